"""Importance scorers: one score per prunable weight; higher means more important (kept first).

Every scorer has the same signature::

    fn(ctx: ScoringContext) -> dict[str, Tensor]

returning, for each name in ``ctx.params``, a float tensor shaped like the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.registry import Registry


@dataclass
class ScoringContext:
    """Everything a scorer may use.

    Attributes:
        params: Prunable parameters by fully qualified name.
        module: The model that owns ``params`` (data-driven scorers run it).
        masks: Current keep-masks by name, or None when nothing is pruned yet.
        seed: Seed for stochastic scorers.
        extras: Scorer-specific inputs (batches, loss function, ...), set by the caller.

    """

    params: Mapping[str, nn.Parameter]
    module: nn.Module | None = None
    masks: Mapping[str, Tensor] | None = None
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[ScoringContext], dict[str, Tensor]]

_SCORERS: Registry[Scorer] = Registry("scorer", "method", "lightning_pai.register_scorer")


def register_scorer(name: str, fn: Scorer | None = None, *, overwrite: bool = False):
    """Register a scorer ``fn(ctx) -> scores`` under ``name`` (decorator if ``fn`` is None)."""
    return _SCORERS.register(name, fn, overwrite=overwrite)


def get_scorer(name: str | Scorer) -> Scorer:
    """Return the scorer registered as ``name`` (a callable passes through).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.

    """
    return _SCORERS.get(name)


def list_scorers() -> list[str]:
    """Names of the registered scorers."""
    return _SCORERS.list()


@register_scorer("magnitude")
@torch.no_grad()
def magnitude(ctx: ScoringContext) -> dict[str, Tensor]:
    """Magnitude pruning (Han et al. 2015, arXiv:1506.02626): score ``|w|``."""
    return {n: p.detach().abs().float() for n, p in ctx.params.items()}


@register_scorer("random")
@torch.no_grad()
def random(ctx: ScoringContext) -> dict[str, Tensor]:
    """Random pruning: i.i.d. ``U(0, 1)`` scores from a CPU generator seeded with ``ctx.seed``.

    Drawn on the CPU in parameter order, so the same seed gives the same masks on any device or rank.
    """
    gen = torch.Generator().manual_seed(ctx.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in ctx.params.items()}
