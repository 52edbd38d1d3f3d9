"""GraNet: gradual magnitude pruning with zero-cost neuroregeneration (Liu et al. 2021)."""

from __future__ import annotations

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs, check_rates
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.distributions import check_iterative
from lightning_pai.core.dst import Plan, Pruning
from lightning_pai.core.schedules import Cubic, Every
from lightning_pai.core.validation import check_gradual


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
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("gradual", example={"initial_sparsity": 0.5, "delta_t": 2, "end": 0.5})

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
        weight_init: str | None = None,
        **common: Unpack[MethodOptions],
    ) -> None:
        check_rates(death_rate, "death_rate", min_rate, "min_rate")
        self.initial_sparsity = check_gradual(sparsity, initial_sparsity, start, end)
        check_iterative(prune_distribution, "prune_distribution")
        self.start, self.end, self.prune_distribution = start, end, prune_distribution
        super().__init__(
            sparsity,
            **base_kwargs(
                locals(), alpha=death_rate, min_fraction=min_rate, growth="gradient", rounding="ceil", t_end=1.0
            ),
            **common,
        )

    @property
    def initial_sparsity_of_masks(self) -> float:
        """GraNet starts at ``initial_sparsity``."""
        return self.initial_sparsity

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
