"""One small interface over every library's per-step API, so a plain PyTorch loop can drive them all alike.

A :class:`Pruner` wraps one library's method: :meth:`Pruner.setup` prepares the model and optimizer the
way that library's documentation does, :meth:`Pruner.train_step` runs one full training step (zero grad,
forward, backward, the library's per-step calls, the optimizer step) and the read-outs (:meth:`masks`,
:meth:`effective_weights`, :meth:`stored_weights`) report the current topology keyed by the *dense*
model's parameter names (``"layer1.0.conv1.weight"``), whatever the library renames them to.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def default_targets(model: nn.Module) -> list[str]:
    """Names of the weights every library is asked to prune: each ``nn.Conv*`` / ``nn.Linear`` weight.

    On the benchmark models this is exactly lightning_pai's default target set.
    """
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, kinds)]


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of a dotted parameter name."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class Pruner:
    """A library's pruning or sparse-training method behind one step-level interface.

    Attributes:
        key: Registry key (``"pai_rigl"``).
        library: Distribution name (``"lightning_pai"``, ``"rigl-torch"``, ...).
        method: Method label (``"RigL"``).
        modules: Importable modules the adapter needs (missing: the library is skipped).
        dynamic: Whether the topology changes during training (the DST checks apply).
        prunes_once: Whether masks are decided once (at setup) and never change.

    Args:
        sparsity: Fraction of the targeted weights removed.
        seed: Seed of the library's random choices (where it takes one; else the global RNG is seeded with it).
            None: leave the global RNG as it is (each DDP rank then draws its own random numbers).
        total_steps: Length of the run the schedules are laid out over.
        delta_t: Steps between topology updates (DST methods).
        start_step: Steps already done when timing starts (places an update inside a short window).
    """

    key = "dense"
    library = "PyTorch"
    method = "dense"
    modules: tuple[str, ...] = ()
    dynamic = False
    prunes_once = True

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        seed: int | None = 0,
        total_steps: int = 10_000,
        delta_t: int = 100,
        start_step: int = 0,
        **options: Any,
    ) -> None:
        self.sparsity, self.total_steps = float(sparsity), int(total_steps)
        self.seed = None if seed is None else int(seed)
        self.delta_t, self.start_step, self.options = int(delta_t), int(start_step), options
        self.step = int(start_step)  # optimizer steps done
        self.targets: list[str] = []
        self.update_steps: list[int] = []  # steps whose update changed the masks (filled by subclasses)
        self.notes: list[str] = []  # what a user had to work around (filled by the checks)

    @classmethod
    def available(cls) -> bool:
        """Whether every module the adapter imports is installed."""
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)

    @property
    def label(self) -> str:
        return self.method if self.library == "PyTorch" else f"{self.library} {self.method}"

    # ----------------------------------------------------------------- to override
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Prepare ``model`` and ``optimizer`` (prune at init, register hooks, wrap the step...)."""
        self.model, self.optimizer = model, optimizer
        self.targets = default_targets(model)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step on ``(x, y)``; returns the loss (not synchronised)."""
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        self.step += 1
        return loss.detach()

    def masks(self) -> dict[str, Tensor]:
        """Current bool keep-masks by dense parameter name (dense: everything kept)."""
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.effective_weights().items()}

    def effective_weights(self) -> dict[str, Tensor]:
        """The weight each target's forward uses (for reparametrised libraries: ``mask * original``)."""
        return {n: p.detach() for n, p in self.stored_weights().items()}

    def stored_weights(self) -> dict[str, Tensor]:
        """The tensor each target's values are stored in (the optimizer's parameter)."""
        return {n: _get_param(self.model, n) for n in self.targets}

    def state_dict(self) -> dict[str, Any]:
        """The library's own state (beyond the model's and the optimizer's ``state_dict``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into an object that went through :meth:`setup` on a fresh model."""

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: Mapping[str, Any],
        model_state: Mapping[str, Any],
        optimizer_state: Mapping[str, Any],
    ) -> None:
        """Resume on a fresh model and optimizer: set up as usual, then load the three saved states."""
        self.setup(model, optimizer)
        self.load_model(model, model_state)
        optimizer.load_state_dict(optimizer_state)
        self.load_state_dict(state)

    def load_model(self, model: nn.Module, model_state: Mapping[str, Any]) -> None:
        """``model.load_state_dict``; ``strict=False`` (noted in :attr:`notes`) when only mask buffers are missing.

        ``torch.ao``'s ``FakeSparsity`` leaves its mask out of the model's ``state_dict`` but expects it when
        loading, so a strict load of its own checkpoint fails; a user then loads non-strictly.
        """
        try:
            model.load_state_dict(model_state)
        except RuntimeError:
            result = model.load_state_dict(model_state, strict=False)
            if result.unexpected_keys or not all(k.endswith(".mask") for k in result.missing_keys):
                raise
            self.notes.append(
                "a strict model.load_state_dict of its own checkpoint fails (the FakeSparsity masks are left out "
                "of the model's state_dict); loaded with strict=False"
            )

    def extra_tensors(self) -> list[Tensor]:
        """Tensors the library holds outside the dense model's own parameters and buffers (masks, copies)."""
        return []

    def close(self) -> None:
        """Remove hooks (so another pruner can take the same model)."""


def _get_param(model: nn.Module, name: str) -> Tensor:
    mod, attr = owner(model, name)
    parametrized = getattr(mod, "parametrizations", None)
    if parametrized is not None and attr in parametrized:
        return getattr(parametrized, attr).original
    if hasattr(mod, attr + "_orig"):  # torch.nn.utils.prune
        return getattr(mod, attr + "_orig")
    return getattr(mod, attr)


def state_bytes(tensors: list[Tensor]) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
