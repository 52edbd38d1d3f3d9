"""DSR: dynamic sparse reparameterization (Mostafa & Wang 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs, check_rates
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.dst import Plan
from lightning_pai.core.schedules import Periods
from lightning_pai.core.validation import check_number


class DSR(DynamicSparseTraining):
    """Dynamic sparse reparameterization (Mostafa & Wang 2019, arXiv:1902.05967).

    Every ``delta_t`` optimizer steps, every active weight with ``|w| < H`` is dropped (one threshold for all
    layers); ``H`` (from ``threshold``) doubles when fewer than ``(1 - tolerance) K`` were dropped and halves
    when more than ``(1 + tolerance) K``, ``K = prune_fraction * active``. The ``D`` dropped weights regrow at
    random, zero-initialised, layer ``l`` getting ``D R_l / sum_k R_k`` of them (``R_l``: its survivors;
    capped by its free slots, and never onto a weight dropped in the same update); a layer whose every active
    weight is below ``H`` keeps one (its first active weight, as the reference). Defaults from the reference
    code (TimDettmers/sparse_learning ``imagenet/baseline``): ``H = 1e-3``, tolerance 0.1, uniform initial
    density; ``prune_fraction=0.1`` of the active weights corresponds to its 1 % of all parameters at 90 %
    sparsity. The reference's reallocation schedule is ``periods``: a period growing 100 -> 200 -> 400 -> 800
    steps at epochs 0 / 25 / 80 / 140 for its WRN, ``periods={0: 100, 25 * E: 200, 80 * E: 400, 140 * E: 800}``
    with ``E`` optimizer steps per epoch, rewiring stopped at ``stop`` (its ``--stop-rewire-epoch``, 190 of 200
    epochs in the paper's runs: ``stop=0.95``). Without ``periods``, every ``delta_t`` steps to the end.

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        prune_fraction: Target fraction ``K / active`` the threshold adapts to.
        threshold: Initial threshold ``H``.
        tolerance: Relative band around ``K`` in which ``H`` is left unchanged.
        delta_t: Optimizer steps between updates (without ``periods``).
        periods: ``{from_step: period}``: the reallocation period from each step on (the reference's schedule);
            step ``t`` is an update when ``t`` is a multiple of the period in force.
        stop: Fraction of training after which the topology is fixed (the reference's ``--stop-rewire-epoch``
            divided by the epochs).
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("dynamic", example={"delta_t": 2}, keeps_total=True)

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
        periods: Mapping[int, int] | None = None,
        stop: float = 1.0,
        weight_init: str | None = None,
        **common: Unpack[MethodOptions],
    ) -> None:
        check_rates(prune_fraction, "prune_fraction")
        self.threshold = check_number(threshold, "threshold", 0, math.inf, low_open=True, what="the initial H")
        self.tolerance = check_number(tolerance, "tolerance", 0, 1, high_open=True, what="the band around K")
        options = {"threshold": self.threshold, "tolerance": self.tolerance}
        self.periods = None if periods is None else Periods(tuple(dict(periods).items()), end=stop)
        kwargs = base_kwargs(locals(), alpha=prune_fraction, decay="constant", t_end=stop, growth="random")
        super().__init__(sparsity, **kwargs, drop="threshold", redistribution="survivors", **common)

    def plan(self) -> Plan:
        """The base plan, updated on the reference's growing periods when ``periods`` is given."""
        plan = super().plan()
        return plan if self.periods is None else replace(plan, when=self.periods)
