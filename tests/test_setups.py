"""Every callback under the training set-ups users have: precision, accumulation, clipping, torch.compile,
step-bounded runs, validate/test after fit, repeated fits, both Lightning namespaces."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    NAMESPACES,
    TARGET_TOTAL,
    assert_enforced,
    every_callback,
    import_ns,
    make_dataloader,
    make_module,
    make_trainer,
    topology_methods,
)

import lightning_pai
from lightning_pai.callbacks import CALLBACKS as PUBLIC_CALLBACKS
from lightning_pai.callbacks._compat import CallbackBase

pytestmark = pytest.mark.usefixtures("one_thread")

CALLBACKS = every_callback()  # 16 optimizer steps (2 epochs of 8 batches), sparsity 0.8
DYNAMIC = topology_methods()


def test_every_public_callback_is_in_the_test_list():
    """A new method is picked up by every suite that parametrizes over `every_callback` the day it is added."""
    classes = {type(factory()) for factory in CALLBACKS.values()}
    assert classes == {cls for cls in PUBLIC_CALLBACKS if cls.card.family != "gradient_only"}  # FISH: test_fish.py
    exported = {
        obj
        for name in lightning_pai.__all__
        if isinstance(obj := getattr(lightning_pai, name), type) and issubclass(obj, lightning_pai.SparseCallback)
    }
    bases = {
        lightning_pai.SparseCallback,
        lightning_pai.TopologyCallback,
        lightning_pai.DynamicSparseTraining,
        lightning_pai.LearnedMask,
    }
    channel_methods = {lightning_pai.ChannelPruning, lightning_pai.EarlyBird}  # count channels: test_channels.py
    assert exported - bases - channel_methods == set(PUBLIC_CALLBACKS)
    prescribed = [factory() for factory in CALLBACKS.values() if factory().card.sparsity_argument is not None]
    assert all(cb.final_sparsity == pytest.approx(0.8) for cb in prescribed)


def _check_enforced(cb, module, sparsity: float | None = None) -> None:
    sparsity = cb.final_sparsity if sparsity is None else sparsity
    kept = sum(int(m.sum()) for _, m in cb.masks.items())
    if cb.card.exact_sparsity:
        assert abs(kept - (1 - sparsity) * TARGET_TOTAL) <= 3, kept  # per-layer rounding (GMP, learned)
    else:
        assert 0 < kept < TARGET_TOTAL
    assert_enforced(cb, module)


def _fit(name: str, ns: str = "lightning.pytorch", module=None, **trainer_kwargs):
    cb = CALLBACKS[name]()
    module = make_module(ns, seed=0) if module is None else module
    trainer = make_trainer(ns, callbacks=[cb], **{"max_epochs": 2, "max_steps": -1, **trainer_kwargs})
    trainer.fit(module, make_dataloader(), make_dataloader(n=16))
    return cb, module, trainer


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_both_namespaces(name, ns):
    cb, module, trainer = _fit(name, ns)
    assert isinstance(cb, import_ns(ns).Callback)
    assert trainer.global_step == 16
    _check_enforced(cb, module)


SETUPS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    "accumulate": {"accumulate_grad_batches": 2},
    "clip-norm": {"gradient_clip_val": 0.5},
    "clip-value": {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"},
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_training_setups(name, setup):
    cb, module, trainer = _fit(name, **SETUPS[setup])
    assert trainer.global_step == (8 if setup == "accumulate" else 16)
    _check_enforced(cb, module)
    if name in DYNAMIC and not cb.plan().when.at_epoch_end:
        assert cb.updates >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit AMP with a GradScaler needs CUDA in Lightning")
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_16_mixed_on_cuda(name):
    cb, module, trainer = _fit(name, accelerator="gpu", devices=1, precision="16-mixed")
    assert trainer.global_step == 16
    _check_enforced(cb, module)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_compiled_module(name):
    module = make_module(seed=0)
    compiled = torch.compile(module, backend="aot_eager")
    cb, _, trainer = _fit(name, module=compiled)
    assert trainer.global_step == 16
    _check_enforced(cb, module)  # the masks act on the original module's parameters
    assert all(n.startswith(("conv", "fc")) for n in cb.masks.names)  # no "_orig_mod." prefix


def test_compiled_module_with_inductor():
    pytest.importorskip("torch._inductor")
    module = make_module(seed=0)
    cb, _, _ = _fit("RigL", module=torch.compile(module))
    assert cb.updates == 7
    _check_enforced(cb, module, 0.8)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_max_steps_without_epochs(name):
    if CALLBACKS[name]().card.family == "lottery":  # rounds are epochs: a step-bounded run is refused
        with pytest.raises(ValueError, match="max_steps"):
            _fit(name, max_epochs=-1, max_steps=12)
        return
    cb, module, trainer = _fit(name, max_epochs=-1, max_steps=12)
    assert trainer.global_step == 12
    _check_enforced(cb, module)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_validate_and_test_after_fit_leave_the_sparse_model_alone(name):
    cb, module, trainer = _fit(name)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    masks = cb.masks.state_dict()
    (val,) = trainer.validate(module, make_dataloader(n=16), verbose=False)
    (test,) = trainer.test(module, make_dataloader(n=16), verbose=False)
    assert val["val_loss"] > 0 and test["test_loss"] > 0
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert all(torch.equal(m, masks[n]) for n, m in cb.masks.state_dict().items())


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_second_fit_continues_from_the_masks(name):
    """Documented behaviour: a second ``fit`` with the same callback never re-initialises the masks.

    PruneAtInit and LotteryTicket keep the final masks fixed (no new pruning, no rounds repeated);
    the dynamic callbacks continue rewiring from them at the same sparsity.
    """
    cb = CALLBACKS[name]()
    module = make_module(seed=0)
    make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1).fit(module, make_dataloader())
    first = cb.masks.state_dict()
    updates = getattr(cb, "updates", None)
    trainer = make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1)
    trainer.fit(module, make_dataloader())
    assert trainer.global_step == 16
    _check_enforced(cb, module)
    same = all(torch.equal(m, first[n]) for n, m in cb.masks.state_dict().items())
    if name in DYNAMIC:
        assert cb.updates > updates
    if cb.card.family == "learned":  # the scores keep training: the masks may change, the counts stay
        if cb.card.exact_sparsity:
            assert {n: int(m.sum()) for n, m in cb.masks.items()} == {n: int(m.sum()) for n, m in first.items()}
    elif name not in DYNAMIC or cb.plan().rewire is None:  # nothing grows back: the final masks stay
        assert same
    else:
        kept, kept_first = {n: int(m.sum()) for n, m in cb.masks.items()}, {n: int(m.sum()) for n, m in first.items()}
        assert sum(kept.values()) == sum(kept_first.values())  # at the final sparsity, rewiring keeps the total
        if cb.card.keeps_layer_counts:
            assert kept == kept_first
    if cb.card.family == "lottery":
        assert cb.round == 1 and len(cb.results) == 2


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_sharded_strategies_fail_at_setup(name):
    pl = import_ns("lightning.pytorch")
    FSDPStrategy = type("FSDPStrategy", (pl.strategies.SingleDeviceStrategy,), {})  # strategy="fsdp" needs a GPU
    trainer = make_trainer(callbacks=[CALLBACKS[name]()], strategy=FSDPStrategy(device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="supports single-device training, the DDP family .* and FSDP2"):
        trainer.fit(make_module(seed=0), make_dataloader())
    assert trainer.global_step == 0


class _Trace(CallbackBase):
    """Masks and target weights at every batch start, and a crash at ``crash_step`` if given."""

    def __init__(self, cb, crash_step: int | None = None):
        self.cb, self.crash_step, self.masks, self.weights = cb, crash_step, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_step:
            raise RuntimeError("simulated crash")
        self.masks[trainer.global_step] = self.cb.masks.state_dict()

    def on_train_end(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_crash_and_resume_reproduces_the_uninterrupted_run(tmp_path, name):
    """Crash at step 11, resume from the checkpoint saved after step 8 (the last batch of epoch 0; a mid-epoch one
    would replay other batches, Lightning's dataloaders not being resumable): every later mask and the final
    weights equal the uninterrupted run's, bit for bit."""
    pl = import_ns("lightning.pytorch")

    def run(crash_step=None, ckpt_path=None, folder="full"):
        cb = CALLBACKS[name]()
        trace = _Trace(cb, crash_step)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=4, save_top_k=-1)
        trainer = make_trainer(
            callbacks=[cb, trace, ckpt], max_epochs=2, max_steps=-1, enable_checkpointing=True, logger=False
        )
        trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=ckpt_path)
        return cb, trace, trainer

    full, full_trace, _ = run()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_step=11, folder="crashed")
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt"]
    resumed, trace, trainer = run(ckpt_path=tmp_path / "crashed" / "epoch=0-step=8.ckpt", folder="resumed")
    assert trainer.global_step == 16 and sorted(trace.masks) == list(range(8, 16))
    for step in range(8, 16):
        assert all(torch.equal(trace.masks[step][n], full_trace.masks[step][n]) for n in full_trace.masks[step])
    assert all(torch.equal(trace.weights[n], w) for n, w in full_trace.weights.items())
    if name in DYNAMIC:
        assert resumed.updates == full.updates


