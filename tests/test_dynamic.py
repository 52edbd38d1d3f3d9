"""RigL and SET callbacks: updates on schedule, constant counts, masks equal to the core's on recorded inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGET_SHAPES, TARGET_TOTAL, make_dataloader, make_module, make_trainer

from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.callbacks.dynamic import SET, RigL
from lightning_pai.callbacks.gradual import GradualMagnitudePruning
from lightning_pai.core.dst import (
    cosine_fraction,
    cubic_sparsity,
    drop_counts,
    drop_magnitude,
    drop_set,
    grow,
    random_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 40  # 5 epochs of 8 batches


class _Recorder(CallbackBase):
    """Put *before* the DST callback: sees dense grads and post-step weights with the old masks."""

    def __init__(self, cb):
        self.cb = cb
        self.grads, self.weights, self.masks_before, self.masks_after, self.state = {}, {}, {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        self.grads[step] = {n: p.grad.detach().clone() for n, p in self.cb.masks.params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.weights[step] = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}
        self.masks_before[step] = self.cb.masks.state_dict()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step  # steps done so far: the masks after update `step`
        self.masks_after[step] = self.cb.masks.state_dict()
        opt = trainer.optimizers[0]
        self.state[step] = {
            n: opt.state[p]["momentum_buffer"].clone()
            for n, p in self.cb.masks.params.items()
            if p in opt.state and "momentum_buffer" in opt.state[p]
        }
        self.current = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}
        self.weights_at_start = getattr(self, "weights_at_start", {})
        self.weights_at_start[step] = self.current


def _run(cb, steps=STEPS, **trainer_kwargs):
    module = make_module(seed=0)
    recorder = _Recorder(cb)
    trainer = make_trainer(max_steps=steps, callbacks=[recorder, cb], **trainer_kwargs)
    trainer.fit(module, make_dataloader())
    return recorder, module


def _kept(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def test_rigl_updates_match_core_on_recorded_inputs():
    cb = RigL(0.8, delta_t=10, t_end=0.75, verbose=False)
    rec, module = _run(cb)
    t_end = int(0.75 * STEPS)
    assert cb._t_end_steps == t_end == 30
    initial = rec.masks_after[0]
    assert sum(_kept(initial).values()) == round(0.2 * TARGET_TOTAL)
    changed = []
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        assert _kept(after) == _kept(initial)  # every layer's count is constant
        if step in (10, 20, 30):
            fraction = cosine_fraction(0.3, step, t_end)
            dropped = drop_magnitude(rec.weights[step], before, drop_counts(before, fraction))
            counts = {n: int(before[n].sum()) - int(dropped[n].sum()) for n in before}
            expected = grow({n: g.abs() for n, g in rec.grads[step].items()}, dropped, counts)
            assert all(torch.equal(after[n], expected[n]) for n in after), step
            changed.append(any(not torch.equal(after[n], before[n]) for n in after))
            grown = {n: after[n] & ~before[n] for n in after}
            for n, g in grown.items():  # grown weights start at zero with zero momentum
                assert torch.equal(rec.weights_at_start[step][n][g], torch.zeros(int(g.sum())))
                if n in rec.state[step]:
                    assert torch.equal(rec.state[step][n][g], torch.zeros(int(g.sum())))
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    assert changed == [True, True, False]  # cos schedule: the fraction is 0 at t_end = 30
    assert cb.updates == 3
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))
    assert 0.2 < cb.itop <= 1.0 and cb.itop > sum(_kept(initial).values()) / TARGET_TOTAL


def test_set_updates_each_epoch_with_sign_wise_drop_and_random_growth():
    cb = SET(0.8, seed=3, verbose=False)
    rec, _ = _run(cb, steps=STEPS, max_epochs=5)
    initial = rec.masks_after[0]
    # uniform per-layer counts? no: ER budgets; every layer keeps its count through the updates
    epoch_ends = [8, 16, 24, 32]  # after the last epoch (step 40) there is no update
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        assert _kept(after) == _kept(initial)
        if step in epoch_ends:
            dropped = drop_set(rec.weights[step], before, 0.3)
            counts = {n: int(before[n].sum()) - int(dropped[n].sum()) for n in before}
            expected = grow(random_scores(before, 3 * 1_000_003 + step), dropped, counts)
            assert all(torch.equal(after[n], expected[n]) for n in after), step
            assert any(not torch.equal(after[n], before[n]) for n in after)
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    assert cb.updates == 4


def test_rigl_resume_gives_the_same_topology_sequence(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    full = RigL(0.8, delta_t=4, t_end=1.0, verbose=False)
    full_rec, _ = _run(full)

    class _Stop(CallbackBase):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 21:
                raise RuntimeError("crash")

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    first = RigL(0.8, delta_t=4, t_end=1.0, verbose=False)
    module = make_module(seed=0)
    trainer = make_trainer(max_steps=STEPS, callbacks=[first, _Stop(), ckpt], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(module, make_dataloader())
    path = tmp_path / "epoch=1-step=16.ckpt"  # saved after step 16 (the update at 16 included); crash at 21
    resumed = RigL(0.8, delta_t=4, t_end=1.0, verbose=False)
    rec = _Recorder(resumed)
    trainer = make_trainer(max_steps=STEPS, callbacks=[rec, resumed])
    trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=path)
    assert sorted(rec.masks_after) == list(range(16, STEPS))
    for step in range(16, STEPS):
        assert all(torch.equal(rec.masks_after[step][n], full_rec.masks_after[step][n]) for n in TARGET_SHAPES), step
    assert resumed.updates == full.updates
    assert resumed.itop == full.itop


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"growth": "momentum"}, "`growth` must be one of"),
        ({"alpha": 1.5}, "`alpha`"),
        ({"delta_t": 0}, "`delta_t` must be a positive integer"),
        ({"t_end": 0}, "`t_end` is a fraction"),
        ({"update_on": "batch"}, "`update_on` must be one of"),
        ({"init": "nope"}, "nope"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RigL(0.9, **kwargs)


def test_gradual_magnitude_pruning_follows_the_cubic_schedule():
    cb = GradualMagnitudePruning(0.9, start=5, end=25, frequency=5, distribution="uniform")
    rec, module = _run(cb)
    assert cb.target_sparsity(15) == pytest.approx(0.9 - 0.9 * 0.5**3)
    previous = rec.masks_after[0]
    assert sum(_kept(previous).values()) == TARGET_TOTAL  # starts dense
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        if step in (5, 10, 15, 20, 25):
            s = cubic_sparsity(step, 0.0, 0.9, 5, 25)
            for n, shape in TARGET_SHAPES.items():  # every layer reaches s_t exactly (uniform)
                size = torch.Size(shape).numel()
                assert int(after[n].sum()) == size - round(s * size), (step, n)
                assert not (after[n] & ~before[n]).any()  # only shrinks
                w = rec.weights[step][n].abs()
                removed = before[n] & ~after[n]
                if removed.any():  # the smallest survivors went
                    assert w[removed].max() <= w[after[n]].min()
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    params = dict(module.named_parameters())
    assert sum(int(m.sum()) for m in cb.masks._masks.values()) == sum(
        torch.Size(s).numel() - round(0.9 * torch.Size(s).numel()) for s in TARGET_SHAPES.values()
    )
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_gradual_magnitude_pruning_bad_arguments():
    with pytest.raises(ValueError, match="`initial_sparsity`"):
        GradualMagnitudePruning(0.5, initial_sparsity=0.8)
    with pytest.raises(ValueError, match="`end` as a float is a fraction"):
        GradualMagnitudePruning(0.5, end=1.5)
    with pytest.raises(ValueError, match="must come after `start`"):
        _run(GradualMagnitudePruning(0.5, start=30, end=20))


def test_rigl_init_from_snip_masks():
    from lightning_pai import PruneAtInit

    snip = PruneAtInit("snip", 0.8, distribution="erk", verbose=False)
    _run(snip, steps=1)
    cb = RigL(0.8, init="snip", distribution="erk", delta_t=1000, verbose=False)
    rec, _ = _run(cb, steps=1)
    assert all(torch.equal(rec.masks_after[0][n], snip.masks[n].cpu()) for n in TARGET_SHAPES)


def test_multiple_optimizers_rejected_before_training():
    module = make_module(seed=0)
    module.automatic_optimization = False

    def training_step(batch, batch_idx):
        return None

    module.training_step = training_step
    module.configure_optimizers = lambda: [
        torch.optim.SGD(module.fc1.parameters(), lr=0.1),
        torch.optim.SGD(module.fc2.parameters(), lr=0.1),
    ]
    trainer = make_trainer(max_steps=2, callbacks=[RigL(0.8, verbose=False)])
    with pytest.raises(ValueError, match="supports one optimizer; `configure_optimizers` returned 2"):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0
