"""FISH masks (Sung et al. 2021): the Fisher-chosen entries train, every other entry stays bit-identical.

Checked against a brute-force reference (one backward pass per sample, a global top-k), under SGD with momentum
and weight decay, AdamW with weight decay, Adam and RMSprop, in Lightning, a plain loop, the HF Trainer and
2-process DDP, through a crash and resume, and through a diff file applied onto the pretrained model.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import NUM_CLASSES, import_ns, make_dataloader, make_module, make_trainer, run_script
from torch import nn
from torch.nn import functional as F

import lightning_pai
from lightning_pai import FISH, Sparsifier, load_diff, make_permanent, save_diff, save_sparse, to_sparse_inference
from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.core.fish import TrainableMasks, TrainableReport, empirical_fisher
from lightning_pai.deploy.export import DIFF_FORMAT

pytestmark = pytest.mark.usefixtures("one_thread")

#: make_module's parameters: conv (4x2x3 + 4), fc1 (32x56 + 32), fc2 (4x32 + 4): 1,984 entries, head fc2: 132.
TOTAL, HEAD = 1984, 132
HEAD_NAMES = ["fc2.weight", "fc2.bias"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32)


def reference_fisher(module: nn.Module, samples: int) -> dict[str, torch.Tensor]:
    """Brute force: eval mode, one backward pass per sample (batch of one), F += grad ** 2."""
    module = copy.deepcopy(module).eval()
    fisher = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    xs, ys = [], []
    for x, y in make_dataloader():
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs)[:samples], torch.cat(ys)[:samples]
    for i in range(samples):
        module.zero_grad()
        F.cross_entropy(module(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in module.named_parameters():
            fisher[n] += p.grad**2
    return fisher


def reference_masks(fisher: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The head in full, then the top k = int(density * total) - head of the others' raw values, over all of them."""
    rest = [n for n in fisher if n not in HEAD_NAMES]
    flat = torch.cat([fisher[n].reshape(-1) for n in rest])
    k = int(density * TOTAL) - HEAD
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for n in rest:
        out[n] = chosen[start : start + fisher[n].numel()].view(fisher[n].shape)
        start += fisher[n].numel()
    return {n: out.get(n, torch.ones(fisher[n].shape, dtype=torch.bool)) for n in fisher}


# --------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_masks_are_the_brute_force_fisher_top_k(per_sample):
    module = make_module(seed=0)
    fisher = reference_fisher(module, 24)
    method = FISH(density=0.2, samples=24, per_sample=per_sample, verbose=False)
    Sparsifier(method, module, torch.optim.SGD(module.parameters(), lr=0.1), data=make_dataloader())  # 3 batches
    masks = method.masks
    assert isinstance(masks, TrainableMasks) and masks.names == list(fisher)
    assert sum(int(m.sum()) for _, m in masks.items()) == int(0.2 * TOTAL) == 396  # 264 chosen + the head's 132
    assert all(bool(masks[n].all()) for n in HEAD_NAMES) and method.session.head_names == HEAD_NAMES
    expected = reference_masks(fisher, 0.2)
    assert all(torch.equal(masks[n], expected[n]) for n in fisher)
    assert (method.session.fisher_samples, method.session.fisher_per_sample) == (24, per_sample)
    ours = empirical_fisher(module, dict(module.named_parameters()), list(make_dataloader()), None, 24, per_sample)
    for n, f in fisher.items():
        if per_sample == "loop":  # the same backward passes, summed in the same order
            assert torch.equal(ours.values[n], f), n
        else:
            assert torch.allclose(ours.values[n], f, rtol=1e-5, atol=1e-12), n


def test_budget_is_exact_and_the_head_can_be_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    model.append(nn.Linear(64, 3))
    total = sum(p.numel() for p in model.parameters())  # 1088 + 128 + 4160 + 195 = 5571
    data = [(torch.randn(8, 16), torch.randint(0, 3, (8,))) for _ in range(2)]
    for head, head_size in ((None, 195), ("3", 4160), (["3.weight", "5.*"], 4096 + 195), ((), 0)):
        method = FISH(density=0.9 if head_size > 1000 else 0.1, samples=16, head=head, verbose=False)
        Sparsifier(method, model, torch.optim.SGD(model.parameters(), lr=0.0), data=data)
        kept = sum(int(m.sum()) for _, m in method.masks.items())
        assert kept == int(method.density * total), head
        named = method.session.head_names
        assert sum(method.masks[n].numel() for n in named) == head_size and all(method.masks[n].all() for n in named)
    report = method.report()
    assert isinstance(report, TrainableReport) and report.trainable == int(0.1 * total) == 557
    assert report.trainable_fraction == pytest.approx(557 / 5571)
    assert set(report.metrics()) == {"fish/trainable_fraction", "fish/trainable"}
    assert "Trainable / Total" in str(report) and "parsity" not in str(report)
    assert report.summary().startswith("trainable fraction 0.1000 (557 of 5,571 entries")


