"""PruneAtInit inside real (CPU, single-process) Lightning fits, with both Lightning namespaces."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    NAMESPACES,
    TARGET_SHAPES,
    TARGET_TOTAL,
    import_ns,
    make_dataloader,
    make_module,
    make_trainer,
    masks_equal,
)
from torch import nn

import lightning_pai.core.pruning as pai_module
from lightning_pai import PruneAtInit, compute_masks
from lightning_pai.callbacks._compat import check_strategy

KEPT_90 = round(0.1 * TARGET_TOTAL)  # 194 of 1944: the kept count at sparsity 0.9
assert KEPT_90 == 194


# ---------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_thread")


def _callback_base(ns):
    return import_ns(ns).Callback


def make_probe(ns="lightning.pytorch"):
    """A callback counting optimizer steps and checking, on every step, that masked gradients are zero.

    Put it after the pruning callback in ``callbacks=[...]`` so that it sees the gradients after masking.
    """

    class Probe(_callback_base(ns)):
        def __init__(self, pruner=None):
            self.pruner = pruner
            self.steps = 0
            self.batches = 0
            self.first_step_seen = None
            self.masked_grad_max = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first_step_seen is None:
                self.first_step_seen = trainer.global_step
            self.batches += 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.steps += 1
            if self.pruner is not None and self.pruner.masks is not None:
                for name, p in self.pruner.masks.params.items():
                    if p.grad is not None:
                        g = p.grad[~self.pruner.masks[name]]
                        if g.numel():
                            self.masked_grad_max = max(self.masked_grad_max, float(g.abs().max()))

    return Probe


def assert_enforced(module, cb, kept_total=KEPT_90):
    """Masked weights exactly zero; kept weights nonzero; kept counts exact."""
    masks = cb.masks
    assert masks is not None
    assert set(masks.names) == set(TARGET_SHAPES)
    params = dict(module.named_parameters())
    total_kept = 0
    for name, mask in masks.items():
        w = params[name].detach()
        assert mask.dtype == torch.bool and tuple(mask.shape) == TARGET_SHAPES[name]
        assert torch.count_nonzero(w[~mask]) == 0, f"{name}: a masked weight is nonzero"
        # a kept weight is exactly zero only with negligible probability
        assert int(torch.count_nonzero(w)) == int(mask.sum()), name
        total_kept += int(mask.sum())
    assert total_kept == kept_total
    # only the targets are masked: biases are untouched (all nonzero)
    for name in ("conv.bias", "fc1.bias", "fc2.bias"):
        assert torch.count_nonzero(params[name]) == params[name].numel()


def initial_magnitudes(module):
    return {n: module.get_parameter(n).detach().abs().clone() for n in TARGET_SHAPES}


def fit(ns, module, callbacks, **kwargs):
    trainer = make_trainer(ns, callbacks=callbacks, **kwargs)
    trainer.fit(module, make_dataloader())
    return trainer


def _boom(*args, **kwargs):
    raise AssertionError("re-pruned: the scorer must not be called again")


def forbid_rescoring(monkeypatch):
    """Make PruneAtInit's pruning step fail from now on (construct the callback *before* calling this)."""
    monkeypatch.setattr(pai_module, "prune", _boom)


# --------------------------------------------------------- both namespaces
@pytest.mark.parametrize("ns", NAMESPACES)
def test_same_callback_class_works_with_both_trainers(ns):
    pl = import_ns(ns)
    module = make_module(ns, seed=0)
    expected = compute_masks(initial_magnitudes(module), 0.9, "global")
    cb = PruneAtInit("magnitude", sparsity=0.9, distribution="global", verbose=False)
    assert isinstance(cb, pl.Callback)
    probe = make_probe(ns)(cb)
    trainer = fit(ns, module, [cb, probe], max_steps=10)
    assert isinstance(trainer, pl.Trainer)
    assert trainer.global_step == 10 and probe.steps == 10
    assert sum(cb.masks.kept().values()) == KEPT_90
    assert masks_equal(cb.masks.state_dict(), expected)  # the 194 largest |w| of the initial weights
    assert probe.masked_grad_max == 0.0
    assert_enforced(module, cb)


