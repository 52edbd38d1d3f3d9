"""Dynamic sparse training: callbacks that rewire the topology during training at constant sparsity."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.callbacks.gradual import CubicSchedule
from lightning_pai.callbacks.prune_at_init import PruneAtInit
from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.dst import (
    cosine_fraction,
    diff,
    drop_and_grow,
    prune_by_magnitude,
    random_scores,
)
from lightning_pai.core.masks import check_sparsity
from lightning_pai.core.pruning import check_choice, is_number
from lightning_pai.core.scorers import get_scorer
from lightning_pai.core.targets import Selectors

GROWTH = ("random", "gradient", "momentum")
DROPS = ("magnitude", "set")
DECAYS = ("cosine", "constant")
UPDATE_ON = ("step", "epoch")
REDISTRIBUTION = ("none", "momentum")
ROUNDING = ("floor", "ceil")


class DynamicSparseTraining(SparseCallback):
    """Drop-and-grow dynamic sparse training at a constant number of weights (SET, RigL, SNFS build on it).

    The network starts sparse (``init``: random masks with the ``distribution``'s per-layer budgets, or
    any pruning-at-initialization scorer) and, every ``delta_t`` optimizer steps (``update_on="step"``) or
    at the end of every epoch but the last (``update_on="epoch"``), each layer drops ``r(f_t * active)``
    active weights (``r``: ``rounding`` down or up; ``drop``: smallest magnitude, or SET's sign-wise rule)
    and grows inactive ones by the largest growth score (``growth``: ``"random"``, ``"gradient"`` =
    ``|dense gradient|`` of the update step, or ``"momentum"`` = ``|dense momentum|``), with
    ``f_t = m + (alpha - m) / 2 * (1 + cos(pi * t / T_end))`` (``decay="cosine"``, ``m = min_fraction``)
    or ``alpha``. Nothing changes after ``t_end`` (a fraction of the total optimizer steps). Each layer
    grows what it dropped (``redistribution="none"``), or the total dropped is shared between layers in
    proportion to the mean ``|momentum|`` of their active weights (``"momentum"``, SNFS). Either way the
    overall kept count stays exactly constant.

    Momentum growth and redistribution read a *dense* momentum ``m <- beta * m + grad`` that the callback
    keeps itself (every step with finite gradients, from the dense gradient before masking): the
    optimizer's own momentum is zero on inactive weights because their gradients are masked.

    Grown weights start at exactly zero with zero optimizer state (a weight dropped and regrown in the
    same update keeps its value, as in RigL). The gradient used for growth is the dense, all-reduced
    gradient of the update step (accumulated over ``accumulate_grad_batches``), read before the masks
    are applied to it; a step whose gradients are not finite (e.g. skipped by a 16-bit ``GradScaler``)
    never updates the topology — that update is skipped. Random growth draws from a generator seeded with
    ``(seed, step)``, so every DDP rank grows the same weights; the new masks are also broadcast from rank
    zero. The fraction of targeted weights that have ever been active (in-time over-parameterization,
    Liu et al. 2021) is logged as ``sparsity/itop`` with ``dst/dropped`` and ``dst/grown`` per update.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks (``"erk"``, ``"er"``, ``"uniform"``, ...).
        init: ``"random"`` or the name of a registered scorer (e.g. ``"snip"``) for the initial masks.
        growth: ``"random"``, ``"gradient"`` or ``"momentum"``.
        drop: ``"magnitude"`` or ``"set"`` (Mocanu et al. 2018's sign-wise rule).
        alpha: Initial drop fraction.
        decay: ``"cosine"`` or ``"constant"``.
        update_on: ``"step"`` or ``"epoch"``.
        delta_t: Optimizer steps between updates (``update_on="step"``).
        t_end: Fraction of the total optimizer steps after which the topology is frozen.
        min_fraction: Floor ``m`` of the cosine decay.
        rounding: ``"floor"`` (RigL, SET) or ``"ceil"`` (SNFS, GraNet) of the per-layer drop count.
        redistribution: ``"none"`` or ``"momentum"``.
        beta: Decay of the dense momentum used by ``growth="momentum"`` and ``redistribution="momentum"``.
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: Parameters left dense.
        seed: Seed of the initial masks and of random growth.
        verbose: Print the sparsity table at fit start (rank zero).
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "erk",
        init: str = "random",
        growth: str = "gradient",
        drop: str = "magnitude",
        alpha: float = 0.3,
        decay: str = "cosine",
        update_on: str = "step",
        delta_t: int = 100,
        t_end: float = 0.75,
        min_fraction: float = 0.0,
        rounding: str = "floor",
        redistribution: str = "none",
        beta: float = 0.9,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        self.sparsity = check_sparsity(sparsity)
        get_distribution(distribution)
        get_scorer(init)
        check_choice(growth, GROWTH, "growth")
        check_choice(drop, DROPS, "drop")
        check_choice(decay, DECAYS, "decay")
        check_choice(update_on, UPDATE_ON, "update_on")
        check_choice(rounding, ROUNDING, "rounding")
        check_choice(redistribution, REDISTRIBUTION, "redistribution")
        if not is_number(alpha) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` (the drop fraction) must be in (0, 1); got {alpha!r}.")
        if not is_number(min_fraction) or not 0 <= min_fraction <= alpha:
            raise ValueError(f"`min_fraction` must be in [0, `alpha`={alpha}]; got {min_fraction!r}.")
        if not is_number(beta) or not 0 <= beta < 1:
            raise ValueError(f"`beta` (the momentum decay) must be in [0, 1); got {beta!r}.")
        if not is_number(delta_t, integer=True) or delta_t < 1:
            raise ValueError(f"`delta_t` must be a positive integer (optimizer steps); got {delta_t!r}.")
        if not is_number(t_end) or not 0 < t_end <= 1:
            raise ValueError(f"`t_end` is a fraction of the training steps in (0, 1]; got {t_end!r}.")
        self.distribution, self.init, self.growth, self.drop = distribution, init, growth, drop
        self.alpha, self.decay, self.update_on = float(alpha), decay, update_on
        self.delta_t, self.t_end, self.seed = delta_t, float(t_end), int(seed)
        self.min_fraction, self.rounding, self.redistribution = float(min_fraction), rounding, redistribution
        self.beta = float(beta)
        self._momentum: dict[str, Tensor] | None = None  # dense gradient momentum (SNFS)
        self._scores: dict[str, Tensor] | None = None  # growth scores captured for the coming update
        self._scores_step = -1
        self._fired: dict[str, Tensor] | None = None
        self.updates = 0
        self._t_end_steps = self._total_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, growth=self.growth, drop=self.drop)

    def _start_sparsity(self) -> float:
        """Sparsity of the initial masks (GraNet starts below its final ``sparsity``)."""
        return self.sparsity

    def initial_masks(self, trainer: Any, pl_module: Any, params: dict[str, Any]) -> dict[str, Tensor]:
        """The ``init`` masks at the starting sparsity with the ``distribution``'s budgets."""
        sparsity, dist = self._start_sparsity(), self.distribution
        scorer = PruneAtInit(self.init, sparsity, distribution=dist, seed=self.seed, verbose=False)
        return scorer.initial_masks(trainer, pl_module, params)

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"`{type(self).__name__}` supports one optimizer; `configure_optimizers` returned "
                f"{len(trainer.optimizers)}."
            )
        super().on_fit_start(trainer, pl_module)
        if self._fired is None:
            self._fired = {n: m.clone() for n, m in self.masks.items()}
        else:  # restored from a checkpoint (CPU) or kept from a previous fit
            self._fired = {n: f.to(self.masks[n].device) for n, f in self._fired.items()}
        if self._needs_momentum:
            params = self.masks.params
            if self._momentum is None:
                self._momentum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            else:  # restored from a checkpoint (CPU) or kept from a previous fit
                self._momentum = {n: b.to(params[n].device) for n, b in self._momentum.items()}
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                f"`{type(self).__name__}` schedules its updates over the whole run: set `max_steps` or `max_epochs` "
                "on the Trainer (training length is unbounded)."
            )
        self._total_steps = int(total)
        self._t_end_steps = int(self.t_end * self._total_steps)

    @property
    def _needs_momentum(self) -> bool:
        return self.growth == "momentum" or self.redistribution == "momentum"

    # ---------------------------------------------------------------- timing
    def _is_update_step(self, trainer: Any, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (1-based) ends with a topology update.

        Never the last step of training: nothing would train the grown weights.
        """
        if self.update_on == "epoch" or step > self._t_end_steps or step >= self._total_steps:
            return False
        return step % self.delta_t == 0

    def _fraction(self, step: int) -> float:
        if self.decay == "constant":
            return self.alpha
        return cosine_fraction(self.alpha, step, self._t_end_steps, self.min_fraction)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step + 1
        last_of_epoch = self.update_on == "epoch" and _is_last_step_of_epoch(trainer)
        update = self._is_update_step(trainer, step) or last_of_epoch
        if update or self._needs_momentum:
            grads = [p.grad for p in self.masks.params.values()]
            # one host sync for all layers (this runs every step when a dense momentum is kept)
            finite = all(g is not None for g in grads) and bool(torch.stack([g.isfinite().all() for g in grads]).all())
            if finite and self._needs_momentum:
                bufs = list(self._momentum.values())
                torch._foreach_mul_(bufs, self.beta)
                torch._foreach_add_(bufs, [g.detach().float() for g in grads])
            if update:
                self._scores = None
                if finite:
                    if self.growth == "gradient":
                        self._scores = {n: g.detach().abs() for n, g in zip(self.masks.names, grads)}
                    else:
                        self._scores = {}  # random and momentum scores are read at update time
                    self._scores_step = step
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.update_on == "step" and self._scores is not None and trainer.global_step == self._scores_step:
            self._update(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.update_on == "epoch" and self._scores is not None and trainer.global_step == self._scores_step:
            last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
            if trainer.global_step <= self._t_end_steps and not last_epoch:
                self._update(trainer, pl_module, trainer.global_step)
        self._scores = None

    # ---------------------------------------------------------------- update
    def _prune(self, masks: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Masks to drop and grow from at ``step`` (GraNet prunes here first; unchanged by default)."""
        return masks

    def _growth_scores(self, masks: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if self.growth == "gradient":
            return self._scores
        if self.growth == "momentum":
            return {n: b.abs() for n, b in self._momentum.items()}
        return random_scores(masks, self.seed * 1_000_003 + step)

    def _update(self, trainer: Any, pl_module: Any, step: int) -> None:
        fraction = self._fraction(step)
        old = {n: m.clone() for n, m in self.masks.items()}
        start = self._prune(old, step)
        new = drop_and_grow(
            self.masks.params,
            start,
            fraction,
            self._growth_scores(start, step),
            drop=self.drop,
            rounding=self.rounding,
            momentum=self._momentum if self.redistribution == "momentum" else None,
        )
        new = self._from_rank_zero(trainer, new)
        update = diff(old, {n: m.to(old[n].device) for n, m in new.items()})
        self.masks.update_(update.masks, trainer.optimizers)
        for n, m in self.masks.items():
            self._fired[n] |= m
        self._scores = None
        self.updates += 1
        metrics = {
            "sparsity/global": 1.0 - self.masks.density,
            "sparsity/itop": self.itop,
            "dst/fraction": fraction,
            "dst/dropped": float(sum(update.dropped.values())),
            "dst/grown": float(sum(update.grown.values())),
        }
        self._log_metrics(trainer, metrics, step)

    @property
    def itop(self) -> float:
        """Fraction of the targeted weights that have been active at some point (Liu et al. 2021)."""
        if self._fired is None:
            return 0.0
        return sum(int(f.sum()) for f in self._fired.values()) / sum(f.numel() for f in self._fired.values())

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fired = None if self._fired is None else {n: f.cpu().clone() for n, f in self._fired.items()}
        momentum = None if self._momentum is None else {n: b.cpu().clone() for n, b in self._momentum.items()}
        state.update(updates=self.updates, fired=fired, momentum=momentum)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updates = int(state_dict.get("updates", 0))
        fired = state_dict.get("fired")
        if fired is not None:
            self._fired = {n: f.clone() for n, f in fired.items()}
        momentum = state_dict.get("momentum")
        if momentum is not None:
            self._momentum = {n: b.clone() for n, b in momentum.items()}


def _is_last_step_of_epoch(trainer: Any) -> bool:
    """Whether the optimizer step about to happen is the epoch's last."""
    loop = trainer.fit_loop.epoch_loop
    return loop._num_ready_batches_reached() if hasattr(loop, "_num_ready_batches_reached") else False


_BASE_PARAMS = frozenset(inspect.signature(DynamicSparseTraining.__init__).parameters) - {"self", "sparsity"}


def _base_kwargs(local: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """:class:`DynamicSparseTraining` keyword arguments: a subclass's same-named ``locals()`` plus ``fixed``."""
    return {**{k: v for k, v in local.items() if k in _BASE_PARAMS}, **fixed}


class RigL(DynamicSparseTraining):
    """RigL (Evci et al. 2020, arXiv:1911.11134): drop by magnitude, grow by the dense gradient.

    Every ``delta_t`` optimizer steps until ``t_end`` of training, each layer drops the
    ``floor(f_t * active)`` smallest-magnitude active weights, ``f_t = alpha / 2 * (1 + cos(pi * t / T_end))``,
    and grows as many inactive weights with the largest ``|dense gradient|`` of that step. Defaults from
    the paper: ERK initial masks, ``alpha=0.3``, ``delta_t=100``, ``t_end=0.75``.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer (e.g. ``"snip"``) for the initial masks.
        alpha: Initial drop fraction.
        delta_t: Optimizer steps between updates.
        t_end: Fraction of training after which the topology is frozen.
        include, exclude, seed, verbose: As for :class:`DynamicSparseTraining`.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "erk",
        init: str = "random",
        alpha: float = 0.3,
        delta_t: int = 100,
        t_end: float = 0.75,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(sparsity, **_base_kwargs(locals(), growth="gradient"))


class SET(DynamicSparseTraining):
    """SET (Mocanu et al. 2018, Nature Communications 9:2383): sign-wise magnitude drop, random growth.

    At the end of every epoch but the last (or every ``delta_t`` steps with ``update_on="step"``), each
    layer removes the fraction ``zeta`` of its positive active weights closest to zero and, separately,
    ``zeta`` of its negative ones, and grows as many inactive weights uniformly at random. Defaults from
    the paper: Erdős–Rényi initial masks, ``zeta=0.3``, per-epoch updates.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks (``"er"``: Erdős–Rényi).
        init: ``"random"`` or a registered scorer for the initial masks.
        zeta: Fraction of each sign's active weights replaced per update.
        update_on: ``"epoch"`` or ``"step"``.
        delta_t: Optimizer steps between updates with ``update_on="step"``.
        include, exclude, seed, verbose: As for :class:`DynamicSparseTraining`.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "er",
        init: str = "random",
        zeta: float = 0.3,
        update_on: str = "epoch",
        delta_t: int = 100,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            sparsity, **_base_kwargs(locals(), alpha=zeta, growth="random", drop="set", decay="constant", t_end=1.0)
        )


class SNFS(DynamicSparseTraining):
    """Sparse momentum / SNFS (Dettmers & Zettlemoyer 2019, arXiv:1907.04840).

    At the end of every epoch but the last, each layer removes ``ceil(p_t * active)`` of its
    smallest-magnitude weights, with the prune rate decayed per optimizer step over the whole run as
    ``p_t = m + (p - m) / 2 * (1 + cos(pi * t / T))`` (``p = prune_rate = 0.5``, ``m = min_rate = 0.005``).
    The removed weights are redistributed: layer ``l`` regrows a share ``mu_l / sum_k mu_k`` of them,
    ``mu_l`` being the mean ``|momentum|`` of its active weights (capped by its free slots, the rest shared
    among the others; a nearly dense layer — sparsity below 0.2 and an above-average share — prunes at
    most its sparsity). Within a layer the inactive weights with the largest ``|momentum|`` grow. The
    momentum is the dense gradient's, ``m <- beta m + grad`` (``beta=0.9``), kept by the callback, as the
    official code reads SGD's momentum of unmasked gradients. Grown weights start at zero with zero
    optimizer state; the total kept count is exactly constant (the official code only approximately
    restores it). Initial masks are uniform per layer by default, as in the official code.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        prune_rate: Initial prune rate ``p``.
        min_rate: Final prune rate ``m`` of the cosine decay.
        update_on: ``"epoch"`` or ``"step"``.
        delta_t: Optimizer steps between updates with ``update_on="step"``.
        beta: Decay of the dense momentum.
        include, exclude, seed, verbose: As for :class:`DynamicSparseTraining`.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "uniform",
        init: str = "random",
        prune_rate: float = 0.5,
        min_rate: float = 0.005,
        update_on: str = "epoch",
        delta_t: int = 100,
        beta: float = 0.9,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            sparsity,
            **_base_kwargs(
                locals(),
                alpha=prune_rate,
                min_fraction=min_rate,
                growth="momentum",
                redistribution="momentum",
                rounding="ceil",
                t_end=1.0,
            ),
        )


class GraNet(CubicSchedule, DynamicSparseTraining):
    """GraNet (Liu et al. 2021, arXiv:2106.10404): gradual magnitude pruning with zero-cost neuroregeneration.

    Starts from ``init`` masks at ``initial_sparsity`` (``distribution`` budgets; 0 = dense) and, every
    ``delta_t`` optimizer steps from ``start`` on:

    1. while ``start <= t <= end``, prunes to Zhu & Gupta's cubic schedule
       ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3`` by removing the
       smallest-magnitude remaining weights across all layers (``prune_distribution="global"``; also
       ``"uniform"``, ``"lamp"``); ``end`` always gets an update, so ``s_f = sparsity`` is reached exactly;
    2. then, at every update until training ends (also after ``end``, as in the official code),
       each layer drops ``ceil(r_t * active)`` of its smallest-magnitude weights and regrows the same
       number of inactive weights with the largest ``|dense gradient|``, with the death rate
       ``r_t = m + (r - m) / 2 * (1 + cos(pi * t / T))`` (``r = death_rate``, ``m = min_rate``).

    Defaults are the paper's CIFAR settings: ``death_rate=0.5``, ``delta_t=1000``,
    ``initial_sparsity=0.5``, ERK, pruning until 110 / 160 of training. Grown weights start at zero with
    zero optimizer state.

    Args:
        sparsity: Final sparsity ``s_f``.
        initial_sparsity: ``s_i``, the sparsity of the initial masks.
        start: First pruning step (``int``) or fraction of training (``float``).
        end: Step (``int``) or fraction (``float``) at which ``sparsity`` is reached.
        prune_distribution: ``"global"``, ``"uniform"`` or ``"lamp"`` for the gradual pruning.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        death_rate: Initial drop fraction ``r`` of the regeneration.
        min_rate: Final drop fraction ``m`` of the cosine decay.
        delta_t: Optimizer steps between updates.
        include, exclude, seed, verbose: As for :class:`DynamicSparseTraining`.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.5,
        start: int | float = 0.0,
        end: int | float = 110 / 160,
        prune_distribution: str = "global",
        distribution: str = "erk",
        init: str = "random",
        death_rate: float = 0.5,
        min_rate: float = 0.005,
        delta_t: int = 1000,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            sparsity,
            **_base_kwargs(
                locals(), alpha=death_rate, min_fraction=min_rate, growth="gradient", rounding="ceil", t_end=1.0
            ),
        )
        self._init_schedule(initial_sparsity, start, end)
        check_choice(prune_distribution, ("global", "uniform", "lamp"), "prune_distribution")
        self.prune_distribution = prune_distribution

    def _start_sparsity(self) -> float:
        return self.initial_sparsity

    def _is_update_step(self, trainer: Any, step: int) -> bool:
        if step < self._start_step:
            return False
        return super()._is_update_step(trainer, step) or (step == self._end_step and step <= self._t_end_steps)

    def _prune(self, masks: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if step > self._end_step:
            return masks
        target = self.target_sparsity(step)
        kept = sum(int(m.sum()) for m in masks.values())
        if kept <= round((1.0 - target) * sum(m.numel() for m in masks.values())):
            return masks
        return prune_by_magnitude(self.masks.params, masks, target, self.prune_distribution)
