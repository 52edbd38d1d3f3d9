"""Plots of ``compare.json`` and of the MNIST result files, and :func:`render`, which writes every table and plot.

``render(results, outdir)`` writes ``compare.md`` (:mod:`compare_tables`), ``compare_readme_section.md``
(:mod:`compare_readme`) and, when matplotlib is installed, ``compare_step_time.png``, ``compare_memory.png``,
``compare_accuracy.png``, ``compare_layer_density.png`` and ``mnist_accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from compare_readme import render_readme
from compare_tables import MNIST_FILES, MNIST_RESULTS, OURS, _label, _libs, _models, load_mnist_results, render_markdown

RESULTS = Path(__file__).resolve().parent / "results"


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
        "mnist_accuracy_vs_sparsity.png": lambda p: plot_mnist(MNIST_RESULTS, p),
    }
    for name, fn in plots.items():
        if fn(outdir / name):
            written.append(outdir / name)
    if _plt() is None:
        print("matplotlib is not installed: tables only (pip install matplotlib for the plots)")
    for p in written:
        print(f"wrote {p}")
    return written
