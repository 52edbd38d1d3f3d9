"""NaN and Inf gradients at pruned positions: pruned weights stay exactly 0 and the model finite.

Masking by multiplication keeps ``0 * NaN = NaN``; a NaN gradient at a pruned weight then made that weight NaN
and, through the next forward pass, the whole model. Here the gradient of every pruned weight is set to NaN, +Inf
or -Inf on an update step and on a non-update step (in backward, before accumulation, as a bad loss would), and
after every optimizer step each pruned weight and its optimizer state must be exactly 0 and every parameter finite.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TARGET_SHAPES, make_dataloader, make_module, make_trainer, scheduled_updates
from torch import nn
from torch.nn import functional as F

from lightning_pai import SET, PruneAtInit, RigL, Sparsifier
from lightning_pai.core.masks import MaskSet, zero_masked_

pl = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 8  # make_dataloader(): 64 samples, batches of 8

#: name -> (method factory, epochs, the poisoned steps: a non-update step, then an update step)
METHODS = {
    "RigL": (lambda: RigL.example(0.8), 2, (3, 4)),
    "RigL-nm": (lambda: RigL.example(0.8, nm={"fc*": "2:4"}), 2, (3, 4)),
    "SET": (lambda: SET.example(0.8), 3, (7, 8)),  # epoch-end updates: step 8 ends epoch 0
    "PruneAtInit": (lambda: PruneAtInit("magnitude", 0.8, verbose=False), 2, (3, 4)),
}


def _poison(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``grad`` with NaN, +Inf and -Inf (in turn) at every pruned position."""
    out = grad.clone()
    flat, pruned = out.view(-1), (~keep.to(out.device)).view(-1).nonzero().squeeze(1)
    flat[pruned[0::3]] = float("nan")
    flat[pruned[1::3]] = float("inf")
    flat[pruned[2::3]] = -float("inf")
    return out


def _install(module: nn.Module, masks_of, step_of, steps: tuple[int, ...]) -> list[int]:
    """Tensor hooks poisoning the gradients of pruned weights at ``steps``; returns the list of poisoned counts."""
    poisoned: list[int] = []

    def hook(name: str, grad: torch.Tensor) -> torch.Tensor:
        masks = masks_of()
        if masks is None or step_of() not in steps:
            return grad
        poisoned.append(int((~masks[name]).sum()))
        return _poison(grad, masks[name])

    for name in TARGET_SHAPES:
        module.get_parameter(name).register_hook(lambda g, name=name: hook(name, g))
    return poisoned


def _check(module: nn.Module, masks: MaskSet, optimizer: torch.optim.Optimizer) -> list[str]:
    """What is wrong after a step: a non-finite parameter, a pruned weight or state entry that is not exactly 0."""
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    for n, p in masks.params.items():
        pruned = ~masks[n]
        if not torch.equal(p.detach()[pruned], torch.zeros(int(pruned.sum()))):
            bad.append(f"{n}: pruned weights not 0")
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                if not torch.equal(value[pruned], torch.zeros(int(pruned.sum()))):
                    bad.append(f"{n}: state {key!r} not 0 where pruned")
    return bad


class _Checker(pl.Callback):
    """After every training batch (after the method's own hooks): what :func:`_check` finds, by step."""

    def __init__(self, method) -> None:
        self.method, self.found, self.steps = method, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.found += [
            f"step {trainer.global_step}: {b}" for b in _check(pl_module, self.method.masks, trainer.optimizers[0])
        ]


def _expected_updates(cb, total: int) -> int:
    """Scheduled updates, less the poisoned one when the method grows by the dense gradients (RigL skips it)."""
    if not hasattr(cb, "plan"):
        return 0
    return scheduled_updates(cb, total, STEPS_PER_EPOCH) - int(cb.session.updater.needs_grads)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_pruned_weights_stay_zero_under_nan_and_inf_gradients(name, optimizer):
    factory, epochs, steps = METHODS[name]
    cb = factory()
    module = make_module(optimizer=optimizer, seed=0)  # "sgd": momentum 0.9 and weight decay 5e-4
    trainer = make_trainer(callbacks=[cb, checker := _Checker(cb)], max_epochs=epochs, max_steps=-1)
    poisoned = _install(module, lambda: cb.masks, lambda: trainer.global_step + 1, steps)
    trainer.fit(module, make_dataloader())
    total = epochs * STEPS_PER_EPOCH
    assert checker.steps == total and checker.found == []
    assert len(poisoned) == len(steps) * len(TARGET_SHAPES) and sum(poisoned) > 0  # every target, both steps
    assert getattr(cb, "updates", 0) == _expected_updates(cb, total)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", ["RigL", "RigL-nm", "PruneAtInit"])
