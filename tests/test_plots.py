"""lightning_pai.plots: per-layer density bars from a sparsity report."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_pai import LayerSparsity, SparsityReport, sparsity_report
from lightning_pai.plots import plot_layer_density


def _report() -> SparsityReport:
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    masks = {"0.weight": torch.rand(10, 20) < 0.3, "2.weight": torch.zeros(4, 10, dtype=torch.bool)}
    return sparsity_report(net, masks)


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "density.png"
    ax = plot_layer_density(_report(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heights = [bar.get_height() for bar in ax.patches]
    report = _report()
    assert len(heights) == len(report.rows)
    assert heights[1] == 0.0  # the collapsed layer
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.weight", "2.weight"]


def test_draws_on_a_given_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    report = SparsityReport([LayerSparsity("a", (4,), 1, 4), LayerSparsity("b", (4,), 3, 4)])
    assert plot_layer_density(report, ax=ax) is ax
    assert [bar.get_height() for bar in ax.patches] == [0.25, 0.75]


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install lightning-pai\[plot\]"):
        plot_layer_density(_report())


def test_empty_report_is_an_error():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no layers"):
        plot_layer_density(SparsityReport([]))
