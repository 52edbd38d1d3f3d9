"""Effective sparsity on any graph by synaptic flow, and pruning to a target effective sparsity.

Vysogorets & Kempe 2021 (arXiv:2107.02306): a kept weight is effective iff it lies on an input-to-output path of
kept weights. The hand-built graphs below have their effective counts worked out in the comments.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_dataloader, make_module, make_trainer
from torch import nn
from torch.nn import functional as F

from lightning_pai import PruneAtInit, Sparsifier
from lightning_pai.core.effective import effective_masks_by_flow
from lightning_pai.core.masks import MaskSet, compute_masks
from lightning_pai.core.pruning import Pruner
from lightning_pai.core.report import effective_masks, sparsity_report
from lightning_pai.core.scorers import ScoringContext, get_scorer
from lightning_pai.core.session import Host

pytestmark = pytest.mark.usefixtures("one_thread")


def _counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def _ones(model, *names, dead=()):
    """All-kept masks of ``names``, with the ``dead`` ones all pruned."""
    return {n: torch.full(model.get_parameter(n).shape, n not in dead) for n in names}


def _effective_sparsity(model, masks, example):
    eff = effective_masks_by_flow(model, masks, example)
    return 1.0 - sum(int(m.sum()) for m in eff.values()) / sum(m.numel() for m in masks.values())


# ------------------------------------------------------------------------------------ (a) chains: as the chain method
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.8, 0.9, 0.95, 0.98])
def test_flow_equals_the_chain_method_on_an_mlp(sparsity):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 10))
    names = ["0.weight", "2.weight", "4.weight"]
    gen = torch.Generator().manual_seed(int(sparsity * 100))
    for _ in range(5):
        masks = {n: torch.rand(model.get_parameter(n).shape, generator=gen) >= sparsity for n in names}
        chain = effective_masks(masks)
        flow = effective_masks_by_flow(model, masks, torch.randn(1, 20))
        assert all(torch.equal(chain[n], flow[n]) for n in names)
    report = sparsity_report(model, masks, effective=True, example_inputs=torch.randn(3, 20))
    assert [r.effective_kept for r in report.rows] == [int(chain[n].sum()) for n in names]


# ------------------------------------------------------------------------------------------------ (b) residual block
class _Residual(nn.Module):
    """stem (1->2, 1x1) -> x + b(relu(a(x))) (a, b: 2->2, 3x3) -> average pool -> head (2->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.b(F.relu(self.a(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


RESIDUAL = ["stem.weight", "a.weight", "b.weight", "head.weight"]


def test_a_dead_residual_branch_leaves_the_shortcut_effective():
    model = _Residual()
    masks = _ones(model, *RESIDUAL, dead=["b.weight"])
    report = sparsity_report(model, masks, effective=True, example_inputs=torch.randn(1, 1, 4, 4))
    # b is fully pruned, so a (which feeds only b) is cut off from the output: all 36 of its weights are
    # ineffective; stem and head stay connected through the identity shortcut.
    assert [r.effective_kept for r in report.rows] == [2, 0, 0, 6]
    assert report.sparsity == pytest.approx(36 / 80) and report.effective_sparsity == pytest.approx(72 / 80)


def test_a_half_dead_residual_branch():
    model = _Residual()
    masks = _ones(model, *RESIDUAL)
    masks["b.weight"][:, 1] = False  # b reads only a's channel 0: a's 18 weights into channel 1 lead nowhere
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 1, 4, 4))
    assert _counts(eff) == {"stem.weight": 2, "a.weight": 18, "b.weight": 18, "head.weight": 6}
    assert not eff["a.weight"][1].any() and eff["a.weight"][0].all()


def test_the_chain_check_still_refuses_the_residual_block_without_inputs():
    model = _Residual()
    with pytest.raises(ValueError, match=re.escape("Pass `example_inputs=` (one input of the model)")):
        sparsity_report(model, _ones(model, *RESIDUAL), effective=True)


# ----------------------------------------------------------------------------------- (c) concatenation (DenseNet-like)
class _Dense(nn.Module):
    """stem (1->2) ; c1: 2->2 on stem ; c2: 4->2 on cat(stem, c1) ; head: 6->2 on cat(stem, c1, c2), all 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.c1, self.c2 = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h1 = torch.cat([s, F.relu(self.c1(s))], 1)
        h2 = torch.cat([h1, F.relu(self.c2(h1))], 1)
        return self.head(F.adaptive_max_pool2d(h2, 1).flatten(1))


DENSE = ["stem.weight", "c1.weight", "c2.weight", "head.weight"]


def test_a_dead_concatenated_branch():
    model = _Dense()
    masks = _ones(model, *DENSE, dead=["c1.weight"])
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 1, 3, 3))
    # c1's channels (positions 2, 3 of both concatenations) carry nothing: c2's 4 weights and head's 4 weights that
    # read them are ineffective; stem's, c2's other 4 and head's other 8 stay.
    assert _counts(eff) == {"stem.weight": 2, "c1.weight": 0, "c2.weight": 4, "head.weight": 8}
    assert not eff["c2.weight"][:, 2:].any() and not eff["head.weight"][:, 2:4].any()


def test_a_concatenated_branch_dead_at_both_ends():
    model = _Dense()
    masks = _ones(model, *DENSE, dead=["c1.weight"])
    masks["head.weight"][:, 4:] = False  # c2's outputs are read by nothing: c2 is cut off from the output
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 1, 3, 3))
    assert _counts(eff) == {"stem.weight": 2, "c1.weight": 0, "c2.weight": 0, "head.weight": 4}
    report = sparsity_report(model, masks, effective=True, example_inputs=torch.randn(1, 1, 3, 3))
    assert report.kept == 2 + 8 + 8 and report.effective_sparsity == pytest.approx(1 - 6 / 26)


# ----------------------------------------------------------------------------------------------- (d) 1x1 shortcut conv
class _Shortcut(nn.Module):
    """stem (1->2) -> b(relu(a(x))) + sc(x) (a: 2->3, b: 3->4, 3x3; sc: 2->4, 1x1) -> pool -> head (4->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.sc = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))) + self.sc(x))
        return self.head(F.avg_pool2d(x, 4).flatten(1))


