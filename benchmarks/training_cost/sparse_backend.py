"""Step time of truly sparse training (``backend="sparse"``) against dense training: MLPs on the CPU, one process.

For LeNet-300-100 (784-300-100-10) and a wide MLP (784-4096-4096-10, default) at 90 / 95 / 98 / 99 % sparsity, five
models train on the same synthetic MNIST-shaped batches (batch 128, SGD with momentum 0.9 and weight decay 5e-4):
dense (no method), SET and RigL with ``backend="masked"``, and SET and RigL with ``backend="sparse"`` (Liu, Mocanu
et al. 2020), each in its own plain loop (``Sparsifier``; every layer targeted, the methods' default ER / ERK
distributions). Steps are interleaved in blocks: every round runs ``--block`` consecutive steps of each model (10
for LeNet-sized models, ``--wide-block`` 2 for wide ones), in an order rotated per round, so each ratio compares
steps taken seconds apart under the same machine load, each in the steady state a training run is in. (With
``--block 1`` every step follows another model's step and pays for refilling the caches and waking the thread
pool: on LeNet-300-100 that costs the sparse step about twice what it costs the dense one, a switching cost a
real run, which steps one model, never pays.) For LeNet-sized MLPs each model is timed in its own rounds beside a
dense twin (the same dense model, rebuilt), so that no third model's data evicts theirs between blocks
(``--no-pairs``: all models in the same rounds, as for the wide MLPs). A step is ``zero_grad``, forward,
cross-entropy, backward and ``sparsifier.step()`` (the optimizer step and the method's work), or
``optimizer.step()`` for the dense model.

The methods update every ``--delta-t`` steps (100, the papers' interval; ``--wide-delta-t`` 20 for the wide MLPs, so
that their shorter runs time updates too; with updates every 10 steps the steps right after one pay for the rebuilt
structures' cold caches, and LeNet-300-100's sparse SET step at 98 % measured 0.52 of dense instead of 0.42);
reported per model and sparsity:

- ``step``: median over rounds of (the model's median step in its block / dense's in the same round), updates
  apart;
- ``min``: the fastest step without an update over the fastest dense step (what an idle machine would show);
- ``update``: the median update step over the median dense step (RigL: dense gradient on that step only, drop,
  growth, CSR rebuild and optimizer-state remap; SET: no dense gradient);
- ``ΔT=100``: the cost amortized over the paper's update interval, ``(99 * step + update) / 100``.

The last table splits a sparse SET step into the CSR products, the first layer's input transpose, the optimizer
step and the rest, in fastest-of-N times (robust to other jobs on the machine), to name the limiting op. A check
compares the masked and sparse models' weights after the timed steps (same batches, same seeds).

Usage::

    python benchmarks/training_cost/sparse_backend.py                    # the results file, ~10 min on 2 cores
    python benchmarks/training_cost/sparse_backend.py --rounds 3 --widths 784,300,100,10   # smoke run
    python benchmarks/training_cost/sparse_backend.py --isa avx2         # as a CPU without AVX-512: ..._avx2.md

Timings are wall times; the machine's load average is printed before and after (other jobs share its cores).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lightning_pai
from lightning_pai import SET, RigL, Sparsifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
from sparse_inference import ISA_ENV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_backend.md"
MODELS = ("dense", "SET masked", "SET sparse", "RigL masked", "RigL sparse")


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between them."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclass
class Run:
    """One model in training: its loop objects and its step times (update steps apart)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsifier: Sparsifier | None
    steps: list[float] = field(default_factory=list)  # per round: the median step of its block (updates apart)
    fastest: float = float("inf")  # the fastest step without an update
    updates: list[float] = field(default_factory=list)

    def due(self) -> bool:
        """Whether the coming step ends with a topology update."""
        if self.sparsifier is None:
            return False
        session = self.sparsifier.session
        return session.updater.is_update(self.sparsifier.global_step + 1, session.total_steps)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        if self.sparsifier is None:
            self.optimizer.step()
        else:
            self.sparsifier.step()
        return time.perf_counter() - start


