"""Tables and plots of ``compare.json`` and of the MNIST result files (part of ``compare.py``).

``render(results, outdir)`` writes ``compare.md``, ``compare_readme_section.md`` and, when matplotlib is
installed, ``compare_step_time.png``, ``compare_memory.png``, ``compare_accuracy.png``,
``compare_layer_density.png`` and ``mnist_accuracy_vs_sparsity.png``. The MNIST panel reads the tables
of ``pai_mnist.md``, ``lottery_mnist.md``, ``dst_mnist.md`` and ``dst_mnist_dsr_movement.md`` (or a JSON
file of the same name when present) with :func:`parse_tables` / :func:`mnist_series`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
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


# ------------------------------------------------------------------------------------------ plots
def _plt():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def plot_step_time(results: dict, path: Path) -> bool:
    Figure, timing = _plt(), results.get("timing", {})
    models = [m for m in _models(timing) if m != "tiny"]
    if Figure is None or not models:
        return False
    libs = _libs({k for m in models for k in timing[m]["libraries"]})
    fig = Figure(figsize=(10, 1.0 + 0.28 * len(libs) * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 1, sharex=True, squeeze=False)[:, 0]
    for ax, m in zip(axes, models):
        rows = timing[m]["libraries"]
        keys = [k for k in libs if k in rows and k != "dense"]
        ys = list(range(len(keys)))[::-1]
        med = [rows[k]["ratio_median"] for k in keys]
        err = [
            [rows[k]["ratio_median"] - rows[k]["ratio_q1"] for k in keys],
            [rows[k]["ratio_q3"] - rows[k]["ratio_median"] for k in keys],
        ]
        colors = ["tab:blue" if k in OURS else "tab:gray" for k in keys]
        ax.barh(ys, [x - 1 for x in med], left=1, xerr=err, color=colors, height=0.7, capsize=2)
        am = [(y, rows[k]["ratio_amortized"]) for y, k in zip(ys, keys) if rows[k].get("ratio_amortized") is not None]
        if am:
            ax.plot([a for _, a in am], [y for y, _ in am], "k|", markersize=9, label="amortized with the update")
        ax.set_yticks(ys)
        ax.set_yticklabels([_label(results, k) for k in keys], fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{timing[m]['label']} (dense {rows['dense']['median_ms']:.1f} ms/step)", fontsize=9)
        if am:
            ax.legend(fontsize=7, loc="lower right")
    axes[-1].set_xlabel("training-step time / dense (median of per-step ratios, bars: interquartile range)")
    fig.savefig(path, dpi=110)
    return True


def plot_memory(results: dict, path: Path) -> bool:
    Figure, mem = _plt(), results.get("memory", {})
    models = _models(mem)
    if Figure is None or not models:
        return False
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    axes = fig.subplots(1, len(models), sharey=True, squeeze=False)[0]
    libs = [k for k in _libs({k for m in models for k in mem[m]["libraries"]}) if k != "dense"]
    ys = list(range(len(libs)))[::-1]
    for ax, m in zip(axes, models):
        rows = mem[m]["libraries"]
        peak = [rows.get(k, {}).get("extra_peak_per_param", float("nan")) for k in libs]
        held = [rows.get(k, {}).get("held_per_param", float("nan")) for k in libs]
        ax.barh(
            ys,
            peak,
            color=["tab:blue" if k in OURS else "tab:gray" for k in libs],
            height=0.7,
            label="training peak (one update included)",
        )
        ax.plot(held, ys, "kD", markersize=4, label="held tensors")
        ax.set_title(results.get("timing", {}).get(m, {}).get("label", m), fontsize=9)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("extra bytes per prunable weight", fontsize=8)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([_label(results, k) for k in libs], fontsize=7)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def plot_accuracy(results: dict, path: Path) -> bool:
    Figure, acc = _plt(), results.get("accuracy")
    if Figure is None or not acc:
        return False
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    rows = list(acc["rows"].values())
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(acc["sparsities"]))]
        vals = [r["results"][f"{s:g}"] for s in acc["sparsities"]]
        color = "tab:blue" if r["library"] == "lightning_pai" else None
        ax.bar(
            xs,
            [v["test_error_mean"] for v in vals],
            width,
            yerr=[v["test_error_std"] for v in vals],
            label=r["label"],
            capsize=2,
            color=color,
            alpha=1.0 if "ERK" in r["label"] or color is None else 0.6,
        )
    for name, ref in acc.get("reference", {}).items():
        for j, s in enumerate(acc["sparsities"]):
            v = ref.get(str(s), ref.get(s))
            if v is not None:
                ax.plot([j - 0.45, j + 0.45], [v, v], "k--", linewidth=1)
                ax.annotate(name, (j + 0.45, v), fontsize=6, ha="right", va="bottom")
    ax.set_xticks(range(len(acc["sparsities"])))
    ax.set_xticklabels([f"{100 * s:g} % sparsity" for s in acc["sparsities"]])
    ax.set_ylabel("test error % (mean ± std over seeds)")
    ax.set_title(f"RigL on LeNet-300-100 / MNIST, {acc['epochs']} epochs, same recipe and seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def plot_layer_density(results: dict, path: Path) -> bool:
    rows = results.get("timing", {}).get("resnet18", {}).get("rigl_layers")
    if _plt() is None or not rows:
        return False
    from lightning_pai.core.report import LayerSparsity, SparsityReport
    from lightning_pai.plots import plot_layer_density as plot

    report = SparsityReport([LayerSparsity(n, tuple(s), k, t) for n, s, k, t in rows])
    plot(report, path, title="lightning_pai RigL(0.9) on ResNet-18: ERK per-layer density after one update")
    return True


def plot_mnist(results_dir: Path, path: Path) -> bool:
    Figure, found = _plt(), load_mnist_results(results_dir)
    if Figure is None or not found:
        return False
    titles = {
        "pai_mnist": "pruning at initialization (pai_mnist.md)",
        "lottery_mnist": "lottery tickets (lottery_mnist.md)",
        "dst_mnist": "dynamic sparse training (dst_mnist.md)",
        "dst_mnist_dsr_movement": "DSR, movement pruning (dst_mnist_dsr_movement.md)",
    }
    names = [n for n in MNIST_FILES if n in found]
    cols = 2
    fig = Figure(figsize=(11, 4.2 * math.ceil(len(names) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False).ravel()
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        data = found[name]
        floor = 90.0
        densities = set()
        for label, pts in data["series"].items():
            if not pts:
                continue
            xs = [-math.log10(d) for d, _, _ in pts]
            ys = [max(a, floor) for _, a, _ in pts]
            (line,) = ax.plot(xs, ys, "o-", markersize=3, label=label)
            ax.errorbar(xs, ys, yerr=[s for _, _, s in pts], fmt="none", ecolor=line.get_color(), capsize=2)
            for x, (d, a, _) in zip(xs, pts):
                densities.add(d)
                if a < floor:
                    ax.annotate(f"{a:.1f}", (x, floor), fontsize=6, color=line.get_color(), va="bottom")
        for d, a, label in data["anchors"]:
            ax.plot(-math.log10(d), a, "k*", markersize=9)
            ax.annotate(label, (-math.log10(d), a), fontsize=6, xytext=(4, 4), textcoords="offset points")
        for key, style in (("dense", "-"), ("dense_paper", ":")):
            if data.get(key):
                ax.axhline(data[key], color="gray", linestyle=style, linewidth=1, label=key.replace("_", " "))
        for d, label in data.get("vlines", []):
            ax.axvline(-math.log10(d), color="black", linestyle=":", linewidth=0.8)
            if label:
                ax.annotate(label, (-math.log10(d), floor + 0.2), fontsize=6, rotation=90, va="bottom")
        ticks = sorted(densities, reverse=True)
        ax.set_xticks([-math.log10(d) for d in ticks])
        ax.set_xticklabels([f"{100 * (1 - d):.4g}" for d in ticks], fontsize=6, rotation=60)
        ax.set_xlabel("sparsity % (axis: -log10 density)", fontsize=8)
        ax.set_ylabel("test accuracy %", fontsize=8)
        ax.set_ylim(floor - 0.5, 99.2)
        ax.set_title(titles.get(name, name), fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=110)
    return True


def render(results: dict, outdir: Path = RESULTS) -> list[Path]:
    """Write ``compare.md``, the README section and every plot the data allows; returns the files written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    if results:
        (outdir / "compare.md").write_text(render_markdown(results))
        (outdir / "compare_readme_section.md").write_text(render_readme(results))
        written += [outdir / "compare.md", outdir / "compare_readme_section.md"]
    plots = {
        "compare_step_time.png": lambda p: plot_step_time(results, p),
        "compare_memory.png": lambda p: plot_memory(results, p),
        "compare_accuracy.png": lambda p: plot_accuracy(results, p),
        "compare_layer_density.png": lambda p: plot_layer_density(results, p),
        "mnist_accuracy_vs_sparsity.png": lambda p: plot_mnist(RESULTS, p),
    }
    for name, fn in plots.items():
        if fn(outdir / name):
            written.append(outdir / name)
    if _plt() is None:
        print("matplotlib is not installed: tables only (pip install matplotlib for the plots)")
    for p in written:
        print(f"wrote {p}")
    return written