def test_bad_arguments_fail_before_training():
    for density in (0, 1.5, -0.1, "0.1"):
        with pytest.raises(ValueError, match=re.escape("`density` (fraction of entries trained) must be a number")):
            FISH(density=density)
    with pytest.raises(ValueError, match="`samples`"):
        FISH(samples=0)
    with pytest.raises(ValueError, match="`per_sample` must be one of"):
        FISH(per_sample="batched")
    module = make_module(seed=0)
    trainer = make_trainer(callbacks=[FISH(density=0.005, verbose=False)], max_steps=4)
    message = (
        "`FISH(density=0.005)` trains int(0.005 x 1,984) = 9 of the 1,984 trainable entries, but the head alone "
        "(`head`: fc2.weight, fc2.bias) has 132: raise `density` to at least 0.0666, or name a smaller head"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="`head` entry 'decoder' matches no parameter or module"):
        make_trainer(callbacks=[FISH(0.2, head="decoder")]).fit(make_module(seed=0), make_dataloader())
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`FISH` estimates the Fisher information .* pass `data=`"):
        Sparsifier(FISH(0.2, verbose=False), module, opt)
    with pytest.raises(ValueError, match="the training data gave none"):
        Sparsifier(FISH(0.2, verbose=False), module, opt, data=[])
    with pytest.raises(ValueError, match=r"`FISH` chooses the entries it trains by their gradients"):
        module.conv.weight.requires_grad_(False)
        Sparsifier(FISH(0.2, frozen="prune", verbose=False), module, opt, data=make_dataloader())


# ------------------------------------------------------------------------------------------------ frozen
OPTIMIZERS = {
    "sgd-momentum-wd": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4), True),
    "adamw-wd": (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), True),
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-2), False),  # gradient masking alone: the state stays 0
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-3), True),  # not SGD/Adam/AdamW: written back to be safe
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unselected_entries_stay_bit_identical(name):
    make_optimizer, anchored = OPTIMIZERS[name]
    module = make_module(seed=0)
    module.configure_optimizers = lambda: make_optimizer(module.parameters())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = FISH(density=0.2, samples=16, verbose=False)
    seen = []

    class Probe(CallbackBase):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(bool(cb.session._anchors))

    trainer = make_trainer(callbacks=[cb, Probe()], max_epochs=2, max_steps=-1)
    trainer.fit(module, make_dataloader())
    assert trainer.global_step == 16 and set(seen) == {anchored}
    for n, p in module.named_parameters():
        m = cb.masks[n]
        assert torch.equal(bits(p[~m]), bits(before[n][~m])), n  # frozen: the very same bits
        assert bool((p[m] != before[n][m]).all()), n  # trained: every selected entry moved
    assert cb.report().trainable == 396


@pytest.mark.parametrize(
    "setup",
    [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}, {"gradient_clip_val": 0.5}],
    ids=["bf16-mixed", "accumulate", "clip-norm"],
)
def test_training_setups_keep_the_frozen_entries(setup):
    module = make_module(seed=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = FISH(density=0.2, samples=16, verbose=False)
    make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1, **setup).fit(module, make_dataloader())
    for n, p in module.named_parameters():
        m = cb.masks[n]
        assert torch.equal(bits(p[~m]), bits(before[n][~m])), n
        assert bool((p[m] != before[n][m]).all()), n


def test_the_masks_are_never_treated_as_pruning_masks(tmp_path):
    module = make_module(seed=0)
    cb = FISH(density=0.2, samples=16, verbose=False)
    make_trainer(callbacks=[cb], max_epochs=1, max_steps=-1).fit(module, make_dataloader())
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert cb.final_sparsity is None
    plain = cb.make_permanent(module)  # nothing to bake in: the weights as they are
    assert all(torch.equal(p, weights[n]) for n, p in plain.named_parameters())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in plain.parameters())
    for call in (
        lambda: make_permanent(module, cb.masks),
        lambda: save_sparse(module, tmp_path / "x.pt", cb.masks),
        lambda: to_sparse_inference(module, cb.masks),
    ):
        with pytest.raises(TypeError, match=r"gradient-only masks \(FISH\): their False entries are frozen"):
            call()
    cb.masks.apply_()  # what a pruning session does to its weights: a no-op here
    cb.session.load_state_dict(cb.state_dict())  # re-applies restored masks to a started session
    assert all(torch.equal(p, weights[n]) for n, p in module.named_parameters())
    assert cb.masks.trainable_fraction == pytest.approx(396 / TOTAL)
    with pytest.raises(TypeError, match="these are pruning masks"):
        save_diff(module, lightning_pai.MaskSet.from_module(module), tmp_path / "d.pt")
    with pytest.raises(TypeError, match="`PruneAtInit` prunes weights"):
        save_diff(module, lightning_pai.PruneAtInit("magnitude", 0.5, verbose=False), tmp_path / "d.pt")


