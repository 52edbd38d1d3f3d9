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

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_pai.core.registry import Registry

#: Batch keys taken as targets (never passed to ``forward``) when a batch is a dict.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")

_FORWARD_HINT = (
    "Pass `forward_fn(module, batch) -> (logits, targets)`, e.g. "
    "`forward_fn=lambda m, b: (m(b['input_ids'], attention_mask=b['attention_mask']).logits, b['labels'])`"
)


def _required_positional(module: nn.Module) -> int:
    """How many positional arguments ``module.forward`` requires (1 when it cannot be told)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params))


def split_batch(module: nn.Module, batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, targets)`` of a batch, as ``module.forward`` takes the inputs.

    - a dict: ``{"x": ..., "y": ...}`` gives ``(x, y)``; otherwise every key but :data:`LABEL_KEYS` is an
      input (keyword arguments, HF style) and the first label key present is the target;
    - a tuple/list: its first ``n`` items are the positional inputs, ``n`` being the number of positional
      arguments ``forward`` requires (a two-input ``forward(inputs, target)`` gets both), and the item after
      the first is the target (``(x, y, ...)``);
    - a tensor: the input, no target.
    """
    if isinstance(batch, Mapping):
        if "x" in batch:
            return batch["x"], batch.get("y")
        target = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, target
    if isinstance(batch, (tuple, list)):
        n = min(len(batch), _required_positional(module))
        return tuple(batch[:n]), batch[1] if len(batch) > 1 else None
    return batch, None


def call_forward(module: nn.Module, inputs: Any) -> Any:
    """``module(**inputs)``, ``module(*inputs)`` or ``module(inputs)`` for a dict, tuple or single input.

    Raises:
        ValueError: If the call fails on its arguments: a ``TypeError`` (a missing or unexpected argument) or a
            ``ValueError`` (a model refusing the arguments it got, e.g. an encoder-decoder given no decoder
            inputs); the message says how to pass ``forward_fn``, and the model's error is its ``__cause__``.
            Other errors (shapes, devices, memory) pass through unchanged.
    """
    try:
        if isinstance(inputs, Mapping):
            return module(**inputs)
        if isinstance(inputs, tuple):
            return module(*inputs)
        return module(inputs)
    except (TypeError, ValueError) as error:
        how = ""
        if isinstance(inputs, Mapping):
            how = f" (keyword arguments {sorted(inputs)}: every key of the batch but {'/'.join(LABEL_KEYS)})"
        raise ValueError(
            f"Cannot call the model's forward on the batch's inputs{how}: {type(error).__name__}: {error}. "
            f"{_FORWARD_HINT}."
        ) from error


def output_tensor(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself, its ``logits`` (HF ``ModelOutput``), or its first tensor.

    Raises:
        ValueError: If the output contains no tensor.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise ValueError(f"The model's output ({type(output).__name__}) holds no tensor. {_FORWARD_HINT}.")


def default_forward(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` of a batch (see :func:`split_batch`), logits flattened to ``(N, classes)``.

    Works for ``(x, y, ...)`` tuples, multi-input ``forward``s and HF-style dict batches with ``labels``;
    sequence outputs ``(B, T, C)`` with targets ``(B, T)`` are flattened to ``(B*T, C)`` and ``(B*T,)``.

    Raises:
        TypeError: If the batch has no targets; the message says how to pass ``forward_fn``.
    """
    inputs, targets = split_batch(module, batch)
    if targets is None:
        raise TypeError(
            "Cannot split the batch into inputs and targets: expected `(x, y, ...)`, `{'x': ..., 'y': ...}` or a "
            f"dict with 'labels', got {type(batch).__name__}. {_FORWARD_HINT}."
        )
    logits = output_tensor(call_forward(module, inputs))
    if logits.dim() > 2 and targets.dim() == logits.dim() - 1:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits, targets


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
        input_shape: Shape of one input sample without the batch dimension (SynFlow); default: the first
            batch's inputs (any structure: floats become ones, integer inputs such as token ids are kept).
        extras: Further scorer-specific options (e.g. ``{"temperature": 200}`` for GraSP).
        layouts: Each target's :class:`~lightning_pai.core.targets.Layout` (for shape-based distributions).
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
    layouts: Mapping[str, Any] | None = None

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
    defaults={"needs": "data", "iterations": 1, "signed": False, "revives": False},
)


def register_scorer(
    name: str,
    fn: Scorer | None = None,
    *,
    overwrite: bool = False,
    needs: str = "data",
    iterations: int = 1,
    signed: bool = False,
    revives: bool = False,
):
    """Register a scorer ``fn(ctx) -> scores`` under ``name`` (decorator if ``fn`` is None).

    Args:
        name: Registry name (case-insensitive).
        fn: The scorer.
        overwrite: Replace an existing entry of that name.
        needs: ``"nothing"``, ``"shape"`` or ``"data"`` (see the module docstring).
        iterations: Default number of scoring rounds.
        signed: Whether the scores may be negative.
        revives: Iterative pruning may bring back weights pruned in earlier rounds: every round starts from the
            initial weights (pruned ones zeroed for the forward pass, their values in
            ``ctx.extras["initial_weights"]``) and selects among all weights (FORCE).

    Raises:
        ValueError: If ``needs`` is not one of :data:`SCORER_NEEDS` or the name is taken.
    """
    if needs not in SCORER_NEEDS:
        raise ValueError(f"`needs` must be one of {', '.join(map(repr, SCORER_NEEDS))}; got {needs!r}.")
    info = {"needs": needs, "iterations": iterations, "signed": signed, "revives": revives}
    return _SCORERS.register(name, fn, overwrite=overwrite, **info)


def scorer_info(name: str | Scorer) -> Mapping[str, Any]:
    """Metadata of a scorer: ``needs``, ``iterations``, ``signed``, ``revives`` (defaults for unregistered ones)."""
    return _SCORERS.info(name)


def get_scorer(name: str | Scorer, argument: str = "method") -> Scorer:
    """Return the scorer registered as ``name`` (a callable passes through).

    Raises:
        ValueError: If the name is unknown; the message (naming ``argument``) lists the valid names.

    """
    return _SCORERS.get(name, argument)


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
