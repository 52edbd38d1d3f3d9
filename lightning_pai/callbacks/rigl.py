"""RigL: drop by magnitude, grow by the dense gradient (Evci et al. 2020)."""

from __future__ import annotations

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.nm import NMSpec


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
        nm: N:M layers, as for :class:`DynamicSparseTraining` (``nm="2:4"``: N:M RigL).
        nm_incompatible: Layers the ``nm`` groups cannot fit: ``"error"`` (default), ``"dense"`` or
            ``"unstructured"``, as for :class:`DynamicSparseTraining`.
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        backend: ``"masked"`` (default) or ``"sparse"``: the ``nn.Linear`` targets train as CSR matrices, only
            their kept values stored, stepped and all-reduced; the dense gradient is computed on update steps only
            (Liu, Mocanu et al. 2020; see :mod:`lightning_pai.core.sparse_train`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("dynamic", example={"delta_t": 2, "t_end": 1.0}, keeps_layer_counts=True, keeps_total=True)

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "erk",
        init: str = "random",
        alpha: float = 0.3,
        delta_t: int = 100,
        t_end: float = 0.75,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        weight_init: str | None = None,
        backend: str = "masked",
        **common: Unpack[MethodOptions],
    ) -> None:
        super().__init__(sparsity, **base_kwargs(locals(), growth="gradient"), **common)