# ------------------------------------------------------ optimizer states
STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_masked_weights_and_optimizer_state_stay_zero(opt):
    module = make_module(optimizer=opt, seed=1)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    probe = make_probe()(cb)
    trainer = fit("lightning.pytorch", module, [cb, probe], max_steps=50, max_epochs=-1)
    assert trainer.global_step == 50 and probe.steps == 50
    assert probe.masked_grad_max == 0.0
    assert_enforced(module, cb)
    optimizer = trainer.optimizers[0]
    for name, p in cb.masks.params.items():
        mask = cb.masks[name]
        state = optimizer.state[p]
        for key in STATE_KEYS[opt]:
            value = state[key]
            assert value.shape == p.shape
            assert torch.count_nonzero(value[~mask]) == 0, f"{opt} {key} of {name} nonzero at a masked weight"
            assert torch.count_nonzero(value[mask]) > 0, f"{opt} {key} of {name}: state never updated?"


# --------------------------------------------- clipping and accumulation
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(gradient_clip_val=0.5), id="clip-norm"),
        pytest.param(dict(gradient_clip_val=0.01, gradient_clip_algorithm="value"), id="clip-value"),
        pytest.param(dict(accumulate_grad_batches=2), id="accumulate"),
        pytest.param(dict(gradient_clip_val=0.5, accumulate_grad_batches=2), id="clip-and-accumulate"),
    ],
)
def test_clipping_and_accumulation_keep_masks(kwargs):
    module = make_module(optimizer="sgd", seed=2)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    probe = make_probe()(cb)
    trainer = fit("lightning.pytorch", module, [cb, probe], max_steps=12, max_epochs=-1, **kwargs)
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    assert trainer.global_step == 12 and probe.steps == 12
    assert probe.batches == 12 * accumulate
    assert probe.masked_grad_max == 0.0
    assert_enforced(module, cb)
    optimizer = trainer.optimizers[0]
    for name, p in cb.masks.params.items():
        assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"][~cb.masks[name]]) == 0
        if "gradient_clip_algorithm" in kwargs:  # clipped by value: every gradient entry within the bound
            assert float(p.grad.abs().max()) <= kwargs["gradient_clip_val"] + 1e-7


# ----------------------------------------------------------------- logging
def test_csv_logger_gets_sparsity_metrics(tmp_path):
    pl = import_ns("lightning.pytorch")
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    module = make_module(seed=3)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    fit("lightning.pytorch", module, [cb], max_steps=5, logger=logger)
    metrics_file = Path(logger.log_dir) / "metrics.csv"
    assert metrics_file.exists()
    with open(metrics_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert "sparsity/global" in rows[0]
    for name in TARGET_SHAPES:
        assert f"sparsity/{name}" in rows[0], f"no per-layer column for {name}"
    logged = [r for r in rows if r["sparsity/global"] not in ("", None)]
    assert len(logged) == 1
    row = logged[0]
    assert int(row["step"]) == 0
    expected_global = 1 - KEPT_90 / TARGET_TOTAL
    assert abs(float(row["sparsity/global"]) - expected_global) < 1e-6
    assert abs(float(row["sparsity/global"]) - (1 - cb.masks.density)) < 1e-6
    for name, kept in cb.masks.kept().items():
        total = torch.Size(TARGET_SHAPES[name]).numel()
        assert abs(float(row[f"sparsity/{name}"]) - (1 - kept / total)) < 1e-6


# ------------------------------------------------------------- reporting
def test_table_printed_and_report_counts(capsys):
    module = make_module(seed=4)
    cb = PruneAtInit("magnitude", sparsity=0.9)
    with pytest.raises(RuntimeError, match="no masks yet"):
        cb.report()
    fit("lightning.pytorch", module, [cb], max_steps=2)
    out = capsys.readouterr().out
    assert "PruneAtInit: 3 layers" in out
    assert "Total" in out and "fc1.weight" in out and "conv.weight" in out
    assert f"{KEPT_90:,} / {TARGET_TOTAL:,}" in out
    report = cb.report()
    assert [r.name for r in report.rows] == list(TARGET_SHAPES)
    kept = cb.masks.kept()
    for row in report.rows:
        assert row.kept == kept[row.name] == int(torch.count_nonzero(module.get_parameter(row.name)))
        assert row.total == torch.Size(TARGET_SHAPES[row.name]).numel()
        assert row.shape == TARGET_SHAPES[row.name]
    assert report.kept == KEPT_90 and report.total == TARGET_TOTAL
    assert report.sparsity == pytest.approx(1 - KEPT_90 / TARGET_TOTAL, abs=1e-12)


def test_verbose_false_prints_nothing(capsys):
    fit("lightning.pytorch", make_module(seed=4), [PruneAtInit("magnitude", 0.9, verbose=False)], max_steps=1)
    assert "Total" not in capsys.readouterr().out


# ------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("ns", NAMESPACES)
def test_checkpoint_is_plain_and_carries_masks(ns, tmp_path):
    module = make_module(ns, seed=5)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    trainer = fit(ns, module, [cb], max_steps=10)
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)

    assert not [k for k in ckpt["state_dict"] if "weight_orig" in k or "weight_mask" in k]
    assert set(ckpt["state_dict"]) == {n for n, _ in module.named_parameters()}

    fresh = make_module(ns, seed=99)  # un-pruned, different init
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    for name, mask in cb.masks.items():
        w = fresh.get_parameter(name).detach()
        assert torch.count_nonzero(w[~mask]) == 0
        assert torch.equal(w == 0, ~mask)
        assert torch.equal(w, module.get_parameter(name).detach())

    saved = ckpt["callbacks"][cb.state_key]["masks"]
    assert masks_equal(saved, cb.masks.state_dict())
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in saved.values())


