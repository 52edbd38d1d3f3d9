"""N:M structured sparsity: the group rule by hand, then every family (PaI scorers, IMP, GMP, RigL, SET)
keeping exactly N of every M consecutive input weights after training, mixed N:M / unstructured models."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import assert_enforced, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pai import SET, GradualMagnitudePruning, LotteryTicket, MaskSet, PruneAtInit, RigL, list_methods
from lightning_pai.core.nm import (
    group_budget,
    group_counts,
    is_nm,
    nm_keep,
    nm_sparsity,
    parse_nm,
    refill_groups,
    resolve_nm,
)
from lightning_pai.core.targets import Layout

pl = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.usefixtures("one_thread")
LINEAR, CONV, HF = Layout("linear"), Layout("conv", 0, (1, 2)), Layout("conv1d", 1, (0,))


def test_nm_keep_by_hand_along_each_layouts_input_axis():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.8, 0.0]])  # Linear(8 -> 1): groups [0:4], [4:8]
    assert nm_keep(scores, 2, 4, LINEAR).tolist() == [[False, True, True, False, True, False, True, False]]
    # ties go to the earlier position (0.2 at 4 and 5): deterministic on every rank
    conv = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # Conv1d(4 -> 2, k=3): groups over channels
    mask = nm_keep(conv, 2, 4, CONV)
    assert mask[:, 2:].all() and not mask[:, :2].any()  # at each kernel position, the 2 largest of 4 channels
    hf = torch.tensor([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0], [0.0, 2.0]])  # Conv1D (in=4, out=2): groups over rows
    assert nm_keep(hf, 2, 4, HF).tolist() == [[False, False], [True, True], [True, False], [False, True]]
    assert is_nm(nm_keep(torch.randn(6, 12), 2, 4, LINEAR), 2, 4, LINEAR)
    pruned = scores.masked_fill(torch.tensor([[False, False, True, True, True, True, True, True]]), -float("inf"))
    assert nm_keep(pruned, 2, 4, LINEAR)[0, :4].tolist() == [True, True, False, False]  # -inf only if forced


def test_refill_groups_regrows_inside_each_group():
    mask = torch.tensor([[True, False, False, False, True, True, False, False]])  # group 0 lost one weight
    grow = torch.tensor([[0.0, 0.1, 0.7, 0.3, 0.9, 0.9, 0.9, 0.9]])
    assert refill_groups(grow, mask, 2, 4, LINEAR).tolist() == [[True, False, True, False, True, True, False, False]]
    assert group_counts(mask, 4, LINEAR).tolist() == [[1, 2]]


def test_parsing_and_validation():
    assert parse_nm("2:4") == (2, 4) and parse_nm("1:8") == (1, 8)
    for bad in ("4:4", "0:4", "2-4", "a:b"):
        with pytest.raises(ValueError, match="'N:M' with integers 0 < N < M"):
            parse_nm(bad)
    assert nm_sparsity(None, "2:4") == 0.5 and nm_sparsity(0.5, "2:4") == 0.5
    with pytest.raises(ValueError, match=r"`sparsity`=0.9 conflicts with `nm`='2:4'.*sparsity 0.5"):
        nm_sparsity(0.9, "2:4")
    assert nm_sparsity(0.9, {"fc*": "2:4"}) == 0.9
    shapes = {"fc.weight": (4, 8), "head.weight": (2, 6)}
    layouts = {"fc.weight": LINEAR, "head.weight": LINEAR}
    assert resolve_nm({"fc*": "2:4"}, shapes, layouts) == {"fc.weight": (2, 4)}
    with pytest.raises(ValueError, match=r"multiples of M: head.weight \(6 input channels\)"):
        resolve_nm("2:4", shapes, layouts)
    with pytest.raises(ValueError, match="`nm` pattern 'conv\\*' matches no pruned parameter"):
        resolve_nm({"conv*": "2:4"}, shapes, layouts)
    assert [group_budget(2, 4, p) for p in (0, 0.49, 0.5, 1.0)] == [4, 4, 3, 2]
    with pytest.raises(ValueError, match="conflicts with `nm`"):
        RigL(0.9, nm="2:4")


class Net(pl.LightningModule):
    """Linear, Conv1d and an HF-style Conv1D, all with input channels in multiples of 4, plus a 6-input head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc = nn.Linear(64, 16)
        self.hf_w = nn.Parameter(torch.randn(16, 12) * 0.2)  # (in, out), used as x @ W
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(torch.relu(self.fc(h)) @ self.hf_w))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 4, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)), 8)


