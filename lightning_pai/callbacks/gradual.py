"""Gradual magnitude pruning during training (Zhu & Gupta 2017)."""

from __future__ import annotations

from typing_extensions import Unpack

from lightning_pai.callbacks.base import TargetOptions
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.callbacks.topology import TopologyCallback
from lightning_pai.core.distributions import check_iterative
from lightning_pai.core.dst import Plan, Pruning
from lightning_pai.core.nm import NMSpec
from lightning_pai.core.schedules import Cubic, Every
from lightning_pai.core.validation import check_gradual, check_positive_int


class GradualMagnitudePruning(TopologyCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv:1710.01878), no regrowth.

    From optimizer step ``start`` to ``end``, every ``frequency`` steps (and at ``end``), the sparsity
    is raised to ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3`` by removing the
    smallest-magnitude remaining weights (``distribution="uniform"``: each layer reaches ``s_t``, as in
    the paper's TensorFlow implementation; ``"global"`` or ``"lamp"``: one ranking across layers). Masks
    only shrink; pruned weights and their optimizer state are zeroed and stay zero. ``start`` and
    ``end`` are optimizer-step indices (``int``) or fractions of the total steps (``float``).

    Args:
        sparsity: Final sparsity ``s_f``.
        initial_sparsity: ``s_i``; when above 0, the weights are pruned by magnitude to it at fit start.
        start: First pruning step (int) or fraction of training (float).
        end: Step (int) or fraction (float) at which ``sparsity`` is reached.
        frequency: Optimizer steps between pruning updates.
        distribution: ``"uniform"``, ``"global"`` or ``"lamp"``.
        nm: N:M layers (``"2:4"`` or ``{glob: "N:M"}``): each group of ``M`` keeps
            ``M - floor((M - N) * p_t)`` weights, ``p_t`` the schedule's progress from 0 to 1 (so ``N`` at
            ``end``); the other layers follow ``s_t``.
        nm_incompatible: Layers the ``nm`` groups cannot fit (input channels not a multiple of ``M``):
            ``"error"`` (default) refuses before training, ``"dense"`` leaves them dense, ``"unstructured"`` prunes
            them unstructured on the same budgets; they are named in a warning and in the report.
        **common: ``include``, ``exclude``, ``frozen``, ``verbose`` (default False; see
            :class:`~lightning_pai.TargetOptions`).
    """

    score = "magnitude"
    card = MethodCard("gradual", example={"start": 0, "end": 0.5, "frequency": 2})

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        initial_sparsity: float = 0.0,
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        distribution: str = "uniform",
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        **common: Unpack[TargetOptions],
    ) -> None:
        common.setdefault("verbose", False)  # gradual pruning prints nothing by default
        nm_options = {"nm": nm, "nm_incompatible": nm_incompatible}
        super().__init__(sparsity, distribution=distribution, init="magnitude", **nm_options, **common)
        self.initial_sparsity = check_gradual(self.sparsity, initial_sparsity, start, end)
        if nm is not None and self.initial_sparsity > 0:
            raise ValueError("With `nm`, gradual pruning starts dense: leave `initial_sparsity` at 0.")
        self.frequency = check_positive_int(frequency, "frequency", "optimizer steps between pruning updates")
        check_iterative(distribution)
        self.start, self.end = start, end
        self._check()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, initial_sparsity=self.initial_sparsity)

    @property
    def initial_sparsity_of_masks(self) -> float:
        """Gradual pruning starts at ``initial_sparsity``."""
        return self.initial_sparsity

    def plan(self) -> Plan:
        """Every ``frequency`` steps from ``start`` and at ``end``: keep the top ``score`` to the cubic target."""
        sparsity = Cubic(self.initial_sparsity, self.sparsity, self.start, self.end)
        when = Every(self.frequency, self.start, self.end, also=(self.end,))
        return Plan(when=when, prune=Pruning(sparsity, self.score, self.distribution), options={"nm": self.nm})
