"""Per-layer sparsity tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_pai.core.masks import MaskSet
from lightning_pai.core.targets import Selectors, select_targets


@dataclass(frozen=True)
class LayerSparsity:
    """One row of a sparsity report.

    Attributes:
        name: Fully qualified parameter name.
        shape: Parameter shape.
        kept: Number of kept (unmasked, or nonzero when no mask is given) weights.
        total: Number of weights.

    """

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        """Fraction kept."""
        return self.kept / self.total

    @property
    def sparsity(self) -> float:
        """Fraction removed (``1 - density``)."""
        return 1.0 - self.density

    @property
    def collapsed(self) -> bool:
        """True when the layer is fully pruned (no signal can pass through it)."""
        return self.kept == 0


@dataclass(frozen=True)
class SparsityReport:
    """Rows per layer plus totals; ``str()`` gives a compact table."""

    rows: list[LayerSparsity]

    @property
    def kept(self) -> int:
        """Kept weights over all layers."""
        return sum(r.kept for r in self.rows)

    @property
    def total(self) -> int:
        """Targeted weights over all layers."""
        return sum(r.total for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall fraction removed."""
        return 1.0 - self.kept / self.total

    @property
    def collapsed(self) -> list[str]:
        """Names of fully pruned layers."""
        return [r.name for r in self.rows if r.collapsed]

    def metrics(self, prefix: str = "sparsity") -> dict[str, float]:
        """Flat metrics for loggers: ``{prefix}/global`` and ``{prefix}/{layer}`` (fraction removed)."""
        out = {f"{prefix}/global": self.sparsity}
        out.update({f"{prefix}/{r.name}": r.sparsity for r in self.rows})
        return out

    def __str__(self) -> str:
        header = ("", "Layer", "Shape", "Kept / Total", "Density")
        body = [
            (
                str(i),
                r.name,
                "x".join(map(str, r.shape)),
                f"{r.kept:,} / {r.total:,}",
                f"{r.density:.4f}" + ("  COLLAPSED" if r.collapsed else ""),
            )
            for i, r in enumerate(self.rows)
        ]
        body.append(("", "Total", "", f"{self.kept:,} / {self.total:,}", f"{1 - self.sparsity:.4f}"))
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), "-" * (sum(widths) + 3 * (len(widths) - 1))]
        lines += [fmt.format(*row) for row in body]
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(
    module: nn.Module | None,
    masks: MaskSet | Mapping[str, Tensor] | None = None,
    include: Selectors = None,
    exclude: Selectors = None,
) -> SparsityReport:
    """Per-layer kept counts of ``module``.

    Args:
        module: The model (may be None when ``masks`` is given).
        masks: Masks to count; without them, the nonzero weights of the targets selected by
            ``include``/``exclude`` (see :func:`~lightning_pai.core.targets.select_targets`) are counted.
        include: Target selection when ``masks`` is None.
        exclude: Target selection when ``masks`` is None.

    Returns:
        The report; ``str(report)`` is a table, ``report.metrics()`` a dict for loggers.

    """
    if masks is None and module is None:
        raise ValueError("`sparsity_report` needs a `module` or `masks`.")
    if masks is not None:
        rows = [LayerSparsity(n, tuple(m.shape), int(m.sum()), m.numel()) for n, m in masks.items()]
    else:
        rows = [
            LayerSparsity(n, tuple(p.shape), int(torch.count_nonzero(p)), p.numel())
            for n, p in select_targets(module, include, exclude).items()
        ]
    return SparsityReport(rows)
