"""The dynamic-sparse-training core: schedules and drop/grow rules checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_pai.core.dst import (
    diff,
    drop_counts,
    drop_magnitude,
    drop_set,
    grow,
    layer_momentum,
    momentum_growth_counts,
    random_scores,
    snfs_rates,
)
from lightning_pai.core.schedules import Cosine, Cubic
from lightning_pai.core.select import active_counts


def cosine_fraction(alpha, step, t_end, minimum=0.0):
    return Cosine(alpha, minimum, t_end)(step, t_end)


def cubic_sparsity(step, initial, final, start, end):
    return Cubic(initial, final, start, end)(step, end)


def t(*values):
    return torch.tensor(values)


def b(*values):
    return torch.tensor([bool(v) for v in values])


def test_cosine_fraction():
    assert cosine_fraction(0.3, 0, 1000) == pytest.approx(0.3)
    assert cosine_fraction(0.3, 500, 1000) == pytest.approx(0.15)
    assert cosine_fraction(0.3, 250, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_fraction(0.3, 1000, 1000) == 0.0 and cosine_fraction(0.3, 1500, 1000) == 0.0
    # SNFS / GraNet: CosineAnnealingLR from 0.5 to eta_min = 0.005
    assert cosine_fraction(0.5, 0, 1000, 0.005) == pytest.approx(0.5)
    assert cosine_fraction(0.5, 500, 1000, 0.005) == pytest.approx(0.005 + 0.495 / 2)
    assert cosine_fraction(0.5, 1000, 1000, 0.005) == 0.005
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000, 0.005)
    for step in range(1, 301):
        opt.step()
        sched.step()
        if step in (1, 77, 300):
            assert cosine_fraction(0.5, step, 1000, 0.005) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)


def test_cubic_sparsity():
    assert cubic_sparsity(0, 0.0, 0.9, 10, 110) == 0.0
    assert cubic_sparsity(60, 0.0, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(110, 0.0, 0.9, 10, 110) == pytest.approx(0.9)
    assert cubic_sparsity(500, 0.5, 0.9, 10, 110) == pytest.approx(0.9)


def test_drop_counts_floor_and_ceil():
    masks = active_counts({"a": torch.ones(10, dtype=torch.bool), "b": b(1, 1, 1, 0, 0, 0, 0)})
    assert masks == {"a": 10, "b": 3}
    assert drop_counts(masks, 0.3) == {"a": 3, "b": 0}  # int(10 * .3) = 3, int(3 * .3) = 0
    assert drop_counts(masks, 0.3, "ceil") == {"a": 3, "b": 1}  # ceil(0.9) = 1
    assert drop_counts(masks, 0.25) == {"a": 2, "b": 0}
    assert drop_counts(masks, {"a": 0.5, "b": 0.5}, "ceil") == {"a": 5, "b": 2}  # per-layer rates
    with pytest.raises(ValueError, match="`rounding` must be 'floor' or 'ceil'"):
        drop_counts(masks, 0.3, "round")


def test_rigl_drop_then_grow_by_hand():
    w = {"a": t(0.5, -0.1, 0.0, 0.3, -0.7, 0.0, 0.2, 0.0)}
    m = {"a": b(1, 1, 0, 1, 1, 0, 1, 0)}  # 5 active
    g = {"a": t(0.0, 9.0, 0.4, 0.1, 0.0, 0.8, 0.3, 0.05)}  # dense |gradient|
    counts = drop_counts(active_counts(m), 0.4)  # int(5 * .4) = 2
    assert counts == {"a": 2}
    dropped = drop_magnitude(w, m, counts)  # the two smallest active |w|: -0.1 (idx 1), 0.2 (idx 6)
    assert dropped["a"].tolist() == [True, False, False, True, True, False, False, False]
    grown = grow(g, dropped, counts)  # highest |g| among inactive after the drop: idx 1 (9.0), idx 5 (0.8)
    assert grown["a"].tolist() == [True, True, False, True, True, True, False, False]
    update = diff(m, grown)
    assert update.dropped == {"a": 1} and update.grown == {"a": 1}  # idx 1 came straight back
    assert int(grown["a"].sum()) == int(m["a"].sum())


def test_grow_random_among_inactive_only_and_seeded():
    m = {"a": torch.zeros(50, dtype=torch.bool), "b": torch.ones(3, 4, dtype=torch.bool)}
    m["a"][:20] = True
    m["b"][0] = False
    scores = random_scores(m, seed=3)
    new = grow(scores, m, {"a": 7, "b": 4})
    assert int(new["a"].sum()) == 27 and bool(new["a"][:20].all())
    assert bool(new["b"].all())
    assert all(torch.equal(new[n], grow(random_scores(m, 3), m, {"a": 7, "b": 4})[n]) for n in m)
    assert not torch.equal(new["a"], grow(random_scores(m, 4), m, {"a": 7, "b": 4})["a"])
    with pytest.raises(ValueError, match="cannot grow 5 weights: only 4 are inactive"):
        grow(scores, m, {"a": 0, "b": 5})


def test_set_drops_each_sign_separately():
    # positives 0.1 0.2 0.3 0.9 (4) -> floor(0.5*4)=2 closest to zero: 0.1, 0.2;
    # negatives -0.05 -0.6 (2) -> floor(0.5*2)=1: -0.05; the inactive 0.0 entries are untouched.
    w = {"a": t(0.1, -0.05, 0.2, 0.0, 0.3, -0.6, 0.9, 0.0)}
    m = {"a": b(1, 1, 1, 0, 1, 1, 1, 0)}
    assert drop_set(w, m, 0.5)["a"].tolist() == [False, False, False, False, True, True, True, False]
    # plain magnitude dropping 3 would instead remove -0.05, 0.1, 0.2: same here, but not in general:
    w2 = {"a": t(0.01, 0.02, 0.03, 0.04, -0.5, -0.6, -0.7, -0.8)}
    m2 = {"a": torch.ones(8, dtype=torch.bool)}
    assert drop_set(w2, m2, 0.25)["a"].tolist() == [False, True, True, True, False, True, True, True]
    assert drop_magnitude(w2, m2, {"a": 2})["a"].tolist() == [False, False, True, True, True, True, True, True]
    # active weights at exactly zero (grown, never moved) always go; the sign-wise counts exclude them
    w3 = {"a": t(0.0, 0.0, 0.5, 0.1, -0.3, -0.2)}
    m3 = {"a": b(1, 1, 1, 1, 1, 1)}
    assert drop_set(w3, m3, 0.5)["a"].tolist() == [False, False, True, False, True, False]


def test_momentum_redistribution_by_hand():
    masks = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool)}
    momentum = {"a": torch.full((10,), 3.0), "b": torch.full((10,), 1.0)}
    dropped = {"a": b(*[1] * 6 + [0] * 4), "b": b(*[1] * 6 + [0] * 4)}  # 4 free slots each
    # 8 to regrow, shares 3:1 -> ideal a=6, b=2, but a has only 4 free: a=4, the other 2 go to b -> b=4.
    assert momentum_growth_counts(momentum, masks, dropped, 8) == {"a": 4, "b": 4}
    assert momentum_growth_counts(momentum, masks, dropped, 4) == {"a": 3, "b": 1}
    # mean over *active* weights only: inactive entries' momentum does not count
    masks2 = {"a": b(*[1] * 5 + [0] * 5), "b": torch.ones(10, dtype=torch.bool)}
    mom2 = {"a": t(*[1.0] * 5 + [100.0] * 5), "b": torch.full((10,), 1.0)}
    assert momentum_growth_counts(mom2, masks2, dropped, 4) == {"a": 2, "b": 2}


def test_snfs_rates_cap_nearly_dense_layers_with_a_large_momentum_share():
    masks = {
        "dense": b(*[1] * 9 + [0]),  # sparsity 0.1 < 0.2
        "sparse": b(*[1] * 2 + [0] * 8),  # sparsity 0.8
        "quiet": b(*[1] * 9 + [0]),  # sparsity 0.1, but a small share
    }
    momentum = {"dense": torch.full((10,), 5.0), "sparse": torch.full((10,), 4.0), "quiet": torch.full((10,), 1.0)}
    means = layer_momentum(momentum, masks)
    assert means == {"dense": 5.0, "sparse": 4.0, "quiet": 1.0}
    # shares 0.5, 0.4, 0.1 against 1/3: only "dense" is both nearly dense and above average
    rates = snfs_rates(active_counts(masks), {n: 10 for n in masks}, 0.5, means)
    assert rates["dense"] == pytest.approx(0.1) and rates["sparse"] == 0.5 and rates["quiet"] == 0.5
    assert drop_counts(active_counts(masks), rates, "ceil") == {"dense": 1, "sparse": 1, "quiet": 5}


def test_snfs_update_by_hand():
    # one layer loses weights to the other: removal is per layer, regrowth follows the momentum
    w = {"a": t(0.9, 0.1, 0.5, 0.0, 0.0, 0.0), "b": t(0.3, -0.2, 0.0, 0.0, 0.0, 0.0)}
    m = {"a": b(1, 1, 1, 0, 0, 0), "b": b(1, 1, 0, 0, 0, 0)}
    mom = {"a": t(0.1, 0.1, 0.1, 0.2, 0.05, 0.0), "b": t(0.6, 0.3, 0.9, 0.1, 0.8, 0.0)}
    counts = drop_counts(active_counts(m), 0.5, "ceil")  # ceil(1.5) = 2, ceil(1) = 1
    assert counts == {"a": 2, "b": 1}
    dropped = drop_magnitude(w, m, counts)  # a keeps 0.9; b keeps 0.3
    assert dropped["a"].tolist() == [True, False, False, False, False, False]
    assert dropped["b"].tolist() == [True, False, False, False, False, False]
    # mean |momentum| over active (before the drop): a 0.1, b 0.45 -> 3 regrown split 0.18 : 0.82
    regrow = momentum_growth_counts(mom, m, dropped, 3)
    assert regrow == {"a": 1, "b": 2}  # 0.55 -> 1 and 2.45 -> 2 by largest remainder
    grown = grow({n: v.abs() for n, v in mom.items()}, dropped, regrow)
    assert grown["a"].tolist() == [True, False, False, True, False, False]  # idx 3 has |m| 0.2
    assert grown["b"].tolist() == [True, False, True, False, True, False]  # 0.9 and 0.8
    assert sum(int(v.sum()) for v in grown.values()) == sum(int(v.sum()) for v in m.values())


# ------------------------------------------------------------------ registries, schedules, updater
from lightning_pai.core.dst import (  # noqa: E402
    _GROWTH,
    Plan,
    Pruning,
    Rewire,
    TopologyUpdater,
    UpdateContext,
    list_drop_rules,
    list_growth_rules,
    list_redistributions,
    proportional_counts,
    register_growth_rule,
    survivor_redistribution,
    threshold_drop,
)
from lightning_pai.core.schedules import Constant, EpochEnds, Every, round_sparsities  # noqa: E402


def test_rule_registries_list_every_rule_and_reject_unknown_names():
    # the built-in rules (a new method may add more: these lists only grow)
    assert {"magnitude", "set", "threshold", "sign_flip"} <= set(list_drop_rules())
    assert {"gradient", "magnitude", "momentum", "random"} <= set(list_growth_rules())
    assert {"momentum", "none", "survivors"} <= set(list_redistributions())
    assert list_drop_rules() == sorted(list_drop_rules())
    with pytest.raises(ValueError, match=r"Unknown `growth` 'hebb'\. .* Register a new one with"):
        Plan(when=Every(1), rewire=Rewire(Constant(0.1), growth="hebb")).validate()
    with pytest.raises(ValueError, match="Unknown growth rule metadata"):
        register_growth_rule("x", lambda ctx: {}, speed=3)


def test_a_new_growth_rule_is_one_registration():
    @register_growth_rule("largest_index", overwrite=True)
    def largest_index(ctx):
        return {n: torch.arange(m.numel(), dtype=torch.float32).view_as(m) for n, m in ctx.masks.items()}

    try:
        updater = TopologyUpdater(Plan(when=Every(1), rewire=Rewire(Constant(0.5), growth="largest_index")))
        w = {"a": t(0.5, -0.1, 0.0, 0.3, 0.0, 0.0)}
        m = {"a": b(1, 1, 0, 1, 0, 0)}
        new = updater.compute(1, 10, w, m)
        assert new["a"].tolist() == [True, False, False, True, False, True]  # drop -0.1 (floor 1.5 = 1), grow idx 5
    finally:
        _GROWTH.unregister("largest_index")


def test_schedules():
    assert Every(3).is_update(3, 10, False) and not Every(3).is_update(4, 10, False)
    assert [s for s in range(1, 21) if Every(4, start=2, end=0.5, also=(0.5,)).is_update(s, 20, False)] == [2, 6, 10]
    assert [s for s in range(1, 21) if Every(4, start=1, end=11, also=(11,)).is_update(s, 20, False)] == [1, 5, 9, 11]
    epoch = EpochEnds(end=0.5)
    assert epoch.at_epoch_end and epoch.is_update(8, 20, True) and not epoch.is_update(8, 20, False)
    assert not epoch.is_update(16, 20, True)  # after `end`
    assert round_sparsities(0.99, 2) == pytest.approx([0.9, 0.99])
    with pytest.raises(ValueError, match="`schedule` must be one of 'exponential', 'linear'"):
        round_sparsities(0.9, 2, "cosine")
    with pytest.raises(ValueError, match="must come after `start`"):
        Cubic(0.0, 0.9, 10, 5)(7, 20)


def test_dsr_threshold_drop_by_hand():
    w = {"a": t(0.0005, 0.002, -0.0008, 0.5, 0.0, 0.0), "b": t(-0.003, 0.0009, 0.4, 0.0)}
    m = {"a": b(1, 1, 1, 1, 0, 0), "b": b(1, 1, 1, 0)}
    ctx = UpdateContext(weights=w, masks=m, kept=active_counts(m), memory={}, options={"threshold": 1e-3})
    out = threshold_drop(ctx, 0.5)  # |w| < 1e-3: a[0], a[2], b[1] -> 3 dropped of 7 active; K = 3.5
    assert out["a"].tolist() == [False, True, False, True, False, False]
    assert out["b"].tolist() == [True, False, True, False]
    assert ctx.memory["threshold"] == 2e-3  # 3 dropped < (1 - 0.1) * 3.5 = 3.15: H doubles for the next update
    ctx1 = UpdateContext(weights=w, masks=m, kept=active_counts(m), memory={"threshold": 1e-3})
    threshold_drop(ctx1, 3 / 7)  # K = 3: within the band, H unchanged
    assert ctx1.memory["threshold"] == 1e-3
    ctx2 = UpdateContext(weights=w, masks=m, kept=active_counts(m), memory={"threshold": 1e-3})
    threshold_drop(ctx2, 0.8)  # K = 5.6, 3 dropped < 5.04
    assert ctx2.memory["threshold"] == 2e-3
    ctx3 = UpdateContext(weights=w, masks=m, kept=active_counts(m), memory={"threshold": 1e-3})
    threshold_drop(ctx3, 0.2)  # K = 1.4, 3 dropped > 1.54
    assert ctx3.memory["threshold"] == 5e-4
    # regrowth in proportion to the survivors R = {a: 2, b: 2}: 3 dropped -> 2 and 1 (largest remainder, ties first)
    assert survivor_redistribution(ctx, out) == {"a": 2, "b": 1}
    assert proportional_counts({"a": 3.0, "b": 1.0}, {"a": 1, "b": 10}, 4) == {"a": 1, "b": 3}  # capped, re-split


def test_updater_state_round_trip_and_own_momentum_without_host_sync():
    plan = Plan(when=Every(2), rewire=Rewire(Constant(0.5), growth="momentum"))
    updater = TopologyUpdater(plan, beta=0.5)
    m = {"a": b(1, 0, 1, 0)}
    updater.use_optimizer(None)  # no optimizer momentum: the updater keeps its own buffer
    updater.bind(m)
    assert updater.momentum is not None and not updater.dense_gradients and updater.observes_every_step
    w = {"a": t(0.3, 0.0, -0.2, 0.0)}
    updater.observe(w, {"a": t(1.0, 2.0, 1.0, 4.0)})
    updater.observe(w, {"a": t(1.0, float("inf"), 1.0, 1.0)})  # a non-finite step adds nothing
    updater.observe(w, {"a": t(1.0, 0.0, 1.0, 0.0)})
    assert updater.momentum["a"].tolist() == [1.5, 1.0, 1.5, 2.0]  # 0.5 * (1, 2, 1, 4) + (1, 0, 1, 0)
    new = updater.compute(2, 10, w, m)  # drop floor(0.5 * 2) = 1 (|-0.2|), grow the largest inactive |m|: idx 3
    assert new["a"].tolist() == [True, False, False, True]
    update = updater.record(m, new)
    assert (update.dropped, update.grown, updater.updates) == ({"a": 1}, {"a": 1}, 1)
    assert updater.momentum["a"].tolist() == [1.5, 1.75, 1.75, 2.0]  # inactive <- mean of the active (1.5, 2)
    assert updater.itop == 0.75
    state = updater.state_dict()
    again = TopologyUpdater(plan, beta=0.5)
    again.load_state_dict(state)
    again.use_optimizer(None)
    again.bind(new)
    assert again.updates == 1 and again.itop == 0.75 and torch.equal(again.momentum["a"], updater.momentum["a"])


def test_gradual_pruning_stage_keeps_the_highest_scores_of_the_active_weights():
    plan = Plan(when=Every(1), prune=Pruning(Cubic(0.0, 0.5, 0, 4), "magnitude", "global"))
    updater = TopologyUpdater(plan)
    w = {"a": t(0.1, -0.9, 0.3, 0.0), "b": t(0.5, 0.2, -0.05, 0.7)}
    m = {"a": b(1, 1, 1, 0), "b": b(1, 1, 1, 1)}
    new = updater.compute(4, 8, w, m)  # s = 0.5: keep 4 of 8, the largest |w| among the active
    assert new["a"].tolist() == [False, True, True, False] and new["b"].tolist() == [True, False, False, True]
    assert updater.is_update(8, 8, False)  # a pruning-only plan may update at the last step
    rewiring = TopologyUpdater(Plan(when=Every(1), rewire=Rewire(Constant(0.1))))
    assert not rewiring.is_update(8, 8, False)  # a growing one never does


def test_a_step_rule_runs_once_after_every_optimizer_step_and_not_again_after_resume():
    """Step rules (Plan.step_rule) change the active weights after each optimizer step, once per step."""
    from dataclasses import replace

    from helpers import make_dataloader, make_module, make_trainer

    from lightning_pai import DynamicSparseTraining
    from lightning_pai.core import register_step_rule

    seen = []

    @register_step_rule("test_shrink", overwrite=True)
    def shrink(ctx):
        seen.append(ctx.step)
        for n, w in ctx.weights.items():  # an L1 step on the active weights: w -= lr * 0.01 * sign(w)
            w.sub_(ctx.lr[n] * 0.01 * torch.sign(w) * ctx.masks[n])

    class Shrinking(DynamicSparseTraining):
        def plan(self):
            return replace(super().plan(), step_rule="test_shrink")

    try:
        cb = Shrinking(0.8, delta_t=3, t_end=1.0, verbose=False)
        module = make_module(seed=0)
        make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1, accumulate_grad_batches=2).fit(
            module, make_dataloader()
        )
        assert seen == list(range(1, 9))  # 16 batches, 8 optimizer steps: once each, never at a micro-batch
        assert cb.updater.memory["step_rule_step"] == 8
        cb.updater.apply_step_rule(cb.masks.params, dict(cb.masks.items()), 8, {n: 0.1 for n in cb.masks.names})
        assert seen == list(range(1, 9))  # step 8 again (e.g. reported after a resume): not re-applied
        params = dict(module.named_parameters())
        for n, m in cb.masks.items():
            assert torch.equal(params[n].detach()[~m], torch.zeros(int((~m).sum())))
    finally:
        from lightning_pai.core.dst import _STEP

        _STEP.unregister("test_shrink")


def test_dsr_keeps_one_weight_of_an_emptied_layer_and_spares_the_dropped_from_regrowth():
    """DSR's reference: a layer whose every active weight is below H keeps its largest ("removing all, keeping
    one"), and the weights dropped in an update do not regrow in it (setdiff1d)."""
    from lightning_pai.core.dst import Rewire, UpdateContext, drop_and_grow, threshold_drop
    from lightning_pai.core.schedules import Constant
    from lightning_pai.core.select import active_counts

    torch.manual_seed(0)
    small = torch.full((4, 8), 1e-5)
    small[2, 3] = 5e-5  # the largest of the layer, still below H (the reference keeps the first, not the largest)
    big = torch.randn(6, 8)
    weights = {"a": small, "b": big}
    masks = {"a": torch.rand(4, 8) < 0.5, "b": torch.zeros(6, 8, dtype=torch.bool)}
    masks["a"][2, 3] = True
    masks["b"][0, :3] = True  # 3 survivors in b against a's 1: a's share of the regrowth is about a quarter
    ctx = UpdateContext(weights=weights, masks=masks, kept=active_counts(masks), options={"threshold": 1e-3})
    dropped = threshold_drop(ctx, 0.1)
    first = masks["a"].reshape(-1).nonzero()[0].item()
    assert int(dropped["a"].sum()) == 1 and bool(dropped["a"].reshape(-1)[first])  # one: the first active, as the
    # reference's prune_indices[1:] keeps
    assert torch.equal(dropped["b"], masks["b"] & (big.abs() >= 1e-3))
    ctx = UpdateContext(weights=weights, masks=masks, kept=active_counts(masks), options={"threshold": 1e-3}, seed=3)
    new = drop_and_grow(ctx, 0.1, Rewire(Constant(0.1), drop="threshold", growth="random", redistribution="survivors"))
    for n in new:
        just_dropped = masks[n] & ~(masks[n] & (weights[n].abs() >= 1e-3))
        if n == "a":
            just_dropped.view(-1)[first] = False
        assert not (new[n] & just_dropped).any(), n  # none of them regrew in the same update
    assert sum(int(m.sum()) for m in new.values()) == sum(int(m.sum()) for m in masks.values())  # total kept
    assert int(new["a"].sum()) > 1  # the emptied layer regrew, elsewhere than where it just dropped


