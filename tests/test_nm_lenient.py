"""N:M on real CNNs: ``nm_incompatible`` leaves the layers the groups cannot fit dense, or prunes them unstructured.

torchvision's resnet18 (a 3-channel stem) and mobilenet_v3_small (a 3-channel stem and depthwise convolutions)
refuse ``nm="2:4"`` by default, naming the layers; with ``nm_incompatible="dense"`` those layers are left out of
the targets and every other layer keeps exactly 2 of every 4 weights; with ``"unstructured"`` they are pruned to
the pattern's sparsity exactly. The report and a warning name them either way.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import assert_enforced, make_dataloader, make_module, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_pai import PruneAtInit, RigL, Sparsifier, compute_masks, list_methods
from lightning_pai.core.nm import NM_INCOMPATIBLE, group_counts, nm_fits, resolve_nm
from lightning_pai.core.pruning import Pruner
from lightning_pai.core.targets import Layout

pl = pytest.importorskip("lightning.pytorch")
torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ("resnet18", "mobilenet_v3_small")
LENIENT_METHODS = [cls for cls in list_methods() if "nm_incompatible" in inspect.signature(cls).parameters]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


def _unfit(model: nn.Module, m: int = 4) -> list[str]:
    """Conv / linear weights whose input channels (axis 1: per-group channels of a grouped conv) are not a
    multiple of ``m``, worked out here without the library."""
    return [
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[1] % m
    ]


def _weights(model: nn.Module) -> list[str]:
    return [f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


def _sparsify(model: nn.Module, method) -> tuple[Sparsifier, list[str]]:
    """A sparsifier over ``model`` (masks set at once) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsifier = Sparsifier(method, model, torch.optim.SGD(model.parameters(), lr=0.1))
    return sparsifier, [str(w.message) for w in caught]


def _assert_two_of_four(masks, names) -> None:
    for n in names:
        counts = group_counts(masks[n], 4, masks.layouts[n])
        assert counts.numel() * 4 == masks[n].numel() and bool((counts == 2).all()), n


@pytest.mark.parametrize("name", MODELS)
def test_default_refuses_and_names_every_layer_the_groups_cannot_fit(name):
    model = _model(name)
    unfit = _unfit(model)
    assert unfit and unfit[0] in ("conv1.weight", "features.0.0.weight")  # the 3-channel stem
    with pytest.raises(ValueError) as info:
        _sparsify(model, PruneAtInit("magnitude", None, nm="2:4", verbose=False))
    message = str(info.value)
    channels = {n: model.get_parameter(n).shape[1] for n in unfit}
    assert all(f"{n} ({channels[n]} input channels)" in message for n in unfit[:8])
    assert f"({len(unfit)} targeted layer" in message
    assert "nm_incompatible='dense'" in message and "nm_incompatible='unstructured'" in message
    if len(unfit) > 8:
        assert f"and {len(unfit) - 8} more" in message


@pytest.mark.parametrize("name", MODELS)
def test_dense_leaves_unfit_layers_untouched_and_every_other_exactly_two_of_four(name):
    model = _model(name)
    unfit = _unfit(model)
    before = {n: model.get_parameter(n).detach().clone() for n in unfit}
    sparsifier, caught = _sparsify(
        model, PruneAtInit("magnitude", None, nm="2:4", nm_incompatible="dense", verbose=False)
    )
    masks = sparsifier.masks
    assert set(masks.names) == set(_weights(model)) - set(unfit)  # left out of the targets
    _assert_two_of_four(masks, masks.names)
    for n in unfit:  # dense: not one weight zeroed
        assert torch.equal(model.get_parameter(n).detach(), before[n]) and bool(before[n].ne(0).all()), n
    line = [x for x in str(sparsifier.report()).splitlines() if x.startswith("N:M:")]
    assert len(line) == 1 and "left dense (`nm_incompatible='dense'`)" in line[0]
    assert line[0].endswith(": " + ", ".join(unfit) + ".") and f"N:M: {len(unfit)} layer" in line[0]
    assert sum(line[0] in w for w in caught) == 1  # the same line, once, as a warning
    assert not any(r.name in unfit for r in sparsifier.report().rows)


@pytest.mark.parametrize("name", MODELS)
def test_unstructured_prunes_unfit_layers_to_exactly_the_patterns_sparsity(name):
    model = _model(name)
    unfit = _unfit(model)
    sparsifier, caught = _sparsify(
        model, PruneAtInit("magnitude", None, nm="2:4", nm_incompatible="unstructured", verbose=False)
    )
    masks = sparsifier.masks
    assert set(masks.names) == set(_weights(model))
    _assert_two_of_four(masks, [n for n in masks.names if n not in unfit])
    for n in unfit:
        mask, weight = masks[n], model.get_parameter(n).detach()
        assert int(mask.sum()) == round(mask.numel() / 2), n  # sparsity 1 - 2/4, exactly
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum()))), n
    report = sparsifier.report()
    assert all(abs(r.sparsity - 0.5) < 1e-12 for r in report.rows if r.name in unfit)
    line = [x for x in str(report).splitlines() if x.startswith("N:M:")]
    assert len(line) == 1 and "pruned unstructured to the same sparsity" in line[0]
    assert line[0].endswith(": " + ", ".join(unfit) + ".") and any(line[0] in w for w in caught)


def test_unstructured_keeps_the_largest_magnitudes_of_an_unfit_layer():
    model = _model("resnet18")
    stem = model.conv1.weight.detach().abs().clone()
    sparsifier, _ = _sparsify(model, PruneAtInit("magnitude", None, nm="2:4", nm_incompatible="unstructured"))
    mask = sparsifier.masks["conv1.weight"]
    assert stem[mask].min() >= stem[~mask].max()  # the top half by |w|, not a group rule


