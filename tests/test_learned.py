"""Learned masks: the straight-through gradients, exact counts, frozen weights, revival, resume, the references."""

import math

import pytest
import torch
from helpers import assert_enforced, import_ns, make_dataloader, make_module, make_trainer
from torch import nn

from lightning_pai import EdgePopup, MovementPruning, Sparsifier, Supermask
from lightning_pai.core.learned import get_mask_rule, list_mask_rules, masked_weight, top_k
from lightning_pai.core.targets import LINEAR


# ------------------------------------------------------------------------------------------- the rules
def test_rules_are_registered():
    assert {"topk_abs", "topk", "bernoulli", "sigmoid_threshold"} <= set(list_mask_rules())
    with pytest.raises(ValueError, match="Unknown `rule` 'nope'. Valid mask rules: .*register_mask_rule"):
        get_mask_rule("nope")


@pytest.mark.parametrize(
    ("rule", "factor"),
    [
        ("topk_abs", lambda s: s.sign()),  # GetSubnet's identity, then |s|'s derivative
        ("topk", lambda s: torch.ones_like(s)),  # TopKBinarizer: identity
        ("bernoulli", lambda s: torch.sigmoid(s) * (1 - torch.sigmoid(s))),  # through σ(s)
        ("sigmoid_threshold", lambda s: torch.ones_like(s)),  # ThresholdBinarizer: sigmoid inside, identity
    ],
)
def test_straight_through_gradients(rule, factor):
    torch.manual_seed(0)
    weight = torch.randn(6, 8, requires_grad=True)
    scores = torch.randn(6, 8, requires_grad=True)
    mask = (torch.rand(6, 8) < 0.5).float()
    upstream = torch.randn(6, 8)
    effective = get_mask_rule(rule).effective(weight, scores, mask)
    assert torch.equal(effective, weight.detach() * mask)
    effective.backward(upstream)
    assert torch.allclose(scores.grad, upstream * weight.detach() * factor(scores.detach()))
    assert torch.equal(weight.grad, upstream * mask)  # pruned weights get no gradient through the product


def test_masked_weight_without_weight_gradient():
    weight, scores = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    masked_weight(weight, scores, torch.ones(3, 4)).sum().backward()
    assert torch.equal(scores.grad, weight)


def test_edge_popup_and_movement_counts():
    scores = torch.randn(7, 9)  # 63 weights
    layout = LINEAR
    edge = get_mask_rule("topk_abs").binarize(scores, scores, 0.3, None, layout, None)
    assert int(edge.sum()) == 63 - int(0.7 * 63)  # GetSubnet: n - floor((1 - k) n) = 19
    assert torch.equal(edge, top_k(scores.abs(), 19, None, layout))
    move = get_mask_rule("topk").binarize(scores, scores, 0.3, None, layout, None)
    assert int(move.sum()) == int(0.3 * 63)  # TopKBinarizer: floor(k n) = 18
    kept = scores.flatten()[move.flatten()]
    assert kept.min() > scores.flatten()[~move.flatten()].max()  # the highest raw scores, sign included


