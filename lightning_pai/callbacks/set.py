"""SET: sign-wise magnitude drop, random growth (Mocanu et al. 2018)."""

from __future__ import annotations

from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs, check_rates
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.nm import NMSpec


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
        nm: N:M layers, as for :class:`DynamicSparseTraining` (``nm="2:4"``: N:M SET).
        nm_incompatible: Layers the ``nm`` groups cannot fit: ``"error"`` (default), ``"dense"`` or
            ``"unstructured"``, as for :class:`DynamicSparseTraining`.
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`).
        backend: ``"masked"`` (default) or ``"sparse"``: the ``nn.Linear`` targets train as CSR matrices, only
            their kept values stored, stepped and all-reduced; random growth needs no dense gradient (Liu, Mocanu
            et al. 2020, the truly sparse SET; see :mod:`lightning_pai.core.sparse_train`).
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose`` (see
            :class:`~lightning_pai.MethodOptions`).
    """

    card = MethodCard("dynamic", keeps_layer_counts=True, keeps_total=True)

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "er",
        init: str = "random",
        zeta: float = 0.3,
        update_on: str = "epoch",
        delta_t: int = 100,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        weight_init: str | None = None,
        backend: str = "masked",
        **common: Unpack[MethodOptions],
    ) -> None:
        check_rates(zeta, "zeta")
        fixed = {"alpha": zeta, "growth": "random", "drop": "set", "decay": "constant", "t_end": 1.0}
        super().__init__(sparsity, **base_kwargs(locals(), **fixed), **common)