def test_sparsifier_pruned_weights_stay_zero_under_nan_and_inf_gradients(name, optimizer):
    factory, epochs, steps = METHODS[name]
    method = factory()
    module = make_module(optimizer=optimizer, seed=0)
    opt, loader = module.configure_optimizers(), make_dataloader()
    total = epochs * len(loader)
    sparsifier = Sparsifier(method, module, opt, data=loader, total_steps=total)
    poisoned = _install(module, lambda: sparsifier.masks, lambda: sparsifier.global_step + 1, steps)
    found = []
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(module(x), y).backward()
            sparsifier.step()
            found += [f"step {sparsifier.global_step}: {b}" for b in _check(module, sparsifier.masks, opt)]
        sparsifier.epoch_end()
    assert found == [] and len(poisoned) == len(steps) * len(TARGET_SHAPES) and sum(poisoned) > 0
    assert getattr(method, "updates", 0) == _expected_updates(method, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex128])
def test_zero_masked_clears_nan_and_inf_and_leaves_kept_bits_alone(dtype):
    keep = torch.tensor([True, False, True, False, False, True, False])
    values = torch.tensor([float("nan"), float("nan"), float("inf"), float("inf"), -float("inf"), -0.0, 3.5])
    t = values.to(dtype)
    before = t.clone()
    zero_masked_([t], [keep])
    assert (t[~keep] == 0).all() and not torch.signbit(t[~keep].real).any()  # +0.0, not NaN or -0.0
    assert torch.equal(t[keep].isnan(), before[keep].isnan())
    kept = keep & ~before.isnan()
    assert torch.equal(t[kept], before[kept]) and torch.equal(
        torch.signbit(t[kept].real), torch.signbit(before[kept].real)
    )
    u = values.clone()
    zero_masked_([u], [keep.view(torch.uint8)])  # the uint8 view MaskSet keeps works the same
    assert (u[~keep] == 0).all() and u[6] == 0 and u[5] == 0 and torch.signbit(u[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_compiled_mask_kernel_equals_the_bit_multiply(dtype, layout):
    """The compiled one-pass kernel and PyTorch's bit multiply give the same bits (NaN payloads too); a
    non-contiguous tensor, which the kernel does not take, is masked by the fallback."""
    from lightning_pai.deploy import kernels

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(257, 131, generator=gen).to(dtype)
    base[torch.rand(base.shape, generator=gen) < 0.1] = float("nan")
    base[torch.rand(base.shape, generator=gen) < 0.05] = -float("inf")
    keep = torch.rand(base.shape, generator=gen) < 0.3
    if layout == "transposed":
        base, keep = base.t(), keep.t()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[base.element_size()]
    want = torch.where(keep, base.contiguous().view(bits), 0)
    t = base.clone()  # clone keeps the layout
    zero_masked_([t], [keep])
    assert torch.equal(t.contiguous().view(bits), want)
    if kernels.available():
        u = base.clone()
        assert kernels.mask_bits_(u, keep.view(torch.uint8)) == (layout == "contiguous")
        if layout == "contiguous":
            assert torch.equal(u.view(bits), want)
    # like an in-place PyTorch op, masking a tensor autograd saved makes its backward fail instead of lying
    w = base.detach().float().clone().requires_grad_()
    y = (w * w).sum()
    zero_masked_([w], [keep])  # (no_grad inside: allowed on a leaf, and counted)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_mask_set_clears_nan_weights_gradients_and_optimizer_state():
    w = nn.Parameter(torch.full((4, 8), float("nan")))
    keep = torch.zeros(4, 8, dtype=torch.bool)
    keep[:, :2] = True
    masks = MaskSet({"w": w}, {"w": keep})
    w.grad = torch.full((4, 8), float("inf"))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.full((4, 8), float("nan"))
    masks.apply_()
    masks.mask_grads_()
    masks.mask_optimizer_state_(opt)
    for t in (w.detach(), w.grad, opt.state[w]["momentum_buffer"]):
        assert torch.equal(t[~keep], torch.zeros(24)) and not torch.isfinite(t[keep]).any()
    buf = torch.zeros(4, 8)
    buf[keep] = 2.0
    buf[~keep] = float("nan")
    opt.state[w]["momentum_buffer"] = buf
    masks.mask_optimizer_state_(opt, fill="mean")
    assert torch.equal(buf, torch.full((4, 8), 2.0))  # NaN at pruned entries does not reach the mean