def test_dsr_reallocation_periods_follow_the_reference_schedule():
    """The period between reallocations grows at given steps (the reference's 100 -> 200 -> 400 -> 800) and rewiring
    stops at ``stop``: updates at the multiples of the period in force."""
    from helpers import make_dataloader, make_module, make_trainer

    from lightning_pai import DSR
    from lightning_pai.core.schedules import Periods

    schedule = Periods(((0, 100), (2500, 200), (8000, 400), (14000, 800)), end=0.95)
    updates = [t for t in range(1, 20001) if schedule.is_update(t, 20000, False)]
    assert updates[:3] == [100, 200, 300] and 2500 not in updates
    assert [t for t in updates if 2400 <= t <= 3000] == [2400, 2600, 2800, 3000]
    assert [t for t in updates if 13600 <= t <= 15000] == [13600, 14400]
    assert max(updates) == 18400 and len(updates) == 24 + 27 + 15 + 6  # to 95 % of the run (step 19000)
    cb = DSR(0.8, periods={0: 2, 6: 4}, stop=0.75, verbose=False)
    make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1).fit(make_module(seed=0), make_dataloader())
    assert cb.updates == 4  # steps 2, 4, 8, 12 of 16
    with pytest.raises(ValueError, match="`periods` must map optimizer steps"):
        DSR(0.8, periods={0: 0})