SHORTCUT = ["stem.weight", "a.weight", "b.weight", "sc.weight", "head.weight"]


def test_a_shortcut_convolution_is_a_masked_path_too():
    model = _Shortcut()
    masks = _ones(model, *SHORTCUT)
    masks["head.weight"][:, 2:] = False  # the head reads channels 0, 1 only (4 weights)
    masks["b.weight"][:2] = False  # b writes channels 2, 3 only (54 weights), which nothing reads
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 1, 4, 4))
    # b and a (which feeds only b) are cut off from the output; the shortcut's 4 weights into channels 0, 1
    # carry the stem's signal to the head, its 4 weights into channels 2, 3 do not.
    assert _counts(eff) == {"stem.weight": 2, "a.weight": 0, "b.weight": 0, "sc.weight": 4, "head.weight": 4}
    assert eff["sc.weight"][:2].all() and not eff["sc.weight"][2:].any()


def test_a_dead_shortcut_convolution_leaves_the_main_branch():
    model = _Shortcut()
    masks = _ones(model, *SHORTCUT, dead=["sc.weight"])
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 1, 4, 4))
    assert _counts(eff) == {"stem.weight": 2, "a.weight": 54, "b.weight": 108, "sc.weight": 0, "head.weight": 8}


# -------------------------------------------------------------------------------------- (e) a disconnected unit
def test_an_all_zero_input_row_disconnects_the_unit():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = _ones(model, "0.weight", "2.weight", "4.weight")
    masks["0.weight"][1] = False  # hidden unit 1 has no input: the 4 weights reading it are ineffective
    masks["4.weight"][:, 3] = False  # unit 3 of the second layer reaches no output: its 3 other weights are too
    eff = effective_masks_by_flow(model, masks, torch.randn(1, 3))
    assert _counts(eff) == {"0.weight": 9, "2.weight": 16 - 4 - 3, "4.weight": 6}
    assert not eff["2.weight"][:, 1].any() and not eff["2.weight"][3].any()
    assert all(torch.equal(eff[n], m) for n, m in effective_masks(masks).items())