NM_LAYERS = {"conv.weight": CONV, "fc.weight": LINEAR, "head.weight": LINEAR}
FAMILIES = {
    "magnitude": lambda: PruneAtInit("magnitude", None, nm="2:4", verbose=False),
    "snip": lambda: PruneAtInit("snip", None, nm="2:4", verbose=False),
    "grasp": lambda: PruneAtInit("grasp", None, nm="2:4", verbose=False),
    "synflow": lambda: PruneAtInit("synflow", None, iterations=3, nm="2:4", verbose=False),
    "shuffle": lambda: PruneAtInit("snip", None, nm="2:4", ablation="shuffle", verbose=False),
    "lottery": lambda: LotteryTicket(3, 0.3, 1, nm="2:4", verbose=False),
    "gmp": lambda: GradualMagnitudePruning(None, end=10, frequency=2, nm="2:4"),
    "rigl": lambda: RigL(None, delta_t=2, t_end=1.0, nm="2:4", verbose=False),
    "set": lambda: SET(None, update_on="step", delta_t=2, nm="2:4", verbose=False),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_keeps_exactly_two_of_four_after_training(name):
    torch.manual_seed(0)
    module = Net()
    cb = FAMILIES[name]()
    seen = []

    class Check(pl.Callback):  # after cb: every group of 4 has exactly 2 kept at every step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({n: m.clone() for n, m in cb.masks.items()})

    trainer = make_trainer(callbacks=[cb, Check()], max_epochs=3, max_steps=-1)
    trainer.fit(module, _data())
    assert trainer.global_step == 24
    assert set(cb.masks.names) == set(NM_LAYERS)  # hf_w is a bare Parameter: not a default target
    layouts = cb.masks.layouts
    for n, m in cb.masks.items():
        assert is_nm(m, 2, 4, layouts[n]), n
        assert int(m.sum()) * 2 == m.numel(), n
        p = module.get_parameter(n)
        assert torch.equal(p[~m].detach(), torch.zeros(int((~m).sum()))), n
    if name in ("rigl", "set"):
        assert all(is_nm(s[n], 2, 4, layouts[n]) for s in seen for n in s)  # at every update, not only the end
        assert cb.updates == 11 and any(not torch.equal(seen[0][n], seen[-1][n]) for n in seen[0])
    if name == "lottery":  # budgets 4 -> 3 -> 2 per group over the rounds
        assert [
            sorted({int(c) for c in group_counts(h["fc.weight"], 4, LINEAR).flatten()}) for h in cb.mask_history
        ] == [
            [4],
            [3],
            [2],
        ]
    if name == "gmp":
        budgets = [sorted({int(c) for c in group_counts(s["fc.weight"], 4, LINEAR).flatten()}) for s in seen]
        assert budgets[0] == [4] and [3] in budgets and budgets[-1] == [2]


NM_METHODS = [cls for cls in list_methods() if "nm" in inspect.signature(cls).parameters]


@pytest.mark.parametrize("cls", NM_METHODS, ids=lambda cls: cls.__name__)
def test_every_registered_method_with_nm_keeps_two_of_four(cls):
    """Registry-derived: each method that takes ``nm`` (its example configuration, 2 epochs) ends exactly 2:4."""
    torch.manual_seed(0)
    module = Net()
    cb = cls.example(0.5, nm="2:4")
    make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1).fit(module, _data())
    for n, m in cb.masks.items():
        assert is_nm(m, 2, 4, cb.masks.layouts[n]) and int(m.sum()) * 2 == m.numel(), n
    assert_enforced(cb, module, torch.randn(4, *next(iter(_data()))[0].shape[1:]))


def test_mixed_nm_and_unstructured_layers():
    torch.manual_seed(0)
    module = Net()
    cb = PruneAtInit("magnitude", 0.9, nm={"fc*": "2:4"}, distribution="global", verbose=False)
    make_trainer(callbacks=[cb], max_steps=2).fit(module, _data())
    assert is_nm(cb.masks["fc.weight"], 2, 4, LINEAR)
    rest = [n for n in cb.masks.names if n != "fc.weight"]
    total = sum(cb.masks[n].numel() for n in rest)
    assert sum(int(cb.masks[n].sum()) for n in rest) == total - round(0.9 * total)  # sparsity applies to the rest


def test_nm_is_refused_with_redistribution_and_on_indivisible_layers():
    from lightning_pai import SNFS

    module = Net()
    module.fc = nn.Linear(64, 16)
    with pytest.raises(ValueError, match="multiples of M"):
        make_trainer(callbacks=[PruneAtInit("magnitude", None, nm="3:5", verbose=False)], max_steps=1).fit(
            module, _data()
        )
    cb = SNFS.__mro__[1](None, redistribution="momentum", growth="momentum", nm="2:4", verbose=False)
    with pytest.raises(ValueError, match="`redistribution='momentum'`.*cannot apply"):
        make_trainer(callbacks=[cb], max_steps=2).fit(Net(), _data())


def test_mask_set_layout_of_a_bare_parameter_is_its_shape_order():
    masks = MaskSet({"w": nn.Parameter(torch.zeros(4, 8))})
    masks.load_state_dict({"w": nm_keep(torch.randn(4, 8), 2, 4, masks.layouts["w"])})
    assert is_nm(masks["w"], 2, 4, LINEAR)


@pytest.mark.parametrize(
    ("nm", "message"),
    [
        ((5, 4), r"0 < N <= M .* got N=5, M=4"),
        ((0, 4), r"got N=0, M=4"),
        ((-1, 4), r"got N=-1, M=4"),
        ((2, 3), r"input channels in multiples of M=3; this layer has 8"),
    ],
)
def test_compute_masks_refuses_impossible_groups(nm, message):
    """Resolved (N, M) pairs given to the engine directly are checked too (they were accepted or failed in reshape)."""
    from lightning_pai import compute_masks

    with pytest.raises(ValueError, match=message):
        compute_masks({"w": torch.randn(4, 8)}, 0.5, nm={"w": nm}, layouts={"w": LINEAR})
