"""Dynamic sparse training: Lightning hooks wired to a :class:`~lightning_pai.core.dst.TopologyUpdater`."""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback, is_last_batch_of_epoch
from lightning_pai.callbacks.prune_at_init import PruneAtInit
from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.dst import Plan, Pruning, Rewire, TopologyUpdater
from lightning_pai.core.masks import MaskSet, check_sparsity
from lightning_pai.core.nm import NMSpec, nm_sparsity
from lightning_pai.core.pruning import check_choice, check_range, is_number
from lightning_pai.core.schedules import Constant, Cosine, Cubic, EpochEnds, Every, check_point, resolve_window
from lightning_pai.core.scorers import get_scorer
from lightning_pai.core.sharding import full_dict
from lightning_pai.core.targets import Selectors

DECAYS = ("cosine", "constant")
UPDATE_ON = ("step", "epoch")
ROUNDING = ("floor", "ceil")
PRUNE_DISTRIBUTIONS = ("global", "uniform", "lamp")


class TopologyCallback(SparseCallback):
    """Base of the callbacks that change the masks during training; subclasses only say *what* (:meth:`plan`).

    Wiring: ``on_before_optimizer_step`` hands the dense gradients (accumulated over
    ``accumulate_grad_batches``, all-reduced under DDP, before masking and clipping) to
    :meth:`TopologyUpdater.observe <lightning_pai.core.dst.TopologyUpdater.observe>` and, on an update step,
    keeps them for the update; the update runs after that optimizer step (``on_train_batch_end``) or at the
    end of the epoch (schedules with ``at_epoch_end``, after validation). A method that grows weights skips an
    update whose step had non-finite gradients (e.g. skipped by a 16-bit ``GradScaler``) and never updates at
    the last step. New masks are computed on every rank and rank zero's are broadcast. Masks, the updater's
    state (update count, ITOP set, momentum buffer, rule memory) and nothing else are in the checkpoint.

    Args:
        sparsity: Final fraction of the targeted weights removed.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        seed: Seed of the initial masks and of random rules.
        beta: Decay of the updater's own momentum buffer (used when the optimizer has no momentum).
        include: Prunable parameters, see :func:`~lightning_pai.core.targets.select_targets`.
        exclude: Parameters left dense.
        verbose: Print the sparsity table at fit start (rank zero).
        nm: N:M structured sparsity (``"2:4"`` or ``{glob: "N:M"}``, see :mod:`lightning_pai.core.nm`); the
            other layers follow ``sparsity``.
    """

    def __init__(
        self,
        sparsity: float | None,
        *,
        distribution: str,
        init: str = "random",
        seed: int = 0,
        beta: float = 0.9,
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = True,
        nm: NMSpec = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        self.nm = nm
        self.sparsity = check_sparsity(nm_sparsity(sparsity, nm))
        get_distribution(distribution)
        get_scorer(init)
        if not is_number(beta) or not 0 <= beta < 1:
            raise ValueError(f"`beta` (the momentum decay) must be in [0, 1); got {beta!r}.")
        self.distribution, self.init, self.seed, self.beta = distribution, init, int(seed), float(beta)
        self._updater: TopologyUpdater | None = None
        self._restored_updater: dict[str, Any] | None = None
        self._pending: tuple[int, dict[str, Tensor] | None] | None = None
        self._total_steps = 0

    # ------------------------------------------------------------- to override
    def plan(self) -> Plan:
        """The method: update schedule, pruning and rewiring stages (see :class:`~lightning_pai.core.dst.Plan`)."""
        raise NotImplementedError

    def _start_sparsity(self) -> float:
        """Sparsity of the initial masks (gradual methods start below their final ``sparsity``)."""
        return self.sparsity

    def _check(self) -> None:
        """Build the plan once so that bad arguments fail in ``__init__``."""
        self.plan().validate()

    # ------------------------------------------------------------------ set-up
    @property
    def updater(self) -> TopologyUpdater:
        """The engine object that owns the method's state (created at fit start)."""
        if self._updater is None:
            raise RuntimeError(f"`{type(self).__name__}` has no updater yet: it is created when `trainer.fit` starts.")
        return self._updater

    @property
    def updates(self) -> int:
        """Number of topology updates applied so far."""
        self._collect_handoff()
        if self._updater is not None:
            return self._updater.updates
        return int((self._restored_updater or {}).get("updates", 0))

    @property
    def itop(self) -> float:
        """Fraction of the targeted weights that have been active at some point (Liu et al. 2021)."""
        return 0.0 if self._updater is None else self._updater.itop

    def initial_masks(self, trainer: Any, pl_module: Any, masks: MaskSet) -> dict[str, Tensor]:
        """Dense at starting sparsity 0, else the ``init`` masks with the ``distribution``'s budgets."""
        start = self._start_sparsity()
        if start == 0:
            return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in masks.params.items()}
        scorer = PruneAtInit(
            self.init, start, distribution=self.distribution, seed=self.seed, verbose=False, nm=self.nm
        )
        return scorer.initial_masks(trainer, pl_module, masks)

    def _dense_gradients(self, trainer: Any) -> bool:
        return self._make_updater(trainer).dense_gradients

    def _make_updater(self, trainer: Any) -> TopologyUpdater:
        if self._updater is None:
            self._updater = TopologyUpdater(self.plan(), seed=self.seed, beta=self.beta)
            if self._restored_updater is not None:
                self._updater.load_state_dict(self._restored_updater)
                self._restored_updater = None
        self._updater.use_optimizer(trainer.optimizers[0] if trainer.optimizers else None)
        return self._updater

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"`{type(self).__name__}` supports one optimizer; `configure_optimizers` returned "
                f"{len(trainer.optimizers)}."
            )
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError(
                f"`{type(self).__name__}` schedules its updates over the whole run: set `max_steps` or `max_epochs` "
                "on the Trainer (training length is unbounded)."
            )
        self._total_steps = int(total)
        self._make_updater(trainer)
        self.plan_check(self._total_steps)
        super().on_fit_start(trainer, pl_module)
        self._updater.bind(dict(self.masks.items()), self.masks.layouts)

    def plan_check(self, total: int) -> None:
        """Raise before training when the plan's windows do not fit a fit of ``total`` optimizer steps."""
        prune = self._updater.plan.prune
        if prune is not None and isinstance(prune.sparsity, Cubic):
            resolve_window(prune.sparsity.start, prune.sparsity.end, total)

    # ---------------------------------------------------------------- stepping
    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        updater, step = self._updater, trainer.global_step + 1
        params = self.masks.params
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        complete = len(grads) == len(params)
        if complete and updater.observes_every_step:  # sharded: on gathered tensors (every step, documented)
            updater.observe(full_dict({n: p.detach() for n, p in params.items()}), full_dict(grads))
        if updater.is_update(step, self._total_steps, is_last_batch_of_epoch(trainer)):
            self._pending = None
            grows = updater.plan.rewire is not None
            grads = full_dict(grads) if complete else grads  # sharded: gathered once per update
            finite = complete and bool(torch.stack([g.isfinite().all() for g in grads.values()]).all())
            if finite or not grows:
                kept = {n: g.detach().clone() for n, g in grads.items()} if updater.needs_grads else None
                self._pending = (step, kept)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # An epoch-end update still pending here was interrupted: a checkpoint saved after the epoch's last
        # step and resumed (Lightning does not replay that epoch's end hooks). Run it before the next step.
        self._run_pending(trainer)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _backward_masking(self) -> bool:
        updater = self._updater
        if updater.reads_every_step:
            return False
        return not (updater.needs_grads and updater.plan.when.at_epoch_end)  # its last step is known late

    def _needs_dense_grads(self, trainer: Any) -> bool:
        updater, step = self._updater, trainer.global_step + 1
        return updater.needs_grads and updater.is_update(step, self._total_steps, False)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._updater.plan.when.at_epoch_end:
            self._run_pending(trainer)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._updater.plan.when.at_epoch_end:
            self._run_pending(trainer)
        self._pending = None

    def _run_pending(self, trainer: Any) -> None:
        if self._pending is None or self._pending[0] != trainer.global_step:
            return
        step, grads = self._pending
        self._pending = None
        if grads is not None:
            grads = {n: g.to(self.masks[n].device) for n, g in grads.items()}
        old = {n: m.clone() for n, m in self.masks.items()}
        params = self.masks.params
        momentum = self._updater.current_momentum(params)
        weights = full_dict({n: p.detach() for n, p in params.items()})  # sharded: gathered (collective)
        momentum = None if momentum is None else full_dict(momentum)
        new = self._updater.compute(step, self._total_steps, weights, old, grads, momentum)
        new = self._from_rank_zero(trainer, new)
        new = {n: m.to(old[n].device) for n, m in new.items()}
        self.masks.update_(new, trainer.optimizers, fill="mean" if self._updater.dense_gradients else "zero")
        update = self._updater.record(old, new)
        rewire = self._updater.plan.rewire
        metrics = {"sparsity/global": 1.0 - self.masks.density, "sparsity/itop": self._updater.itop}
        metrics["dst/dropped"] = float(sum(update.dropped.values()))
        metrics["dst/grown"] = float(sum(update.grown.values()))
        if rewire is not None:
            metrics["dst/fraction"] = rewire.fraction(step, self._total_steps)
        self._log_metrics(trainer, metrics, step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._updater is not None:
            state["updater"] = self._updater.state_dict()
        elif self._restored_updater is not None:
            state["updater"] = self._restored_updater
        if self._pending is not None:  # an update decided at a step and due at its epoch's end
            step, grads = self._pending
            state["pending"] = (step, None if grads is None else {n: g.cpu() for n, g in grads.items()})
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending = state_dict.get("pending")
        if state_dict.get("updater") is None:
            return
        if self._updater is not None:
            self._updater.load_state_dict(state_dict["updater"])
        else:
            self._restored_updater = state_dict["updater"]


class DynamicSparseTraining(TopologyCallback):
    """Drop-and-grow dynamic sparse training at a constant number of weights, from any registered rules.

    The network starts sparse (``init``: random masks with the ``distribution``'s per-layer budgets, or any
    pruning-at-initialization scorer) and, every ``delta_t`` optimizer steps (``update_on="step"``) or at the
    end of every epoch but the last (``update_on="epoch"``), until ``t_end`` (a fraction of the optimizer
    steps), each update drops active weights with the ``drop`` rule (fraction
    ``f_t = m + (alpha - m) / 2 * (1 + cos(pi * t / T_end))`` with ``decay="cosine"``, ``m = min_fraction``,
    or ``alpha``; per-layer counts rounded by ``rounding``), lets the ``redistribution`` rule decide how many
    weights each layer grows back, and grows the inactive weights with the highest ``growth`` scores.
    Rules are registries (:func:`~lightning_pai.core.dst.list_drop_rules`, ``list_growth_rules``,
    ``list_redistributions``): ``drop`` ``"magnitude"`` / ``"set"`` / ``"threshold"``, ``growth``
    ``"random"`` / ``"gradient"`` (``|dense gradient|``) / ``"momentum"``, ``redistribution`` ``"none"``
    (constant per-layer counts) / ``"momentum"`` (SNFS) / ``"survivors"`` (DSR), and any registered one.

    Momentum rules read the optimizer's own momentum (SGD ``momentum_buffer``, Adam ``m / (sqrt(v) + eps)``)
    as the SNFS reference code does; the masked weights' gradients then reach the optimizer (their weights
    are re-masked after every step) and after every update the inactive entries of the optimizer state are
    set to the mean of the active ones (the reference ``reset_momentum``). With an optimizer without
    momentum, the callback keeps ``m <- beta m + grad`` itself, from the dense gradients.

    Grown weights start at exactly zero (with zero optimizer state unless momentum rules keep the
    optimizer's); a weight dropped and regrown in the same update keeps its value, as in RigL. Random growth
    is seeded by ``(seed, step)``, so every DDP rank grows the same weights; masks are broadcast from rank
    zero. Logged per update: ``sparsity/itop`` (weights ever active, Liu et al. 2021), ``dst/dropped``,
    ``dst/grown``, ``dst/fraction``.

    Targets: by default the weights of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (the papers' own
    set-ups differ: RigL's ImageNet runs keep the first layer dense, ``exclude="stem"``; SET's keep the
    output layer dense, ``exclude="head"``).

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks (``"erk"``, ``"er"``, ``"uniform"``, ...).
        init: ``"random"`` or the name of a registered scorer (e.g. ``"snip"``) for the initial masks.
        growth: Growth rule.
        drop: Drop rule.
        alpha: Initial drop fraction.
        decay: ``"cosine"`` or ``"constant"``.
        update_on: ``"step"`` or ``"epoch"``.
        delta_t: Optimizer steps between updates (``update_on="step"``).
        t_end: Fraction of the total optimizer steps after which the topology is frozen.
        min_fraction: Floor ``m`` of the cosine decay.
        rounding: ``"floor"`` (RigL, SET) or ``"ceil"`` (SNFS, GraNet) of the per-layer drop count.
        redistribution: Redistribution rule.
        beta: Decay of the callback's own momentum (optimizers without momentum only).
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: Parameters left dense (``"stem"``, ``"head"``, name globs, module types).
        seed: Seed of the initial masks and of random growth.
        verbose: Print the sparsity table at fit start (rank zero).
        nm: N:M layers (``"2:4"`` or ``{glob: "N:M"}``): initial masks N:M, and every update drops inside
            each group of ``M`` and regrows the same group back to ``N`` (the N:M case of SRigL, Lasby et al.
            2023); needs ``redistribution="none"``.
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
        nm: NMSpec = None,
    ) -> None:
        super().__init__(
            sparsity,
            distribution=distribution,
            init=init,
            seed=seed,
            beta=beta,
            include=include,
            exclude=exclude,
            verbose=verbose,
            nm=nm,
        )
        check_choice(decay, DECAYS, "decay")
        check_choice(update_on, UPDATE_ON, "update_on")
        check_choice(rounding, ROUNDING, "rounding")
        if not is_number(alpha) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` (the drop fraction) must be in (0, 1); got {alpha!r}.")
        if not is_number(min_fraction) or not 0 <= min_fraction <= alpha:
            raise ValueError(f"`min_fraction` must be in [0, `alpha`={alpha}]; got {min_fraction!r}.")
        if not is_number(delta_t, integer=True) or delta_t < 1:
            raise ValueError(f"`delta_t` must be a positive integer (optimizer steps); got {delta_t!r}.")
        if not is_number(t_end) or not 0 < t_end <= 1:
            raise ValueError(f"`t_end` is a fraction of the training steps in (0, 1]; got {t_end!r}.")
        self.growth, self.drop, self.redistribution = growth, drop, redistribution
        self.alpha, self.decay, self.update_on = float(alpha), decay, update_on
        self.delta_t, self.t_end = delta_t, float(t_end)
        self.min_fraction, self.rounding = float(min_fraction), rounding
        self._check()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, growth=self.growth, drop=self.drop)

    def plan(self) -> Plan:
        """Every ``delta_t`` steps (or epoch end) until ``t_end``: ``drop``, ``redistribution``, ``growth``."""
        if self.update_on == "epoch":
            when = EpochEnds(end=self.t_end)
        else:
            when = Every(self.delta_t, end=self.t_end)
        fraction = (
            Constant(self.alpha) if self.decay == "constant" else Cosine(self.alpha, self.min_fraction, self.t_end)
        )
        rewire = Rewire(fraction, self.drop, self.growth, self.redistribution)
        return Plan(when=when, rewire=rewire, options={"rounding": self.rounding, "nm": self.nm})


_BASE_PARAMS = frozenset(inspect.signature(DynamicSparseTraining.__init__).parameters) - {"self", "sparsity"}


def _base_kwargs(local: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """:class:`DynamicSparseTraining` keyword arguments: a subclass's same-named ``locals()`` plus ``fixed``."""
    return {**{k: v for k, v in local.items() if k in _BASE_PARAMS}, **fixed}


class RigL(DynamicSparseTraining):
    """RigL (Evci et al. 2020, arXiv:1911.11134): drop by magnitude, grow by the dense gradient.

    Every ``delta_t`` optimizer steps until ``t_end`` of training, each layer drops the
    ``floor(f_t * active)`` smallest-magnitude active weights, ``f_t = alpha / 2 * (1 + cos(pi * t / T_end))``,
    and grows as many inactive weights with the largest ``|dense gradient|`` of that step. Defaults from
    the paper: ERK initial masks, ``alpha=0.3``, ``delta_t=100``, ``t_end=0.75``. The paper's ImageNet
    set-up keeps the first layer dense: ``RigL(..., exclude="stem")``.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer (e.g. ``"snip"``) for the initial masks.
        alpha: Initial drop fraction.
        delta_t: Optimizer steps between updates.
        t_end: Fraction of training after which the topology is frozen.
        include, exclude, seed, verbose, nm: As for :class:`DynamicSparseTraining` (``nm="2:4"``: N:M RigL).
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
        nm: NMSpec = None,
    ) -> None:
        super().__init__(sparsity, **_base_kwargs(locals(), growth="gradient"))


class SET(DynamicSparseTraining):
    """SET (Mocanu et al. 2018, Nature Communications 9:2383): sign-wise magnitude drop, random growth.

    At the end of every epoch but the last (or every ``delta_t`` steps with ``update_on="step"``), each
    layer removes the fraction ``zeta`` of its positive active weights closest to zero and, separately,
    ``zeta`` of its negative ones, and grows as many inactive weights uniformly at random. Defaults from
    the paper: Erdős–Rényi initial masks, ``zeta=0.3``, per-epoch updates. The paper's MLPs keep the output
    layer dense: ``SET(..., exclude="head")``.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks (``"er"``: Erdős–Rényi).
        init: ``"random"`` or a registered scorer for the initial masks.
        zeta: Fraction of each sign's active weights replaced per update.
        update_on: ``"epoch"`` or ``"step"``.
        delta_t: Optimizer steps between updates with ``update_on="step"``.
        include, exclude, seed, verbose, nm: As for :class:`DynamicSparseTraining` (``nm="2:4"``: N:M SET).
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
        nm: NMSpec = None,
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
    most its sparsity). Within a layer the inactive weights with the largest ``|momentum|`` grow.

    The momentum is the optimizer's own, as in the official code: SGD's ``momentum_buffer``, Adam's
    ``exp_avg / (sqrt(exp_avg_sq) + eps)``. To let it build up on inactive weights, their gradients reach
    the optimizer and their weights are re-zeroed after every step (the official code's ``apply_mask``);
    after every update the inactive entries of the optimizer state are set to the mean of the active ones
    (its ``reset_momentum``), and grown weights keep their momentum. With an optimizer without momentum the
    callback keeps ``m <- beta m + grad`` from the dense gradients itself. The total kept count is exactly
    constant (the official code only approximately restores it). Initial masks are uniform per layer by
    default, as in the official code.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        prune_rate: Initial prune rate ``p``.
        min_rate: Final prune rate ``m`` of the cosine decay.
        update_on: ``"epoch"`` or ``"step"``.
        delta_t: Optimizer steps between updates with ``update_on="step"``.
        beta: Decay of the callback's own momentum (optimizers without momentum only).
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


class GraNet(DynamicSparseTraining):
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
        self.initial_sparsity = check_gradual(sparsity, initial_sparsity, start, end)
        check_choice(prune_distribution, PRUNE_DISTRIBUTIONS, "prune_distribution")
        self.start, self.end, self.prune_distribution = start, end, prune_distribution
        super().__init__(
            sparsity,
            **_base_kwargs(
                locals(), alpha=death_rate, min_fraction=min_rate, growth="gradient", rounding="ceil", t_end=1.0
            ),
        )

    def _start_sparsity(self) -> float:
        return self.initial_sparsity

    def target_sparsity(self, step: int) -> float:
        """``s_t`` of the cubic schedule at optimizer step ``step`` (of this fit)."""
        return self.plan().prune.sparsity(step, self._total_steps)

    def plan(self) -> Plan:
        """Every ``delta_t`` steps from ``start`` (and at ``end``): cubic global pruning, then regeneration."""
        rigl = super().plan()
        sparsity = Cubic(self.initial_sparsity, self.sparsity, self.start, self.end)
        when = Every(self.delta_t, self.start, 1.0, also=(self.end,))
        return Plan(
            when=when,
            prune=Pruning(sparsity, "magnitude", self.prune_distribution),
            rewire=rigl.rewire,
            options=rigl.options,
        )


def check_gradual(sparsity: float, initial_sparsity: float, start: int | float, end: int | float) -> float:
    """Validate a gradual schedule from ``initial_sparsity`` to ``sparsity`` over ``[start, end]``; return ``s_i``.

    Raises:
        ValueError: On a sparsity outside ``[0, 1)``, ``initial_sparsity > sparsity`` or bad window points.
    """
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > check_sparsity(sparsity):
        raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity}).")
    check_point(start, "start")
    check_point(end, "end")
    return initial


