"""The sparse engine on its own: plain PyTorch, numbers checked by hand."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_pai.core import (
    MaskSet,
    ScoringContext,
    apportion,
    compute_masks,
    erdos_renyi_densities,
    get_distribution,
    get_scorer,
    lamp_scores,
    list_distributions,
    list_scorers,
    register_scorer,
    select_targets,
    sparsity_report,
    topk_mask,
)


def _scores(**layers):
    return {n: torch.tensor(v, dtype=torch.float32) for n, v in layers.items()}


# ------------------------------------------------------------------ selection
def test_topk_mask_exact_count_and_deterministic_ties():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert topk_mask(s, 3).tolist() == [False, True, True, False, True]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 5).sum() == 5
    all_tied = torch.zeros(4, 6)
    m = topk_mask(all_tied, 7)
    assert m.sum() == 7 and m.reshape(-1)[:7].all()  # earliest entries win ties


@pytest.mark.parametrize("k", [0, 1, 17, 999, 1000])
def test_topk_mask_matches_sort(k):
    s = torch.randn(10, 100)
    expected = torch.zeros(1000, dtype=torch.bool)
    expected[torch.sort(s.reshape(-1), descending=True, stable=True).indices[:k]] = True
    assert torch.equal(topk_mask(s, k).reshape(-1), expected)


def test_topk_mask_rejects_nan_and_bad_k():
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError):
        topk_mask(torch.ones(3), 4)


def test_apportion_largest_remainder():
    assert apportion({"a": 2.5, "b": 2.5, "c": 1.0}, {"a": 5, "b": 5, "c": 1}, 6) == {"a": 3, "b": 2, "c": 1}
    assert apportion({"a": 0.4, "b": 0.3}, {"a": 1, "b": 1}, 1) == {"a": 1, "b": 0}


# -------------------------------------------------------------- distributions
def test_global_keeps_highest_over_all_layers():
    counts = get_distribution("global")(_scores(a=[0.1, 0.9, 0.5], b=[0.8, 0.2]), 0.6)
    assert counts == {"a": 2, "b": 1}


def test_uniform_counts():
    s = {"a": torch.rand(10, 10), "b": torch.rand(3, 7)}
    assert get_distribution("uniform")(s, 0.25) == {"a": 25, "b": 5}  # 5.25 -> 5, total round(30.25)=30


def test_erk_hand_computed():
    # Linear(10->20): raw = 30/200; Conv2d(3->4, 3x3): raw = 13/108. density 0.5 of 308 -> 154 kept.
    shapes = {"fc": torch.Size([20, 10]), "conv": torch.Size([4, 3, 3, 3])}
    eps = 154 / (30 / 200 * 200 + 13 / 108 * 108)
    dens = erdos_renyi_densities(shapes, 0.5)
    assert dens["fc"] == pytest.approx(eps * 30 / 200)
    assert dens["conv"] == pytest.approx(eps * 13 / 108)
    counts = get_distribution("erk")({n: torch.rand(s) for n, s in shapes.items()}, 0.5)
    assert counts == {"fc": 107, "conv": 47}  # 107.44 and 46.56, total 154


def test_er_uses_channel_dims_only():
    shapes = {"fc": torch.Size([20, 10]), "conv": torch.Size([4, 3, 3, 3])}
    eps = 154 / (30 / 200 * 200 + 7 / 12 * 108)
    dens = erdos_renyi_densities(shapes, 0.5, kernel=False)
    assert dens["conv"] == pytest.approx(eps * 7 / 12)
    assert dens["fc"] == pytest.approx(eps * 30 / 200)


def test_erk_dense_layer_redistribution():
    # The tiny layer's ERK density would be ~20 > 1: it becomes dense, the big layer takes the rest.
    shapes = {"small": torch.Size([3, 2]), "big": torch.Size([100, 100])}
    dens = erdos_renyi_densities(shapes, 0.5)
    assert dens["small"] == 1.0
    assert dens["big"] == pytest.approx((5003 - 6) / 10000)
    counts = get_distribution("erk")({n: torch.rand(s) for n, s in shapes.items()}, 0.5)
    assert counts == {"small": 6, "big": 4997}


def test_lamp_scores_and_counts_hand_computed():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.6])
    assert torch.allclose(lamp_scores(a), torch.tensor([1 / 30, 4 / 29, 9 / 25, 1.0], dtype=torch.float64))
    assert torch.allclose(lamp_scores(b), torch.tensor([0.25 / 0.61, 1.0], dtype=torch.float64))
    assert get_distribution("lamp")({"a": a, "b": b}, 0.5) == {"a": 1, "b": 2}
    assert get_distribution("global")({"a": a, "b": b}, 0.5) == {"a": 3, "b": 0}  # magnitude would collapse b


@pytest.mark.parametrize("name", list_distributions())
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.93])
def test_every_distribution_hits_the_target(name, density):
    torch.manual_seed(0)
    shapes = [(64, 32), (16, 8, 3, 3), (10, 64), (5, 1)]
    scores = {f"l{i}": torch.rand(s) for i, s in enumerate(shapes)}
    counts = get_distribution(name)(scores, density)
    total = sum(math.prod(s) for s in shapes)
    assert sum(counts.values()) == round(density * total)
    assert all(0 <= counts[n] <= scores[n].numel() for n in scores)
    masks = compute_masks(scores, 1 - density, name)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown `distribution` 'nope'.*erk.*global.*lamp.*register_distribution"):
        get_distribution("nope")
    with pytest.raises(ValueError, match=r"Unknown `method` 'nope'.*magnitude.*random.*register_scorer"):
        get_scorer("nope")


# -------------------------------------------------------------------- scorers
@pytest.mark.parametrize("name", list_scorers())
def test_every_scorer_scores_every_target(name):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    params = select_targets(model)
    batches = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))]
    scores = get_scorer(name)(ScoringContext(params=params, module=model, seed=1, batches=batches))
    assert list(scores) == list(params)
    for n, p in params.items():
        assert scores[n].shape == p.shape and torch.isfinite(scores[n]).all()


def test_magnitude_and_random_scorers():
    model = nn.Linear(4, 3)
    params = select_targets(model)
    assert torch.equal(get_scorer("magnitude")(ScoringContext(params))["weight"], model.weight.abs())
    r0 = get_scorer("random")(ScoringContext(params, seed=0))["weight"]
    assert torch.equal(r0, get_scorer("random")(ScoringContext(params, seed=0))["weight"])
    assert not torch.equal(r0, get_scorer("random")(ScoringContext(params, seed=1))["weight"])


def test_register_custom_scorer():
    @register_scorer("test_neg_magnitude", overwrite=True)
    def _neg(ctx):
        return {n: -p.detach().abs() for n, p in ctx.params.items()}

    w = nn.Linear(4, 1)
    with torch.no_grad():
        w.weight.copy_(torch.tensor([[1.0, -4.0, 2.0, 3.0]]))
    masks = compute_masks(get_scorer("test_neg_magnitude")(ScoringContext(select_targets(w))), 0.5)
    assert masks["weight"].tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test_neg_magnitude", _neg)


# -------------------------------------------------------------------- targets
class _Net(nn.Module):
    class MyLinear(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.fc = self.MyLinear(6, 2)


def test_default_targets_are_linear_and_conv_weights():
    assert list(select_targets(_Net())) == ["conv.weight", "fc.weight"]


def test_include_and_exclude():
    net = _Net()
    assert list(select_targets(net, include=["*.bias"])) == ["conv.bias", "norm.bias", "fc.bias"]
    assert list(select_targets(net, include=nn.Embedding)) == ["emb.weight"]
    assert list(select_targets(net, include=[nn.Conv1d, "norm.*"])) == ["conv.weight", "norm.weight", "norm.bias"]
    assert list(select_targets(net, exclude="fc.*")) == ["conv.weight"]
    assert list(select_targets(net, exclude=nn.Conv1d)) == ["fc.weight"]


def test_bad_selectors():
    with pytest.raises(ValueError, match=r"`include` entry 'enc\.\*' matches no parameter"):
        select_targets(_Net(), include="enc.*")
    with pytest.raises(ValueError, match=r"`exclude` entry 'emb.weight' matches no parameter among the targets"):
        select_targets(_Net(), exclude="emb.weight")
    with pytest.raises(ValueError, match="no prunable parameter"):
        select_targets(nn.Sequential(nn.Embedding(3, 2), nn.LayerNorm(2)))
    with pytest.raises(ValueError, match="no prunable parameter"):
        select_targets(_Net(), exclude=[nn.Conv1d, nn.Linear])
    with pytest.raises(TypeError, match="`include`"):
        select_targets(_Net(), include=[3])


def test_shared_parameter_selected_once():
    a = nn.Linear(3, 3)
    net = nn.Sequential(a, nn.ReLU(), a)
    assert list(select_targets(net)) == ["0.weight"]


# ---------------------------------------------------------------- enforcement
def _train(model, masks, opt, steps=50, attach=True):
    if attach:
        masks.attach(opt)
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_masked_weights_and_state_stay_zero(opt_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = MaskSet.from_module(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, masks, opt, steps=3, attach=False)  # optimizer state exists before pruning
    scores = get_scorer("magnitude")(ScoringContext(masks.params))
    masks.update_(compute_masks(scores, 0.75, "uniform"), optimizers=[opt])
    assert masks.kept() == {"0.weight": 32, "2.weight": 16}
    _train(model, masks, opt)
    for name, p in masks.params.items():
        off = ~masks[name]
        assert (p[off] == 0).all() and (p[~off] != 0).all()
        state = [v for v in opt.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
        assert state and all((v[off] == 0).all() for v in state)


def test_other_optimizers_get_the_masks_reapplied_after_each_step():
    class Drifting(torch.optim.SGD):  # a subclass: not known to keep zeros, so the post-hook is registered
        @torch.no_grad()
        def step(self, closure=None):
            out = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(0.01)
            return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = MaskSet.from_module(model)
    masks.update_(compute_masks(get_scorer("magnitude")(ScoringContext(masks.params)), 0.75, "uniform"))
    opt = Drifting(model.parameters(), lr=0.1)
    _train(model, masks, opt, steps=5)
    assert len(masks._handles) == 2  # grad pre-hook and weight post-hook
    for name, p in masks.params.items():
        assert (p[~masks[name]] == 0).all()
    plain = MaskSet.from_module(model)
    plain.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(plain._handles) == 1  # SGD keeps zeros by itself: only the grad pre-hook


def test_without_enforcement_weights_revive():
    """Control for the test above: masking once, then training densely, does not keep zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = MaskSet.from_module(model)
    masks.update_(compute_masks(get_scorer("magnitude")(ScoringContext(masks.params)), 0.75))
    _train(model, masks, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), attach=False)
    assert (model[0].weight[~masks["0.weight"]] != 0).any()