@pytest.mark.parametrize("name", ["PruneAtInit", "RigL", "LotteryTicket"])
def test_make_permanent_hands_back_a_plain_model(name):
    cb, module, _ = _fit(name)
    plain = cb.make_permanent(module)
    assert plain is not module and type(plain) is type(module)
    for n, p in plain.named_parameters():
        assert torch.equal(p, module.get_parameter(n)), n  # the same weights, zeros included
        assert not getattr(p, "_post_accumulate_grad_hooks", None), n  # nothing attached
    for n, m in cb.masks.items():
        assert torch.equal(plain.get_parameter(n)[~m].detach(), torch.zeros(int((~m).sum())))
    assert all(not mod._forward_pre_hooks for mod in plain.modules())


@pytest.mark.parametrize("resume", [None, "checkpoint", "recompute"])
def test_resuming_with_changed_arguments_is_refused_or_done_as_asked(tmp_path, resume):
    """A RigL(0.8) checkpoint resumed with RigL(0.9): Lightning alone would drop the saved masks silently."""
    pl = import_ns("lightning.pytorch")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    first = lightning_pai.RigL(0.8, delta_t=2, t_end=1.0, verbose=False)
    make_trainer(callbacks=[first, ckpt], max_epochs=1, max_steps=-1, enable_checkpointing=True).fit(
        make_module(seed=0), make_dataloader()
    )
    saved = first.masks.state_dict()
    cb = lightning_pai.RigL(0.9, delta_t=2, t_end=1.0, verbose=False, resume=resume)
    seen = {}

    class Probe(CallbackBase):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("masks", cb.masks.state_dict())

    trainer = make_trainer(callbacks=[cb, Probe()], max_epochs=2, max_steps=-1)
    path = tmp_path / "epoch=0-step=8.ckpt"
    if resume is None:
        with pytest.raises(ValueError, match=r"state saved with other arguments .* resume='checkpoint'"):
            trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=path)
        assert not seen  # refused before any training step
        return
    trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=path)
    kept = sum(int(m.sum()) for m in seen["masks"].values())
    if resume == "checkpoint":  # the checkpoint's masks, as saved
        assert all(torch.equal(seen["masks"][n], m) for n, m in saved.items())
    else:  # new masks at the new sparsity
        assert kept == round(0.1 * TARGET_TOTAL)
