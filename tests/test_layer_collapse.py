"""SynFlow's layer-collapse claim (Tanaka et al. 2020, Fig. 1/3), qualitatively, on an untrained VGG-16."""

from __future__ import annotations

import torch
from torch import nn

from lightning_pai import ScoringContext, select_targets, sparsity_report
from lightning_pai.core import prune

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
#: Compressions 10^0.25 ... 10^4 (compression = total / kept).
EXPONENTS = [0.25 * i for i in range(1, 17)]


def vgg16_cifar100() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 100))


def first_collapse(model, method, batches, iterations=1):
    """Smallest swept compression exponent at which some layer is fully pruned (None if never)."""
    for exponent in EXPONENTS:
        ctx = ScoringContext(select_targets(model), module=model, batches=batches, input_shape=(3, 32, 32))
        masks = prune(ctx, method, 1 - 10**-exponent, iterations=iterations)
        if sparsity_report(model, masks).collapsed:
            return exponent
    return None


def test_synflow_avoids_layer_collapse_where_magnitude_and_snip_collapse():
    torch.manual_seed(0)
    model = vgg16_cifar100()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)  # the SynFlow code's initialisation for VGG
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 100, (32,)))]
    magnitude = first_collapse(model, "magnitude", batches)
    snip = first_collapse(model, "snip", batches)
    # Paper: magnitude collapses at 10^2.75, SNIP at 10^3.5.
    assert magnitude is not None and magnitude <= 3.0
    assert snip is not None and snip <= 3.75
    # SynFlow, 100 rounds, at the largest swept compression 10^4: every layer still keeps weights.
    ctx = ScoringContext(select_targets(model), module=model, input_shape=(3, 32, 32))
    masks = prune(ctx, "synflow", 1 - 1e-4, iterations=100)
    report = sparsity_report(model, masks)
    assert report.collapsed == []
    assert report.kept == round(1e-4 * report.total)
    print(f"first collapse: magnitude 10^{magnitude}, snip 10^{snip}, synflow(100) none up to 10^4")