# ----------------------------------------------------------------------------------------------- loops
def test_trainer_and_plain_loop_end_identical():
    by_trainer, module_a = FISH(0.2, samples=16, verbose=False), make_module(seed=0)
    make_trainer(callbacks=[by_trainer], max_epochs=2, max_steps=-1).fit(module_a, make_dataloader())
    by_loop, module_b = FISH(0.2, samples=16, verbose=False), make_module(seed=0)
    optimizer = module_b.configure_optimizers()
    sparsifier = Sparsifier(by_loop, module_b, optimizer, data=make_dataloader())
    for _ in range(2):
        for x, y in make_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(module_b(x), y).backward()
            sparsifier.step()
        sparsifier.epoch_end()
    assert all(torch.equal(by_trainer.masks[n], by_loop.masks[n]) for n in by_trainer.masks.names)
    for (n, a), b in zip(module_a.named_parameters(), module_b.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n
    assert isinstance(sparsifier.report(), TrainableReport)
    again = FISH(0.2, samples=16, verbose=False)  # a plain loop resumed from its state: the masks, no new estimate
    module_c = make_module(seed=1)
    Sparsifier(again, module_c, module_c.configure_optimizers(), data=make_dataloader(), state=sparsifier.state_dict())
    assert again.session.estimates == 0 and by_loop.session.estimates == 1
    assert all(torch.equal(again.masks[n], m) for n, m in by_loop.masks.items())


class _Trace(CallbackBase):
    def __init__(self, crash_step=None):
        self.crash_step, self.weights = crash_step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_step:
            raise RuntimeError("simulated crash")

    def on_train_end(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_crash_and_resume_restores_the_masks_without_a_new_estimate(tmp_path):
    pl = import_ns("lightning.pytorch")

    def run(crash_step=None, ckpt_path=None, folder="full"):
        cb, trace = FISH(0.2, samples=16, verbose=False), _Trace(crash_step)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=8, save_top_k=-1)
        trainer = make_trainer(callbacks=[cb, trace, ckpt], max_epochs=2, max_steps=-1, enable_checkpointing=True)
        trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=ckpt_path)
        return cb, trace

    full, full_trace = run()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_step=11, folder="crashed")
    path = tmp_path / "crashed" / "epoch=0-step=8.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][full.state_key]
    assert saved["head"] == HEAD_NAMES and saved["samples"] == 16
    resumed, trace = run(ckpt_path=path, folder="resumed")
    assert full.session.estimates == 1 and resumed.session.estimates == 0  # restored, not estimated again
    assert all(torch.equal(resumed.masks[n], m) for n, m in saved["masks"].items())
    assert all(torch.equal(trace.weights[n], w) for n, w in full_trace.weights.items())
    assert resumed.report().samples == 16