def reference_topk_binarizer(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The HF movement-pruning reference's TopKBinarizer.forward, written out straightforwardly."""
    mask = scores.clone()
    _, idx = scores.flatten().sort(descending=True)
    j = int(threshold * scores.numel())
    flat = mask.flatten()
    flat[idx[j:]] = 0
    flat[idx[:j]] = 1
    return flat.view(scores.shape).bool()


def test_soft_movement_keeps_a_floor():
    scores = torch.full((10, 30), -5.0)
    scores[0, :3] = 4.0
    mask = get_mask_rule("sigmoid_threshold").binarize(scores, scores, 0.5, None, LINEAR, None)
    assert int(mask.sum()) == 3  # σ(4) > τ; more than the floor of int(0.005 * 300) + 1 = 2
    scores[0, :3] = -4.0
    scores[1, 5] = 0.0
    mask = get_mask_rule("sigmoid_threshold").binarize(scores, scores, 0.9, None, LINEAR, None)
    assert int(mask.sum()) == 2 and bool(mask[1, 5])  # none above τ: the floor's highest scores


# --------------------------------------------------------------------------------------- in a Trainer
class Recorder:
    """Masks and scores after every optimizer step (a Lightning callback placed after the method)."""

    def __new__(cls, ns, method):
        pl = import_ns(ns)

        class _Recorder(pl.Callback):
            def __init__(self):
                self.masks, self.scores = [], []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.masks.append(method.masks.state_dict())
                self.scores.append({n: s.detach().clone() for n, s in method.session.scores.items()})

        return _Recorder()


def fit(cb, ns="pytorch_lightning", epochs=2, seed=0, extra=(), **trainer_kwargs):
    torch.manual_seed(seed)
    module = make_module(ns)
    trainer = make_trainer(ns, callbacks=[cb, *extra], max_epochs=epochs, max_steps=-1, **trainer_kwargs)
    trainer.fit(module, make_dataloader())
    return module, trainer


@pytest.mark.parametrize("weight_init", ["keep", "signed_constant"])
def test_edge_popup_freezes_weights_and_keeps_exact_counts(weight_init):
    torch.manual_seed(0)
    reference = make_module("pytorch_lightning")
    cb = EdgePopup(0.7, weight_init=weight_init, verbose=False)
    module, _ = fit(cb)
    targets = ("conv.weight", "fc1.weight", "fc2.weight")
    for name, param in module.named_parameters():
        before = dict(reference.named_parameters())[name].detach()
        if name in targets:
            expected = before if weight_init == "keep" else before.sign() * math.sqrt(2.0 / before[0].numel())
            assert torch.equal(param.detach(), expected)  # bit-identical: frozen, never zeroed
            assert not param.requires_grad
    kept = cb.masks.kept()
    for name in targets:
        n = cb.masks[name].numel()
        assert kept[name] == n - int(0.7 * n)  # GetSubnet: n - floor((1 - k) n), k = 0.3 kept
    scores = cb.session.scores
    assert all(torch.equal(cb.masks[n], top_k(scores[n].abs(), kept[n], None, cb.masks.layouts[n])) for n in targets)
    assert cb.session.optimizer.state  # the scores trained with their own SGD (momentum buffers exist)
    x = torch.randn(5, 2, 16)
    with torch.no_grad():  # after fit, the model computes with w ⊙ m; the weights themselves hold no zeros
        plain = cb.make_permanent(module)
        assert torch.allclose(module(x), plain(x), atol=1e-6)
        assert not torch.equal(module.fc1.weight, plain.fc1.weight)
        assert not plain.fc1._forward_pre_hooks and not plain.fc1._forward_hooks  # nothing attached


def test_supermask_frozen_weights_and_published_sample():
    torch.manual_seed(0)
    reference = make_module("pytorch_lightning")
    cb = Supermask(lr=10.0, verbose=False)
    module, _ = fit(cb)
    session = cb.session
    gen = torch.Generator().manual_seed(session.seed * 1_000_003 + session.step)
    for name in ("conv.weight", "fc1.weight", "fc2.weight"):
        assert torch.equal(dict(module.named_parameters())[name], dict(reference.named_parameters())[name])
        scores = session.scores[name]
        sample = torch.rand(scores.shape, generator=gen) < torch.sigmoid(scores)  # the published sample
        assert torch.equal(cb.masks[name], sample)
    assert 0.0 < cb.masks.density < 1.0
    rounded = Supermask(lr=10.0, eval_mask="round", verbose=False)
    fit(rounded)
    assert all(torch.equal(rounded.masks[n], s > 0) for n, s in rounded.session.scores.items())


def test_supermask_initial_density():
    cb = Supermask(0.8, lr=1e-9, verbose=False)
    fit(cb, epochs=1)
    scores = torch.cat([s.flatten() for s in cb.session.scores.values()])
    assert torch.allclose(torch.sigmoid(scores), torch.full_like(scores, 0.2), atol=1e-5)  # logit(1 - sparsity)


def test_movement_pruning_revives_and_follows_the_reference_rule():
    cb = MovementPruning(0.75, initial_warmup=0, final_warmup=0.25, lr=0.1, verbose=False)
    recorder = Recorder("pytorch_lightning", cb)
    fit(cb, epochs=2, extra=[recorder])
    steps = len(recorder.masks)
    assert steps == 16
    revived = 0
    for name in ("fc1.weight", "fc2.weight"):
        stack = torch.stack([m[name] for m in recorder.masks])  # (steps, ...)
        pruned_then_kept = (~stack[:-1]).cumsum(0).bool() & stack[1:]
        revived += int(pruned_then_kept.any(0).sum())
    assert revived > 0  # a weight pruned at one step is kept at a later one
    # the kept set is the reference's TopKBinarizer's wherever its choice is unique (no tie at the k-th score:
    # Adam's first steps move many scores by the same amount, and the reference breaks ties by an unstable sort)
    compared = 0
    for step in range(1, 17):
        level = cb.level(step, 16)
        for name, scores in recorder.scores[step - 1].items():
            mask, k = recorder.masks[step - 1][name], int(level * scores.numel())
            assert int(mask.sum()) == max(1, k)
            ranked = scores.flatten().sort(descending=True).values
            if 0 < k < scores.numel() and ranked[k - 1] > ranked[k]:
                assert torch.equal(mask, reference_topk_binarizer(scores, level))
                compared += 1
    assert compared >= 16
    assert cb.level(16, 16) == pytest.approx(0.25) and cb.level(0, 16) == 1.0
    assert recorder.scores[-1]["fc1.weight"].abs().sum() > 0  # trained by their AdamW


def test_soft_movement_penalty_and_threshold():
    cb = MovementPruning(
        None, variant="soft", initial_warmup=0, final_warmup=0, final_lambda=1e4, lr=0.5, verbose=False
    )
    fit(cb, epochs=2)
    assert cb.session.masks.density < 0.9  # the penalty pushed σ(S) below τ for many weights
    for name, scores in cb.session.scores.items():
        assert torch.equal(cb.masks[name], torch.sigmoid(scores) > cb.threshold) or int(cb.masks[name].sum()) == (
            int(0.005 * scores.numel()) + 1
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="`sparsity` .* must be a number in \\[0, 1\\)"):
        EdgePopup(1.0)
    with pytest.raises(ValueError, match="`weight_init` must be one of 'keep', 'signed_constant'"):
        EdgePopup(0.5, weight_init="zeros")
    with pytest.raises(ValueError, match="variant='soft'\\)` sets no sparsity"):
        MovementPruning(0.9, variant="soft")
    with pytest.raises(ValueError, match="`eval_mask` must be one of 'fixed', 'sample', 'round'"):
        Supermask(eval_mask="mean")
    with pytest.raises(ValueError, match="`lr` must be a number in \\(0, inf\\]"):
        Supermask(lr=0)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: EdgePopup(0.6, verbose=False),
        lambda: Supermask(lr=5.0, verbose=False),
        lambda: MovementPruning(0.8, initial_warmup=0, final_warmup=0, verbose=False),
    ],
)
def test_crash_and_resume_gives_the_same_masks_and_scores(factory, tmp_path):
    import pytorch_lightning as pl

    full = factory()
    fit(full, epochs=2)
    first = factory()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    torch.manual_seed(0)
    module = make_module("pytorch_lightning")
    trainer = make_trainer(
        "pytorch_lightning", callbacks=[first, ckpt_cb], max_epochs=2, max_steps=-1, enable_checkpointing=True
    )
    trainer.fit(module, make_dataloader())  # the checkpoint saved after epoch 0 stands for a crash there
    ckpt = next(tmp_path.glob("epoch=0*.ckpt"))
    resumed = factory()
    torch.manual_seed(0)
    module = make_module("pytorch_lightning")
    trainer = make_trainer("pytorch_lightning", callbacks=[resumed], max_epochs=2, max_steps=-1)
    trainer.fit(module, make_dataloader(), ckpt_path=ckpt)
    for name in full.masks:
        assert torch.equal(resumed.masks[name], full.masks[name])
        assert torch.equal(resumed.session.scores[name], full.session.scores[name])


