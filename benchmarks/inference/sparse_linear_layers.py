"""Sparse matmul layer by layer: dense ``F.linear`` against ``SparseLinear`` with each kernel, on the linear shapes
of ``sparse_inference.py``.

For every linear layer of LeNet-300-100 and the transformer MLP stack at batch 64 (and ResNet-18's ``fc``): the
dense layer, ``SparseLinear(kernel="c")`` (the compiled CSR kernel) and ``SparseLinear(kernel="sum")``
(``torch.sparse.mm``, what ``to_sparse_inference`` uses without the compiled kernels) run interleaved on the same
row-major input (each sparse layer transposing it its own way), with the same random mask at each sparsity.
Reported: the median and lower quartile of each, and ``c`` against ``dense`` and ``sum`` (> 1: ``c`` faster).
Medians of interleaved calls, so a load that comes and goes hits every candidate alike.

Usage::

    python benchmarks/inference/sparse_linear_layers.py  # writes results/sparse_linear_layers.md
    python benchmarks/inference/sparse_linear_layers.py --isa avx2  # as a CPU without AVX-512: ..._avx2.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_pai.deploy import SparseLinear
from lightning_pai.deploy import kernels as ckernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_inference import ISA_ENV, ForeignLoad, cpu_description, wait_until_quiet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: (model, layer, out features, in features, rows at batch 64, input layout in the converted model: "rows" =
#: row-major, "chained" = the transposed view a converted layer (or TransposedLayerNorm) before it returns)
SHAPES = [
    ("lenet-300-100", "0", 300, 784, 64, "rows"),
    ("lenet-300-100", "2", 100, 300, 64, "chained"),
    ("lenet-300-100", "4", 10, 100, 64, "chained"),
    ("transformer-mlp", "0.fc1", 1024, 256, 64 * 64, "rows"),
    ("transformer-mlp", "1.fc1", 1024, 256, 64 * 64, "chained"),
    ("transformer-mlp", "fc2", 256, 1024, 64 * 64, "chained"),
    ("resnet18", "fc", 1000, 512, 64, "rows"),
]
warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for fn in calls.values():
        fn()
        fn()
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="time per shape and sparsity, about")
    parser.add_argument("--isa", choices=list(ISA_ENV), default="native", help="as in sparse_inference.py")
    parser.add_argument(
        "--max-foreign", type=float, default=0.1,
        help="before each row, wait (up to 15 min) for other processes to use under this share of the CPUs (1: never)",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    env = ISA_ENV[args.isa]
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    if not ckernels.available():
        raise SystemExit("this compares the compiled kernels (a C compiler) with torch.sparse; none is usable here.")
    torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.time()
    rows = []
    for model, name, out, inp, n, layout in SHAPES:
        gen = torch.Generator().manual_seed(0)
        w, b = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
        x = torch.randn(n, inp, generator=gen)
        if layout == "chained":
            x = x.t().contiguous().t()  # the dense layer gets the same view
        for sparsity in args.sparsities:
            mask = torch.rand(out, inp, generator=gen) >= sparsity
            layers = {k: SparseLinear(w, b, mask, kernel=k, contiguous_outputs=False) for k in ("c", "sum")}
            wd = w * mask
            calls = {"dense": lambda x=x, wd=wd, b=b: F.linear(x, wd, b)}
            calls |= {k: (lambda m=m, x=x: m(x)) for k, m in layers.items()}
            if args.max_foreign < 1:
                wait_until_quiet(args.max_foreign)
            with torch.inference_mode(), ForeignLoad() as load:
                err = max(float((m(x) - F.linear(x, wd, b)).abs().max()) for m in layers.values())
                first = time.perf_counter()
                for fn in calls.values():
                    fn()
                once = time.perf_counter() - first
                times = interleaved(calls, max(5, min(400, int(args.seconds / max(once, 1e-6)))))
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: statistics.quantiles(v, n=4)[0] for k, v in times.items()}
            row = dict(model=model, layer=name, shape=(out, inp), rows=n, layout=layout, sparsity=sparsity)
            row.update(median=med, q1=low)
            row.update(repeats=len(times["dense"]), err=err, foreign=load.fraction)
            rows.append(row)
            print(
                f"{model:16s} {name:5s} {out}x{inp} {n:5d} {layout:7s} s={sparsity:.2f}: "
                f"dense {med['dense'] * 1e3:8.3f} ms  "
                f"c {med['c'] * 1e3:8.3f} ms  sum {med['sum'] * 1e3:8.3f} ms  dense/c {med['dense'] / med['c']:6.2f}  "
                f"sum/c {med['sum'] / med['c']:5.2f}  err {err:.1e}  foreign load {load.fraction:.0%}",
                flush=True,
            )
    out = [
        "# Sparse matmul layers: dense against the compiled kernel (c) and torch.sparse (sum)",
        "",
        f"`python benchmarks/inference/sparse_linear_layers.py {' '.join(sys.argv[1:])}`: {cpu_description()}, "
        f"{args.threads} threads, torch {torch.__version__} (its CPU kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}"
        + "".join(f", {k}={os.environ[k]}" for k in ISA_ENV["avx2"] if k in os.environ)
        + f"), compiled kernels: {ckernels.build_info()}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {(time.time() - start) / 60:.1f} min.",
        "",
        "Median (lower quartile) ms per call over interleaved repeats, on the input layout the layer gets in the "
        "converted model (*rows*: row-major `(rows, in)`, each sparse layer transposing it its own way; *chained*: "
        "the transposed view a converted layer before it returns, for the dense layer too). `dense/c`, `sum/c`: "
        "ratios of medians (> 1: the compiled kernel faster). *other load*: share of the CPUs other processes used "
        f"while the row was measured (each row waits for under {args.max_foreign:.0%} first, up to 15 min).",
        "",
        "| model | layer | out x in | rows | input | sparsity | dense ms | c ms | sum ms | dense/c | sum/c "
        "| max abs err | other load |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        med, low = r["median"], r["q1"]
        cells = " | ".join(f"{med[k] * 1e3:.3f} ({low[k] * 1e3:.3f})" for k in ("dense", "c", "sum"))
        out.append(
            f"| {r['model']} | {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['layout']} | "
            f"{r['sparsity']:.2f} | "
            f"{cells} | {med['dense'] / med['c']:.2f} | {med['sum'] / med['c']:.2f} | {r['err']:.1e} | "
            f"{r['foreign']:.0%} |"
        )
    text = "\n".join(out) + "\n"
    print()
    print(text)
    if not args.no_write:
        stem = "sparse_linear_layers" + ("" if args.isa == "native" else f"_{args.isa}")
        path = RESULTS / (stem + ("" if args.threads == 2 else f"_{args.threads}t") + ".md")
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
