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


def test_lottery_ticket_reports_the_instability_of_its_rewind_point():

    from helpers import make_dataloader, make_module, make_trainer

    from lightning_pai import LotteryTicket

    ticket = LotteryTicket(2, 0.5, epochs_per_round=1, rewind_to="init", verbose=False)
    module = make_module("pytorch_lightning", seed=0)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    make_trainer("pytorch_lightning", callbacks=[ticket], max_epochs=2, max_steps=-1).fit(module, make_dataloader())
    loader = make_dataloader()
    seen = []

    def train(net, seed):
        seen.append({n: p.detach().clone() for n, p in net.named_parameters()})
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        x, y = loader.dataset.tensors
        for idx in torch.randperm(len(x), generator=gen).split(8):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        for n, m in ticket.masks.items():  # the ticket's masks held through SGD with momentum and decay
            assert not net.get_parameter(n)[~m].any()

    def evaluate(net):
        x, y = loader.dataset.tensors
        return 100.0 * float((net(x).argmax(1) != y).float().mean())

    result = ticket.instability(module, train, evaluate, seeds=(0, 0), points=5)
    assert result.barrier == 0.0  # identical data order: identical copies
    for n, w in seen[0].items():  # each copy started from the rewind point (init) with the ticket's zeros
        mask = ticket.masks[n] if n in ticket.masks.names else torch.ones_like(w, dtype=torch.bool)
        assert torch.equal(w, initial[n] * mask)
    assert ticket.instability(module, train, evaluate, seeds=(0, 1), points=5).barrier >= 0.0
    with pytest.raises(RuntimeError, match="holds no rewind point with weights"):
        LotteryTicket(2, 0.5, epochs_per_round=1, rewind_to="lr").instability(module, train, evaluate)
