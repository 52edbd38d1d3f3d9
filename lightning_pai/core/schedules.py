"""Schedules: *how much* (value schedules) and *when* (update schedules), one interface each.

A **value schedule** maps an index and a horizon to a number, ``schedule(step, total) -> float``: the
drop fraction of a topology update at optimizer step ``step`` of ``total``, the target sparsity of
gradual pruning, or the sparsity after round ``r`` of ``k`` of iterative pruning at initialization.
Window points (``start``, ``end``) are optimizer steps (``int``) or fractions of ``total`` (``float``),
resolved by :func:`resolve_point`.

An **update schedule** decides whether optimizer step ``step`` (1-based) of ``total`` ends with a
topology update, ``schedule.is_update(step, total, epoch_end) -> bool``; ``epoch_end`` says whether the
step is the last of its epoch. Its ``at_epoch_end`` attribute tells the Lightning adapter whether to run
the update at the end of the epoch (after validation) or right after the step.

Both families are registries (:func:`get_schedule`, :func:`get_update_schedule`): a new schedule is a
small dataclass and one ``register_*`` line.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from lightning_pai.core.registry import Registry
from lightning_pai.core.validation import check_positive_int, check_sparsity

Point = int | float


def resolve_point(point: Point, total: int) -> int:
    """An optimizer step: ``point`` itself if it is an ``int``, else ``int(point * total)``."""
    return point if isinstance(point, int) else int(point * total)


def resolve_window(start: Point, end: Point, total: int) -> tuple[int, int]:
    """``start`` and ``end`` as optimizer steps, ``start < end``.

    Raises:
        ValueError: If ``end`` does not come after ``start``.
    """
    first, last = resolve_point(start, total), resolve_point(end, total)
    if last <= first:
        raise ValueError(
            f"`end` (step {last}) must come after `start` (step {first}); training has {total} optimizer steps."
        )
    return first, last


# ---------------------------------------------------------------------------------------- value schedules
class Schedule(ABC):
    """A value as a function of an index and a horizon: ``schedule(step, total) -> float``."""

    @abstractmethod
    def __call__(self, step: int, total: int) -> float:
        """The value at ``step`` of ``total``."""


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step (SET's ``zeta``)."""

    value: float

    def __call__(self, step: int, total: int) -> float:
        return self.value


@dataclass(frozen=True)
class Cosine(Schedule):
    """``m + (a - m) / 2 * (1 + cos(pi * t / T))``, ``a = initial``, ``m = final``, ``T = end`` (``m`` from ``T`` on).

    With ``final=0`` this is RigL's drop fraction ``alpha / 2 * (1 + cos(pi * t / T_end))`` (Evci et al. 2020);
    SNFS and GraNet decay their prune rate to ``final=0.005`` over the whole run (``CosineAnnealingLR``'s
    ``eta_min`` in their official code).
    """

    initial: float
    final: float = 0.0
    end: Point = 1.0

    def __call__(self, step: int, total: int) -> float:
        t_end = resolve_point(self.end, total)
        if t_end <= 0 or step >= t_end:
            return self.final
        return self.final + (self.initial - self.final) / 2 * (1 + math.cos(math.pi * step / t_end))


@dataclass(frozen=True)
class Cubic(Schedule):
    """Zhu & Gupta 2017's gradual schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``.

    ``initial`` (``s_i``) up to ``start`` (``t0``), ``final`` (``s_f``) from ``end`` (``t1``) on.
    """

    initial: float
    final: float
    start: Point = 0.0
    end: Point = 1.0

    def __call__(self, step: int, total: int) -> float:
        start, end = resolve_window(self.start, self.end, total)
        if step <= start:
            return self.initial
        if step >= end:
            return self.final
        return self.final + (self.initial - self.final) * (1 - (step - start) / (end - start)) ** 3


@dataclass(frozen=True)
class Exponential(Schedule):
    """Sparsity after round ``r`` of ``k``: density ``(1 - final) ** (r / k)`` (Tanaka et al. 2020's iterative SynFlow).

    Every round removes the same fraction of the remaining weights.
    """

    final: float

    def __call__(self, step: int, total: int) -> float:
        return 1.0 - (1.0 - self.final) ** (step / total)


@dataclass(frozen=True)
class Linear(Schedule):
    """``final * r / k``: the same number of weights removed in every round."""

    final: float

    def __call__(self, step: int, total: int) -> float:
        return self.final * step / total


_SCHEDULES: Registry[type[Schedule]] = Registry(
    "schedule", "schedule", "lightning_pai.core.schedules.register_schedule"
)
for _name, _cls in (
    ("constant", Constant),
    ("cosine", Cosine),
    ("cubic", Cubic),
    ("exponential", Exponential),
    ("linear", Linear),
):
    _SCHEDULES.register(_name, _cls)


def register_schedule(name: str, cls: type[Schedule] | None = None, *, overwrite: bool = False):
    """Register a :class:`Schedule` subclass under ``name`` (decorator if ``cls`` is None)."""
    return _SCHEDULES.register(name, cls, overwrite=overwrite)


