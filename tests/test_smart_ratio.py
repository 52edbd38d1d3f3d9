"""Smart-ratio random tickets (Su et al. 2020): the budgets follow the reference's formula exactly."""

import pytest
import torch
from torch import nn

from lightning_pai import compute_masks, select_targets
from lightning_pai.core.distributions import smart_ratio_densities
from lightning_pai.core.targets import target_layouts


def reference(sizes: list[int], linear: list[bool], density: float, linear_keep: float = 0.3) -> list[float]:
    """The reference's SmartRatio (ResNet branch: no 1/l^2), written out: Ratio[n-k] = k^2 + k for k = 1..n."""
    n = len(sizes)
    ratio = [0.0] * n
    for k in range(1, n + 1):
        ratio[n - k] = k**2 + k
    total, linear_num = sum(sizes), sum(s for s, lin in zip(sizes, linear) if lin)
    goal = total * density - linear_num * linear_keep
    test = sum(ratio[i] * sizes[i] for i in range(n) if not linear[i])
    scale = goal / test
    ratio = [linear_keep if linear[i] else ratio[i] * scale for i in range(n)]
    extra = 0.0
    for i in range(n):
        if linear[i]:
            continue
        if ratio[i] >= 1:
            extra += (ratio[i] - 1) * sizes[i]
            ratio[i] = 1.0
        elif extra > 0:
            rest = (1 - ratio[i]) * sizes[i]
            take = min(rest, extra)
            ratio[i] += take / sizes[i]
            extra -= take
    return ratio


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def vgg16_cifar() -> nn.Module:
    """VGG-16 as the paper's CIFAR experiments build it: 13 convs (BN, ReLU), one 512 -> 10 classifier."""
    layers, channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 10))


# LeNet-5's classifier holds 94 % of its weights: at 30 % they fix the density near 0.3 (0.32: no layer capped;
# 0.33: the first conv capped at 1, its excess passed on)
@pytest.mark.parametrize(("name", "density"), [("lenet5", 0.32), ("lenet5", 0.33), ("vgg16", 0.1), ("vgg16", 0.02)])
def test_smart_ratio_densities_follow_the_formula(name, density):
    with torch.device("meta"):
        model = lenet5() if name == "lenet5" else vgg16_cifar()
    targets = select_targets(model)
    layouts = target_layouts(model, list(targets))
    sizes = {n: p.numel() for n, p in targets.items()}
    linear = {n: layouts[n].kind == "linear" for n in targets}
    got = smart_ratio_densities(sizes, density, linear)
    want = reference(list(sizes.values()), list(linear.values()), density)
    assert list(got.values()) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert sum(got[n] * sizes[n] for n in sizes) == pytest.approx(density * sum(sizes.values()), rel=1e-9)
    assert all(got[n] == 0.3 for n in sizes if linear[n])  # classifier layers fixed at 30 %
    free = [got[n] for n in sizes if not linear[n]]
    assert free == sorted(free, reverse=True)  # (L - l + 1)^2 + (L - l + 1) falls with depth


def test_smart_ratio_masks_have_the_exact_counts():
    torch.manual_seed(0)
    model = lenet5()
    targets = select_targets(model)
    layouts = target_layouts(model, list(targets))
    scores = {n: torch.rand(p.shape) for n, p in targets.items()}
    masks = compute_masks(scores, 0.69, "smart_ratio", layouts=layouts)
    sizes = {n: p.numel() for n, p in targets.items()}
    want = smart_ratio_densities(sizes, 0.31, {n: layouts[n].kind == "linear" for n in targets})
    kept = {n: int(m.sum()) for n, m in masks.items()}
    assert sum(kept.values()) == round(0.31 * sum(sizes.values()))
    assert all(abs(kept[n] - want[n] * sizes[n]) < 1 for n in sizes)
    masks = compute_masks(scores, 0.55, "smart_ratio", layouts=layouts, options={"linear_keep": 0.45})
    assert int(masks["11.weight"].sum()) == 378  # the classifier at 45 % of 840
    with pytest.raises(ValueError, match="the linear layers alone keep 0.3 of their weights"):
        compute_masks(scores, 0.9, "smart_ratio", layouts=layouts)