def test_sparsifier_runs_edge_popup_in_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(EdgePopup(0.5, verbose=False), model, opt, total_steps=20)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[2].weight, before[2])
    assert sparsifier.masks.kept() == {"0.weight": 80, "2.weight": 24}


# ------------------------------------------------------------------------------------ trainable thresholds
def test_threshold_step_gradients_follow_the_long_tailed_estimator():
    torch.manual_seed(0)
    weight = torch.randn(4, 6, requires_grad=True)
    threshold = torch.tensor([0.1, 0.5, 1.2, 0.0], requires_grad=True)
    upstream = torch.randn(4, 6)
    rule = get_mask_rule("row_threshold")
    out = rule.effective(weight, threshold, torch.empty(0))
    x = weight.detach().abs() - threshold.detach().unsqueeze(1)
    mask = (x > 0).float()
    assert torch.equal(out, weight.detach() * mask)
    out.backward(upstream)
    ax = x.abs()
    slope = torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1.0, torch.tensor(0.4), torch.tensor(0.0)))
    through = upstream * weight.detach() * slope
    assert torch.allclose(weight.grad, upstream * mask + through * weight.detach().sign())
    assert torch.allclose(threshold.grad, -through.sum(1))


def test_threshold_reset_when_a_layer_falls_to_one_percent():
    rule = get_mask_rule("row_threshold")
    weight = torch.full((10, 20), 0.5)
    weight[0, 0] = 2.0  # 1 of 200 weights above the thresholds: density 0.005
    thresholds = torch.full((10,), 1.0)
    mask = rule.binarize(thresholds, weight, 0.0, None, LINEAR, None)
    assert torch.equal(thresholds, torch.zeros(10)) and bool(mask.all())  # reset to 0: every weight back


