"""Gradual magnitude pruning (Zhu & Gupta 2017) during training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.dst import cubic_sparsity, prune_by_magnitude
from lightning_pai.core.masks import check_sparsity, compute_masks
from lightning_pai.core.pruning import is_number
from lightning_pai.core.targets import Selectors


def check_point(value: int | float, argument: str) -> None:
    """Validate a training point: an optimizer step (``int >= 0``) or a fraction of training (``float``)."""
    if not is_number(value) or value < 0:
        raise ValueError(
            f"`{argument}` is an optimizer step (int >= 0) or a fraction of training (float); got {value!r}."
        )
    if isinstance(value, float) and value > 1:
        raise ValueError(f"`{argument}` as a float is a fraction of the training steps in [0, 1]; got {value!r}.")


def resolve_window(start: int | float, end: int | float, total: int) -> tuple[int, int]:
    """``start`` and ``end`` (steps or fractions of ``total`` steps) as optimizer steps, ``start < end``.

    Raises:
        ValueError: If ``end`` does not come after ``start``.
    """
    first = start if isinstance(start, int) else int(start * total)
    last = end if isinstance(end, int) else int(end * total)
    if last <= first:
        raise ValueError(
            f"`end` (step {last}) must come after `start` (step {first}); training has {total} optimizer steps."
        )
    return first, last


class CubicSchedule:
    """Mixin: Zhu & Gupta's cubic sparsity schedule, for :class:`GradualMagnitudePruning` and ``GraNet``.

    Goes from ``initial_sparsity`` to ``sparsity`` between ``start`` and ``end`` (optimizer steps, or
    fractions of the fit's steps resolved at fit start). Place it before the callback base class.
    """

    sparsity: float

    def _init_schedule(self, initial_sparsity: float, start: int | float, end: int | float) -> None:
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({self.sparsity}).")
        check_point(start, "start")
        check_point(end, "end")
        self.start, self.end = start, end
        self._start_step = self._end_step = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]
        self._start_step, self._end_step = resolve_window(self.start, self.end, trainer.estimated_stepping_batches)

    def target_sparsity(self, step: int) -> float:
        """``s_t`` of the cubic schedule at optimizer step ``step``."""
        return cubic_sparsity(step, self.initial_sparsity, self.sparsity, self._start_step, self._end_step)


class GradualMagnitudePruning(CubicSchedule, SparseCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv:1710.01878), no regrowth.

    From optimizer step ``start`` to ``end``, every ``frequency`` steps (and at ``end``), the sparsity
    is raised to ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3`` by removing the
    smallest-magnitude remaining weights (``distribution="uniform"``: each layer reaches ``s_t``, as in
    the paper's TensorFlow implementation; ``"global"`` or ``"lamp"``: one ranking across layers). Masks
    only shrink; pruned weights and their optimizer state are zeroed and stay zero. ``start`` and
    ``end`` are optimizer-step indices (``int``) or fractions of the total steps (``float``).

    Args:
        sparsity: Final sparsity ``s_f``.
        initial_sparsity: ``s_i``; when above 0, the weights are pruned by magnitude to it at fit start.
        start: First pruning step (int) or fraction of training (float).
        end: Step (int) or fraction (float) at which ``sparsity`` is reached.
        frequency: Optimizer steps between pruning updates.
        distribution: ``"uniform"``, ``"global"`` or ``"lamp"``.
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: Parameters left dense.
        verbose: Print the sparsity table when masks are set (rank zero).
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        distribution: str = "uniform",
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        self.sparsity = check_sparsity(sparsity)
        self._init_schedule(initial_sparsity, start, end)
        if not is_number(frequency, integer=True) or frequency < 1:
            raise ValueError(f"`frequency` must be a positive integer (optimizer steps); got {frequency!r}.")
        if distribution not in ("uniform", "global", "lamp"):
            raise ValueError(f"`distribution` must be one of ['uniform', 'global', 'lamp']; got {distribution!r}.")
        get_distribution(distribution)
        self.frequency, self.distribution = frequency, distribution
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, initial_sparsity=self.initial_sparsity)

    def initial_masks(self, trainer: Any, pl_module: Any, params: dict[str, Any]) -> dict[str, Tensor]:
        """Dense, or magnitude-pruned to ``initial_sparsity``."""
        if self.initial_sparsity == 0:
            return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()}
        return compute_masks({n: p.detach().abs() for n, p in params.items()}, self.initial_sparsity, self.distribution)

    def _is_update_step(self, step: int) -> bool:
        if step < self._start_step or step > self._end_step:
            return False
        return (step - self._start_step) % self.frequency == 0 or step == self._end_step

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not self._is_update_step(step):
            return
        self._last_step = step  # with gradient accumulation, several batches share one step
        current = dict(self.masks.items())
        new = prune_by_magnitude(self.masks.params, current, self.target_sparsity(step), self.distribution)
        self.masks.update_(self._from_rank_zero(trainer, new), trainer.optimizers)
        self._log_metrics(trainer, {"sparsity/global": 1.0 - self.masks.density}, step)