def _ckpt_step(path: Path) -> int:
    return int(re.search(r"step=(\d+)", path.name).group(1))


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("ns", NAMESPACES)
def test_crash_and_resume_reuses_masks(ns, tmp_path, monkeypatch):
    pl = import_ns(ns)

    class CrashAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 12:
                raise Crash("simulated crash at step 12")

    module = make_module(ns, seed=6)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    trainer = make_trainer(ns, callbacks=[cb, ckpt_cb, CrashAt()], max_steps=20, enable_checkpointing=True)
    with pytest.raises(Crash):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 12
    first_masks = cb.masks.state_dict()
    assert sum(int(m.sum()) for m in first_masks.values()) == KEPT_90

    ckpts = sorted(tmp_path.glob("*.ckpt"), key=_ckpt_step)
    assert [_ckpt_step(p) for p in ckpts] == [5, 10]
    latest = ckpts[-1]

    # new process state: a new module with another init, a new callback with the same arguments
    module2 = make_module(ns, seed=7)
    assert not masks_equal(compute_masks(initial_magnitudes(module2), 0.9, "global"), first_masks)
    cb2 = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    forbid_rescoring(monkeypatch)
    probe = make_probe(ns)(cb2)
    trainer2 = make_trainer(ns, callbacks=[cb2, probe], max_steps=20)
    trainer2.fit(module2, make_dataloader(), ckpt_path=str(latest))

    assert probe.first_step_seen == 10  # continued from the checkpoint's step
    assert trainer2.global_step == 20 and probe.steps == 10
    assert masks_equal(cb2.masks.state_dict(), first_masks)
    assert probe.masked_grad_max == 0.0
    assert_enforced(module2, cb2)
    optimizer = trainer2.optimizers[0]
    for name, p in cb2.masks.params.items():
        assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"][~cb2.masks[name]]) == 0


def test_second_fit_with_same_callback_reuses_masks(monkeypatch):
    module = make_module(seed=8)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    fit("lightning.pytorch", module, [cb], max_steps=5)
    first = cb.masks.state_dict()
    forbid_rescoring(monkeypatch)

    trainer = fit("lightning.pytorch", module, [cb], max_steps=5)  # a new trainer, same module
    assert trainer.global_step == 5
    assert masks_equal(cb.masks.state_dict(), first)
    assert_enforced(module, cb)

    other = make_module(seed=9)  # a new module: the kept masks are applied to it
    fit("lightning.pytorch", other, [cb], max_steps=5)
    assert masks_equal(cb.masks.state_dict(), first)
    assert_enforced(other, cb)


def test_resume_from_dense_checkpoint_zeroes_restored_optimizer_state(tmp_path):
    """Adding PruneAtInit when resuming a dense run: the restored momentum of pruned weights must be zeroed.

    Lightning (2.x) calls ``on_fit_start`` *before* it restores the optimizer state from ``ckpt_path``
    (``Trainer._run``: ``on_fit_start`` hooks, then ``_checkpoint_connector.restore_training_state()``),
    so ``SparseCallback.on_fit_start``'s ``mask_optimizer_state_`` sees an empty state and the restored
    momentum of the just-pruned weights survives. The weights themselves stay zero only because the
    step post-hook zeroes them again after every step.
    """
    dense = make_module(optimizer="sgd", seed=12)
    trainer = fit("lightning.pytorch", dense, [], max_steps=5)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert any(torch.count_nonzero(s["momentum_buffer"]) for s in ckpt["optimizer_states"][0]["state"].values()), (
        "the dense checkpoint should carry momentum"
    )

    module = make_module(optimizer="sgd", seed=13)
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    probe = make_probe()(cb)
    trainer = make_trainer(callbacks=[cb, probe], max_steps=7)
    trainer.fit(module, make_dataloader(), ckpt_path=str(path))
    assert probe.first_step_seen == 5 and trainer.global_step == 7
    assert_enforced(module, cb)  # passes: the post-hook re-zeroes the weights
    optimizer = trainer.optimizers[0]
    leaked = {
        name: int(torch.count_nonzero(optimizer.state[p]["momentum_buffer"][~cb.masks[name]]))
        for name, p in cb.masks.params.items()
    }
    assert leaked == dict.fromkeys(TARGET_SHAPES, 0), f"momentum of pruned weights not zeroed: {leaked}"


