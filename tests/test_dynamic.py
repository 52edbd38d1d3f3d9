"""RigL and SET callbacks: updates on schedule, constant counts, masks equal to the core's on recorded inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGET_SHAPES, TARGET_TOTAL, make_dataloader, make_module, make_trainer, masks_equal

from lightning_pai import DSR, SET, SNFS, DynamicSparseTraining, GradualMagnitudePruning, GraNet, RigL
from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.core.dst import (
    TopologyUpdater,
    drop_counts,
    drop_magnitude,
    drop_set,
    grow,
    layer_momentum,
    momentum_growth_counts,
    prune_by_magnitude,
    random_scores,
    snfs_rates,
)
from lightning_pai.core.schedules import Cosine, Cubic
from lightning_pai.core.select import active_counts


def cosine_fraction(alpha, step, t_end, minimum=0.0):
    return Cosine(alpha, minimum, t_end)(step, t_end)


def cubic_sparsity(step, initial, final, start, end):
    return Cubic(initial, final, start, end)(step, end)


def _drop(weights, masks, fraction, rounding="floor"):
    return drop_magnitude(weights, masks, drop_counts(active_counts(masks), fraction, rounding))


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
        self.pre_weights = getattr(self, "pre_weights", {})
        self.pre_weights[step] = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.weights[step] = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}
        self.masks_before[step] = self.cb.masks.state_dict()
        opt = trainer.optimizers[0]
        self.opt_state = getattr(self, "opt_state", {})
        self.opt_state[step] = {
            n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
            for n, p in self.cb.masks.params.items()
            if p in opt.state
        }

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
    assert t_end == 30 and cb.session.total_steps == STEPS
    initial = rec.masks_after[0]
    assert sum(_kept(initial).values()) == round(0.2 * TARGET_TOTAL)
    changed = []
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        assert _kept(after) == _kept(initial)  # every layer's count is constant
        if step in (10, 20, 30):
            fraction = cosine_fraction(0.3, step, t_end)
            dropped = _drop(rec.weights[step], before, fraction)
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


_RESUMABLE = {
    "rigl": lambda: RigL(0.8, delta_t=4, t_end=1.0, verbose=False),
    "snfs": lambda: SNFS(0.8, update_on="step", delta_t=4, verbose=False),  # momentum state must survive
    "granet": lambda: GraNet(0.9, initial_sparsity=0.5, end=24, delta_t=4, verbose=False),
}


@pytest.mark.parametrize("method", sorted(_RESUMABLE))
def test_resume_gives_the_same_topology_sequence(tmp_path, method):
    pl = pytest.importorskip("lightning.pytorch")
    full = _RESUMABLE[method]()
    full_rec, _ = _run(full)

    class _Stop(CallbackBase):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 21:
                raise RuntimeError("crash")

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    first = _RESUMABLE[method]()
    module = make_module(seed=0)
    trainer = make_trainer(max_steps=STEPS, callbacks=[first, _Stop(), ckpt], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(module, make_dataloader())
    path = tmp_path / "epoch=1-step=16.ckpt"  # saved after step 16 (the update at 16 included); crash at 21
    resumed = _RESUMABLE[method]()
    rec = _Recorder(resumed)
    trainer = make_trainer(max_steps=STEPS, callbacks=[rec, resumed])
    trainer.fit(make_module(seed=0), make_dataloader(), ckpt_path=path)
    assert sorted(rec.masks_after) == list(range(16, STEPS))
    for step in range(16, STEPS):
        assert all(torch.equal(rec.masks_after[step][n], full_rec.masks_after[step][n]) for n in TARGET_SHAPES), step
    assert resumed.updates == full.updates
    assert resumed.itop == full.itop
    if full.updater.momentum is not None:
        assert all(torch.equal(resumed.updater.momentum[n], full.updater.momentum[n]) for n in full.updater.momentum)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"growth": "hebbian"}, r"Unknown `growth` 'hebbian'\. Valid growth rules: .*gradient.*momentum.*random"),
        ({"redistribution": "magnitude"}, "Unknown `redistribution` 'magnitude'. Valid redistribution rules"),
        ({"drop": "oldest"}, r"Unknown `drop` 'oldest'. Valid drop rules: magnitude, set, .*threshold\. Register"),
        ({"rounding": "round"}, "`rounding` must be one of"),
        ({"min_fraction": 0.5}, r"`min_fraction` \(the cosine's floor\) must be a number in \[0, 0.3\]"),
        ({"beta": 1.0}, "`beta`"),
        ({"alpha": 1.5}, "`alpha`"),
        ({"delta_t": 0}, r"`delta_t` \(optimizer steps between updates\) must be a positive integer"),
        ({"t_end": 0}, r"`t_end` \(a fraction of the training steps\) must be a number in \(0, 1\]"),
        ({"update_on": "batch"}, "`update_on` must be one of"),
        ({"init": "nope"}, "nope"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicSparseTraining(0.9, **kwargs)


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
    with pytest.raises(ValueError, match="supports one optimizer; the training loop uses 2"):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0


def _assert_grown_start_at_zero(rec, step, before, after):
    for n in after:
        grown = after[n] & ~before[n]
        assert torch.equal(rec.weights_at_start[step][n][grown], torch.zeros(int(grown.sum())))
        if n in rec.state[step]:
            assert torch.equal(rec.state[step][n][grown], torch.zeros(int(grown.sum())))


def _check_snfs_update(rec, step, momentum, before, after):
    """The update at ``step`` equals the core's SNFS rules on the recorded weights and ``momentum``."""
    rate = cosine_fraction(0.5, step, STEPS, 0.005)
    rates = snfs_rates(_kept(before), {n: m.numel() for n, m in before.items()}, rate, layer_momentum(momentum, before))
    dropped = _drop(rec.weights[step], before, rates, "ceil")
    removed = sum(_kept(before).values()) - sum(_kept(dropped).values())
    counts = momentum_growth_counts(momentum, before, dropped, removed)
    expected = grow({n: v.abs() for n, v in momentum.items()}, dropped, counts)
    assert all(torch.equal(after[n], expected[n]) for n in after), step


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_snfs_reads_the_optimizer_momentum_as_the_reference_code(optimizer):
    """Momentum = SGD's momentum_buffer / Adam's exp_avg / (sqrt(exp_avg_sq) + eps), dense on inactive weights;
    after every update its inactive entries are the mean of the active ones (``reset_momentum``)."""
    cb = SNFS(0.8, seed=1, verbose=False)
    module = make_module(seed=0, optimizer=optimizer)
    rec = _Recorder(cb)
    make_trainer(max_steps=STEPS, max_epochs=5, callbacks=[rec, cb]).fit(module, make_dataloader())
    assert cb.updater.dense_gradients and cb.updater.momentum is None  # no buffer of its own
    initial = rec.masks_after[0]
    for n, shape in TARGET_SHAPES.items():  # uniform initial budgets (the official code's)
        assert abs(int(initial[n].sum()) - 0.2 * torch.Size(shape).numel()) < 1
    counts_seen = [_kept(initial)]
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        state = rec.opt_state[step]
        if optimizer == "sgd":
            momentum = {n: state[n]["momentum_buffer"] for n in before}
        else:
            momentum = {n: state[n]["exp_avg"] / (state[n]["exp_avg_sq"].sqrt() + 1e-8) for n in before}
        for n, m in before.items():  # the optimizer saw the dense gradients: momentum on inactive weights
            assert not (~m).any() or float(momentum[n][~m].abs().sum()) > 0, (step, n)
            assert torch.equal(rec.weights[step][n][~m], torch.zeros(int((~m).sum())))  # yet weights stay 0
        assert sum(_kept(after).values()) == sum(_kept(initial).values())  # total exactly constant
        if step in (8, 16, 24, 32):
            _check_snfs_update(rec, step, momentum, before, after)
            reset = rec.state.get(step)  # SGD's buffer at the next batch start (after the update)
            if optimizer == "sgd":
                for n, m in after.items():
                    mean = (momentum[n] * m).sum() / m.sum()
                    assert torch.allclose(reset[n][~m], mean.expand(int((~m).sum()))), (step, n)
                    assert torch.equal(reset[n][m], momentum[n][m])  # active and grown keep their momentum
            counts_seen.append(_kept(after))
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    assert len({tuple(c.values()) for c in counts_seen}) > 1  # budgets moved between layers
    assert cb.updates == 4
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_snfs_keeps_its_own_momentum_when_the_optimizer_has_none():
    cb = SNFS(0.8, seed=1, verbose=False)
    module = make_module(seed=0)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)  # no momentum
    rec = _Recorder(cb)
    make_trainer(max_steps=STEPS, max_epochs=5, callbacks=[rec, cb]).fit(module, make_dataloader())
    assert not cb.updater.dense_gradients and cb.updater.momentum is not None
    momentum = {n: torch.zeros(shape) for n, shape in TARGET_SHAPES.items()}
    for step in range(1, STEPS):
        momentum = {n: 0.9 * momentum[n] + rec.grads[step][n] for n in momentum}  # from the dense gradients
        before, after = rec.masks_before[step], rec.masks_after[step]
        if step in (8, 16, 24, 32):
            _check_snfs_update(rec, step, momentum, before, after)
            _assert_grown_start_at_zero(rec, step, before, after)
            momentum = {  # the buffer is reset as the optimizer state would be
                n: torch.where(after[n], b, (b * after[n]).sum() / after[n].sum()) for n, b in momentum.items()
            }
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    final = {n: 0.9 * momentum[n] + rec.grads[STEPS][n] for n in momentum}
    assert all(torch.allclose(cb.updater.momentum[n], final[n], atol=1e-6) for n in momentum)
    assert cb.updates == 4


