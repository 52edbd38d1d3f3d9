"""Shared test helpers: a tiny LightningModule for either Lightning namespace, synthetic data, mask comparison."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import partial
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")

IN_CHANNELS, LENGTH, NUM_CLASSES = 2, 16, 4

#: Prunable weights of :func:`make_module`'s model, by name, with their shapes.
TARGET_SHAPES: dict[str, tuple[int, ...]] = {
    "conv.weight": (4, IN_CHANNELS, 3),
    "fc1.weight": (32, 4 * (LENGTH - 2)),
    "fc2.weight": (NUM_CLASSES, 32),
}
#: Number of targeted weights (1944).
TARGET_TOTAL = sum(torch.Size(s).numel() for s in TARGET_SHAPES.values())


def import_ns(ns: str | ModuleType) -> ModuleType:
    """``"lightning.pytorch"`` / ``"pytorch_lightning"`` (or the module itself) -> the imported module."""
    return importlib.import_module(ns) if isinstance(ns, str) else ns


#: What a multi-process launch may fail with for reasons outside the code under test: a rendezvous port taken
#: by a parallel launch, and torch 2.14's gloo threads aborting a process at interpreter exit (1 Fabric run in
#: 8 here, after the work is done, destroy_process_group or not; also on code older than this suite).
TRANSIENT = (
    "terminate called without an active exception",
    "Address already in use",
    "EADDRINUSE",
    "Connection refused",
    "connect() timed out",
)


def run_script(script, *args, timeout: int = 300):
    """Run ``python script *args`` in a clean environment (no inherited rank variables, 1 thread) from the script's
    folder, as a multi-process launch needs; a launch that fails with a :data:`TRANSIENT` message is retried
    (twice at most); fail the test with the output when it exits non-zero."""
    import os
    import subprocess
    import sys

    import pytest

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    command = [sys.executable, str(script), *map(str, args)]
    for _ in range(3):
        proc = subprocess.run(command, cwd=script.parent, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or not any(t in proc.stderr for t in TRANSIENT):
            break
    assert proc.returncode == 0, (
        f"{script.name} failed:\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
    return proc


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    raise ValueError(f"unknown optimizer {name!r}")


def _module_class(ns: str) -> type:
    """``TinyModule`` for namespace ``ns``, defined at module level (so ``ddp_spawn`` can pickle it)."""
    name = "TinyModule_" + ns.replace(".", "_")
    if name in globals():
        return globals()[name]
    pl = import_ns(ns)

    class TinyModule(pl.LightningModule):
        def __init__(self, optimizer: str = "sgd") -> None:
            super().__init__()
            self.conv = nn.Conv1d(IN_CHANNELS, 4, kernel_size=3)
            self.fc1 = nn.Linear(4 * (LENGTH - 2), 32)
            self.fc2 = nn.Linear(32, NUM_CLASSES)
            self.optimizer_name = optimizer

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.conv(x)).flatten(1)
            return self.fc2(torch.relu(self.fc1(h)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return make_optimizer(self.optimizer_name, self.parameters())

    TinyModule.__name__ = TinyModule.__qualname__ = name
    TinyModule.__module__ = __name__
    globals()[name] = TinyModule
    return TinyModule


for _ns in NAMESPACES:
    try:
        _module_class(_ns)
    except ImportError:  # pragma: no cover - depends on the environment
        pass


def make_module(ns: str | ModuleType = "lightning.pytorch", optimizer: str = "sgd", seed: int | None = 0):
    """A tiny Conv1d + 2-layer MLP classifier deriving from ``ns.LightningModule``.

    Inputs are ``(B, 2, 16)`` floats, targets ``(B,)`` class indices in ``[0, 4)``. Prunable weights:
    ``conv.weight`` (4x2x3), ``fc1.weight`` (32x56), ``fc2.weight`` (4x32); all layers have biases.
    ``seed`` (if not None) seeds the parameter initialisation.
    """
    ns_name = ns if isinstance(ns, str) else ns.__name__
    cls = _module_class(ns_name)
    if seed is not None:
        torch.manual_seed(seed)
    return cls(optimizer)


def make_dataloader(n: int = 64, batch_size: int = 8, seed: int = 123) -> DataLoader:
    """Synthetic, learnable classification data for :func:`make_module` (no shuffling, deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_CHANNELS, LENGTH, generator=gen)
    y = (x[:, 0, :4].sum(1) > 0).long() + 2 * (x[:, 1, -4:].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(ns: str | ModuleType = "lightning.pytorch", **kwargs):
    """A quiet CPU trainer of namespace ``ns``; ``kwargs`` override the defaults."""
    pl = import_ns(ns)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def masks_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same names, and per name the same shape and the same bool values (compared on the CPU)."""
    if set(a) != set(b):
        return False
    return all(
        a[n].shape == b[n].shape and torch.equal(a[n].detach().cpu().bool(), b[n].detach().cpu().bool()) for n in a
    )


def as_dict(masks) -> dict[str, Tensor]:
    """A MaskSet (or mapping) as a plain ``{name: bool cpu tensor}`` dict."""
    return {n: m.detach().cpu().bool().clone() for n, m in masks.items()}


def every_callback(sparsity: float = 0.8, **overrides: dict) -> dict:
    """Factories of every registered lightning_pai pruning method in its example configuration, by class name.

    The one list the suites parametrize over, derived from the registry (:func:`lightning_pai.list_methods`): a
    new method declaring a ``MethodCard`` is tested by every suite the day it is added. Each example reaches
    ``sparsity`` within a fit of 2 epochs (its card's contract). ``overrides`` maps a class name to keyword
    overrides, e.g. ``every_callback(PruneAtInit={"method": "snip"})``. Gradient-only methods (FISH) prune
    nothing, so the pruning suites' contract is not theirs: tests/test_fish.py covers them.
    """
    from lightning_pai import list_methods

    return {
        cls.__name__: partial(cls.example, sparsity, **overrides.get(cls.__name__, {}))
        for cls in list_methods()
        if cls.card.family != "gradient_only"
    }


def topology_methods() -> list[str]:
    """Registered methods whose masks change during training (they count ``updates``)."""
    from lightning_pai import TopologyCallback, list_methods

    return [cls.__name__ for cls in list_methods() if issubclass(cls, TopologyCallback)]


def scheduled_updates(cb, total_steps: int, steps_per_epoch: int) -> int:
    """Topology updates ``cb``'s plan schedules in a run of ``total_steps`` optimizer steps (none at the last step
    of a growing method; epoch-end schedules at every ``steps_per_epoch``-th step)."""
    from lightning_pai.core import TopologyUpdater

    updater = TopologyUpdater(cb.plan())
    return sum(updater.is_update(t, total_steps, t % steps_per_epoch == 0) for t in range(1, total_steps + 1))


def assert_enforced(cb, module: nn.Module, x: Tensor | None = None) -> None:
    """The masks hold: pruned weights are exactly zero, or, for a learned mask (whose weights are never zeroed),
    the model computes exactly what the copy with the zeros baked in computes (on ``x``, default: a batch of
    :func:`make_module`'s inputs)."""
    if cb.card.family == "learned":
        if x is None:
            x = torch.randn(5, IN_CHANNELS, LENGTH, generator=torch.Generator().manual_seed(1))
        x = x.to(next(module.parameters()).device)
        training = module.training
        with torch.no_grad():
            plain = cb.make_permanent(module).eval()
            module.eval()
            assert torch.allclose(module(x), plain(x), atol=1e-5)
            module.train(training)
        return
    params = dict(module.named_parameters())
    for n, m in cb.masks.items():
        assert torch.equal(params[n][~m].detach().float().cpu(), torch.zeros(int((~m).sum())))