def test_manual_optimization_keeps_masks():
    pl = import_ns("lightning.pytorch")
    base = type(make_module(seed=14))

    class Manual(base):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
            return loss

    assert issubclass(Manual, pl.LightningModule)
    torch.manual_seed(14)
    module = Manual()
    cb = PruneAtInit("magnitude", sparsity=0.9, verbose=False)
    probe = make_probe()(cb)
    trainer = fit("lightning.pytorch", module, [cb, probe], max_steps=10)
    assert trainer.global_step == 10 and probe.steps == 10
    assert probe.masked_grad_max == 0.0
    assert_enforced(module, cb)
    for name, p in cb.masks.params.items():
        assert torch.count_nonzero(trainer.optimizers[0].state[p]["momentum_buffer"][~cb.masks[name]]) == 0


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1, 1.5, "0.5", True, None])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="`sparsity`"):
        PruneAtInit("magnitude", sparsity=sparsity)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="`method`") as info:
        PruneAtInit("nonexistent", sparsity=0.5)
    assert "magnitude" in str(info.value) and "random" in str(info.value)


def test_unknown_distribution_lists_valid_names():
    with pytest.raises(ValueError, match="`distribution`") as info:
        PruneAtInit("magnitude", sparsity=0.5, distribution="nonexistent")
    assert "erk" in str(info.value) and "global" in str(info.value)


def test_bad_selector_type_fails_at_construction():
    with pytest.raises(TypeError, match="`include`"):
        PruneAtInit("magnitude", 0.5, include=[3])


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_pattern_matching_nothing_fails_before_training(arg):
    cb = PruneAtInit("magnitude", 0.5, verbose=False, **{arg: "encoder.*.weight"})
    probe = make_probe()()
    with pytest.raises(ValueError, match=f"`{arg}`.*matches no parameter"):
        fit("lightning.pytorch", make_module(seed=10), [cb, probe], max_steps=5)
    assert probe.steps == 0 and probe.batches == 0
    assert cb.masks is None


def test_model_without_prunable_layers_fails_at_fit():
    pl = import_ns("lightning.pytorch")

    class EmbeddingOnly(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.norm(self.emb(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 10, (16,)), torch.randint(0, 4, (16,))), batch_size=4
    )
    probe = make_probe()()
    trainer = make_trainer(callbacks=[PruneAtInit("magnitude", 0.5, verbose=False), probe], max_steps=3)
    with pytest.raises(ValueError, match="no prunable parameter"):
        trainer.fit(EmbeddingOnly(), data)
    assert probe.steps == 0


def test_check_strategy_rejects_sharded_and_unknown_strategies():
    pl = import_ns("lightning.pytorch")
    FSDPStrategy = type("FSDPStrategy", (), {})
    with pytest.raises(RuntimeError, match="`PruneAtInit`.*`FSDPStrategy`"):
        check_strategy(FSDPStrategy(), "PruneAtInit")
    # a sharded strategy that derives from a supported one is still rejected
    DeepSpeedStrategy = type("DeepSpeedStrategy", (pl.strategies.DDPStrategy,), {})
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy), "PruneAtInit")
    with pytest.raises(RuntimeError, match="SomethingElse"):
        check_strategy(type("SomethingElse", (), {})(), "PruneAtInit")
    for ns in NAMESPACES:
        strategies = import_ns(ns).strategies
        check_strategy(strategies.SingleDeviceStrategy(device="cpu"), "PruneAtInit")
        check_strategy(strategies.DDPStrategy(), "PruneAtInit")


def test_unsupported_strategy_fails_at_fit():
    # strategy="fsdp" needs a GPU; a CPU strategy that calls itself FSDPStrategy exercises the same check
    pl = import_ns("lightning.pytorch")
    FSDPStrategy = type("FSDPStrategy", (pl.strategies.SingleDeviceStrategy,), {})
    probe = make_probe()()
    trainer = make_trainer(
        callbacks=[PruneAtInit("magnitude", 0.5, verbose=False), probe],
        strategy=FSDPStrategy(device=torch.device("cpu")),
        max_steps=3,
    )
    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        trainer.fit(make_module(seed=11), make_dataloader())
    assert probe.steps == 0
