"""Markdown tables of ``compare.json`` and parsing of the MNIST result tables (part of ``compare.py``).

:func:`render_markdown` gives ``compare.md``; :func:`parse_tables` / :func:`mnist_series` read the MNIST result
files of ``benchmarks/reproductions/results`` (``pai_mnist.md``, ``lottery_mnist.md``, ``dst_mnist.md``,
``dst_mnist_dsr_movement.md``, or a JSON file of the same name when present).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

#: Where the paper reproductions write their MNIST tables (the accuracy-vs-sparsity plot reads them).
MNIST_RESULTS = Path(__file__).resolve().parents[1] / "reproductions" / "results"
MNIST_FILES = ("pai_mnist", "lottery_mnist", "dst_mnist", "dst_mnist_dsr_movement")
MODEL_ORDER = ("lenet", "resnet18", "vit_tiny", "resnet50", "vit_small", "tiny")
LIB_ORDER = (
    "dense",
    "pai_pai",
    "pai_rigl",
    "pai_gmp",
    "pai_lottery",
    "modelpruning",
    "modelpruning_default",
    "rigl_torch",
    "sparsimony_rigl",
    "sparsimony_set",
    "ao_weightnorm",
)
OURS = ("pai_pai", "pai_rigl", "pai_gmp", "pai_lottery")


# ------------------------------------------------------------------------------------------ markdown parsing
def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table of a markdown text as a list of ``{header: cell}`` rows (cells stripped)."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        head, sep = lines[i].strip(), lines[i + 1].strip()
        if head.startswith("|") and re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*\|?", sep):
            headers = [h.strip() for h in head.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(headers, cells + [""] * (len(headers) - len(cells)))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def parse_value(cell: str) -> tuple[float, float] | None:
    """``"2.16 ± 0.08"`` -> ``(2.16, 0.08)``, ``"1.6"`` -> ``(1.6, 0.0)``, ``"–"`` / ``""`` -> None."""
    m = re.match(r"\**\s*(-?\d+(?:\.\d+)?)\s*(?:±\s*(\d+(?:\.\d+)?))?", cell.replace("**", ""))
    if not m or cell.strip() in ("", "–", "-"):
        return None
    return float(m.group(1)), float(m.group(2) or 0.0)


def mnist_series(name: str, text: str) -> dict[str, Any]:
    """Accuracy-vs-density series of one MNIST result file.

    Returns ``{"series": {label: [(density, accuracy %, std)]}, "anchors": [(density, accuracy %, label)],
    "dense": accuracy % or None, "dense_paper": accuracy % or None, "vlines": [(density, label)]}``.
    Tables with ``NN% sparsity`` columns hold test errors; the lottery table holds accuracies per round.
    """
    out: dict[str, Any] = {"series": {}, "anchors": [], "dense": None, "dense_paper": None, "vlines": []}
    for table in parse_tables(text):
        if not table:
            continue
        headers = list(table[0])
        if "weights remaining" in headers:  # lottery: one row per round
            for col in ("ticket final", "reinit final"):
                pts = []
                for row in table:
                    d, v = parse_value(row["weights remaining"]), parse_value(row.get(col, ""))
                    if d and v:
                        pts.append((d[0] / 100, v[0], v[1]))
                out["series"][f"lottery {col.split()[0]}"] = pts
            out["vlines"] = [(0.513, "LTH paper: tickets >= dense"), (0.211, ""), (0.036, "about dense")]
            continue
        cols = []
        for h in headers:
            m = re.match(r"(\d+(?:\.\d+)?)% sparsity", h)
            if m:
                cols.append((h, 1 - float(m.group(1)) / 100))
        if not cols:
            continue
        for row in table:
            method = row[headers[0]]
            values = [(d, parse_value(row[h])) for h, d in cols]
            if method.startswith("dense"):
                first = next((v for _, v in values if v), None)
                if first:
                    key = "dense_paper" if "paper" in method else "dense"
                    out[key] = 100 - first[0]
                continue
            pts = [(d, 100 - v[0], v[1]) for d, v in values if v]
            if "paper" in method:
                out["anchors"] += [(d, a, method.split(",")[0] + " paper") for d, a, _ in pts]
            else:
                out["series"][method.replace("†", "").replace("‡", "").strip()] = pts
    return out


def load_mnist_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """:func:`mnist_series` of every MNIST result file present (``NAME.json`` when it exists, else ``NAME.md``)."""
    found = {}
    for name in MNIST_FILES:
        js, md = results_dir / f"{name}.json", results_dir / f"{name}.md"
        if js.exists():
            data = json.loads(js.read_text())
            if isinstance(data, dict) and "series" in data:
                found[name] = data
                continue
        if md.exists():
            found[name] = mnist_series(name, md.read_text())
    return found


# ------------------------------------------------------------------------------------------ helpers
def _label(results: dict, key: str) -> str:
    for model in results.get("timing", {}).values():
        if key in model.get("libraries", {}):
            return model["libraries"][key]["label"]
    row = results.get("correctness", {}).get("rows", {}).get(key)
    return f"{row['library']} {row['method']}" if row else key


def _full_cell(r: dict) -> str:
    cell = f"{r['ratio_median']:.3f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]"
    if r.get("ratio_amortized") is not None:
        cell += f"; amortized {r['ratio_amortized']:.3f}"
    if r["coverage"] < 0.999:
        cell += f" (prunes {100 * r['coverage']:.2g} % of the targets)"
    return cell


def _short_cell(r: dict) -> str:
    cell = f"{r['ratio_median']:.2f}"
    if r.get("ratio_amortized") is not None:
        cell += f" / {r['ratio_amortized']:.2f}"
    if r["coverage"] < 0.999:
        cell += f" ({100 * r['coverage']:.2g} % pruned)"
    return cell


def _ratio_rows(results: dict, timing: dict, models: list[str], libs: list[str], cell) -> list[str]:
    """One markdown row per library: ``cell(row)`` per model, empty where the library did not run."""
    rows = []
    for k in libs:
        cells = [cell(timing[m]["libraries"][k]) if k in timing[m]["libraries"] else "" for m in models]
        rows.append(f"| {_label(results, k)} | " + " | ".join(cells) + " |")
    return rows


def _models(section: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in section] + [m for m in section if m not in MODEL_ORDER]


def _libs(keys) -> list[str]:
    return [k for k in LIB_ORDER if k in keys] + [k for k in keys if k not in LIB_ORDER]


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _load_cells(section: dict) -> str:
    return f"{section.get('load_before', float('nan')):.2f} -> {section.get('load_after', float('nan')):.2f}"


# ------------------------------------------------------------------------------------------ tables
def timing_tables(results: dict) -> list[str]:
    timing = results.get("timing", {})
    if not timing:
        return []
    models = _models(timing)
    libs = _libs({k for m in models for k in timing[m]["libraries"]})
    lines = [
        "## Step time, ratio to dense (step-level interleaved, median over rounds)",
        "",
        "Each cell: median of the per-round ratios `t(library) / t(dense)` of the same round, the interquartile "
        "range in brackets. `amortized` adds the extra cost of the one update step in the window spread over "
        "delta_t = 100 steps (RigL, SET, GMP update every 100 steps; for the lottery ticket a round boundary "
        "every 100 steps is far more often than real rounds of whole epochs, so its amortized value is an "
        "upper bound).",
        "",
        "| library | " + " | ".join(timing[m]["label"] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    lines += _ratio_rows(results, timing, models, libs, _full_cell)
    lines += [
        "| dense step (median ms) | "
        + " | ".join(f"{timing[m]['libraries']['dense']['median_ms']:.1f}" for m in models)
        + " |",
        "| timed rounds; 1-min load before -> after | "
        + " | ".join(f"{timing[m]['rounds']}; {_load_cells(timing[m])}" for m in models)
        + " |",
        "",
        "Extra time of the update step (ms, minus the dense step's deviation in the same round):",
        "",
        "| library | " + " | ".join(timing[m]["label"] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for k in libs:
        vals = [timing[m]["libraries"].get(k, {}).get("update_extra_ms") for m in models]
        if any(v is not None for v in vals):
            lines.append(f"| {_label(results, k)} | " + " | ".join(_f(v, ".0f") for v in vals) + " |")
    lines.append("")
    return lines


def fit_table(results: dict) -> list[str]:
    fit = results.get("fit")
    if not fit:
        return []
    names = {
        "dense": "dense",
        "pai_pai": "lightning_pai PruneAtInit magnitude",
        "pai_rigl": "lightning_pai RigL (no update in the window)",
        "modelpruning": "Lightning ModelPruning, pruned at train start",
    }
    lines = [
        f"## Cross-check: whole `Trainer.fit` runs on {fit['model']}",
        "",
        f"{fit['repeats']} repeats of interleaved fits (order rotated), {fit['warmup']} warm-up + {fit['steps']} timed "
        f"steps each; ratio = median step of the fit / median step of the dense fit of the same repeat; "
        f"1-min load {_load_cells(fit)}.",
        "",
        "| callback | median step (ms) | ratio, median of repeats | per repeat |",
        "|---|---|---|---|",
    ]
    for k, r in fit["modes"].items():
        lines.append(
            f"| {names.get(k, k)} | {r['median_ms']:.1f} | {r['ratio_median']:.3f} | "
            + ", ".join(f"{x:.3f}" for x in r["ratios"])
            + " |"
        )
    return lines + [""]


def memory_table(results: dict) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return []
    models = _models(mem)
    libs = _libs({k for m in models for k in mem[m]["libraries"]})
    labels = {m: results.get("timing", {}).get(m, {}).get("label", m) for m in models}
    lines = [
        "## Extra memory per prunable weight (bytes)",
        "",
        "Per weight of the common targets, minus the same for dense training, a fresh process per library, "
        "measured from the memory in use once model, optimizer and data exist (CPU: RSS, with the peak reset "
        "through `/proc/self/clear_refs` and glibc returning large blocks to the OS; CUDA: "
        "`max_memory_allocated`). `train`: peak while training 3 steps, the second of which is a topology "
        "update / lottery round boundary; `set-up`: peak while the library prunes or prepares the model; "
        "`held`: bytes of the tensors the library keeps beside the model's parameters (masks, copies, "
        "buffers, ITOP set), counted exactly.",
        "",
        "| library | " + " | ".join(f"{labels[m]}: train / set-up / held" for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for k in libs:
        cells = []
        for m in models:
            r = mem[m]["libraries"].get(k)
            setup = None if r is None else r.get("extra_setup_peak_per_param")
            cells.append(
                "" if r is None else f"{r['extra_peak_per_param']:.2f} / {_f(setup, '.2f')} / {r['held_per_param']:.2f}"
            )
        lines.append(f"| {_label(results, k)} | " + " | ".join(cells) + " |")
    lines.append("| prunable weights | " + " | ".join(f"{mem[m]['prunable']:,}" for m in models) + " |")
    return lines + [""]


def _yes(ok: bool) -> str:
    return "**True**" if ok else "**False**"


def correctness_table(results: dict) -> list[str]:
    corr = results.get("correctness")
    if not corr:
        return []
    lines = [
        f"## Correctness ({corr['model']}, sparsity {corr['sparsity']}, {corr['steps']} steps of SGD lr 0.1, "
        "momentum 0.9, weight decay 5e-4)",
        "",
        "| library | method | checked through | (a) DDP: masks equal on 2 ranks | (b) resume reproduces masks | "
        "(c) pruned weights exactly 0 | kept / target | (d) mask changed at steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in corr["rows"].values():
        if "ddp_error" in r:
            a = f"error: {r['ddp_error'][:120]}"
        else:
            a = (
                f"{_yes(r['ddp_mask_diff'] == 0)} ({r['ddp_mask_diff']:,} entries differ; "
                f"weights by up to {r['ddp_weight_diff']:.3g})"
            )
        if "resume_error" in r:
            b = f"error: {r['resume_error'][:120]}"
        else:
            b = (
                f"{_yes(r['resume_mask_diff'] == 0)} ({r['resume_mask_diff']:,} entries differ; "
                f"weights by up to {r['resume_weight_diff']:.3g})"
            )
            if r.get("resume_notes"):
                b += "; " + "; ".join(r["resume_notes"])
        c = f"{_yes(r['leaks'] == 0)} ({r['leaks']:,} nonzero"
        if r.get("stored_nonzero_masked"):
            c += f"; the stored dense copy keeps {r['stored_nonzero_masked']:,} masked entries nonzero"
        c += ")"
        kept = f"{r['kept']:,} / {r['expected_kept']:,}" if r.get("expected_kept") else f"{r['kept']:,}"
        changes = ", ".join(map(str, r.get("mask_changes", []))) or "never"
        if r.get("dynamic") and not r.get("mask_changes"):
            changes = "**never** (should update)"
        if r.get("note"):
            changes += f"; {r['note']}"
        lines.append(f"| {r['library']} | {r['method']} | {r['via']} | {a} | {b} | {c} | {kept} | {changes} |")
    lines += [
        "",
        f"Schedules: plain-PyTorch rows update every {corr['plain_delta_t']} steps and resume after step "
        f"{corr['plain_resume_after']}; Lightning rows update every {corr['lightning_delta_t']} steps, save a "
        f"checkpoint at step {corr['lightning_checkpoint_at']} and crash at step "
        f"{corr['lightning_checkpoint_at'] + 2}. "
        "DDP: each rank builds its model from its own seed and reads its own data.",
        "",
    ]
    return lines


def accuracy_table(results: dict) -> list[str]:
    acc = results.get("accuracy")
    if not acc:
        return []
    sps = acc["sparsities"]
    lines = [
        f"## RigL on LeNet-300-100 / MNIST: test error (%), {acc['epochs']} epochs, seeds {acc['seeds']}",
        "",
        f"Recipe: {acc['recipe']}.",
        "",
        "| library | " + " | ".join(f"{100 * s:g} % sparsity: error | density | leaks" for s in sps) + " | s/run |",
        "|---|" + "---|---|---|" * len(sps) + "---|",
    ]
    for r in acc["rows"].values():
        cells = []
        for s in sps:
            x = r["results"][f"{s:g}"]
            cells.append(f"{x['test_error_mean']:.2f} ± {x['test_error_std']:.2f} | {x['density']:.4f} | {x['leaks']}")
        secs = sum(r["results"][f"{s:g}"]["seconds_per_run"] for s in sps) / len(sps)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {secs:.0f} |")
    for name, ref in acc.get("reference", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{ref.get(str(s), ref.get(s, '–'))} | | " for s in sps) + " |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    env = results.get("env", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    commands = "; ".join(f"`{c}` ({k})" for k, c in results.get("commands", {}).items())
    lines = [
        "# Side by side: lightning_pai, Lightning ModelPruning, rigl-torch, sparsimony, torch.ao",
        "",
        f"- command(s): {commands}",
        f"- date: {results.get('date', '?')}; device: {env.get('device', '?')}, "
        f"torch threads {env.get('threads', '?')}",
        f"- versions: {versions}",
        f"- seconds per invocation: {', '.join(f'{k}: {v:.0f}' for k, v in results.get('seconds', {}).items())}",
        "- sparsity 0.9 of every Conv/Linear weight unless stated; ratios < 1 would be faster than dense",
        "",
    ]
    lines += timing_tables(results) + fit_table(results) + memory_table(results)
    lines += correctness_table(results) + accuracy_table(results)
    return "\n".join(lines) + "\n"
