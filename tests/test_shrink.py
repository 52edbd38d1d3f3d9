"""`shrink`: dead channels physically removed, outputs unchanged, exact parameter counts, file round trip."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from lightning_pai import load_shrunk, save_shrunk, shrink

tp = pytest.importorskip("torch_pruning")

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def zero_channels(model: nn.Module, x: torch.Tensor, fraction: float, seed: int = 0) -> int:
    """Zero ``fraction`` of the channels of every coupled group (filters, biases, norm γ and β), as a channel mask
    does; the layers producing the model's outputs are left alone. Returns the number of channels zeroed."""
    gen = torch.Generator().manual_seed(seed)
    dg = tp.DependencyGraph().build_dependency(model, x, verbose=False)
    outputs = [m for m, n in dg.module2node.items() if isinstance(m, nn.Module) and not n.outputs]
    zeroed = 0
    with torch.no_grad():
        for group in dg.get_all_groups(ignored_layers=outputs, root_module_types=LAYERS):
            width = len(group[0].idxs)
            dead = set(torch.randperm(width, generator=gen)[: int(fraction * width)].tolist())
            zeroed += len(dead)
            for item in group:
                m = item.dep.target.module
                if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(m, (*NORMS, *LAYERS)):
                    local = [i for i, r in zip(item.idxs, item.root_idxs) if r in dead]
                    m.weight[local] = 0
                    if m.bias is not None:
                        m.bias[local] = 0
    return zeroed


class SmallNet(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = act or nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial statistics, as after training
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def test_small_net_exact_counts_and_outputs():
    net = randomized(SmallNet())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():  # 3 channels of conv1 pruned by a channel mask: filter, bias, γ and β
        for c in (1, 4, 6):
            net.conv1.weight[c] = 0
            net.conv1.bias[c] = 0
            net.bn1.weight[c] = 0
            net.bn1.bias[c] = 0
        net.bn2.weight[[0, 9]] = 0  # only γ and β of bn2: the norm alone makes these channels zero
        net.bn2.bias[[0, 9]] = 0
        net.fc.weight[3] = 0  # a class output: never removed
        net.fc.bias[3] = 0
    small, report = shrink(net, x, report=True)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.bn1.num_features) == (5, 5, 5)
    assert (small.conv2.out_channels, small.bn2.num_features, small.fc.in_features) == (14, 14, 14)
    assert small.fc.out_features == 10
    expected = (5 * 3 * 9 + 5) + 2 * 5 + (14 * 5 * 9 + 14) + 2 * 14 + (10 * 14 + 10)
    assert report.params_after == expected == sum(p.numel() for p in small.parameters())
    assert report.params_before == sum(p.numel() for p in net.parameters())
    assert report.removed == {"conv1": 3, "conv2": 2}
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-6)
    assert net.conv1.out_channels == 8  # the input model is untouched


def test_channel_with_live_shift_is_kept():
    net = randomized(SmallNet())
    with torch.no_grad():  # filter zero but β != 0: the channel outputs a constant, it is alive
        net.conv1.weight[2] = 0
        net.conv1.bias[2] = 0
    small = shrink(net, torch.randn(2, 3, 8, 8))
    assert small.conv1.out_channels == 8


def test_nonzero_after_activation_is_refused():
    net = randomized(SmallNet(act=nn.Sigmoid()))  # sigmoid(0) = 0.5: a zero channel still feeds conv2
    with torch.no_grad():
        net.bn1.weight[5] = 0
        net.bn1.bias[5] = 0
    with pytest.raises(ValueError, match=r"differ .*`atol`.*`ignored=`"):
        shrink(net, torch.randn(2, 3, 8, 8))
    assert shrink(net, torch.randn(2, 3, 8, 8), ignored=[net.conv1]).conv1.out_channels == 8


@pytest.mark.parametrize(
    "name",
    ["resnet18", "vgg11_bn", "mobilenet_v3_small", "timm:resnet18", "timm:convnext_atto"],
)
def test_real_models_half_the_channels(name):
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    model = randomized(model)
    x = torch.randn(2, 3, 64, 64)
    zeroed = zero_channels(model, x, 0.5)
    with torch.no_grad():
        masked = model(x)
    dead = {n: int((m.weight.flatten(1) == 0).all(1).sum()) for n, m in model.named_modules() if isinstance(m, LAYERS)}
    small, report = shrink(model, x, report=True)
    with torch.no_grad():
        assert (small(x) - masked).abs().max() <= 1e-5
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert report.params_after < 0.6 * report.params_before
    assert report.flops_after < 0.6 * report.flops_before
    if name == "timm:convnext_atto":  # its residual stream is LayerNorm'ed: those channels must stay
        assert report.skipped and all("LayerNorm" in why for why in report.skipped.values())
    else:
        assert not report.skipped
        assert sum(report.removed.values()) >= zeroed  # every zeroed channel, some in several layers of a group
    if name == "resnet18":  # each convolution lost exactly its zeroed filters, and its norm the same channels
        original = dict(model.named_modules())
        for n, m in small.named_modules():
            if isinstance(m, nn.Conv2d):
                assert m.out_channels == original[n].out_channels - dead[n] == original[n].out_channels // 2, n
                bn = small.get_submodule(n.replace("conv", "bn").replace("downsample.0", "downsample.1"))
                assert bn.num_features == m.out_channels


def test_save_and_load_shrunk_round_trip(tmp_path):
    model = randomized(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    zero_channels(model, x, 0.5, seed=3)
    small, report = shrink(model, x, report=True)
    path = tmp_path / "small.pt"
    save_shrunk(small, report, path)
    fresh = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    loaded = load_shrunk(fresh, path, x)
    assert loaded.state_dict().keys() == small.state_dict().keys()
    for k, v in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    loaded.load_state_dict(small.state_dict(), strict=True)  # the strict round trip of an ordinary module

    payload = torch.load(path, weights_only=True)
    payload["state"]["fc.bias"] = payload["state"]["fc.bias"] + 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="checksum"):
        load_shrunk(torchvision.models.resnet18(weights=None, num_classes=10), tmp_path / "tampered.pt", x)
    with pytest.raises(ValueError, match="do not fit|does not fit"):
        load_shrunk(torchvision.models.resnet34(weights=None, num_classes=10), path, x)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by"):
        load_shrunk(copy.deepcopy(fresh), tmp_path / "other.pt", x)


def test_channel_pruned_resnet18_shrinks_to_the_predicted_size():
    """ChannelPruning at 50 % (every group, coupled ones jointly) -> shrink: same outputs, the predicted size."""
    from lightning_pai import ChannelPruning, Sparsifier
    from lightning_pai.core.channels import layer_positions, predicted_shrunk_macs, predicted_shrunk_params

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sparsifier = Sparsifier(ChannelPruning(0.5, scorer="l1", couple=True, verbose=False), model, optimizer)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    for _ in range(2):  # momentum and weight decay must not revive a pruned channel
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
    model.eval()
    masks = sparsifier.masks
    small, report = shrink(model, x[:2], report=True)
    assert report.params_after == predicted_shrunk_params(model, masks) == 2_801_450
    assert report.flops_after == predicted_shrunk_macs(model, masks, layer_positions(model, x[:1]))
    assert not report.skipped
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5