# ------------------------------------------------------------------------------------------ README section
#: Which peer rows each of our rows is compared with in the generated "where we stand" sentences.
RIVALS = {
    "pai_pai": ("modelpruning", "ao_weightnorm"),
    "pai_rigl": ("rigl_torch", "sparsimony_rigl"),
}


def _overlap(a: dict, b: dict) -> bool:
    return not (a["ratio_q3"] < b["ratio_q1"] or b["ratio_q3"] < a["ratio_q1"])


def standing(results: dict) -> list[str]:
    """One sentence per (model, our method, rival): faster or slower by the median, and whether the spreads overlap."""
    timing, out = results.get("timing", {}), []
    for m in _models(timing):
        if m == "tiny":
            continue
        rows = timing[m]["libraries"]
        for ours, rivals in RIVALS.items():
            if ours not in rows:
                continue
            mine = rows[ours]
            for rival in rivals:
                if rival not in rows:
                    continue
                other = rows[rival]
                if rows[rival]["coverage"] < 0.5:
                    continue  # e.g. torch.ao on a ResNet: only `fc` is pruned, no comparison
                a, b = mine["ratio_median"], other["ratio_median"]
                verdict = "faster than" if a < b else "slower than"
                if _overlap(mine, other):
                    verdict = f"{verdict} (spreads overlap)"
                text = (
                    f"{timing[m]['label']}: {_label(results, ours)} {a:.3f} is {verdict} "
                    f"{_label(results, rival)} {b:.3f}"
                )
                am, bm = mine.get("ratio_amortized"), other.get("ratio_amortized")
                if am is not None and bm is not None:
                    text += f" (amortized with the update: {am:.3f} vs {bm:.3f})"
                out.append(text)
    return out


