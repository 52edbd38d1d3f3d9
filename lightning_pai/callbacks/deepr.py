"""Deep Rewiring: sign-constrained connections that die when their parameter crosses zero (Bellec et al. 2018)."""

from __future__ import annotations

import math

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.callbacks.topology import TopologyCallback
from lightning_pai.core.dst import Plan, Rewire
from lightning_pai.core.schedules import Constant, Every
from lightning_pai.core.validation import check_number


class DeepR(TopologyCallback):
    """DEEP R (Bellec et al. ICLR 2018, arXiv:1711.05136; official code guillaumeBellec/deep_rewiring).

    Every connection ``k`` has a fixed sign ``s_k`` and a parameter ``theta_k``; it is active while
    ``theta_k > 0`` and then its weight is ``w_k = s_k theta_k`` (dormant: ``w_k = 0``). After every optimizer
    step (the gradient step on the active weights) the active parameters move by
    ``theta <- theta - eta * l1 + eta * noise * nu``, ``nu ~ N(0, 1)`` (the paper's L1 prior and random walk
    ``sqrt(2 eta T) nu`` with temperature ``T = eta noise^2 / 2``, the official code's ``gdnoise``); every
    connection whose ``theta`` reached ``<= 0`` (its weight changed sign or fell to zero) becomes dormant; and
    as many dormant connections of the same layer, drawn uniformly at random (seeded by step: the same on every
    rank), become active at ``theta = 0``, so each layer keeps exactly its number of connections. The signs are
    drawn once: an active connection's is its initial weight's, a dormant one's a seeded random +-1; they
    are saved with the masks. Defaults are the official MNIST script's (``l1 = noise = 1e-5``, plain SGD);
    initial masks are random with ``distribution``'s budgets (the script's per-layer densities are 1 %, 3 %,
    30 % for LeNet-300-100, i.e. ``distribution="erk"``-like).

    Args:
        sparsity: Fraction of the targeted weights dormant, constant during training.
        distribution: Per-layer budgets of the initial random masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        l1: ``alpha``, the L1 shrinkage of the active parameters per unit learning rate.
        noise: ``sigma``, the random walk's standard deviation per unit learning rate.
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("dynamic", keeps_layer_counts=True, keeps_total=True)

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "erk",
        init: str = "random",
        l1: float = 1e-5,
        noise: float = 1e-5,
        weight_init: str | None = None,
        **common: Unpack[MethodOptions],
    ) -> None:
        super().__init__(sparsity, distribution=distribution, init=init, **common)
        self.l1 = check_number(l1, "l1", 0, math.inf, what="the L1 shrinkage per unit learning rate")
        self.noise = check_number(noise, "noise", 0, math.inf, what="the random walk's std per unit learning rate")
        self._check()

    def plan(self) -> Plan:
        """After every step: the L1 and noise move, drop where ``theta <= 0``, random regrowth in the same layer."""
        rewire = Rewire(Constant(0.0), drop="sign_flip", growth="random", redistribution="none")
        options = {"l1": self.l1, "noise": self.noise}
        return Plan(when=Every(1, end=1.0), rewire=rewire, options=options, step_rule="deepr")