def test_trainable_thresholds_prune_by_the_regulariser():
    from lightning_pai import TrainableThresholds

    cb = TrainableThresholds(alpha=0.05, lr=0.05, verbose=False)
    module, _ = fit(cb, epochs=2)
    assert cb.final_sparsity is None
    assert cb.masks.density < 1.0  # the thresholds rose from 0 and pruned
    for name, t in cb.session.scores.items():
        w = module.get_parameter(name).detach()
        assert t.shape == (w.shape[0],) and bool((t > 0).any())
        assert torch.equal(cb.masks[name], w.abs() > t.view(-1, *[1] * (w.dim() - 1)))


# ------------------------------------------------------------------- Zhou et al.'s lottery-ticket variants
def test_mask_criteria_formulas():
    from lightning_pai.core.lottery import CRITERIA

    wi = torch.tensor([1.0, -2.0, 0.5, -0.1])
    wf = torch.tensor([2.0, 1.0, -0.25, -3.0])
    same = torch.tensor([True, False, False, True])
    expected = {
        "large_final": wf.abs(),
        "small_final": -wf.abs(),
        "large_init": wi.abs(),
        "small_init": -wi.abs(),
        "magnitude_increase": wf.abs() - wi.abs(),
        "movement": (wf - wi).abs(),
        "large_final_same_sign": torch.where(same, wf.abs(), 0.0),
        "large_final_diff_sign": torch.where(same, 0.0, wf.abs()),
        "magnitude_increase_same_sign": torch.where(same, wf.abs() - wi.abs(), 0.0),
        "magnitude_increase_diff_sign": torch.where(same, 0.0, wf.abs() - wi.abs()),
    }
    for name, want in expected.items():
        assert torch.equal(CRITERIA[name](wf, wi), want), name


def test_large_init_large_final_is_the_two_threshold_rule():
    """Keeping the top k by min(percentile(|w_i|), percentile(|w_f|)) = keeping the weights above a common
    percentile of both, the percentile set so that k remain (the reference's bisection)."""
    from lightning_pai.core.lottery import CRITERIA

    gen = torch.Generator().manual_seed(0)
    wi, wf = torch.randn(200, generator=gen), torch.randn(200, generator=gen)
    scores = CRITERIA["large_init_large_final"](wf, wi)
    for p in (0.3, 0.5, 0.8):
        both = (wi.abs() >= wi.abs().quantile(p, interpolation="lower")) & (
            wf.abs() >= wf.abs().quantile(p, interpolation="lower")
        )
        k = int(both.sum())
        kept = torch.zeros(200, dtype=torch.bool)
        kept[scores.topk(k).indices] = True
        assert torch.equal(kept, both), p