class DSR(DynamicSparseTraining):
    """Dynamic sparse reparameterization (Mostafa & Wang 2019, arXiv:1902.05967).

    Every ``delta_t`` optimizer steps, every active weight with ``|w| < H`` is dropped (one threshold for all
    layers); ``H`` (from ``threshold``) doubles when fewer than ``(1 - tolerance) K`` were dropped and halves
    when more than ``(1 + tolerance) K``, ``K = prune_fraction * active``. The ``D`` dropped weights regrow at
    random, zero-initialised, layer ``l`` getting ``D R_l / sum_k R_k`` of them (``R_l``: its survivors;
    capped by its free slots). Defaults from the reference code: ``H = 1e-3``, tolerance 0.1, uniform initial
    density; ``prune_fraction=0.1`` of the active weights corresponds to its 1 % of all parameters at 90 %
    sparsity. The paper's period doubling every 40 epochs is not applied (``delta_t`` is constant).

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        prune_fraction: Target fraction ``K / active`` the threshold adapts to.
        threshold: Initial threshold ``H``.
        tolerance: Relative band around ``K`` in which ``H`` is left unchanged.
        delta_t: Optimizer steps between updates.
        include, exclude, seed, verbose: As for :class:`DynamicSparseTraining`.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "uniform",
        init: str = "random",
        prune_fraction: float = 0.1,
        threshold: float = 1e-3,
        tolerance: float = 0.1,
        delta_t: int = 100,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        self.threshold = check_range(threshold, "threshold", 0.0, float("inf"), "the initial threshold H", True)
        self.tolerance = check_range(tolerance, "tolerance", 0.0, 1.0)
        kwargs = _base_kwargs(locals(), alpha=prune_fraction, decay="constant", t_end=1.0, growth="random")
        super().__init__(sparsity, **kwargs, drop="threshold", redistribution="survivors")

    def plan(self) -> Plan:
        """Every ``delta_t`` steps: threshold drop, regrowth in proportion to each layer's survivors."""
        return replace(super().plan(), options={"threshold": self.threshold, "tolerance": self.tolerance})