def test_granet_prunes_on_the_cubic_schedule_and_regenerates():
    cb = GraNet(0.9, initial_sparsity=0.5, start=0, end=20, delta_t=5, seed=2, verbose=False)
    rec, module = _run(cb)
    assert sum(_kept(rec.masks_after[0]).values()) == TARGET_TOTAL - round(0.5 * TARGET_TOTAL)
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        if step in (5, 10, 15, 20, 25, 30, 35):  # never at the last step (40)
            start = before
            if step <= 20:
                target = cubic_sparsity(step, 0.5, 0.9, 0, 20)
                start = prune_by_magnitude(rec.weights[step], before, target, "global")
                assert sum(_kept(start).values()) == TARGET_TOTAL - round(target * TARGET_TOTAL), step
                assert cb.target_sparsity(step) == pytest.approx(target)
            rate = cosine_fraction(0.5, step, STEPS, 0.005)
            dropped = _drop(rec.weights[step], start, rate, "ceil")
            counts = {n: int(start[n].sum()) - int(dropped[n].sum()) for n in start}
            expected = grow({n: g.abs() for n, g in rec.grads[step].items()}, dropped, counts)
            assert all(torch.equal(after[n], expected[n]) for n in after), step
            assert _kept(after) == _kept(start)  # regeneration: as many grown as dropped, per layer
            assert any(not torch.equal(after[n], start[n]) for n in after), step  # it did rewire
            _assert_grown_start_at_zero(rec, step, before, after)
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    assert sum(int(m.sum()) for _, m in cb.masks.items()) == TARGET_TOTAL - round(0.9 * TARGET_TOTAL)
    assert cb.updates == 7
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_granet_bad_arguments():
    with pytest.raises(ValueError, match="`initial_sparsity`"):
        GraNet(0.5, initial_sparsity=0.8)
    with pytest.raises(ValueError, match="`prune_distribution` must be one of"):
        GraNet(0.9, prune_distribution="erk")