# -------------------------------------------------------------------------------------------------- (f) ResNet-18
def _resnet_channel_reference(masks):
    """Channel-level reachability through torchvision's ResNet-18 wiring, written out by hand."""
    conn = {n: m.reshape(m.shape[0], m.shape[1], -1).any(-1).float() for n, m in masks.items()}  # [out, in]
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    reach = {"conv1.weight": torch.ones(3, dtype=torch.bool)}
    alive = (conn["conv1.weight"] @ reach["conv1.weight"].float()) > 0
    for b in blocks:
        reach[f"{b}.conv1.weight"] = alive
        reach[f"{b}.conv2.weight"] = mid = (conn[f"{b}.conv1.weight"] @ alive.float()) > 0
        shortcut = alive
        if f"{b}.downsample.0.weight" in masks:
            reach[f"{b}.downsample.0.weight"] = alive
            shortcut = (conn[f"{b}.downsample.0.weight"] @ alive.float()) > 0
        alive = ((conn[f"{b}.conv2.weight"] @ mid.float()) > 0) | shortcut
    reach["fc.weight"] = alive
    useful = {"fc.weight": torch.ones(masks["fc.weight"].shape[0], dtype=torch.bool)}
    into = (conn["fc.weight"].t() @ useful["fc.weight"].float()) > 0
    for b in reversed(blocks):
        useful[f"{b}.conv2.weight"] = into
        useful[f"{b}.conv1.weight"] = mid = (conn[f"{b}.conv2.weight"].t() @ into.float()) > 0
        shortcut = into
        if f"{b}.downsample.0.weight" in masks:
            useful[f"{b}.downsample.0.weight"] = into
            shortcut = (conn[f"{b}.downsample.0.weight"].t() @ into.float()) > 0
        into = ((conn[f"{b}.conv1.weight"].t() @ mid.float()) > 0) | shortcut
    useful["conv1.weight"] = into
    return {
        n: m & (useful[n][:, None] & reach[n][None, :]).view(*m.shape[:2], *([1] * (m.dim() - 2)))
        for n, m in masks.items()
    }


def test_resnet18_at_99_percent_matches_the_channel_reference():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    targets = MaskSet.from_module(model)
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) >= 0.99 for n, p in targets.params.items()}
    report = sparsity_report(model, masks, effective=True, example_inputs=torch.randn(1, 3, 224, 224))
    reference = _resnet_channel_reference(masks)
    assert [r.effective_kept for r in report.rows] == [int(reference[r.name].sum()) for r in report.rows]
    assert report.kept == 111_863 and sum(r.effective_kept for r in report.rows) == 89_692
    assert report.effective_sparsity == pytest.approx(1 - 89_692 / 11_172_032)
    assert report.effective_sparsity > report.sparsity == pytest.approx(1 - 111_863 / 11_172_032)
    # At 64x64 layer4 runs on 2x2 maps, where a single kept corner tap only meets zero padding: the flow counts
    # such taps out (as the paper's SynFlow computation does), the channel-level graph cannot see them.
    small = effective_masks_by_flow(model, masks, torch.randn(1, 3, 64, 64))
    assert all(bool((small[n] <= reference[n]).all()) for n in masks)
    assert {n for n in masks if not torch.equal(small[n], reference[n])} == {"layer4.1.conv1.weight"}


# ------------------------------------------------------------------------------ flows through other layer types
def test_attention_normalisation_and_embeddings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    masks = MaskSet.from_module(model, include=["*weight"])
    dense = {n: torch.ones_like(m) for n, m in masks.items()}
    ids = torch.tensor([[1, 2, 3]])
    assert _counts(effective_masks_by_flow(model, dense, ids)) == _counts(dense)
    cut = dict(dense)
    cut["1.norm2.weight"] = torch.zeros_like(cut["1.norm2.weight"])  # the last norm's scale cuts every path
    eff = effective_masks_by_flow(model, cut, ids)
    assert sum(int(m.sum()) for m in eff.values()) == 0


def test_the_model_is_left_as_it_was():
    model = _Residual().train()
    model.b.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    effective_masks_by_flow(model, _ones(model, *RESIDUAL), torch.randn(1, 1, 4, 4))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert model.training and not model.b.weight.requires_grad and model.a.weight.requires_grad


