"""Smoke test of benchmarks/compare/compare.py's core: every installed library trains a tiny model step by step."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCH / "compare"), str(BENCH)]

import compare  # noqa: E402
import compare_tables  # noqa: E402
from peers import PRUNERS  # noqa: E402


def _requires(key: str) -> None:
    for module in PRUNERS[key].modules:
        pytest.importorskip(module)


@pytest.mark.parametrize("key", [k for k in PRUNERS if k != "dense"])
def test_every_library_times_a_tiny_model(key, one_thread):
    _requires(key)
    out = compare.time_model("tiny", ["dense", key], rounds=3, warmup=1, device=torch.device("cpu"), log=lambda _: None)
    rows = out["libraries"]
    assert set(rows) == {"dense", key}
    assert rows["dense"]["ratio_median"] == pytest.approx(1.0)
    row = rows[key]
    for field in ("median_ms", "ratio_median", "ratio_q1", "ratio_q3", "coverage", "density"):
        assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] > 0, field
    assert row["ratio_q1"] <= row["ratio_median"] <= row["ratio_q3"]
    assert 0 < row["coverage"] <= 1
    assert row["density"] <= 0.5  # sparsity 0.9 of the covered targets (whatever rounding the library uses)
    if not PRUNERS[key].prunes_once:
        assert math.isfinite(row["update_extra_ms"]) and math.isfinite(row["ratio_amortized"])


def test_table_has_a_row_per_library(one_thread):
    keys = [k for k in PRUNERS if PRUNERS[k].available()]
    timing = compare.time_model("tiny", keys, rounds=2, warmup=1, device=torch.device("cpu"), log=lambda _: None)
    assert set(timing["libraries"]) == set(keys)
    text = compare_tables.render_markdown({"timing": {"tiny": timing}})
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    for key in keys:
        label = timing["libraries"][key]["label"]
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        ratio = row.split("|")[2].split("[")[0]
        assert float(ratio) > 0


def test_memory_worker_counts_our_masks(one_thread):
    dense = compare.memory_worker("tiny", "dense", torch.device("cpu"), steps=1)
    ours = compare.memory_worker("tiny", "pai_pai", torch.device("cpu"), steps=1)
    assert dense["held_bytes"] == 0
    assert ours["held_bytes"] == ours["prunable"]  # one byte of mask per prunable weight
    assert isinstance(ours["growth_bytes"], int)


def test_markdown_tables_parse_into_series():
    text = (
        "| method | 90% sparsity | 98% sparsity |\n|---|---|---|\n"
        "| dense | 1.33 ± 0.03 (all sparsities) | |\n| snip | 1.61 ± 0.08 | 2.79 ± 0.07 |\n"
        "| SNIP, paper (Lee et al.) | – | 2.4 |\n"
    )
    data = compare_tables.mnist_series("x", text)
    assert data["dense"] == pytest.approx(98.67)
    (d90, a90, s90), (d98, a98, _) = data["series"]["snip"]
    assert (d90, a90, s90) == (pytest.approx(0.1), pytest.approx(98.39), pytest.approx(0.08))
    assert d98 == pytest.approx(0.02) and a98 == pytest.approx(97.21)
    assert data["anchors"] == [(pytest.approx(0.02), pytest.approx(97.6), "SNIP paper")]
