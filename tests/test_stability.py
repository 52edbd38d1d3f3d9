"""Linear mode connectivity (Frankle et al. 2020): the error barrier between two trained copies."""

import pytest
import torch
from torch import nn

from lightning_pai import error_barrier, instability, interpolate


def task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR-like: a non-convex problem with many solutions
    return x, y


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))


def trainer(x, y, epochs=60, lr=0.1):
    def train(net: nn.Module, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(16):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()

    return train


def error(x, y):
    return lambda net: 100.0 * float((net(x).argmax(1) != y).float().mean())


def test_identical_data_order_gives_no_barrier():
    x, y = task()
    result = instability(model(), trainer(x, y), error(x, y), seeds=(3, 3), points=30)
    assert len(result.alphas) == 30 and result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert result.barrier == 0.0 and len(set(result.errors)) == 1  # the copies are the same network


def test_different_data_orders_from_initialization_give_a_barrier():
    """Forked at initialization (step 0), two copies of this small network trained on different orders land in
    different basins: the error on the line between them rises well above the endpoints'."""
    x, y = task()
    result = instability(model(), trainer(x, y), error(x, y), seeds=(0, 1), points=30)
    assert max(result.errors[0], result.errors[-1]) < 5  # both copies learned the task (error in %)
    assert result.barrier > 1  # percentage points above the endpoints' mean somewhere on the line


def test_interpolation_is_linear_and_keeps_pruned_zeros():
    a, b = model(0), model(1)
    with torch.no_grad():
        a[0].weight[:, 0] = 0
        b[0].weight[:, 0] = 0
    mid = interpolate(a, b, 0.25)
    assert torch.equal(mid[0].weight, torch.lerp(a[0].weight, b[0].weight, 0.25))
    assert not mid[0].weight[:, 0].any()
    with pytest.raises(ValueError, match="`points` must be an int >= 2"):
        error_barrier(a, b, lambda net: 0.0, points=1)