def _get(results: dict, section: str, model: str, key: str, field: str) -> float | None:
    try:
        return results[section][model]["libraries"][key][field]
    except (KeyError, TypeError):
        return None


def reading(results: dict) -> list[str]:
    """The interpretation: mechanisms behind the measured differences, numbers read from ``results``."""
    t = lambda m, k, f="ratio_median": _get(results, "timing", m, k, f)  # noqa: E731
    mem = lambda m, k, f: _get(results, "memory", m, k, f)  # noqa: E731
    out = []
    ours, mp = t("lenet", "pai_pai"), t("lenet", "modelpruning")
    if ours is not None and mp is not None:
        out.append(
            f"No library makes a step faster than dense: 90 % unstructured sparsity still runs dense kernels, so "
            f"every method only adds work. On the smallest model ours is not ahead: on LeNet-300-100 (a "
            f"{t('lenet', 'dense', 'median_ms'):.1f} ms step) `PruneAtInit` costs {ours:.3f}x against ModelPruning's "
            f"{mp:.3f}x: our gradient masking (an in-place multiply of every masked gradient by its uint8 mask, "
            f"+{t('lenet', 'pai_pai', 'median_ms') - t('lenet', 'dense', 'median_ms'):.2f} ms per step here, the "
            "same whether it runs inside backward or after it) costs more on this model than ModelPruning's "
            "mask multiply in the forward. On the larger models ours is level or a little faster (differences "
            "within the spread), with no second copy of the weights."
        )
    r18 = [t("resnet18", k) for k in ("pai_rigl", "rigl_torch", "sparsimony_rigl")]
    if all(x is not None for x in r18):
        u = [t("resnet18", k, "update_extra_ms") for k in ("pai_rigl", "rigl_torch", "sparsimony_rigl")]
        out.append(
            f"RigL between updates: ours {r18[0]:.3f}x on ResNet-18 against rigl-torch {r18[1]:.3f}x and sparsimony "
            f"{r18[2]:.3f}x. rigl-torch calls a Python tensor hook per weight every backward (mask multiply and "
            "schedule check); sparsimony computes every weight through a parametrization (a mask multiply in "
            "forward and its backward, a full backward hook, a new `zeros_like` dense-gradient buffer per layer "
            f"per step). The update step itself: ours +{u[0]:.0f} ms, sparsimony +{u[2]:.0f} ms (about the same; "
            "on ViT-S sparsimony's is cheaper, "
            f"{t('vit_small', 'sparsimony_rigl', 'update_extra_ms'):.0f} vs "
            f"{t('vit_small', 'pai_rigl', 'update_extra_ms'):.0f} ms), rigl-torch +{u[1]:.0f} ms: it sorts every "
            "layer fully twice (`topk(k=numel)` with int64 indices)."
        )
    peaks = {
        k: (mem("resnet18", k, "extra_setup_peak_per_param"), mem("resnet18", k, "extra_peak_per_param"))
        for k in ("pai_pai", "pai_rigl", "pai_lottery", "modelpruning", "rigl_torch", "sparsimony_rigl")
    }
    if all(v is not None for pair in peaks.values() for v in pair):
        setup, train = {k: v[0] for k, v in peaks.items()}, {k: v[1] for k, v in peaks.items()}
        leaner = [k for k in ("modelpruning", "rigl_torch", "sparsimony_rigl") if setup[k] < setup["pai_pai"]]
        out.append(
            "Memory held: 1 byte per weight for our static methods (a bool mask), 2 for our DST methods (mask "
            "and the ITOP set of weights ever active), 5 for `LotteryTicket` (its rewind copy of the weights, "
            "kept on the CPU). rigl-torch also holds 1 byte (no ITOP tracking), less than our DST; ModelPruning "
            "8 (a float mask and the recomputed weight beside `weight_orig`), sparsimony's RigL 8 (float mask "
            "and dense-gradient buffer). Peaks on ResNet-18: pruning at init by global magnitude peaks at "
            f"{setup['pai_pai']:.1f} bytes per weight (the float scores |w| of every layer and the masks; the "
            "global threshold is found by bisection layer by layer, without concatenating the scores), against "
            f"ModelPruning's {setup['modelpruning']:.1f}, rigl-torch's {setup['rigl_torch']:.1f} and sparsimony's "
            f"{setup['sparsimony_rigl']:.1f}"
            + (
                f" ({', '.join(_label(results, k) for k in leaner)} lower: random per-layer initial masks, no scores)"
                if leaner
                else ""
            )
            + f"; our RigL update step peaks at {train['pai_rigl']:.1f} bytes per weight (a copy of the dense "
            f"gradients and the scores), sparsimony's at {train['sparsimony_rigl']:.1f}, rigl-torch's at "
            f"{train['rigl_torch']:.1f}; the lottery round boundary at {train['pai_lottery']:.1f} (scores plus "
            "restoring the rewind point)."
        )
    corr = (results.get("correctness") or {}).get("rows", {})
    if corr:
        bad = [
            f"{r['library']} {r['method']}"
            for r in corr.values()
            if r.get("ddp_mask_diff", 1) != 0 or r.get("resume_mask_diff", 1) != 0 or r.get("leaks", 1) != 0
        ]
        out.append(
            "Correctness: every row keeps its masked weights exactly zero in the forward pass (the reparametrising "
            "libraries keep a dense copy of every masked weight, still nonzero and decaying). Rows failing (a) or "
            f"(b): {', '.join(bad) if bad else 'none'}. ModelPruning with its defaults resets the surviving weights "
            "to copies taken in `setup`, on each rank before DDP synchronises them, so the ranks diverge after the "
            "first pruning; its checkpoints are saved with the pruning made permanent, so a resumed fit re-prunes "
            "(and resets to the fresh model's init). sparsimony's `state_dict()` has no step count: a resumed "
            "RigL restarts its schedule at 0 and updates at other steps; its SET keeps the masks out of the "
            "model's `state_dict` (torch.ao's `FakeSparsity`) and its own state has none, and its `_step` counts "
            "every call twice, so with an even `delta_t` SET never changes the topology (odd: an assertion fails)."
        )
    acc = (results.get("accuracy") or {}).get("rows", {})
    if {"pai_rigl_erk", "sparsimony_rigl"} <= set(acc):
        a, b = (acc[k]["results"]["0.98"] for k in ("pai_rigl_erk", "sparsimony_rigl"))
        ahead = b["test_error_mean"] + max(a["test_error_std"], b["test_error_std"]) < a["test_error_mean"]
        out.append(
            f"Accuracy: at 90 % all four runs are within ~0.1 point. At 98 % sparsimony's RigL (ERK, "
            f"{b['test_error_mean']:.2f} ± {b['test_error_std']:.2f} %) is "
            + ("ahead of ours (" if ahead else "level with ours (")
            + f"{a['test_error_mean']:.2f} ± {a['test_error_std']:.2f} %) with the same per-layer budgets. Its first "
            "update grows by the dense gradient summed over the first 100 steps (its buffer accumulates from step "
            "1), ours by that step's gradient as in the paper; a one-off run of sparsimony with the accumulation "
            "switched off gave 2.36 ± 0.16 % (3 seeds, not part of the script). rigl-torch supports uniform budgets "
            "only and is compared with our uniform row."
        )
    return out