def make_runs(
    widths: list[int], sparsity: float, total: int, args: argparse.Namespace, batches: list, models: list[str]
) -> list[Run]:
    runs = []
    for name in ("dense", *models):
        torch.manual_seed(args.seed)
        model = mlp(widths)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sparsifier = None
        if name != "dense":
            method, backend = name.split()
            delta_t = args.wide_delta_t if max(widths) > 1000 else args.delta_t
            common = {"delta_t": delta_t, "verbose": False, "backend": backend, "seed": args.seed}
            cb = SET(sparsity, update_on="step", **common) if method == "SET" else RigL(sparsity, t_end=1.0, **common)
            sparsifier = Sparsifier(cb, model, optimizer, data=batches, total_steps=total)
        runs.append(Run(name, model, optimizer, sparsifier))
    return runs


def time_level(
    widths: list[int], sparsity: float, rounds: int, block: int, args: argparse.Namespace, models: list[str]
) -> list[Run]:
    """Interleaved blocks of ``block`` steps of dense and ``models`` at one sparsity (``Run.steps`` gets each round's
    median step of the model's block, update steps apart)."""
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        (torch.randn(args.batch_size, widths[0], generator=gen), torch.randint(0, widths[-1], (args.batch_size,)))
        for _ in range(8)
    ]
    runs = make_runs(widths, sparsity, args.warmup + block * rounds + 1, args, batches, models)
    for i in range(args.warmup):
        for run in runs:
            run.step(*batches[i % len(batches)])
    for r in range(rounds):
        order = runs[r % len(runs) :] + runs[: r % len(runs)]
        for run in order:
            times = []
            for j in range(block):
                x, y = batches[(args.warmup + r * block + j) % len(batches)]
                update = run.due()
                t = run.step(x, y)
                (run.updates if update else times).append(t)
            run.steps.append(statistics.median(times) if times else float("nan"))
            run.fastest = min([run.fastest, *times])
    return runs


