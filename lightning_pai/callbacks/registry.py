"""The method registry: each method class declares a :class:`MethodCard` and is listed by :func:`list_methods`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("prune_at_init", "lottery", "dynamic", "gradual", "learned", "gradient_only")


@dataclass(frozen=True)
class MethodCard:
    """What a method tells the test suites, the CLI check and the benchmarks about itself.

    A method class declares ``card = MethodCard(...)`` in its body and is registered when the class is
    created (:func:`~lightning_pai.callbacks.list_methods`); every registry-parametrized suite picks it up.

    Attributes:
        family: ``"prune_at_init"``, ``"lottery"``, ``"dynamic"`` (drop-and-grow), ``"gradual"`` (pruning
            during training), ``"learned"`` (masks drawn from scores trained by gradient) or ``"gradient_only"``
            (masks saying which entries train, the others frozen, none pruned: FISH).
        example: A small configuration (keyword arguments besides the sparsity) that reaches its final
            sparsity within a fit of 2 epochs of 8 optimizer steps; used by :meth:`SparseCallback.example`.
        sparsity_argument: The argument that sets how much is pruned (``"sparsity"``; the lottery ticket's
            example prunes ``prune_fraction`` once, in 2 rounds), or None where the density is learned from
            another knob (e.g. ``TrainableThresholds``' regulariser weight).
        keeps_layer_counts: Every topology update keeps each layer's kept count (RigL, SET).
        keeps_total: Every topology update keeps the total kept count.
        exact_sparsity: The method ends at its ``sparsity`` (False: the density is learned, e.g. supermasks).
    """

    family: str
    example: dict[str, Any] = field(default_factory=dict)
    sparsity_argument: str | None = "sparsity"
    keeps_layer_counts: bool = False
    keeps_total: bool = False
    exact_sparsity: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {', '.join(map(repr, FAMILIES))}; got {self.family!r}.")


#: Every registered method class, in registration (documentation) order.
_METHODS: dict[str, type] = {}


def register_method(cls: type) -> None:
    """Add a method class (called by ``SparseCallback.__init_subclass__`` for classes that declare a card)."""
    _METHODS[cls.__name__] = cls


def list_methods(family: str | None = None) -> list[type]:
    """The registered method classes (those declaring a :class:`MethodCard`), optionally of one ``family``."""
    return [cls for cls in _METHODS.values() if family is None or cls.card.family == family]