def _lottery_fit(**kwargs):
    import pytorch_lightning as pl

    from lightning_pai import LotteryTicket

    cb = LotteryTicket(2, 0.5, epochs_per_round=1, distribution="uniform", verbose=False, **kwargs)
    seen = {}

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[f"start{trainer.current_epoch}"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_epoch_end(self, trainer, pl_module):
            seen[f"end{trainer.current_epoch}"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    fit(cb, epochs=2, extra=[Watch()])
    return cb, seen


def test_lottery_ticket_magnitude_increase_criterion():
    from lightning_pai.core.lottery import prune_remaining

    cb, seen = _lottery_fit(criterion="magnitude_increase")
    names = cb.masks.names
    scores = {n: seen["end0"][n].abs() - seen["start0"][n].abs() for n in names}
    ones = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    assert all(torch.equal(cb.mask_history[1][n], m) for n, m in prune_remaining(scores, ones, 0.5, "uniform").items())
    magnitude = prune_remaining({n: seen["end0"][n].abs() for n in names}, ones, 0.5, "uniform")
    assert not all(torch.equal(cb.mask_history[1][n], magnitude[n]) for n in names)  # another criterion indeed


def test_lottery_ticket_signed_constant_rewind():
    cb, seen = _lottery_fit(rewind_to="signed_constant")
    for n in cb.masks.names:
        w0, w1, mask = seen["start0"][n], seen["start1"][n], cb.mask_history[1][n]
        assert torch.equal(w1[mask], (torch.sign(w0) * w0.std())[mask])  # sign(w_i) · std of the layer's w_i
        assert not w1[~mask].any()
    with pytest.raises(ValueError, match="`rewind_to` must be .* 'none' or 'signed_constant'"):
        from lightning_pai import LotteryTicket

        LotteryTicket(rewind_to="signed")
    with pytest.raises(ValueError, match="`criterion='small_final'` gives signed scores"):
        from lightning_pai import LotteryTicket

        LotteryTicket(criterion="small_final", distribution="lamp")


# -------------------------------------------------------------------------------- continuous sparsification
def test_continuous_sparsification_rounds_temperature_and_ticket():
    import pytorch_lightning as pl

    from lightning_pai import ContinuousSparsification

    cb = ContinuousSparsification(2, 2, rewind_epoch=1, penalty=1e-3, lr=1.0, final_temperature=100.0, verbose=False)
    seen = {}

    class Watch(pl.Callback):  # after the method: what each epoch starts with
        def on_train_epoch_start(self, trainer, pl_module):
            session = cb.session
            seen[trainer.current_epoch] = {
                "beta": session.beta,
                "ticket": session.ticket,
                "scores": {n: s.detach().clone() for n, s in session.scores.items()},
                "weights": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            }

        def on_train_epoch_end(self, trainer, pl_module):
            seen[f"end{trainer.current_epoch}"] = {n: s.detach().clone() for n, s in cb.session.scores.items()}

    module, _ = fit(cb, epochs=6, extra=[Watch()])  # rounds 0, 1 (2 epochs each), then 2 epochs of ticket
    assert [seen[e]["beta"] for e in range(4)] == [1.0, 100.0, 1.0, 100.0]  # 100^(e / (E - 1)) within a round
    assert [seen[e]["ticket"] for e in range(6)] == [False] * 4 + [True] * 2
    for n, s in seen[2]["scores"].items():  # round 1 starts from min(β_T s, s_0)
        assert torch.equal(s, torch.clamp(100.0 * seen["end1"][n], max=0.0))
    for n, w in seen[4]["weights"].items():  # the ticket rewinds every parameter to the start of epoch 1
        assert torch.equal(w, seen[1]["weights"][n]), n
    for n, s in cb.session.scores.items():
        assert torch.equal(s, seen["end3"][n])  # the ticket's scores, hence its mask, stay fixed
        assert torch.equal(cb.masks[n], s > 0)
    assert 0.0 < cb.masks.density < 1.0  # the penalty pruned some
    assert_enforced(cb, module)


def test_soft_mask_gradient_is_exact():
    rule = get_mask_rule("sigmoid")
    weight, scores = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    out = rule.effective(weight, scores, torch.empty(0), 4.0)
    soft = torch.sigmoid(4.0 * scores.detach()) / 0.5  # σ(s_0 = 0) = 0.5
    assert torch.allclose(out, weight.detach() * soft)
    out.sum().backward()
    assert torch.allclose(scores.grad, weight.detach() * 4.0 * soft * (1 - torch.sigmoid(4.0 * scores.detach())))


def test_a_second_fit_continues_from_the_scores():
    from lightning_pai.core.learned import get_mask_rule

    cb = EdgePopup(0.5, lr=5.0, verbose=False)
    module, _ = fit(cb, epochs=1)
    after_first = {n: s.detach().clone() for n, s in cb.session.scores.items()}
    init = torch.Generator().manual_seed(cb.seed)
    initial = {n: get_mask_rule("topk_abs").init(p, init) for n, p in cb.masks.params.items()}
    make_trainer("pytorch_lightning", callbacks=[cb], max_epochs=1, max_steps=2).fit(module, make_dataloader())
    for n, s in cb.session.scores.items():
        assert not torch.equal(after_first[n], initial[n])  # trained in the first fit
        assert torch.equal(s, after_first[n])  # not re-initialised; the cosine schedule had reached lr 0
    assert cb.session.scheduler.get_last_lr() == [0.0]


def test_a_non_finite_score_gradient_skips_the_score_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = MovementPruning(0.5, initial_warmup=0, final_warmup=0, verbose=False)
    sparsifier = Sparsifier(method, model, opt, total_steps=4)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    for poison in (False, True, False):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: s.detach().clone() for n, s in method.session.scores.items()}
        if poison:
            method.session.scores["0.weight"].grad[0, 0] = float("nan")
        sparsifier.step()
        changed = any(not torch.equal(before[n], s) for n, s in method.session.scores.items())
        assert changed != poison
        assert all(bool(s.isfinite().all()) for s in method.session.scores.values())