def render_readme(results: dict) -> str:
    """The README's "Side by side with the alternatives" section (tables, plots, the honest reading)."""
    timing, mem, corr, acc = (results.get(k) for k in ("timing", "memory", "correctness", "accuracy"))
    env = results.get("env", {})
    v = env.get("versions", {})
    lines = [
        "## Side by side with the alternatives",
        "",
        "`python benchmarks/compare.py` (about 25 minutes on 2 CPU cores; `--quick` for a smoke run, `--models`, "
        "`--libraries`, `--sections` to subset, `--plots-only` to redraw) trains the same models through "
        f"lightning_pai and through Lightning's `ModelPruning` (pytorch-lightning {v.get('pytorch-lightning')}), "
        f"rigl-torch {v.get('rigl-torch')}, sparsimony {v.get('sparsimony')} and `torch.ao.pruning."
        f"WeightNormSparsifier` (torch {v.get('torch')}), each through its own per-step API, in one process, "
        "interleaved step by step. Results: [`benchmarks/results/compare.md`](benchmarks/results/compare.md) "
        "(and `compare.json`); the peers are installed with `pip install lightning-pai[bench]`.",
        "",
    ]
    if timing:
        models = [m for m in _models(timing) if m != "tiny"]
        libs = [k for k in _libs({k for m in models for k in timing[m]["libraries"]}) if k != "dense"]
        lines += [
            f"**Training-step time, ratio to dense** at 90 % sparsity ({env.get('device')}, "
            f"{env.get('threads')} threads; median of per-step ratios; for methods that change the masks, "
            "`/` the ratio with one update every 100 steps amortized):",
            "",
            "| library | " + " | ".join(timing[m]["label"] for m in models) + " |",
            "|---|" + "---|" * len(models),
        ]
        lines += _ratio_rows(results, timing, models, libs, _short_cell)
        lines += ["", "![step time ratios](benchmarks/results/compare_step_time.png)", ""]
    if mem:
        models = _models(mem)
        libs = [k for k in _libs({k for m in models for k in mem[m]["libraries"]}) if k != "dense"]
        labels = {m: (timing or {}).get(m, {}).get("label", m) for m in models}
        lines += [
            "**Extra memory per prunable weight** (bytes; training peak over dense / peak during the set-up / "
            "tensors the library holds):",
            "",
            "| library | " + " | ".join(labels[m] for m in models) + " |",
            "|---|" + "---|" * len(models),
        ]
        for k in libs:
            cells = []
            for m in models:
                r = mem[m]["libraries"].get(k)
                if r is None:
                    cells.append("")
                else:
                    setup = r.get("extra_setup_peak_per_param")
                    cells.append(f"{r['extra_peak_per_param']:.1f} / {_f(setup, '.1f')} / {r['held_per_param']:.1f}")
            lines.append(f"| {_label(results, k)} | " + " | ".join(cells) + " |")
        lines += ["", "![memory per weight](benchmarks/results/compare_memory.png)", ""]
    if corr:
        lines += [
            f"**Correctness** on {corr['model']} (the checks our suite makes, run on every library; details in "
            "`compare.md`): (a) masks equal on 2 DDP ranks that start from different seeds, (b) a resumed run "
            "reproduces the uninterrupted run's masks, (c) masked weights exactly 0 after SGD with momentum and "
            "weight decay, (d) the masks change when the method says they should.",
            "",
            "| library | method | (a) DDP | (b) resume | (c) exact zeros | (d) masks changed at steps |",
            "|---|---|---|---|---|---|",
        ]
        for r in corr["rows"].values():
            a = "error" if "ddp_error" in r else f"{r['ddp_mask_diff'] == 0} ({r['ddp_mask_diff']:,} differ)"
            b = "error" if "resume_error" in r else f"{r['resume_mask_diff'] == 0} ({r['resume_mask_diff']:,} differ)"
            c = f"{r['leaks'] == 0} ({r['leaks']} leak)"
            if r.get("stored_nonzero_masked"):
                c += "; dense copy kept"
            d = ", ".join(map(str, r.get("mask_changes", []))) or ("never" if r.get("dynamic") else "– (prunes once)")
            lines.append(f"| {r['library']} | {r['method']} | {a} | {b} | {c} | {d} |")
        lines.append("")
    if acc:
        sps = acc["sparsities"]
        lines += [
            f"**RigL on LeNet-300-100 / MNIST** through each library, same recipe and seeds ({acc['epochs']} epochs, "
            f"seeds {acc['seeds']}; {acc['recipe']}), test error %:",
            "",
            "| library | " + " | ".join(f"{100 * s:g} %" for s in sps) + " | leaking weights |",
            "|---|" + "---|" * len(sps) + "---|",
        ]
        for r in acc["rows"].values():
            res = [r["results"][f"{s:g}"] for s in sps]
            cells = [f"{x['test_error_mean']:.2f} ± {x['test_error_std']:.2f}" for x in res]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {max(x['leaks'] for x in res)} |")
        lines += ["", "![RigL accuracy](benchmarks/results/compare_accuracy.png)", ""]
    sentences = standing(results)
    if sentences:
        lines += ["**Where we stand on time** (spread = interquartile range of the per-step ratios):", ""]
        lines += [f"- {s}" for s in sentences]
        lines.append("")
    notes = reading(results)
    if notes:
        lines += ["**Reading the numbers, including where we are not ahead:**", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "Accuracy against sparsity for every MNIST benchmark in `benchmarks/results` (papers' numbers as stars):",
        "",
        "![MNIST accuracy vs sparsity](benchmarks/results/mnist_accuracy_vs_sparsity.png)",
        "",
        "Per-layer density of `RigL(0.9)`'s ERK masks on ResNet-18 (`lightning_pai.plots.plot_layer_density`):",
        "",
        "![layer density](benchmarks/results/compare_layer_density.png)",
        "",
    ]
    return "\n".join(lines)