def test_detach_removes_hooks():
    model = nn.Linear(4, 4)
    masks = MaskSet.from_module(model)
    masks.update_({"weight": torch.eye(4, dtype=torch.bool)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    masks.detach()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert (model.weight[~torch.eye(4, dtype=torch.bool)] != 0).any()


def test_mask_memory_is_one_byte_per_weight():
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    masks = MaskSet.from_module(model)
    nbytes = sum(m.element_size() * m.numel() for _, m in masks.items())
    assert nbytes == masks.total == 5500


def test_compute_masks_only_shrinks():
    torch.manual_seed(0)
    scores = {"a": torch.rand(20, 20), "b": torch.rand(10, 30)}
    m1 = compute_masks(scores, 0.5, "global")
    new_scores = {n: torch.rand_like(s) for n, s in scores.items()}  # unrelated scores
    for dist in list_distributions():
        m2 = compute_masks(new_scores, 0.8, dist, masks=m1)
        assert all((m2[n] & ~m1[n]).sum() == 0 for n in scores)
        assert sum(int(m.sum()) for m in m2.values()) == 140


def test_state_dict_round_trip_and_bind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    masks = MaskSet.from_module(model)
    masks.update_(compute_masks(get_scorer("random")(ScoringContext(masks.params, seed=3)), 0.5))
    sd = masks.state_dict()
    assert all(t.dtype == torch.bool and t.device.type == "cpu" for t in sd.values())
    other = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    restored = MaskSet.from_module(other)
    restored.load_state_dict(sd)
    restored.apply_()
    assert all(torch.equal(restored[n], masks[n]) for n in masks)
    assert all((p[~restored[n]] == 0).all() for n, p in restored.params.items())
    with pytest.raises(KeyError, match="Mask names differ"):
        restored.load_state_dict({"0.weight": sd["0.weight"]})
    with pytest.raises(KeyError, match="no parameter named"):
        masks.bind_(nn.Sequential(nn.Linear(6, 6)))


def test_sparsity_report_numbers_and_table():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    masks = MaskSet.from_module(model)
    masks.update_({"0.weight": torch.zeros(5, 4, dtype=torch.bool), "2.weight": torch.ones(2, 5, dtype=torch.bool)})
    for rep in (sparsity_report(model, masks), sparsity_report(model)):
        assert [(r.name, r.kept, r.total) for r in rep.rows] == [("0.weight", 0, 20), ("2.weight", 10, 10)]
        assert rep.sparsity == pytest.approx(20 / 30)
        assert rep.collapsed == ["0.weight"]
        assert rep.metrics()["sparsity/0.weight"] == 1.0
        assert "COLLAPSED" in str(rep) and "10 / 30" in str(rep)


def test_core_never_imports_lightning_nor_the_layers_above_it():
    """One-way layering: core imports neither a training framework nor anything of lightning_pai outside core."""
    core = Path(__file__).parents[1] / "lightning_pai" / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"lightning", "pytorch_lightning", "lightning_fabric", "transformers"}
                assert not name.startswith("lightning_pai.") or name.startswith("lightning_pai.core"), (path, name)


def test_effective_masks_hand_example():
    from lightning_pai.core.report import effective_masks

    # 2 -> 3 -> 3 -> 1 MLP: hidden unit a0 gets no input, hidden unit b2 feeds nothing.
    m1 = torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    m2 = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    m3 = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    eff = effective_masks({"a": m1, "b": m2, "c": m3})
    assert eff["a"].int().tolist() == [[0, 0], [1, 0], [1, 1]]
    assert eff["b"].int().tolist() == [[0, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert eff["c"].int().tolist() == [[1, 1, 0]]
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    masks = MaskSet.from_module(model)
    masks.update_({"0.weight": m1, "1.weight": m2, "2.weight": m3})
    rep = sparsity_report(model, masks, effective=True)
    assert [r.effective_kept for r in rep.rows] == [3, 3, 2]
    assert [r.kept for r in rep.rows] == [3, 6, 2]
    assert rep.effective_sparsity == pytest.approx(1 - 8 / 18)
    assert rep.metrics()["sparsity/effective"] == pytest.approx(1 - 8 / 18)
    assert "Effective density" in str(rep)


def test_effective_masks_conv_to_linear_flatten_and_branch_error():
    from lightning_pai.core.report import effective_masks

    conv = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    conv[1] = False  # channel 1 is dead: its 4 flattened positions feed nothing
    fc = torch.ones(3, 8, dtype=torch.bool)  # 2 channels x 4 positions, channel-major
    eff = effective_masks({"conv": conv, "fc": fc})
    assert eff["fc"].sum() == 12 and not eff["fc"][:, 4:].any()
    assert torch.equal(eff["conv"], conv)
    with pytest.raises(ValueError, match="plain chain"):
        effective_masks({"a": torch.ones(3, 2, dtype=torch.bool), "b": torch.ones(2, 5, dtype=torch.bool)})


def _concat_topk(scores, k):
    """The reference: kthvalue top-k on the concatenation (one small tensor), split back."""
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]  # highest first, then position
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return list(keep.split([s.numel() for s in scores]))


@pytest.mark.parametrize(
    "scores",
    [
        [torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.randn(7)],
        [torch.tensor([1.0, 2.0, 2.0, 0.0]), torch.tensor([2.0, 2.0, 1.0])],  # ties across layers
        [torch.tensor([-0.0, 0.0, -1.0, -math.inf, math.inf]), torch.tensor([0.0, -0.0, 3.5])],
        [torch.randn(9, dtype=torch.float64), torch.randn(4, dtype=torch.float64)],
        [torch.randn(5).half(), torch.randn(6)],
        [torch.randint(0, 3, (8,)), torch.randint(0, 3, (5,))],
    ],
)
def test_topk_masks_equal_one_top_k_over_the_concatenation(scores):
    from lightning_pai.core.select import kth_largest, topk_masks

    n = sum(s.numel() for s in scores)
    for k in range(n + 1):
        got = topk_masks(scores, k)
        assert [m.shape for m in got] == [s.shape for s in scores]
        assert sum(int(m.sum()) for m in got) == k
        for m, ref in zip(got, _concat_topk(scores, k)):
            assert torch.equal(m.reshape(-1), ref), k
    if all(s.dtype in (torch.float32, torch.float64) for s in scores) and len({s.dtype for s in scores}) == 1:
        values = sorted(torch.cat([s.reshape(-1) for s in scores]).tolist(), reverse=True)
        assert [kth_largest(scores, k) for k in range(1, n + 1)] == values  # exact, one of the values


def test_topk_mask_above_the_kthvalue_size_uses_the_bisection_with_the_same_result():
    from lightning_pai.core import select

    x = torch.randint(0, 1000, (select._KTHVALUE_MAX + 5,), generator=torch.Generator().manual_seed(1)).float()
    k = 123_457
    mask = topk_mask(x, k)
    threshold = torch.kthvalue(x, x.numel() - k + 1).values
    assert int(mask.sum()) == k
    assert torch.equal(mask[x > threshold], torch.ones(int((x > threshold).sum()), dtype=torch.bool))
    ties = torch.nonzero(x == threshold).squeeze(1)
    kept_ties = ties[mask[ties]]
    assert torch.equal(kept_ties, ties[: kept_ties.numel()])  # the earliest ties are kept