class _Classifier(pl.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.net = _model(name)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize(("name", "mode"), [("resnet18", "dense"), ("mobilenet_v3_small", "unstructured")])
def test_rigl_nm_fits_a_real_cnn(name, mode):
    """N:M RigL (drop and regrow inside each group) trains through updates with the unfit layers handled."""
    module = _Classifier(name)
    unfit = [f"net.{n}" for n in _unfit(module.net)]
    gen = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(24, 3, 32, 32, generator=gen), torch.randint(0, 10, (24,))), 4)
    cb = RigL(None, nm="2:4", nm_incompatible=mode, delta_t=2, t_end=1.0, verbose=False)
    seen = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({n: m.clone() for n, m in cb.masks.items()})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[cb, Check()], max_epochs=1, max_steps=-1).fit(module, data)
    assert len(seen) == 6 and cb.updates == 2  # updates after steps 2 and 4 (none at the last step)
    fitting = [n for n in cb.masks.names if n not in unfit]
    for masks in seen:  # at every step, not only the end
        for n in fitting:
            assert bool((group_counts(masks[n], 4, cb.masks.layouts[n]) == 2).all()), n
    assert any(not torch.equal(seen[0][n], seen[-1][n]) for n in fitting)  # the topology did change
    if mode == "dense":
        assert not set(unfit) & set(cb.masks.names)
    else:
        for n in unfit:
            assert all(int(s[n].sum()) == round(s[n].numel() / 2) for s in seen), n  # RigL keeps layer counts
    for n, m in cb.masks.items():
        assert torch.equal(module.get_parameter(n).detach()[~m], torch.zeros(int((~m).sum()))), n
    assert any("N:M:" in str(w.message) and unfit[0] in str(w.message) for w in caught)
    assert ("left dense" if mode == "dense" else "pruned unstructured") in str(cb.report(module))


@pytest.mark.parametrize("mode", ["dense", "unstructured"])
@pytest.mark.parametrize("cls", LENIENT_METHODS, ids=lambda cls: cls.__name__)
def test_every_method_taking_nm_handles_an_unfit_layer(cls, mode):
    """Registry-derived: the tiny model's ``conv.weight`` has 2 input channels; after 2 epochs of each method's
    example, fc1 and fc2 are exactly 2:4 and the conv is left dense or pruned to exactly half."""
    module = make_module(seed=0)
    cb = cls.example(0.5, nm="2:4", nm_incompatible=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(callbacks=[cb], max_epochs=2, max_steps=-1).fit(module, make_dataloader())
    _assert_two_of_four(cb.masks, ["fc1.weight", "fc2.weight"])
    learned = cb.card.family == "learned"  # its weights are never zeroed: the forward uses w ⊙ m
    if mode == "dense":
        assert cb.masks.names == ["fc1.weight", "fc2.weight"]
        assert bool(module.conv.weight.ne(0).all())
    else:
        assert int(cb.masks["conv.weight"].sum()) == 12  # 24 weights, sparsity 1 - 2/4
        assert learned or int(module.conv.weight.ne(0).sum()) <= 12
    assert_enforced(cb, module)
    assert cb.session.nm_unfit == ["conv.weight"]


@pytest.mark.parametrize("cls", LENIENT_METHODS, ids=lambda cls: cls.__name__)
def test_nm_incompatible_is_checked_in_init(cls):
    with pytest.raises(
        ValueError, match=r"`nm_incompatible` must be one of 'error', 'dense', 'unstructured'; got 'skip'"
    ):
        cls.example(0.5, nm="2:4", nm_incompatible="skip")


def test_engine_entry_points():
    assert NM_INCOMPATIBLE == ("error", "dense", "unstructured")
    with pytest.raises(ValueError, match="`nm_incompatible` must be one of"):
        Pruner(nm="2:4", sparsity=None, nm_incompatible="yes")
    linear = Layout("linear")
    scores = {"a": torch.arange(32.0).view(4, 8), "b": torch.arange(24.0).view(4, 6)}  # b: 6 inputs, no 2:4
    layouts = {"a": linear, "b": linear}
    assert nm_fits((4, 8), linear, 4) and not nm_fits((4, 6), linear, 4)
    with pytest.raises(ValueError, match=r"multiples of M: b \(6 input channels\) \(1 targeted layer\)"):
        resolve_nm("2:4", {"a": (4, 8), "b": (4, 6)}, layouts)
    assert resolve_nm("2:4", {"a": (4, 8), "b": (4, 6)}, layouts, "unstructured") == {"a": (2, 4), "b": (2, 4)}
    nm = {"a": (2, 4), "b": (2, 4)}
    with pytest.raises(ValueError, match="nm_incompatible"):
        compute_masks(scores, 0.5, nm=nm, layouts=layouts)
    dense = compute_masks(scores, 0.5, nm=nm, layouts=layouts, nm_incompatible="dense")
    assert bool(dense["b"].all()) and bool((group_counts(dense["a"], 4, linear) == 2).all())
    half = compute_masks(scores, 0.5, nm=nm, layouts=layouts, nm_incompatible="unstructured")
    assert int(half["b"].sum()) == 12 and bool(half["b"].view(-1)[12:].all())  # the 12 highest scores
    current = {"a": torch.ones(4, 8, dtype=torch.bool), "b": torch.rand(4, 6) < 0.7}
    kept = compute_masks(scores, 0.5, masks=current, nm=nm, layouts=layouts, nm_incompatible="dense")
    assert torch.equal(kept["b"], current["b"])  # left dense keeps what it still has, nothing revived
