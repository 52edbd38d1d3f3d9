"""Sparse momentum / SNFS: momentum growth and redistribution (Dettmers & Zettlemoyer 2019)."""

from __future__ import annotations

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs, check_rates
from lightning_pai.callbacks.registry import MethodCard


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
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("dynamic", keeps_total=True)

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
        weight_init: str | None = None,
        **common: Unpack[MethodOptions],
    ) -> None:
        check_rates(prune_rate, "prune_rate", min_rate, "min_rate")
        super().__init__(
            sparsity,
            **base_kwargs(
                locals(),
                alpha=prune_rate,
                min_fraction=min_rate,
                growth="momentum",
                redistribution="momentum",
                rounding="ceil",
                t_end=1.0,
            ),
            **common,
        )