def get_schedule(name: str, **params: Any) -> Schedule:
    """An instance of the schedule registered as ``name`` with ``params``.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names).
    """
    if not isinstance(name, str):
        raise ValueError(f"`schedule` must be one of {', '.join(map(repr, list_schedules()))}; got {name!r}.")
    return _SCHEDULES.get(name)(**params)


def list_schedules() -> list[str]:
    """Names of the registered value schedules."""
    return _SCHEDULES.list()


#: Value schedules of the rounds of iterative pruning at initialization.
ROUND_SCHEDULES = ("exponential", "linear")


def round_sparsities(sparsity: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """Sparsity after each of ``iterations`` rounds of iterative pruning, ending at ``sparsity``.

    ``"exponential"`` (:class:`Exponential`) or ``"linear"`` (:class:`Linear`).

    Raises:
        ValueError: On a sparsity outside ``[0, 1)``, a non-positive ``iterations`` or an unknown schedule.
    """
    check_sparsity(sparsity)
    check_positive_int(iterations, "iterations", "scoring rounds")
    if schedule not in ROUND_SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(map(repr, ROUND_SCHEDULES))}; got {schedule!r}.")
    fn = get_schedule(schedule, final=float(sparsity))
    values = [fn(r, iterations) for r in range(1, iterations + 1)]
    values[-1] = float(sparsity)
    return values


# --------------------------------------------------------------------------------------- update schedules
class UpdateSchedule(ABC):
    """Whether an optimizer step ends with a topology update.

    Attributes:
        at_epoch_end: The update runs at the end of the epoch (after validation) rather than after the step.
    """

    at_epoch_end: bool = False

    @abstractmethod
    def is_update(self, step: int, total: int, epoch_end: bool) -> bool:
        """Whether optimizer step ``step`` (1-based) of ``total`` is an update step."""


@dataclass(frozen=True)
class Every(UpdateSchedule):
    """Every ``every`` optimizer steps counted from ``start``, up to and including ``end``; also at the ``also`` points.

    RigL: ``Every(100, end=0.75)``; Zhu & Gupta's gradual pruning: ``Every(frequency, start, end, also=(end,))``.
    """

    every: int
    start: Point = 0
    end: Point = 1.0
    also: tuple[Point, ...] = ()

    def is_update(self, step: int, total: int, epoch_end: bool) -> bool:
        first, last = resolve_point(self.start, total), resolve_point(self.end, total)
        if step < first or step > last:
            return False
        return (step - first) % self.every == 0 or any(step == resolve_point(p, total) for p in self.also)


@dataclass(frozen=True)
class EpochEnds(UpdateSchedule):
    """At the end of every epoch, up to ``end`` (SET, SNFS)."""

    end: Point = 1.0
    at_epoch_end = True

    def is_update(self, step: int, total: int, epoch_end: bool) -> bool:
        return epoch_end and step <= resolve_point(self.end, total)


@dataclass(frozen=True)
class Periods(UpdateSchedule):
    """Every ``period`` optimizer steps, the period changing at given steps, up to and including ``end``.

    ``periods`` is ``((from_step, period), ...)``: from step ``from_step`` on, step ``t`` is an update when ``t`` is a
    multiple of ``period`` (the global count, as DSR's reference counts iterations). DSR's reference WRN schedule,
    in epochs of ``E`` steps: ``((0, 100), (25 E, 200), (80 E, 400), (140 E, 800))``.
    """

    periods: tuple[tuple[int, int], ...]
    end: Point = 1.0

    def __post_init__(self) -> None:
        if not self.periods or any(
            isinstance(s, bool) or isinstance(p, bool) or not isinstance(s, int) or not isinstance(p, int) or s < 0
            or p < 1 for s, p in self.periods
        ):  # fmt: skip
            raise ValueError(
                f"`periods` must map optimizer steps (int >= 0) to periods (int >= 1), e.g. {{0: 100, 5000: 200}}; "
                f"got {self.periods!r}."
            )
        object.__setattr__(self, "periods", tuple(sorted(self.periods, reverse=True)))  # latest start first

    def is_update(self, step: int, total: int, epoch_end: bool) -> bool:
        if step > resolve_point(self.end, total):
            return False
        period = next((p for s, p in self.periods if s <= step), None)
        return period is not None and step % period == 0


_UPDATE_SCHEDULES: Registry[type[UpdateSchedule]] = Registry(
    "update schedule", "update_on", "lightning_pai.core.schedules.register_update_schedule"
)
_UPDATE_SCHEDULES.register("step", Every)
_UPDATE_SCHEDULES.register("epoch", EpochEnds)


def register_update_schedule(name: str, cls: type[UpdateSchedule] | None = None, *, overwrite: bool = False):
    """Register an :class:`UpdateSchedule` subclass under ``name`` (decorator if ``cls`` is None)."""
    return _UPDATE_SCHEDULES.register(name, cls, overwrite=overwrite)


def get_update_schedule(name: str, **params: Any) -> UpdateSchedule:
    """An instance of the update schedule ``name``: ``"step"`` (:class:`Every`), ``"epoch"`` (:class:`EpochEnds`).

    Raises:
        ValueError: If ``name`` is unknown.
    """
    return _UPDATE_SCHEDULES.get(name)(**params)


def list_update_schedules() -> list[str]:
    """Names of the registered update schedules."""
    return _UPDATE_SCHEDULES.list()
