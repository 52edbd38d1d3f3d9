"""Importance scorers: one score per prunable weight; higher means more important (kept first).

Every scorer has the same signature::

    fn(ctx: ScoringContext) -> dict[str, Tensor]

returning, for each name in ``ctx.params``, a float tensor shaped like the parameter. Each registered
scorer carries metadata (:func:`scorer_info`) that callers read instead of special-casing names:

- ``needs``: ``"nothing"`` (weights only), ``"shape"`` (one input's shape, e.g. SynFlow's all-ones
  input) or ``"data"`` (batches and a loss);
- ``iterations``: default number of scoring rounds (SynFlow: 100);
- ``signed``: whether scores may be negative (GraSP), which rules out distributions that rank magnitudes
  (LAMP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_pai.core.registry import Registry


def default_forward(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(module(x), y)`` for a batch ``(x, y, ...)`` (tuple/list) or ``{"x": ..., "y": ...}`` (dict)."""
    if isinstance(batch, Mapping):
        return module(batch["x"]), batch["y"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return module(batch[0]), batch[1]
    raise TypeError(
        "Cannot split the batch into inputs and targets: expected `(x, y, ...)` or `{'x': ..., 'y': ...}`, got "
        f"{type(batch).__name__}. Pass `forward_fn(module, batch) -> (logits, targets)`."
    )


def batch_inputs(batch: Any) -> Tensor:
    """The input tensor of a batch ``x``, ``(x, y, ...)`` or ``{"x": ...}``."""
    if isinstance(batch, Mapping):
        return batch["x"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


@dataclass
class ScoringContext:
    """Everything a scorer may use.

    Attributes:
        params: Prunable parameters by fully qualified name.
        module: The model that owns ``params`` (data-driven scorers run it).
        masks: Current keep-masks by name, or None when nothing is pruned yet. The pruning driver zeroes
            the masked weights before scoring, so they are masked in the scoring forward pass.
        seed: Seed for stochastic scorers.
        batches: Batches for data-driven scorers (already on the module's device).
        loss_fn: ``loss_fn(module, batch) -> scalar loss`` (SNIP). Default: cross-entropy of ``forward_fn``.
        forward_fn: ``forward_fn(module, batch) -> (logits, targets)`` (GraSP; default :func:`default_forward`).
        input_shape: Shape of one input sample without the batch dimension (SynFlow); default: taken from
            the first batch's inputs.
        extras: Further scorer-specific options (e.g. ``{"temperature": 200}`` for GraSP).
    """

    params: Mapping[str, nn.Parameter]
    module: nn.Module | None = None
    masks: Mapping[str, Tensor] | None = None
    seed: int = 0
    batches: Sequence[Any] = ()
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None
    forward_fn: Callable[[nn.Module, Any], tuple[Tensor, Tensor]] = default_forward
    input_shape: tuple[int, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def loss(self, batch: Any) -> Tensor:
        """The scalar loss of ``batch``: ``loss_fn`` if given, else cross-entropy of ``forward_fn``."""
        if self.loss_fn is not None:
            return self.loss_fn(self.module, batch)
        logits, targets = self.forward_fn(self.module, batch)
        return F.cross_entropy(logits, targets)

    def require_data(self, scorer: str) -> None:
        """Raise a clear error when a data-driven scorer has no model or batches."""
        if self.module is None or not self.batches:
            raise ValueError(f"The `{scorer}` scorer needs the model and at least one batch (`batches`).")


Scorer = Callable[[ScoringContext], dict[str, Tensor]]

SCORER_NEEDS = ("nothing", "shape", "data")
_SCORERS: Registry[Scorer] = Registry(
    "scorer",
    "method",
    "lightning_pai.register_scorer",
    defaults={"needs": "data", "iterations": 1, "signed": False},
)


def register_scorer(
    name: str,
    fn: Scorer | None = None,
    *,
    overwrite: bool = False,
    needs: str = "data",
    iterations: int = 1,
    signed: bool = False,
):
    """Register a scorer ``fn(ctx) -> scores`` under ``name`` (decorator if ``fn`` is None).

    Args:
        name: Registry name (case-insensitive).
        fn: The scorer.
        overwrite: Replace an existing entry of that name.
        needs: ``"nothing"``, ``"shape"`` or ``"data"`` (see the module docstring).
        iterations: Default number of scoring rounds.
        signed: Whether the scores may be negative.

    Raises:
        ValueError: If ``needs`` is not one of :data:`SCORER_NEEDS` or the name is taken.
    """
    if needs not in SCORER_NEEDS:
        raise ValueError(f"`needs` must be one of {', '.join(map(repr, SCORER_NEEDS))}; got {needs!r}.")
    return _SCORERS.register(name, fn, overwrite=overwrite, needs=needs, iterations=iterations, signed=signed)


def scorer_info(name: str | Scorer) -> Mapping[str, Any]:
    """Metadata of a scorer: ``needs``, ``iterations``, ``signed`` (defaults for an unregistered callable)."""
    return _SCORERS.info(name)


def get_scorer(name: str | Scorer) -> Scorer:
    """Return the scorer registered as ``name`` (a callable passes through).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.

    """
    return _SCORERS.get(name)


def list_scorers() -> list[str]:
    """Names of the registered scorers."""
    return _SCORERS.list()


@register_scorer("magnitude", needs="nothing")
@torch.no_grad()
def magnitude(ctx: ScoringContext) -> dict[str, Tensor]:
    """Magnitude pruning (Han et al. 2015, arXiv:1506.02626): score ``|w|``."""
    return {n: p.detach().abs().float() for n, p in ctx.params.items()}


@register_scorer("random", needs="nothing")
@torch.no_grad()
def random(ctx: ScoringContext) -> dict[str, Tensor]:
    """Random pruning: i.i.d. ``U(0, 1)`` scores from a CPU generator seeded with ``ctx.seed``.

    Drawn on the CPU in parameter order, so the same seed gives the same masks on any device or rank.
    """
    gen = torch.Generator().manual_seed(ctx.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in ctx.params.items()}
