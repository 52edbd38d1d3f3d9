"""Dynamic sparse training: callbacks that rewire the topology during training at constant sparsity."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.callbacks.prune_at_init import PruneAtInit
from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.dst import cosine_fraction, diff, drop_counts, drop_magnitude, drop_set, grow, random_scores
from lightning_pai.core.masks import check_sparsity
from lightning_pai.core.pruning import check_choice
from lightning_pai.core.scorers import get_scorer
from lightning_pai.core.targets import Selectors

GROWTH = ("random", "gradient")
DROPS = ("magnitude", "set")
DECAYS = ("cosine", "constant")
UPDATE_ON = ("step", "epoch")


class DynamicSparseTraining(SparseCallback):
    """Drop-and-grow dynamic sparse training at a constant number of weights (SET and RigL build on it).

    The network starts sparse (``init``: random masks with the ``distribution``'s per-layer budgets, or
    any pruning-at-initialization scorer) and, every ``delta_t`` optimizer steps (``update_on="step"``) or
    at the end of every epoch (``update_on="epoch"``), each layer drops ``floor(f_t * active)`` active
    weights (``drop``: smallest magnitude, or SET's sign-wise rule) and grows as many inactive ones
    (``growth``: ``"random"`` or ``"gradient"`` = largest ``|dense gradient|`` of the update step), with
    ``f_t = alpha / 2 * (1 + cos(pi * t / T_end))`` (``decay="cosine"``) or ``alpha``. Nothing changes
    after ``t_end`` (a fraction of the total optimizer steps). Each layer's kept count, and so the
    overall sparsity, stays exactly constant.

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
        growth: ``"random"`` or ``"gradient"``.
        drop: ``"magnitude"`` or ``"set"`` (Mocanu et al. 2018's sign-wise rule).
        alpha: Initial drop fraction.
        decay: ``"cosine"`` or ``"constant"``.
        update_on: ``"step"`` or ``"epoch"``.
        delta_t: Optimizer steps between updates (``update_on="step"``).
        t_end: Fraction of the total optimizer steps after which the topology is frozen.
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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` (the drop fraction) must be in (0, 1); got {alpha!r}.")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"`delta_t` must be a positive integer (optimizer steps); got {delta_t!r}.")
        if isinstance(t_end, bool) or not isinstance(t_end, (int, float)) or not 0 < t_end <= 1:
            raise ValueError(f"`t_end` is a fraction of the training steps in (0, 1]; got {t_end!r}.")
        self.distribution, self.init, self.growth, self.drop = distribution, init, growth, drop
        self.alpha, self.decay, self.update_on = float(alpha), decay, update_on
        self.delta_t, self.t_end, self.seed = delta_t, float(t_end), int(seed)
        self._initializer = PruneAtInit(init, self.sparsity, distribution=distribution, seed=self.seed, verbose=False)
        self._scores: dict[str, Tensor] | None = None  # growth scores captured for the coming update
        self._scores_step = -1
        self._fired: dict[str, Tensor] | None = None
        self.updates = 0
        self._t_end_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, growth=self.growth, drop=self.drop)

    def initial_masks(self, trainer: Any, pl_module: Any, params: dict[str, Any]) -> dict[str, Tensor]:
        """The ``init`` masks at ``sparsity`` with the ``distribution``'s budgets."""
        return self._initializer.initial_masks(trainer, pl_module, params)

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
        self._t_end_steps = int(self.t_end * trainer.estimated_stepping_batches)

    # ---------------------------------------------------------------- timing
    def _is_update_step(self, trainer: Any, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (1-based) ends with a topology update."""
        if self.update_on == "epoch" or step > self._t_end_steps:
            return False
        return step % self.delta_t == 0

    def _fraction(self, step: int) -> float:
        if self.decay == "constant":
            return self.alpha
        return cosine_fraction(self.alpha, step, self._t_end_steps)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step + 1
        last_of_epoch = self.update_on == "epoch" and _is_last_step_of_epoch(trainer)
        if self._is_update_step(trainer, step) or last_of_epoch:
            grads = [p.grad for p in self.masks.params.values()]
            finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            self._scores = None
            if finite:
                if self.growth == "gradient":
                    self._scores = {n: g.detach().abs() for n, g in zip(self.masks.names, grads)}
                else:
                    self._scores = {}  # random scores are drawn at update time
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
    def _update(self, trainer: Any, pl_module: Any, step: int) -> None:
        fraction = self._fraction(step)
        old = {n: m.clone() for n, m in self.masks.items()}
        weights = self.masks.params
        if self.drop == "set":
            after_drop = drop_set(weights, old, fraction)
        else:
            after_drop = drop_magnitude(weights, old, drop_counts(old, fraction))
        counts = {n: int(old[n].sum()) - int(after_drop[n].sum()) for n in old}
        scores = self._scores if self.growth == "gradient" else random_scores(old, self.seed * 1_000_003 + step)
        new = grow(scores, after_drop, counts)
        new = self._from_rank_zero(trainer, new)
        update = diff(old, {n: m.to(old[n].device) for n, m in new.items()})
        self.masks.update_(update.masks, trainer.optimizers)
        for n, m in self.masks.items():
            self._fired[n] |= m
        self._scores = None
        self.updates += 1
        metrics = {
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
        state.update(updates=self.updates, fired=fired)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updates = int(state_dict.get("updates", 0))
        fired = state_dict.get("fired")
        if fired is not None:
            self._fired = {n: f.clone() for n, f in fired.items()}


def _is_last_step_of_epoch(trainer: Any) -> bool:
    """Whether the optimizer step about to happen is the epoch's last."""
    loop = trainer.fit_loop.epoch_loop
    return loop._num_ready_batches_reached() if hasattr(loop, "_num_ready_batches_reached") else False


class RigL(DynamicSparseTraining):
    """RigL (Evci et al. 2020, arXiv:1911.11134): drop by magnitude, grow by the dense gradient.

    Defaults from the paper: ERK initial masks, ``alpha=0.3`` with cosine decay
    ``f_t = alpha / 2 * (1 + cos(pi * t / T_end))``, ``delta_t=100`` steps, ``t_end=0.75`` of training.
    See :class:`DynamicSparseTraining` for the arguments.
    """

    def __init__(self, sparsity: float = 0.9, **kwargs: Any) -> None:
        kwargs.setdefault("growth", "gradient")
        super().__init__(sparsity, **kwargs)


class SET(DynamicSparseTraining):
    """SET (Mocanu et al. 2018, Nature Communications 9:2383): sign-wise magnitude drop, random growth.

    Defaults from the paper: Erdős–Rényi initial masks (``distribution="er"``), a constant drop fraction
    ``zeta=0.3`` (``alpha``), one update at the end of every epoch but the last. See
    :class:`DynamicSparseTraining` for the arguments.
    """

    def __init__(self, sparsity: float = 0.9, **kwargs: Any) -> None:
        for key, value in (("distribution", "er"), ("growth", "random"), ("drop", "set")):
            kwargs.setdefault(key, value)
        kwargs.setdefault("decay", "constant")
        kwargs.setdefault("update_on", "epoch")
        kwargs.setdefault("t_end", 1.0)
        super().__init__(sparsity, **kwargs)
