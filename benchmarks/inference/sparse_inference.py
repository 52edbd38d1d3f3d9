"""Sparse inference on the CPU: end-to-end latency of a dense model against its to_sparse_inference copy.

One process, 2 intra-op threads (``torch.set_num_threads(2)``). For each model, sparsity and batch size, the
masked dense model and two sparse copies run interleaved (dense, auto, forced, dense, ...; the order rotates
each repeat) under ``torch.inference_mode``:

- ``auto``: ``to_sparse_inference(model, masks, example_inputs=x)``: each layer gets the fastest of the dense
  layer, the compiled CSR kernel and ``torch.sparse``, measured on this machine at conversion time at the layer's
  own input size (the *auto layers* column counts the converted layers by kernel);
- ``forced``: ``crossover=1.0``, every supported layer sparse (what the sparse kernels alone give).

The reported ratio is ``median(dense) / median(sparse)`` (> 1: sparse is faster). Masks: magnitude top-k per
layer at the same sparsity for every layer (``distribution="uniform"``) over the default targets (every
``nn.Linear`` / ``nn.Conv*`` weight), computed here on freshly initialized weights.

Models: LeNet-300-100 (784-300-100-10 MLP), a transformer MLP stack (4 blocks of Linear(256, 1024) -> GELU ->
Linear(1024, 256), residual and LayerNorm; inputs of ``batch x 64`` tokens) and torchvision's ResNet-18
(224x224: every conv by direct sparse convolution, ``fc`` by the CSR kernel; BatchNorm, ReLU, max-pooling and
the residual adds stay as they are, and take the same time in both models).

The sparse kernels are the compiled ones of ``lightning_pai.core.kernels`` when a C compiler is present (the
``kernels`` field of the results says which were used); set ``LIGHTNING_PAI_NO_CKERNELS=1`` to measure
PyTorch's own CSR kernels instead.

It also writes checkpoint sizes: ``save_sparse`` against ``torch.save(model.state_dict())`` for LeNet-300-100
and ResNet-18 (expected about ``4 (1 - s) + 0.125`` bytes per masked float32 weight).

Usage::

    python benchmarks/inference/sparse_inference.py  # the results file (~10 min alone on 2 cores, 30 with retries)
    python benchmarks/inference/sparse_inference.py --quick  # smoke run, results not written
    python benchmarks/inference/sparse_inference.py --allocator steady  # results_steady: see STEADY_MALLOC
    python benchmarks/inference/sparse_inference.py --runs 5  # and 4 more fresh processes: min / median / max per row

``--isa avx2`` measures, on an AVX-512 machine, what a CPU without AVX-512 gets: the compiled kernels built for
AVX2 + FMA (``LIGHTNING_PAI_KERNEL_ISA=avx2``) and PyTorch's dense kernels limited to AVX2 (``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``); ``--isa avx512`` builds the kernels for AVX-512 (and fails over
to native with a warning where the CPU lacks it). The results name the CPU, its SIMD flags, how the kernels were
built and the instruction set PyTorch's kernels used.

With glibc's default settings every large tensor is a fresh ``mmap`` and freed memory may be returned to the
system, so a forward pass pays page faults whose count depends on the process's allocation history: the same
row can differ by 2x between runs (both the dense and the sparse model pay them; the sparse one, doing less
arithmetic, feels them more). ``--allocator steady`` removes that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_pai.core.masks import compute_masks
from lightning_pai.core.targets import select_targets
from lightning_pai.deploy import (
    clear_crossover_cache,
    conversion_report,
    make_permanent,
    save_sparse,
    to_sparse_inference,
)
from lightning_pai.deploy import kernels as ckernels

RESULTS = Path(__file__).resolve().parent / "results"
#: ``--allocator steady``: glibc keeps freed blocks for reuse instead of returning them to the system (no
#: ``mmap`` per large tensor, no trimming), so repeated calls stop paying page faults for fresh memory, as
#: with the caching allocators (jemalloc, tcmalloc) PyTorch's CPU performance guide recommends.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967295", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
#: ``--isa``: the environment of a process that runs as a CPU with that instruction set would (set before torch
#: and MKL load, so the script runs itself again with it).
ISA_ENV = {
    "native": {},
    "avx2": {
        "LIGHTNING_PAI_KERNEL_ISA": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "avx512": {"LIGHTNING_PAI_KERNEL_ISA": "avx512"},
}
#: CPU flags worth naming next to a timing (vector instruction sets).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx_vnni", "amx_tile")
SEQ = 64
warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


def lenet() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class Block(nn.Module):
    def __init__(self, d: int = 256, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


def mlp_stack() -> nn.Module:
    return nn.Sequential(*[Block() for _ in range(4)])


def resnet18() -> nn.Module:
    return torchvision.models.resnet18()


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], Callable[[int], int]]] = {
    # name: (factory, input for a batch size, matmul rows per call for a batch size)
    "lenet-300-100": (lenet, lambda b: torch.randn(b, 784), lambda b: b),
    "transformer-mlp": (mlp_stack, lambda b: torch.randn(b, SEQ, 256), lambda b: b * SEQ),
    "resnet18": (resnet18, lambda b: torch.randn(b, 3, 224, 224), lambda b: b),
}


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    targets = select_targets(model)
    return compute_masks({n: p.detach().abs() for n, p in targets.items()}, sparsity, "uniform")


def interleaved(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, list]:
    """Seconds per call of each model, calls interleaved (the order rotates every repeat)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for r in range(repeats):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                models[k](x)
                times[k].append(time.perf_counter() - start)
    return times