# ------------------------------------------------------------------------- pruning to a target effective sparsity
class _Net(nn.Module):
    """A small conv net with a residual block (1,448 prunable weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.b(F.relu(self.a(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


SHAPE = (3, 8, 8)


@pytest.mark.parametrize(("method", "distribution"), [("random", "global"), ("magnitude", "global"), ("random", "erk")])
def test_prune_to_an_effective_sparsity_is_the_largest_that_fits(method, distribution):
    torch.manual_seed(0)
    model, target = _Net(), 0.95
    targets = MaskSet.from_module(model)
    total = targets.total
    example = torch.ones(1, *SHAPE)
    kwargs = dict(distribution=distribution, input_shape=SHAPE)
    masks = Pruner(method, target, effective=True, **kwargs).masks(model, targets, Host())
    pruned = total - sum(int(m.sum()) for m in masks.values())
    assert _effective_sparsity(model, masks, example) <= target
    # One more weight pruned in the method's order (lowest score first; the distribution's budgets at that
    # overall direct sparsity) exceeds the target:
    scores = get_scorer(method)(ScoringContext(params=targets.params, seed=0))
    again = compute_masks(scores, pruned / total, distribution, layouts=targets.layouts)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    one_more = compute_masks(scores, (pruned + 1) / total, distribution, layouts=targets.layouts)
    assert _effective_sparsity(model, one_more, example) > target
    # Direct pruning to the target overshoots it effectively; the effective run prunes fewer weights directly.
    direct = Pruner(method, target, **kwargs).masks(model, targets, Host())
    assert pruned / total < target < _effective_sparsity(model, direct, example)
    assert all(bool((masks[n] >= direct[n]).all()) for n in masks)  # the same order, stopped earlier


def test_iterative_scoring_prunes_in_the_order_of_its_rounds():
    torch.manual_seed(0)
    model, target = _Net(), 0.95
    targets = MaskSet.from_module(model)
    kwargs = dict(iterations=5, input_shape=SHAPE)
    masks = Pruner("random", target, effective=True, **kwargs).masks(model, targets, Host())
    direct = Pruner("random", target, **kwargs).masks(model, targets, Host())
    assert _effective_sparsity(model, masks, torch.ones(1, *SHAPE)) <= target
    assert all(bool((masks[n] >= direct[n]).all()) for n in masks)
    assert sum(int(m.sum()) for m in masks.values()) > sum(int(m.sum()) for m in direct.values())


def test_effective_pruning_in_a_plain_loop_reports_its_effective_sparsity():
    torch.manual_seed(0)
    model = _Net()
    method = PruneAtInit("random", 0.95, effective=True, input_shape=SHAPE, verbose=False)
    sparsifier = Sparsifier(method, model, torch.optim.SGD(model.parameters(), lr=0.1))
    report = sparsifier.report()
    assert report.effective_sparsity <= 0.95 and report.sparsity < 0.95
    assert report.metrics()["sparsity/effective"] == report.effective_sparsity
    assert "Effective density" in str(report)


def test_effective_pruning_under_a_trainer_takes_the_input_from_the_first_batch(capsys):
    module = make_module(seed=0)
    cb = PruneAtInit("random", 0.97, effective=True)
    make_trainer(callbacks=[cb], max_steps=1).fit(module, make_dataloader())
    assert "Effective density" in capsys.readouterr().out
    report = cb.report(module)
    assert report.effective_sparsity <= 0.97 and report.sparsity < 0.97
    # The tiny module is a plain chain without padding: the chain method agrees with the flow.
    chain = sparsity_report(module, cb.masks, effective=True)
    assert [r.effective_kept for r in chain.rows] == [r.effective_kept for r in report.rows]
    assert "'effective': True" in cb.state_key and "effective" not in PruneAtInit("random", 0.97).state_key


# ----------------------------------------------------------------------------------------------------------- errors
def test_effective_pruning_without_an_input_names_input_shape():
    model = _Net()
    method = PruneAtInit("magnitude", 0.9, effective=True, verbose=False)
    with pytest.raises(ValueError, match=re.escape("pass `input_shape=` (one sample's shape")):
        Sparsifier(method, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_effective_pruning_refuses_nm_and_an_unreachable_target():
    with pytest.raises(ValueError, match=re.escape("`effective=True` prunes to an effective sparsity, `nm`")):
        PruneAtInit("magnitude", 0.5, effective=True, nm="2:4")
    torch.manual_seed(0)
    model = _Net()
    # At 1x1 inputs the 3x3 convolutions only ever use their centre taps: 24 + 64 + 64 + 80 of 1,448 are effective.
    pruner = Pruner("magnitude", 0.5, effective=True, input_shape=(3, 1, 1))
    dense = f"{1 - 232 / 1448:.6f}"
    with pytest.raises(ValueError, match=re.escape(f"The unpruned network's effective sparsity is already {dense} >")):
        pruner.masks(model, MaskSet.from_module(model), Host())
