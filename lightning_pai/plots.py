"""Plots of sparsity reports (optional: needs matplotlib, ``pip install lightning-pai[plot]``).

matplotlib is imported only when a plot is drawn, so ``import lightning_pai`` never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lightning_pai.core.report import SparsityReport

PLOT_EXTRA = "pip install lightning-pai[plot]"


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"Plotting needs matplotlib, which is not installed: `{PLOT_EXTRA}`.") from e
    return matplotlib


def plot_layer_density(
    report: SparsityReport, path: str | Path | None = None, ax: Any = None, *, title: str | None = None
) -> Any:
    """Bar chart of each layer's density (fraction of its weights kept, ``1 - sparsity``).

    One bar per row of ``report`` in model order, labelled with the layer name and its kept / total
    count; a dashed line marks the overall density of the targets. Layers with no weight left
    (collapsed) are drawn in red.

    Args:
        report: A :class:`~lightning_pai.core.report.SparsityReport` (e.g. ``sparsity_report(model, masks)``
            or a callback's ``report()``).
        path: Where to save the figure (any format matplotlib writes, e.g. ``.png``); the figure is created
            here when ``ax`` is None.
        ax: A matplotlib ``Axes`` to draw on (then ``path`` saves its figure).
        title: Axes title (default: the overall sparsity and the number of layers).

    Returns:
        The matplotlib ``Axes`` drawn on.

    Raises:
        ImportError: If matplotlib is not installed (the message names ``pip install lightning-pai[plot]``).
        ValueError: If the report has no rows.
    """
    _matplotlib()
    from matplotlib.figure import Figure

    rows = list(report.rows)
    if not rows:
        raise ValueError("The sparsity report has no layers to plot.")
    if ax is None:
        fig = Figure(figsize=(max(6.0, 0.32 * len(rows) + 2.0), 4.5), layout="constrained")
        ax = fig.add_subplot()
    positions = range(len(rows))
    densities = [r.density for r in rows]
    colors = ["tab:red" if r.collapsed else "tab:blue" for r in rows]
    ax.bar(positions, densities, color=colors, width=0.8)
    overall = 1.0 - report.sparsity
    ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"all targets: {overall:.3g}")
    ax.set_xticks(list(positions))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("density (fraction of weights kept)")
    top = min(1.0, max(densities + [overall]))
    ax.set_ylim(0, top * 1.08 + 0.01)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    for x, r in zip(positions, rows):  # kept / total: above a short bar, inside a tall one
        inside = r.density > 0.55 * top
        y = r.density - 0.01 * top if inside else r.density + 0.01 * top
        ax.annotate(
            f"{r.kept:,}/{r.total:,}",
            (x, y),
            ha="center",
            va="top" if inside else "bottom",
            rotation=90,
            fontsize=6,
            color="white" if inside else "black",
        )
    ax.set_title(title or f"{len(rows)} layers, sparsity {report.sparsity:.4f} of the targeted weights")
    ax.legend(loc="upper center", fontsize=8)
    if path is not None:
        ax.figure.savefig(path, dpi=120)
    return ax
