"""Prune once at the start of fit and keep the masks for the rest of training."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.core.distributions import Distribution, get_distribution
from lightning_pai.core.masks import check_sparsity, compute_masks
from lightning_pai.core.scorers import Scorer, ScoringContext, get_scorer
from lightning_pai.core.targets import Selectors


class PruneAtInit(SparseCallback):
    """Pruning at initialization: score every prunable weight once at fit start, keep the top ones.

    The kept count is exactly ``round((1 - sparsity) * N)`` over the ``N`` targeted weights, split
    across layers by ``distribution``; within a layer the highest scores are kept (ties broken by
    position). The masks are decided on rank zero and broadcast, enforced on every step (weights,
    gradients and optimizer state of pruned weights stay exactly zero), and saved in checkpoints: a
    resumed fit, or a second ``fit`` with the same callback, reuses them instead of pruning again.

    Args:
        method: Scorer name (see :func:`~lightning_pai.core.scorers.list_scorers`; ``"magnitude"``:
            ``|w|``, ``"random"``: seeded uniform) or a callable ``fn(ScoringContext) -> scores``.
        sparsity: Fraction of the targeted weights removed, in ``[0, 1)``.
        distribution: How the kept count is split across layers: ``"global"`` (one threshold over
            all layers), ``"uniform"``, ``"erk"``, ``"er"``, ``"lamp"`` or a registered/callable one.
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``);
            glob patterns over parameter names or module types.
        exclude: Parameters left dense; same forms as ``include``.
        seed: Seed for stochastic scorers.
        verbose: Print the per-layer table at fit start (rank zero).

    Example::

        trainer = Trainer(callbacks=[PruneAtInit("magnitude", sparsity=0.9, distribution="erk")])

    """

    def __init__(
        self,
        method: str | Scorer = "magnitude",
        sparsity: float = 0.9,
        *,
        distribution: str | Distribution = "global",
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        get_scorer(method)
        get_distribution(distribution)
        self.method = method
        self.sparsity = check_sparsity(sparsity)
        self.distribution = distribution
        self.seed = int(seed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=_name(self.method), sparsity=self.sparsity, distribution=_name(self.distribution)
        )

    def initial_masks(self, trainer: Any, pl_module: Any, params: dict[str, Any]) -> dict[str, Tensor]:
        """Score the targets with ``method`` and keep the top ``1 - sparsity`` by ``distribution``."""
        ctx = ScoringContext(params=params, module=pl_module, seed=self.seed)
        scores = get_scorer(self.method)(ctx)
        return compute_masks(scores, self.sparsity, self.distribution)


def _name(x: object) -> str:
    return x if isinstance(x, str) else getattr(x, "__name__", type(x).__name__)