def repeats_for(model: str, batch: int, scale: float) -> int:
    base = {"lenet-300-100": 400, "transformer-mlp": 60 if batch == 1 else 12, "resnet18": 40 if batch == 1 else 5}
    return max(3, int(base[model] * scale))


class ForeignLoad:
    """Fraction of the machine's CPU time that *other* processes used while the block ran (Linux ``/proc/stat``).

    ``(busy jiffies of all CPUs / HZ - this process's CPU time) / (wall time x CPUs)``; ``nan`` elsewhere.
    """

    def __init__(self) -> None:
        self.fraction = float("nan")

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ForeignLoad:
        self._start = (self._busy(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._busy(), sum(os.times()[:2]), time.perf_counter()
        if busy0 is not None and busy1 is not None and wall1 > wall0:
            foreign = (busy1 - busy0) - (own1 - own0)
            self.fraction = max(0.0, foreign / ((wall1 - wall0) * (os.cpu_count() or 1)))


def wait_until_quiet(limit: float, seconds: int = 3, timeout: float = 900.0) -> float:
    """Block until other processes use under ``limit`` of the CPUs for ``seconds`` consecutive seconds."""
    start, quiet = time.time(), 0
    while quiet < seconds and time.time() - start < timeout:
        with ForeignLoad() as load:
            time.sleep(1.0)
        quiet = quiet + 1 if not load.fraction > limit else 0
    return time.time() - start


def measure(name: str, sparsity: float, batch: int, scale: float) -> dict:
    factory, make_input, rows_for = MODELS[name]
    torch.manual_seed(0)
    base = factory().eval()
    masks = magnitude_masks(base, sparsity)
    dense = make_permanent(base, masks)
    clear_crossover_cache()  # measured afresh (and in the same conditions as the timings) on every try
    start = time.perf_counter()
    x = make_input(batch)
    auto = to_sparse_inference(dense, masks, example_inputs=x)
    convert_s = time.perf_counter() - start
    forced = to_sparse_inference(dense, masks, crossover=1.0, batch_size=rows_for(batch), example_inputs=x)
    with torch.inference_mode():
        ref = dense(x)
        err = max(float((m(x) - ref).abs().max()) for m in (auto, forced))
    times = interleaved({"dense": dense, "auto": auto, "forced": forced}, x, repeats_for(name, batch, scale))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "sparsity": sparsity,
        "batch": batch,
        "dense_ms": med["dense"] * 1e3,
        "auto_ms": med["auto"] * 1e3,
        "forced_ms": med["forced"] * 1e3,
        "ratio_auto": med["dense"] / med["auto"],
        "ratio_forced": med["dense"] / med["forced"],
        "auto_converted": conversion_report(auto).converted,
        "auto_kernels": dict(
            Counter(r.implementation.split("/")[-1].split("+")[0] for r in conversion_report(auto).rows if r.converted)
        ),
        "forced_converted": len(conversion_report(forced).converted),
        "considered": len(conversion_report(forced).rows),
        "convert_s": convert_s,
        "repeats": len(times["dense"]),
        "max_abs_err": err,
    }


def latency(
    models: list[str], sparsities: list[float], batches: list[int], scale: float, max_foreign: float, tries: int
) -> list[dict]:
    """One row per (model, sparsity, batch); a try during which other processes used more than ``max_foreign``
    of the CPUs is repeated (up to ``tries`` times; the least disturbed try is kept)."""
    rows = []
    for name in models:
        for sparsity in sparsities:
            for batch in batches:
                best = None
                for attempt in range(1, tries + 1):
                    waited = wait_until_quiet(max_foreign) if max_foreign < 1 else 0.0
                    with ForeignLoad() as load:
                        row = measure(name, sparsity, batch, scale)
                    row.update(foreign_load=load.fraction, tries=attempt, waited_s=waited)
                    if best is None or not row["foreign_load"] >= best["foreign_load"]:
                        best = row
                    if not load.fraction > max_foreign:
                        break
                    print(f"  (other processes used {load.fraction:.0%} of the CPUs: measuring again)", flush=True)
                rows.append(best)
                print(
                    f"{name:16s} s={sparsity:.2f} b={batch:3d}  dense {best['dense_ms']:9.3f} ms  "
                    f"auto {best['auto_ms']:9.3f} ms (x{best['ratio_auto']:.2f}, {len(best['auto_converted'])})  "
                    f"forced {best['forced_ms']:9.3f} ms (x{best['ratio_forced']:.2f}, {best['forced_converted']})  "
                    f"err {best['max_abs_err']:.1e}  foreign load {best['foreign_load']:.1%}",
                    flush=True,
                )
    return rows


def file_sizes(sparsities: list[float]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lenet-300-100", "resnet18"):
            for sparsity in sparsities:
                torch.manual_seed(0)
                base = MODELS[name][0]()
                masks = magnitude_masks(base, sparsity)
                model = make_permanent(base, masks)
                dense_path, sparse_path = Path(tmp, "dense.pt"), Path(tmp, "sparse.pt")
                torch.save(model.state_dict(), dense_path)
                save_sparse(model, sparse_path, masks)
                masked = sum(m.numel() for m in masks.values())
                kept = sum(int(m.sum()) for m in masks.values())
                other = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in masks)
                sparse_bytes, dense_bytes = sparse_path.stat().st_size, dense_path.stat().st_size
                row = {
                    "model": name,
                    "sparsity": sparsity,
                    "dense_bytes": dense_bytes,
                    "sparse_bytes": sparse_bytes,
                    "ratio": sparse_bytes / dense_bytes,
                    "masked_weights": masked,
                    "bytes_per_masked_weight": (sparse_bytes - other) / masked,
                    "expected_bytes_per_masked_weight": 4 * kept / masked + 0.125,
                }
                rows.append(row)
                print(
                    f"{name:14s} s={sparsity:.2f}  dense {dense_bytes / 1e6:8.3f} MB  "
                    f"sparse {sparse_bytes / 1e6:7.3f} MB  "
                    f"ratio {row['ratio']:.4f}  {row['bytes_per_masked_weight']:.4f} B/weight "
                    f"(expected {row['expected_bytes_per_masked_weight']:.4f})",
                    flush=True,
                )
    return rows


ALLOCATORS = {
    "default": "glibc defaults",
    "steady": "glibc keeping freed memory (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` = 2^32 - 1)",
}


def markdown(lat: list[dict], sizes: list[dict], meta: dict) -> str:
    out = [
        "# Sparse inference on the CPU",
        "",
        f"`python benchmarks/inference/sparse_inference.py {' '.join(meta['argv'])}`: {meta['cpu']}, "
        f"{meta['threads']} threads, torch {meta['torch']} (its CPU kernels: {meta.get('torch_isa', '?')}"
        + "".join(f", {k}={v}" for k, v in meta.get("isa_env", {}).items())
        + f"), sparse kernels: {meta['kernels']}, allocator: "
        f"{ALLOCATORS[meta['allocator']]}; load average "
        f"{meta['load_before']:.2f} before, {meta['load_after']:.2f} after; {meta['minutes']:.1f} min.",
        "",
        "Ratio = median dense latency / median sparse latency over interleaved repeats (> 1: sparse faster). "
        "*auto*: each layer gets the fastest of dense, the compiled kernel (c) and torch.sparse (sum/mm), measured "
        "at conversion; *forced*: `crossover=1.0`, every "
        "supported layer sparse. Masks: uniform magnitude top-k per layer (every conv and linear weight). "
        "*other load*: share of the CPUs other processes used during the row's measurement (rows above "
        f"{meta['max_foreign']:.0%} were measured again, up to {meta['tries']} tries).",
        "",
        "| model | sparsity | batch | dense ms | auto ms | auto ratio | auto layers | forced ms | forced ratio | "
        "forced layers | max abs err | other load | tries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lat:
        out.append(
            f"| {r['model']} | {r['sparsity']:.2f} | {r['batch']} | {r['dense_ms']:.3f} | {r['auto_ms']:.3f} | "
            f"**{r['ratio_auto']:.2f}** | {len(r['auto_converted'])}/{r['considered']}"
            f"{''.join(f' {k} {v}' for k, v in r.get('auto_kernels', {}).items())} | {r['forced_ms']:.3f} | "
            f"{r['ratio_forced']:.2f} | {r['forced_converted']}/{r['considered']} | {r['max_abs_err']:.1e} | "
            f"{r['foreign_load']:.1%} | {r['tries']} |"
        )
    out += [
        "",
        "## Checkpoint sizes",
        "",
        "`save_sparse(model, path, masks)` against `torch.save(model.state_dict(), path)`; bytes per masked weight "
        "= (sparse file - other tensors) / masked weights; expected 4 x density + 0.125.",
        "",
        "| model | sparsity | dense bytes | sparse bytes | ratio | bytes / masked weight | expected |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sizes:
        out.append(
            f"| {r['model']} | {r['sparsity']:.2f} | {r['dense_bytes']} | {r['sparse_bytes']} | {r['ratio']:.4f} | "
            f"{r['bytes_per_masked_weight']:.4f} | {r['expected_bytes_per_masked_weight']:.4f} |"
        )
    return "\n".join(out) + "\n"


def cpu_description() -> str:
    """The CPU's model name and its vector instruction sets (Linux ``/proc/cpuinfo``; the platform elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in SIMD_FLAGS if f in flags]
    return f"{model} ({os.cpu_count()} CPUs; {' '.join(simd) or 'no x86 SIMD flags'})"


def fresh_process_run(args: argparse.Namespace, index: int) -> list[dict]:
    """The latency rows measured again by a new process of this script (same options)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "latency.json")
        command = [sys.executable, __file__, "--models", *args.models, "--sparsities", *map(str, args.sparsities)]
        command += ["--batches", *map(str, args.batches), "--repeat-scale", str(args.repeat_scale)]
        command += ["--max-foreign", str(args.max_foreign), "--tries", str(args.tries), "--allocator", args.allocator]
        command += ["--threads", str(args.threads), "--isa", args.isa]
        print(f"run {index + 1} of {args.runs}, in a new process", flush=True)
        subprocess.run([*command, "--latency-json", str(out)], check=True)
        return json.loads(out.read_text())


def across_runs(runs: list[list[dict]]) -> str:
    """Markdown: each row's auto ratio over the runs (min / median / max, and every value)."""
    out = [
        "",
        f"## Across {len(runs)} runs",
        "",
        "The auto ratio of each row in every run (each in a fresh process: the allocator's history differs).",
        "",
        "| model | sparsity | batch | min | median | max | runs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in runs[0]:
        key = (row["model"], row["sparsity"], row["batch"])
        values = [r["ratio_auto"] for run in runs for r in run if (r["model"], r["sparsity"], r["batch"]) == key]
        out.append(
            f"| {key[0]} | {key[1]:.2f} | {key[2]} | {min(values):.2f} | {statistics.median(values):.2f} | "
            f"{max(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeat-scale", type=float, default=1.0, help="multiplies every model's repeat count")
    parser.add_argument("--quick", action="store_true", help="few repeats, LeNet and the MLP stack; nothing written")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--max-foreign", type=float, default=0.05,
        help="wait for, and re-measure unless, other processes use under this fraction of the CPUs (1: never)",
    )  # fmt: skip
    parser.add_argument("--tries", type=int, default=6, help="measurements per row at most (see --max-foreign)")
    parser.add_argument(
        "--allocator", choices=["default", "steady"], default="default",
        help="steady: rerun under glibc settings that keep freed memory for reuse (results_steady files)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=1,
        help="also measure the latency rows in this many more fresh processes (allocator histories differ) and "
        "add min / median / max across runs",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch.set_num_threads)")
    parser.add_argument(
        "--isa", choices=list(ISA_ENV), default="native",
        help="avx2: run as a CPU without AVX-512 would (kernels built for AVX2, PyTorch limited to AVX2); results "
        "get the suffix _<isa> (and _<threads>t for other than 2 threads)",
    )  # fmt: skip
    parser.add_argument("--latency-json", help=argparse.SUPPRESS)  # a --runs child: write its rows here, only them
    args = parser.parse_args()
    env = {**(STEADY_MALLOC if args.allocator == "steady" else {}), **ISA_ENV[args.isa]}
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    if args.quick:
        args.models, args.repeat_scale, args.no_write = ["lenet-300-100", "transformer-mlp"], 0.1, True
    torch.set_num_threads(args.threads)
    start, load_before = time.time(), os.getloadavg()[0]
    lat = latency(args.models, args.sparsities, args.batches, args.repeat_scale, args.max_foreign, args.tries)
    if args.latency_json:
        Path(args.latency_json).write_text(json.dumps(lat))
        return
    runs = [lat] + [fresh_process_run(args, i) for i in range(1, args.runs)]
    sizes = file_sizes(args.sparsities)
    meta = {
        "argv": sys.argv[1:],
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "minutes": (time.time() - start) / 60,
        "max_foreign": args.max_foreign,
        "tries": args.tries,
        "kernels": f"compiled: {ckernels.build_info()}" if ckernels.available() else "torch.sparse",
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV["avx2"] if k in os.environ},
        "allocator": args.allocator,
    }
    text = markdown(lat, sizes, meta) + (across_runs(runs) if len(runs) > 1 else "")
    print()
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        stem = "sparse_inference" + ("_steady" if args.allocator == "steady" else "")
        stem += ("" if args.isa == "native" else f"_{args.isa}") + ("" if args.threads == 2 else f"_{args.threads}t")
        (RESULTS / f"{stem}.md").write_text(text)
        payload = {"meta": meta, "latency": lat, "file_sizes": sizes, "runs": runs}
        (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {RESULTS / stem}.md and .json")


if __name__ == "__main__":
    main()