# ------------------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_uses_rank_zeros_masks_and_keeps_frozen_entries(tmp_path):
    run_script(Path(__file__).with_name("fish_ddp_script.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"fish{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["global_step"], r1["global_step"]) == (0, 1, 8, 8)
    assert (r0["estimates"], r1["estimates"]) == (1, 0) and r0["samples"] == r1["samples"] == 16
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    assert all(torch.equal(r0["masks"][n], r0["own_masks"][n]) for n in r0["masks"])  # rank zero's samples
    assert not all(torch.equal(r1["masks"][n], r1["own_masks"][n]) for n in r1["masks"])  # not rank one's
    assert sum(int(m.sum()) for m in r0["masks"].values()) == 396
    for r in (r0, r1):
        for n, m in r["masks"].items():
            assert torch.equal(bits(r["final"][n][~m]), bits(r["initial"][n][~m])), (r["rank"], n)
            assert bool((r["final"][n][m] != r["initial"][n][m]).all()), (r["rank"], n)
    assert all(torch.equal(bits(r0["final"][n]), bits(r1["final"][n])) for n in r0["final"])


# ------------------------------------------------------------------------------------------------ diffs
class _BN(nn.Module):
    """A classifier with BatchNorm, whose running statistics change in training (they go into the diff)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.classifier = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x.flatten(1)))


def _fine_tuned(tmp_path):
    torch.manual_seed(0)
    pretrained = _BN()
    model = copy.deepcopy(pretrained)
    method = FISH(0.2, samples=32, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sparsifier = Sparsifier(method, model, optimizer, data=make_dataloader())
    for x, y in make_dataloader():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.step()
    save_diff(model, method, tmp_path / "diff.pt", base=pretrained)
    return pretrained, model, method


def test_diff_rebuilds_the_fine_tuned_model_exactly(tmp_path):
    pretrained, model, method = _fine_tuned(tmp_path)
    assert method.session.head_names == ["classifier.weight", "classifier.bias"]
    payload = torch.load(tmp_path / "diff.pt", weights_only=True)
    assert payload["header"]["format"] == DIFF_FORMAT and payload["index"].dtype == torch.int32
    total = sum(p.numel() for p in model.parameters())  # 2112 + 128 + 260 = 2500
    assert payload["header"]["trained"] == int(0.2 * total) == 500  # 240 chosen + the head's 260
    kinds = {e["name"]: e["kind"] for e in payload["entries"]}
    assert kinds["classifier.weight"] == kinds["classifier.bias"] == "dense"  # the head, whole
    assert kinds["body.1.running_mean"] == kinds["body.1.running_var"] == "dense"  # changed by training
    rebuilt = load_diff(copy.deepcopy(pretrained), tmp_path / "diff.pt")
    ours, theirs = rebuilt.state_dict(), model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], pretrained.state_dict()[k]) for k in ours)
    assert kinds["body.1.num_batches_tracked"] == "dense" and "body.0.weight" in kinds
    # 240 chosen entries as (int32 position, value); the head (256 + 4) and the BatchNorm statistics (64 + 64) whole
    assert payload["index"].numel() == 240
    assert {d: v.numel() for d, v in payload["values"].items()} == {"float32": 240 + 260 + 128, "int64": 1}
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert os.path.getsize(tmp_path / "diff.pt") < os.path.getsize(tmp_path / "full.pt")


def test_a_wrong_base_or_an_altered_diff_is_refused(tmp_path):
    pretrained, model, method = _fine_tuned(tmp_path)
    path = tmp_path / "diff.pt"
    other = copy.deepcopy(pretrained)
    other.body[0] = nn.Linear(32, 48)
    with pytest.raises(ValueError, match=r"'body.0.weight' is float32 of shape \(64, 32\); this model's is .*48, 32"):
        load_diff(other, path)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="does not hold the weights .* was made against"):
        load_diff(_BN(), path)  # same architecture, other pretrained weights
    payload = torch.load(path, weights_only=True)
    payload["values"]["float32"][3] += 1.0
    torch.save(payload, tmp_path / "altered.pt")
    untouched = copy.deepcopy(pretrained)
    with pytest.raises(ValueError, match="does not match the checksum written with it"):
        load_diff(untouched, tmp_path / "altered.pt")
    assert all(torch.equal(p, q) for p, q in zip(untouched.parameters(), pretrained.parameters()))  # nothing written
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a lightning_pai diff"):
        load_diff(copy.deepcopy(pretrained), tmp_path / "plain.pt")
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.body[0].weight[~method.masks["body.0.weight"]] += 1.0
    with pytest.raises(ValueError, match="differs from `base` outside its trained entries, in body.0.weight"):
        save_diff(moved, method, tmp_path / "moved.pt", base=pretrained)


# -------------------------------------------------------------------------------------------- HF Trainer
def test_hf_trainer_fine_tunes_a_tiny_bert_and_its_diff_rebuilds_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lightning_pai.hf import SparsityCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.BertForSequenceClassification(config)
    pretrained = copy.deepcopy(model)
    ids = torch.randint(8, 100, (64, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "attention_mask": torch.ones(12, dtype=torch.long), "labels": int(7 in i)} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8, num_train_epochs=1,
        learning_rate=1e-3, weight_decay=0.01, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    fish = FISH(density=0.005, samples=32, verbose=False)
    callback = SparsityCallback(fish)
    trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 8
    total = sum(p.numel() for p in model.parameters())
    assert total == 37922
    assert fish.session.head_names == ["classifier.weight", "classifier.bias"]
    assert fish.session.fisher_per_sample == "loop"  # BERT's masking code cannot be vmapped: the fallback
    assert sum(int(m.sum()) for _, m in callback.masks.items()) == int(0.005 * total) == 189  # 123 + head 66
    assert len(callback.masks.names) == len(list(model.parameters()))  # embeddings, biases, norms included
    params = dict(pretrained.named_parameters())
    for n, p in model.named_parameters():
        m = callback.masks[n]
        assert torch.equal(bits(p[~m]), bits(params[n][~m])), n  # AdamW with weight decay 0.01: still frozen
    assert bool((model.classifier.weight != pretrained.classifier.weight).all())
    save_diff(model, callback, tmp_path / "diff.pt")
    rebuilt = load_diff(copy.deepcopy(pretrained), tmp_path / "diff.pt").state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in model.state_dict().items())
