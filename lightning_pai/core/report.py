"""Per-layer sparsity tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

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
    effective_kept: int | None = None

    @property
    def effective_sparsity(self) -> float | None:
        """Fraction removed once disconnected weights count as pruned (None if not computed)."""
        return None if self.effective_kept is None else 1.0 - self.effective_kept / self.total

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

    @property
    def effective_sparsity(self) -> float | None:
        """Overall effective sparsity (None unless the report was made with ``effective=True``)."""
        if any(r.effective_kept is None for r in self.rows):
            return None
        return 1.0 - sum(r.effective_kept for r in self.rows) / self.total

    def metrics(self, prefix: str = "sparsity") -> dict[str, float]:
        """Flat metrics for loggers: ``{prefix}/global`` and ``{prefix}/{layer}`` (fraction removed)."""
        out = {f"{prefix}/global": self.sparsity}
        out.update({f"{prefix}/{r.name}": r.sparsity for r in self.rows})
        if self.effective_sparsity is not None:
            out[f"{prefix}/effective"] = self.effective_sparsity
        return out

    def __str__(self) -> str:
        eff = self.effective_sparsity is not None
        header = ("", "Layer", "Shape", "Kept / Total", "Density") + (("Effective density",) if eff else ())
        body = [
            (
                str(i),
                r.name,
                "x".join(map(str, r.shape)),
                f"{r.kept:,} / {r.total:,}",
                f"{r.density:.4f}" + ("  COLLAPSED" if r.collapsed else ""),
            )
            + ((f"{r.effective_kept / r.total:.4f}",) if eff else ())
            for i, r in enumerate(self.rows)
        ]
        total = ("", "Total", "", f"{self.kept:,} / {self.total:,}", f"{1 - self.sparsity:.4f}")
        body.append(total + ((f"{1 - self.effective_sparsity:.4f}",) if eff else ()))
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
    effective: bool = False,
) -> SparsityReport:
    """Per-layer kept counts of ``module``.

    Args:
        module: The model (may be None when ``masks`` is given).
        masks: Masks to count; without them, the nonzero weights of the targets selected by
            ``include``/``exclude`` (see :func:`~lightning_pai.core.targets.select_targets`) are counted.
        include: Target selection when ``masks`` is None.
        exclude: Target selection when ``masks`` is None.
        effective: Also compute effective sparsity (see :func:`effective_masks`; chains of layers only).

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
    if effective:
        kept = {r.name: (masks[r.name] if masks is not None else module.get_parameter(r.name) != 0) for r in rows}
        eff = effective_masks(kept)
        rows = [replace(r, effective_kept=int(eff[r.name].sum())) for r in rows]
    return SparsityReport(rows)


def _to_units(alive: Tensor, width: int, argument: str) -> Tensor:
    """Map a unit vector onto a layer's ``width`` inputs, across a channel-major flatten if needed."""
    if alive.numel() == width:
        return alive
    if width % alive.numel() == 0:
        return alive.repeat_interleave(width // alive.numel())
    raise ValueError(
        f"Effective sparsity needs a plain chain of layers: {argument} has {width} inputs, the layer before it "
        f"{alive.numel()} outputs. Residual or branching graphs are not supported."
    )


def _from_units(useful: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_to_units`: a unit is useful if any of its flattened positions is."""
    if useful.numel() == width:
        return useful
    return useful.view(width, -1).any(1)


@torch.no_grad()
def effective_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks with the weights that cannot carry signal removed (Vysogorets & Kempe 2021, arXiv:2107.02306).

    The layers are taken as a plain chain in the given order (an MLP or a conv stack, with flattening
    between conv and linear layers handled channel-major). A kept weight ``w[o, i, ...]`` is *effective*
    only if input unit ``i`` is reachable from the network input through kept weights and output unit
    ``o`` reaches the network output through kept weights. Biases are ignored (they carry no input
    signal). Residual connections, concatenations and attention are not modelled: for such graphs the
    result is undefined, and inconsistent widths raise an error.

    Args:
        masks: Bool masks ``[out, in, *kernel]`` in forward order.

    Returns:
        Effective masks, by name (a subset of ``masks``).
    """
    names = list(masks)
    conn = {n: masks[n].reshape(masks[n].shape[0], masks[n].shape[1], -1).any(-1) for n in names}  # [out, in]
    reach_in: dict[str, Tensor] = {}
    alive = None
    for n in names:
        width = conn[n].shape[1]
        reach_in[n] = torch.ones(width, dtype=torch.bool) if alive is None else _to_units(alive, width, n)
        alive = (conn[n].float() @ reach_in[n].float().to(conn[n].device)) > 0
    useful_out: dict[str, Tensor] = {}
    useful = None
    for n in reversed(names):
        out_width = conn[n].shape[0]
        useful_out[n] = torch.ones(out_width, dtype=torch.bool) if useful is None else _from_units(useful, out_width)
        useful = (conn[n].float().t() @ useful_out[n].float().to(conn[n].device)) > 0
    out = {}
    for n in names:
        m = masks[n]
        gate = useful_out[n].to(m.device)[:, None] & reach_in[n].to(m.device)[None, :]
        out[n] = m & gate.view(*gate.shape, *([1] * (m.dim() - 2)))
    return out