@pytest.mark.parametrize(
    "setup",
    [
        {"accumulate_grad_batches": 2},
        {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
        {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "norm"},
    ],
    ids=["accumulate", "clip-value", "clip-norm"],
)
def test_rigl_grows_by_the_accumulated_unclipped_gradient(setup):
    cb = RigL(0.8, delta_t=4, t_end=1.0, verbose=False)
    steps = 16
    rec, module = _run(cb, steps=steps, **setup)
    assert cb.updates == 3  # steps 4, 8, 12 (never at the last step)
    for step in (4, 8, 12):
        before, after = rec.masks_before[step], rec.masks_after[step]
        fraction = cosine_fraction(0.3, step, steps)
        dropped = _drop(rec.weights[step], before, fraction)
        counts = {n: int(before[n].sum()) - int(dropped[n].sum()) for n in before}
        expected = grow({n: g.abs() for n, g in rec.grads[step].items()}, dropped, counts)
        assert all(torch.equal(after[n], expected[n]) for n in after), step
        assert _kept(after) == _kept(before)
        _assert_grown_start_at_zero(rec, step, before, after)
    if "gradient_clip_val" in setup:  # the recorded (and used) gradients were not clipped yet
        assert max(float(g.abs().max()) for g in rec.grads[4].values()) > setup["gradient_clip_val"]
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_rigl_skips_the_update_of_a_step_the_grad_scaler_skips():
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    class _InfAtStep8(type(make_module(seed=0))):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.trainer.global_step + 1 == 8 else loss

    torch.manual_seed(0)
    module = _InfAtStep8()
    scaler = torch.amp.GradScaler("cpu")
    cb = RigL(0.8, delta_t=4, t_end=1.0, verbose=False)
    rec = _Recorder(cb)
    trainer = make_trainer(
        max_steps=16, callbacks=[rec, cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    assert isinstance(trainer.precision_plugin, pl.plugins.precision.MixedPrecision)
    trainer.fit(module, make_dataloader())
    assert not all(torch.isfinite(g).all() for g in rec.grads[8].values())
    assert scaler.get_scale() < 2.0**16  # the scaler saw the overflow and backed off
    assert all(torch.equal(rec.masks_after[8][n], rec.masks_before[8][n]) for n in TARGET_SHAPES)
    assert any(not torch.equal(rec.masks_after[4][n], rec.masks_before[4][n]) for n in TARGET_SHAPES)
    assert any(not torch.equal(rec.masks_after[12][n], rec.masks_before[12][n]) for n in TARGET_SHAPES)
    assert cb.updates == 2  # 4 and 12; 8 was skipped
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.isfinite(params[n]).all()
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_unbounded_training_is_rejected():
    trainer = make_trainer(max_steps=-1, max_epochs=-1, callbacks=[RigL(0.8, verbose=False)])
    with pytest.raises(ValueError, match="set `max_steps` or `max_epochs`"):
        trainer.fit(make_module(seed=0), make_dataloader())


def test_dsr_updates_match_the_core_and_adapt_the_threshold():
    cb = DSR(0.8, delta_t=5, prune_fraction=0.2, seed=4, verbose=False)
    rec, module = _run(cb)
    replay = TopologyUpdater(cb.plan(), seed=4)
    thresholds = []
    initial = rec.masks_after[0]
    for n, shape in TARGET_SHAPES.items():  # uniform initial density, as in the reference code
        assert abs(int(initial[n].sum()) - 0.2 * torch.Size(shape).numel()) < 1
    for step in range(1, STEPS):
        before, after = rec.masks_before[step], rec.masks_after[step]
        assert sum(_kept(after).values()) == sum(_kept(initial).values())  # the total is constant
        if step % 5 == 0:
            expected = replay.compute(step, STEPS, rec.weights[step], before)
            assert all(torch.equal(after[n], expected[n]) for n in after), step
            thresholds.append(replay.memory["threshold"])
            for n in after:  # everything that went had |w| below the threshold in force
                gone = before[n] & ~after[n]
                assert bool(
                    (rec.weights[step][n][gone].abs() < (thresholds[-2] if len(thresholds) > 1 else 1e-3)).all()
                )
        else:
            assert all(torch.equal(after[n], before[n]) for n in after), step
    assert cb.updates == 7 and len(set(thresholds)) > 1  # H adapted
    assert cb.updater.memory["threshold"] == thresholds[-1]  # and lives in the updater's state
    assert len({tuple(_kept(rec.masks_after[s]).values()) for s in (0, 10, 20, 35)}) > 1  # budgets moved
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m], torch.zeros(int((~m).sum())))


def test_deepr_step_rule_and_sign_flip_drop_by_hand():
    """theta <- theta - eta * l1 (noise 0) on active connections only; theta <= 0 -> dormant."""
    from lightning_pai.core.dst import StepContext, UpdateContext, connection_signs, deepr_step, sign_flip_drop

    w = torch.nn.Parameter(torch.tensor([[0.5, -0.2, 0.0, 0.003]]))
    masks = {"w": torch.tensor([[True, True, False, True]])}
    memory = {}
    signs = connection_signs(memory, {"w": w}, masks, seed=0)
    assert signs["w"][0, :2].tolist() == [1, -1] and signs["w"][0, 3] == 1  # active: the weight's own sign
    ctx = StepContext({"w": w}, masks, step=1, seed=0, lr={"w": 0.1}, memory=memory, options={"l1": 0.05, "noise": 0})
    with torch.no_grad():
        deepr_step(ctx)
    # active: w -= s * lr * l1 = s * 0.005; the last one's theta crossed zero: dormant, w = 0; dormant untouched
    assert torch.allclose(w.detach(), torch.tensor([[0.495, -0.195, 0.0, 0.0]]))
    kept = sign_flip_drop(UpdateContext(weights={"w": w}, masks=masks, kept={"w": 3}, memory=memory), 0.0)
    assert kept["w"].tolist() == [[True, True, False, False]]


def test_deepr_keeps_every_layers_count_and_rewires_sign_flips():
    from lightning_pai import DeepR

    cb = DeepR(0.8, l1=1e-3, noise=1e-3, verbose=False)
    rec, module = _run(cb)
    history = [rec.masks_after[s] for s in sorted(rec.masks_after)]
    assert all(_kept(m) == _kept(history[0]) for m in history)  # exactly constant per layer at every step
    assert cb.updates == STEPS - 1  # after every step but the last
    assert sum(not masks_equal(a, b) for a, b in zip(history, history[1:])) > 0
    signs = cb.updater.memory["signs"]
    for step, masks in rec.masks_after.items():  # after every step's update: no active connection below zero
        weights = rec.weights_at_start[step]
        assert all(bool((weights[n][m] * signs[n][m] >= 0).all()) for n, m in masks.items()), step
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        w = params[n].detach()
        assert torch.equal(w[~m], torch.zeros(int((~m).sum())))  # dormant: exactly zero
        assert bool((w[m] * signs[n][m] >= 0).all())  # active: on its connection's side of zero (theta >= 0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SET(zeta=float("nan")), r"`zeta` \(a fraction of the weights\) must be a number in \(0, 1\); got nan"),
        (lambda: SNFS(prune_rate=float("nan")), r"`prune_rate` .* must be a number in \(0, 1\); got nan"),
        (lambda: SNFS(min_rate=0.9), r"`min_rate` .* must be a number in \[0, 0.5\]; got 0.9"),
        (lambda: GraNet(death_rate=2.0), r"`death_rate` .* got 2.0"),
        (lambda: DSR(prune_fraction=0), r"`prune_fraction` .* got 0"),
        (lambda: RigL(init="bogus"), r"Unknown `init` 'bogus'\. Valid scorers: .*magnitude"),
        (lambda: GradualMagnitudePruning(end=float("nan")), r"`end` is an optimizer step .* got nan"),
    ],
)
def test_each_preset_names_its_own_argument(make, message):
    """The presets' arguments are checked under their own names (not as the `alpha`/`method` they become)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_a_selector_that_is_neither_a_pattern_nor_a_list_is_named():
    with pytest.raises(TypeError, match=r"`include` takes a glob pattern .* or a list of them; got 42"):
        RigL(include=42)