def weight_gaps(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per method, the largest |masked - sparse| weight difference after the timed steps (same batches, seeds)."""
    gaps = {}
    for method in ("SET", "RigL"):
        masked, sparse = states.get(f"{method} masked"), states.get(f"{method} sparse")
        if masked is not None and sparse is not None:
            gaps[method] = max(float((masked[k] - sparse[k]).abs().max()) for k in masked)
    return gaps


def fastest(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` (after 3 untimed ones), in seconds: what an idle machine shows."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def breakdown(widths: list[int], sparsity: float, args: argparse.Namespace) -> str:
    """Where a sparse SET step goes, in fastest-of-N times (robust to other jobs): the CSR products per layer,
    the first layer's input transpose, the optimizer step, and the rest (loss, activations, dispatch, bookkeeping),
    beside the dense step's total."""
    from lightning_pai.core.sparse_ops import _feature_major, csr_mm_t, csr_sddmm

    repeats = args.breakdown_repeats if max(widths) <= 1000 else max(3, args.breakdown_repeats // 20)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = torch.randn(args.batch_size, widths[0], generator=gen), torch.randint(0, widths[-1], (args.batch_size,))
    batches = [(x, y)]
    torch.manual_seed(args.seed)
    dense = Run("dense", mlp(widths), None, None)  # type: ignore[arg-type]
    dense.optimizer = torch.optim.SGD(dense.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(args.seed)
    model = mlp(widths)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    method = SET(sparsity, update_on="step", delta_t=10**9, verbose=False, backend="sparse")
    sparse = Run("SET sparse", model, optimizer, Sparsifier(method, model, optimizer, data=batches, total_steps=10**9))
    dense_step = fastest(lambda: dense.step(x, y), repeats)
    sparse_step = fastest(lambda: sparse.step(x, y), repeats)
    parts = {"input transpose": fastest(lambda: _feature_major(x, widths[0]), repeats)}
    products = {"mm": 0.0, "sddmm": 0.0, "mmᵀ": 0.0}
    n = args.batch_size
    for i, layer in enumerate(sparse.sparsifier.masks.layers.values()):
        b, v = layer._buffers, layer.values.detach()
        crow, col = b["crow_indices"], b["col_indices"]
        xt, gt = torch.randn(layer.in_features, n), torch.randn(layer.out_features, n)
        products["mm"] += fastest(partial(csr_mm_t, crow, col, v, xt, layer.in_features), repeats)
        products["sddmm"] += fastest(partial(csr_sddmm, crow, col, v, gt, xt.t()), repeats)
        if i:  # the first layer's input needs no gradient
            mm_t = partial(csr_mm_t, b["t_crow"], b["t_col"], v[b["t_perm"]], gt, layer.out_features)
            products["mmᵀ"] += fastest(mm_t, repeats)
    parts.update(products)
    parts["optimizer step"] = fastest(sparse.optimizer.step, repeats)
    parts["rest"] = max(0.0, sparse_step - sum(parts.values()))
    share = ", ".join(f"{k} {1e6 * t:.0f} µs ({100 * t / sparse_step:.0f} %)" for k, t in parts.items())
    return f"{1e6 * sparse_step:.0f} µs = {share} | {1e6 * dense_step:.0f} µs ({sparse_step / dense_step:.3f})"


def kernels_used() -> str:
    """Which kernels the sparse layers' products ran on (the compiled ones and their build, or PyTorch's)."""
    from lightning_pai.deploy import kernels as compiled

    if compiled.available():
        return f"compiled kernels ({compiled.build_info()})"
    return "PyTorch's `torch.sparse` kernels (no C compiler)"


def cpu_facts() -> tuple[str, str]:
    """The CPU's model name and its SIMD flags (from /proc/cpuinfo, where there is one)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx")
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(wanted))
    except OSError:
        pass
    return model, flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", action="append", help="comma-separated layer widths (repeatable)")
    p.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
    p.add_argument("--rounds", type=int, default=100, help="timed rounds per (model, sparsity)")
    p.add_argument(
        "--block", type=int, default=10,
        help="consecutive steps of a model per round (1: strict step-by-step alternation, which also times the "
        "cache and thread-pool refill of switching models at every step)",
    )  # fmt: skip
    p.add_argument("--wide-rounds", type=int, default=40, help="timed rounds for models with a layer over 1000 wide")
    p.add_argument("--wide-block", type=int, default=2, help="--block for models with a layer over 1000 wide")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--delta-t", type=int, default=100, help="steps between updates while timing")
    p.add_argument("--wide-delta-t", type=int, default=20, help="--delta-t for models with a layer over 1000 wide")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--breakdown-repeats", type=int, default=300, help="calls per op in the step breakdown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--models", nargs="+", choices=MODELS[1:], default=list(MODELS[1:]),
        help="the models timed beside dense (each round steps all of them: fewer models, less cache contention)",
    )  # fmt: skip
    p.add_argument(
        "--no-pairs", dest="pairs", action="store_false",
        help="time all --models in the same rounds also for narrow MLPs (default there: each model in its own rounds "
        "with its own dense twin, so no third model's data evicts theirs between blocks)",
    )  # fmt: skip
    p.add_argument(
        "--isa", choices=list(ISA_ENV), default="native",
        help="run as a CPU with this instruction set would (avx2: no AVX-512 in our kernels, PyTorch, MKL, oneDNN)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="results file (default results/sparse_backend[_<isa>].md)")
    args = p.parse_args(argv)
    env = ISA_ENV[args.isa]
    if any(os.environ.get(k) != v for k, v in env.items()):  # set before torch and MKL load: run again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    if args.out is None:
        args.out = RESULTS.with_name("sparse_backend" + ("" if args.isa == "native" else f"_{args.isa}") + ".md")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    archs = [[int(w) for w in s.split(",")] for s in (args.widths or ["784,300,100,10", "784,4096,4096,10"])]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    model, flags = cpu_facts()
    load_before = os.getloadavg()
    started = time.perf_counter()
    lines = [
        '# Truly sparse training (`backend="sparse"`) vs dense: step time on the CPU',
        "",
        f"- command: `python {shlex.join(['benchmarks/training_cost/sparse_backend.py', *(argv or sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, lightning_pai {lightning_pai.__version__}, {args.threads} threads",
        f"- CPU: {model}, {os.cpu_count()} logical cores; flags: {flags}",
        f"- sparse products: {kernels_used()}; PyTorch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}"
        + "".join(f", {k}={v}" for k, v in env.items()),
        f"- batch {args.batch_size}, SGD(lr 0.01, momentum 0.9, wd 5e-4); every layer targeted (SET: ER, RigL: "
        f"ERK); updates every {args.delta_t} steps while timing ({args.wide_delta_t} on the wide MLPs)",
        "",
        "Each round runs a block of consecutive steps of every model (order rotated per round); `step` is the median "
        "over rounds of (the model's median step in its block / dense's in the same round), updates apart; `min` "
        "the fastest step over dense's fastest; `ΔT=100` amortizes one update per 100 steps.",
        "",
    ]
    profiles = []
    for widths in archs:
        wide = max(widths) > 1000
        rounds, block = (args.wide_rounds, args.wide_block) if wide else (args.rounds, args.block)
        name = "-".join(map(str, widths))
        lines += [
            f"## MLP {name} ({rounds} rounds of {block}-step blocks per sparsity"
            + (
                ", each model beside its own dense twin)"
                if args.pairs and not wide
                else ", all models in the same rounds)"
            ),
            "",
            "| sparsity | dense step (median, min) | model | step | min | update | ΔT=100 | weights: masked - sparse |",
            "|---|---|---|---|---|---|---|---|",
        ]
        groups = [[m] for m in args.models] if args.pairs and not wide else [list(args.models)]
        for sparsity in sparsities:
            rows, states = [], {}
            for group in groups:
                runs = time_level(widths, sparsity, rounds, block, args, group)
                dense = runs[0].steps
                dense_median = statistics.median(dense)
                for run in runs[1:]:
                    states[run.name] = run.model.state_dict()
                    step = statistics.median([t / d for t, d in zip(run.steps, dense) if t == t])
                    fastest = run.fastest / runs[0].fastest
                    update = statistics.median(run.updates) / dense_median if run.updates else float("nan")
                    amortized = (99 * step + update) / 100
                    rows.append((run.name, dense_median, runs[0].fastest, step, fastest, update, amortized))
            gaps = weight_gaps(states)
            del runs, states  # the next level's models are built next: free these first (wide MLPs are GBs)
            gc.collect()
            for run_name, dense_median, dense_fastest, step, fastest, update, amortized in rows:
                method = run_name.split()[0]
                lines.append(
                    f"| {sparsity:.2f} | {1e3 * dense_median:.2f}, {1e3 * dense_fastest:.2f} ms | {run_name} | "
                    f"**{step:.3f}** | {fastest:.3f} | {update:.2f} | **{amortized:.3f}** | "
                    + (f"{gaps[method]:.1e} |" if method in gaps else "– |")
                )
                print(lines[-1], flush=True)
            profiles.append(f"| {name} | {sparsity:.2f} | {breakdown(widths, sparsity, args)} |")
            print(profiles[-1], flush=True)
        lines.append("")
    lines += [
        "## Where the sparse SET step goes (fastest of N, each part timed alone)",
        "",
        "`mm`: `Yᵀ = W Xᵀ + b`, `sddmm`: `dW` at the kept positions, `mmᵀ`: `dXᵀ = Wᵀ dYᵀ`, summed over layers "
        f"({kernels_used()}); `rest`: loss, activations, autograd and dispatch, the method's bookkeeping.",
        "",
        "| MLP | sparsity | sparse step = parts | dense step (ratio) |",
        "|---|---|---|---|",
        *profiles,
    ]
    return write_with_load(args.out, lines, load_before, started)


def write_with_load(out: Path, lines: list[str], load_before: tuple[float, ...], started: float) -> int:
    """Append the load averages before and now and the elapsed time to ``lines``; print and write them to ``out``."""
    lines = [
        *lines,
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.perf_counter() - started:.0f} s in all.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
