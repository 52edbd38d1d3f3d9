"""Side by side with the alternatives: lightning_pai against ModelPruning, rigl-torch, sparsimony and torch.ao.

One command, one process for the timings (CPU by default, CUDA when present):

1. **step time** (``timing``): per model, one copy per library, trained *step by step interleaved* (every
   round runs one step of each library in a rotated order), each through its own per-step API
   (``peers``); ratio to the dense step of the same round, median and quartiles over rounds. The
   schedules are placed so that one topology update (RigL, SET, GMP) or lottery round boundary falls in
   the timed window; its extra cost is reported and amortized over ``delta_t = 100`` steps.
2. **Lightning fits** (``fit``): the same for our callbacks and ``ModelPruning`` through ``Trainer.fit``
   (interleaved fits, order rotated), a cross-check of the step-level numbers.
3. **memory** (``memory``): extra peak memory per prunable weight, each library in a fresh subprocess
   (CPU: growth of the peak RSS over the process's RSS before the library's set-up, ``VmHWM`` reset
   through ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``), minus the dense run's growth; and
   the bytes of the tensors each library holds (masks, copies, buffers), counted exactly.
4. **correctness** (``correctness``, ``compare_checks.py``): masks equal on 2 DDP ranks with different
   inits, resume reproduces the masks, pruned weights exactly zero under SGD momentum + weight decay,
   topology updates happen when scheduled.
5. **accuracy** (``accuracy``, ``compare_accuracy.py``): RigL at 90 % and 98 % on LeNet-300-100 / MNIST
   through each library that implements it.
6. **plots and tables** (``compare_plots.py``): ``benchmarks/compare/results/compare.json``, ``compare.md``,
   ``compare_*.png`` and the README section ``compare_readme_section.md``.

Usage::

    python benchmarks/compare/compare.py                         # everything (~25 min on 2 idle CPU cores)
    python benchmarks/compare/compare.py --quick                 # smoke run (~2 min), written to /tmp
    python benchmarks/compare/compare.py --sections timing memory --models resnet18 --libraries dense pai_rigl
    python benchmarks/compare/compare.py --plots-only            # rebuild compare.md and the plots from compare.json

Timings are only meaningful on an otherwise idle machine: the 1-minute load average is recorded before
and after each section and a warning is printed when other processes were running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this group's modules, and benchmarks/mnist_common.py

import torch  # noqa: E402
from peers import PRUNERS, default_targets, installed, state_bytes  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = HERE / "results"
JSON_PATH = RESULTS / "compare.json"
SPARSITY = 0.9
DELTA_T = 100
TOTAL_STEPS = 10_000
UPDATE_STEP = 3000  # the scheduled update every DST library hits inside the timed window (30 * delta_t)


# --------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: builder, one input sample's shape, batch size, default timed rounds."""

    label: str
    build: Callable[[], nn.Module]
    sample: tuple[int, ...]
    batch: int
    rounds: int
    classes: int = 10


def _lenet() -> nn.Module:
    from mnist_common import LENET_300_100, mlp

    return mlp(LENET_300_100, 0, "torch")


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, img_size=32, num_classes=10)

    return build


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec("LeNet-300-100", _lenet, (784,), 100, 200),
    "resnet18": ModelSpec("ResNet-18 (torchvision)", _torchvision("resnet18"), (3, 32, 32), 64, 40),
    "vit_tiny": ModelSpec("ViT-Tiny (timm, img 32)", _timm("vit_tiny_patch16_224"), (3, 32, 32), 64, 60),
    "resnet50": ModelSpec("ResNet-50 (torchvision)", _torchvision("resnet50"), (3, 32, 32), 64, 16),
    "vit_small": ModelSpec("ViT-S (timm, img 32)", _timm("vit_small_patch16_224"), (3, 32, 32), 64, 30),
    "tiny": ModelSpec(
        "tiny MLP (smoke test)", lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (8,), 4, 3, 4
    ),
}
DEFAULT_MODELS = ("lenet", "resnet18", "vit_tiny", "resnet50", "vit_small")
#: ResNet-50 is 4x ResNet-18's step: only the methods the scaling question is about
SCALING_LIBRARIES = ("dense", "pai_pai", "pai_rigl", "modelpruning", "rigl_torch", "sparsimony_rigl")


def batches(spec: ModelSpec, device: torch.device, n: int = 4, seed: int = 1) -> list:
    """``n`` synthetic ``(x, y)`` batches of ``spec``'s shape, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(spec.batch, *spec.sample, generator=gen)
        y = torch.randint(0, spec.classes, (spec.batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


def make_run(spec: ModelSpec, key: str, device: torch.device, start_step: int, seed: int = 0):
    """A fresh model (same init for every library), SGD, and the library's pruner set up on them."""
    torch.manual_seed(seed)
    model = spec.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pruner = PRUNERS[key](SPARSITY, seed=seed, total_steps=TOTAL_STEPS, delta_t=DELTA_T, start_step=start_step)
    pruner.setup(model, opt)
    return model, opt, pruner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def coverage_of(pruner, model_targets: dict[str, int]) -> float:
    """Fraction of the common targets' weights this library prunes."""
    covered = sum(model_targets.get(n, 0) for n in pruner.masks())
    return covered / sum(model_targets.values())


# --------------------------------------------------------------------------------------------- 1. timing
def time_model(
    name: str, keys: list[str], rounds: int, warmup: int, device: torch.device, log=print, spec: ModelSpec | None = None
) -> dict[str, Any]:
    """Step-level interleaved timing of ``keys`` (``"dense"`` first) on model ``name``.

    Round ``r`` runs optimizer step ``start + r + 1`` of every library, in the order of ``keys`` rotated by
    ``r``. ``start`` puts step ``UPDATE_STEP`` (an update of every DST schedule and a lottery boundary)
    in the middle of the timed rounds.
    """
    spec = spec or MODELS[name]
    keys = ["dense"] + [k for k in keys if k != "dense"]
    mid = warmup + rounds // 2
    start = max(0, UPDATE_STEP - mid - 1)
    update_round = UPDATE_STEP - start - 1
    data = batches(spec, device)
    runs = {k: make_run(spec, k, device, start) for k in keys}
    targets = {n: p.numel() for n, p in runs["dense"][0].named_parameters() if n in default_targets(runs["dense"][0])}
    times: dict[str, list[float]] = {k: [] for k in keys}
    load0 = os.getloadavg()[0]
    t_start, c_start = time.perf_counter(), time.process_time()
    for r in range(warmup + rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        x, y = data[r % len(data)]
        for k in order:
            model, opt, pruner = runs[k]
            sync(device)
            t0 = time.perf_counter()
            pruner.train_step(model, opt, x, y)
            sync(device)
            times[k].append(time.perf_counter() - t0)
    seconds = time.perf_counter() - t_start
    cpu_per_wall = (time.process_time() - c_start) / seconds
    load1 = os.getloadavg()[0]
    timed = [i for i in range(warmup, warmup + rounds) if i != update_round]
    dense = [times["dense"][i] for i in timed]
    rows: dict[str, Any] = {}
    for k in keys:
        model, opt, pruner = runs[k]
        own = [times[k][i] for i in timed]
        ratios = [a / b for a, b in zip(own, dense)]
        median_ms = 1e3 * statistics.median(own)
        update_ms = None if pruner.prunes_once else 1e3 * times[k][update_round] - median_ms
        dense_update_round = 1e3 * times["dense"][update_round] - 1e3 * statistics.median(dense)
        row = {
            "library": pruner.library,
            "method": pruner.method,
            "label": pruner.label,
            "median_ms": median_ms,
            "ratio_median": statistics.median(ratios),
            "ratio_q1": quantile(ratios, 0.25),
            "ratio_q3": quantile(ratios, 0.75),
            "ratio_of_medians": median_ms / (1e3 * statistics.median(dense)),
            "update_extra_ms": None if update_ms is None else update_ms - dense_update_round,
            "coverage": coverage_of(pruner, targets),
            "density": _density(pruner),
            "updates_in_window": [s for s in pruner.update_steps if s > start + warmup],
        }
        if update_ms is not None:
            per_step = (median_ms + row["update_extra_ms"] / DELTA_T) / (1e3 * statistics.median(dense))
            row["ratio_amortized"] = per_step
        rows[k] = row
        pruner.close()
    if "pai_rigl" in runs:
        rep = runs["pai_rigl"][2]
        layer_rows = [(n, list(m.shape), int(m.sum()), m.numel()) for n, m in rep.masks().items()]
    else:
        layer_rows = None
    for k in keys:
        r = rows[k]
        extra = "" if r.get("update_extra_ms") is None else f", update +{r['update_extra_ms']:.0f} ms"
        log(
            f"  {r['label']:42s} {r['median_ms']:8.2f} ms  ratio {r['ratio_median']:.3f} "
            f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]  coverage {r['coverage']:.3f}{extra}"
        )
    return {
        "label": spec.label,
        "batch": spec.batch,
        "rounds": rounds,
        "warmup": warmup,
        "update_step": UPDATE_STEP,
        "prunable": sum(targets.values()),
        "seconds": seconds,
        "cpu_per_wall": cpu_per_wall,
        "threads": torch.get_num_threads(),
        "load_before": load0,
        "load_after": load1,
        "libraries": rows,
        "rigl_layers": layer_rows,
    }


def _density(pruner) -> float:
    masks = pruner.masks()
    return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))


# --------------------------------------------------------------------------------------------- 2. Lightning fits
def fit_level(model_name: str, repeats: int, warmup: int, steps: int, device: torch.device, log=print) -> dict:
    """Interleaved ``Trainer.fit`` runs: dense, PruneAtInit, RigL (ours) and ModelPruning; median step each."""
    import logging

    import pytorch_lightning as pl
    from step_time import Mark, ModelPruningAtStart, StepTimer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pai import PruneAtInit, RigL

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = MODELS[model_name]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = spec.build()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def callbacks(mode: str, module: nn.Module) -> list:
        if mode == "pai_pai":
            return [PruneAtInit("magnitude", SPARSITY, verbose=False)]
        if mode == "pai_rigl":
            return [RigL(SPARSITY, delta_t=DELTA_T, verbose=False)]
        if mode == "modelpruning":
            layers = [(m, "weight") for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            return [
                ModelPruningAtStart(
                    "l1_unstructured",
                    parameters_to_prune=layers,
                    amount=SPARSITY,
                    use_global_unstructured=True,
                    apply_pruning=False,  # prune once, at train start (as step_time.py)
                    verbose=0,
                )
            ]
        return []

    modes = ["dense", "pai_pai", "pai_rigl", "modelpruning"]
    n = warmup + steps
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(spec.batch * n, *spec.sample, generator=gen)
    y = torch.randint(0, 10, (spec.batch * n,), generator=gen)
    per: dict[str, list[float]] = {m: [] for m in modes}
    load0 = os.getloadavg()[0]
    for r in range(repeats):
        for mode in modes[r % 4 :] + modes[: r % 4]:
            module = Module()
            timer = StepTimer()
            trainer = pl.Trainer(
                accelerator=device.type,
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                max_steps=n,
                max_epochs=1,
                callbacks=[timer, *callbacks(mode, module), Mark(timer)],
            )
            trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=spec.batch))
            per[mode].append(1e3 * statistics.median(timer.times[warmup:]))
    rows = {}
    for mode in modes:
        ratios = [a / b for a, b in zip(per[mode], per["dense"])]
        rows[mode] = {
            "median_ms": statistics.median(per[mode]),
            "ratios": ratios,
            "ratio_median": statistics.median(ratios),
        }
        log(
            f"  fit {mode:14s} {rows[mode]['median_ms']:8.1f} ms  ratio {rows[mode]['ratio_median']:.3f} "
            f"per repeat {ratios}"
        )
    return {
        "model": model_name,
        "repeats": repeats,
        "steps": steps,
        "warmup": warmup,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "modes": rows,
    }


# --------------------------------------------------------------------------------------------- 3. memory
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the current memory (bytes) it restarts from (0 if it cannot)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS
    except OSError:
        return 0
    return _rss_kb("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kb("VmHWM") * 1024


def _current(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else _rss_kb("VmRSS") * 1024


def memory_worker(model_name: str, key: str, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """In a fresh process: memory growth during ``key``'s set-up, and peak growth while training ``steps`` steps.

    Both are measured from the memory in use just before the set-up (model, optimizer, data built): the
    set-up peak, what stays resident after it, and the peak of the training steps (counter reset after the
    set-up), whose second step is a topology update (or lottery round boundary). The caller subtracts the
    dense run's values.
    """
    for other in installed():  # the same code loaded in every run: only the library's tensors differ
        for module in PRUNERS[other].modules:
            __import__(module)
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec.build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    data = batches(spec, device, n=2)
    prunable = sum(p.numel() for n, p in model.named_parameters() if n in default_targets(model))
    base = _reset_peak(device)
    # the second step is step UPDATE_STEP: every method that changes its masks does so once in the window
    pruner = PRUNERS[key](SPARSITY, total_steps=TOTAL_STEPS, delta_t=DELTA_T, start_step=UPDATE_STEP - 2)
    pruner.setup(model, opt)
    setup_peak = _peak(device) - base
    resident = _current(device) - base
    _reset_peak(device)
    for i in range(steps):
        pruner.train_step(model, opt, *data[i % len(data)])
    train_peak = _peak(device) - base
    dense_ids = {id(t) for t in model.parameters()}
    held = [t for t in pruner.extra_tensors() if id(t) not in dense_ids]
    return {
        "growth_bytes": train_peak,
        "setup_peak_bytes": setup_peak,
        "resident_bytes": resident,
        "hwm_reset": base > 0,
        "held_bytes": state_bytes(held),
        "prunable": prunable,
    }


def memory(models: list[str], keys: list[str], device: torch.device, repeats: int, log=print) -> dict[str, Any]:
    """:func:`memory_worker` in a fresh subprocess per (model, library, repeat); medians minus dense."""
    out: dict[str, Any] = {}
    for m in models:
        raw: dict[str, list[dict]] = {}
        for _ in range(repeats):
            for k in ["dense"] + [k for k in keys if k != "dense"]:
                cmd = [sys.executable, __file__, "--memory-worker", m, k, "--device", device.type]
                # large blocks straight from mmap and back to the OS when freed: RSS follows the live tensors
                env = dict(
                    os.environ,
                    OMP_NUM_THREADS=str(torch.get_num_threads()),
                    MALLOC_MMAP_THRESHOLD_="65536",
                    MALLOC_TRIM_THRESHOLD_="65536",
                )
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                if proc.returncode != 0:
                    log(f"  memory {m} {k}: worker failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                raw.setdefault(k, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))

        def med(rs: list[dict], field: str) -> float:
            return statistics.median(r[field] for r in rs)

        rows = {}
        for k, rs in raw.items():
            prunable = rs[0]["prunable"]
            rows[k] = {
                "extra_peak_bytes": med(rs, "growth_bytes") - med(raw["dense"], "growth_bytes"),
                "extra_setup_peak_bytes": med(rs, "setup_peak_bytes") - med(raw["dense"], "setup_peak_bytes"),
                "extra_resident_bytes": med(rs, "resident_bytes") - med(raw["dense"], "resident_bytes"),
                "held_bytes": rs[0]["held_bytes"],
                "samples": [r["growth_bytes"] for r in rs],
            }
            for field in ("extra_peak", "extra_setup_peak", "extra_resident", "held"):
                rows[k][f"{field}_per_param"] = rows[k][f"{field}_bytes"] / prunable
            log(
                f"  memory {m:9s} {k:16s} training peak {rows[k]['extra_peak_per_param']:6.2f} B/param, "
                f"set-up peak {rows[k]['extra_setup_peak_per_param']:6.2f}, held {rows[k]['held_per_param']:5.2f}"
            )
        out[m] = {"prunable": raw["dense"][0]["prunable"], "hwm_reset": raw["dense"][0]["hwm_reset"], "libraries": rows}
    return out


# --------------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in (
        "torch",
        "torchvision",
        "timm",
        "pytorch-lightning",
        "lightning-pai",
        "rigl-torch",
        "sparsimony",
        "matplotlib",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})"
    return {
        "versions": versions,
        "device": name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


SECTIONS = ("timing", "fit", "memory", "correctness", "accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS))
    p.add_argument("--libraries", nargs="+", choices=list(PRUNERS), default=None, help="default: every installed one")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default: per model)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per model")
    p.add_argument("--fit-model", choices=list(MODELS), default="resnet18")
    p.add_argument("--fit-repeats", type=int, default=6)
    p.add_argument("--memory-models", nargs="+", choices=list(MODELS), default=["resnet18", "vit_tiny", "resnet50"])
    p.add_argument("--memory-repeats", type=int, default=1)
    p.add_argument("--accuracy-epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2, help="accuracy seeds (the results file: 3)")
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 epoch; writes to /tmp unless --out")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before timing, wait up to SECONDS for the 1-min load average to fall below 0.5",
    )
    p.add_argument("--plots-only", action="store_true", help="rebuild compare.md and the plots from compare.json")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON results file (default benchmarks/compare/results/compare.json)"
    )
    p.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "LIBRARY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, device)))
        return 0

    import compare_plots

    out = args.out or (Path("/tmp/compare_quick.json") if args.quick else JSON_PATH)
    if args.plots_only:
        compare_plots.render(load_json(out), out.parent)
        return 0
    results: dict[str, Any] = {}

    keys = installed(args.libraries)
    missing = [k for k in (args.libraries or PRUNERS) if k not in keys]
    if missing:
        print(f"not installed, skipped: {missing}")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/compare/compare.py", *sys.argv[1:]])
    results["env"] = environment(device)
    results["commands"] = {}
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    log(f"command: {command}")
    log(f"device: {results['env']['device']}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    t_all = time.perf_counter()
    if args.wait_idle > 0 and {"timing", "fit", "memory"} & set(args.sections):
        deadline = time.time() + args.wait_idle
        while os.getloadavg()[0] >= 0.5 and time.time() < deadline:
            time.sleep(15)
        log(f"load after waiting for an idle machine: {os.getloadavg()}")
    if "timing" in args.sections:
        section = results["timing"] = {}
        for m in args.models:
            lib = keys if m not in ("resnet50",) else [k for k in keys if k in SCALING_LIBRARIES]
            rounds = args.rounds or (3 if args.quick else MODELS[m].rounds)
            log(f"timing {m}: {rounds} rounds of {len(lib)} libraries, load {os.getloadavg()[0]:.2f}")
            section[m] = time_model(m, lib, rounds, 1 if args.quick else args.warmup, device, log)
            util = section[m]["cpu_per_wall"] / torch.get_num_threads()
            if device.type == "cpu" and (util < 0.85 or section[m]["load_after"] > torch.get_num_threads() + 0.5):
                log(
                    f"  WARNING: disturbed ({util:.2f} of {torch.get_num_threads()} threads busy, load "
                    f"{section[m]['load_after']:.2f}): other processes were running; rerun this model"
                )
        results["commands"]["timing"] = command
    if "fit" in args.sections:
        log(f"fit-level cross-check on {args.fit_model}, load {os.getloadavg()[0]:.2f}")
        steps, warmup = (3, 1) if args.quick else (20, 5)
        results["fit"] = fit_level(args.fit_model, 1 if args.quick else args.fit_repeats, warmup, steps, device, log)
        results["commands"]["fit"] = command
    if "memory" in args.sections:
        log(f"memory, load {os.getloadavg()[0]:.2f}")
        mem_models = ["lenet"] if args.quick else args.memory_models  # LeNet: fixed allocations dominate
        results["memory"] = memory(mem_models, keys, device, args.memory_repeats, log)
        results["commands"]["memory"] = command
    if "correctness" in args.sections:
        import compare_checks

        log("correctness checks (LeNet-300-100, synthetic data)")
        results["correctness"] = compare_checks.run_all(keys, log=log)
        results["commands"]["correctness"] = command
    if "accuracy" in args.sections:
        import compare_accuracy

        epochs, seeds = (1, 1) if args.quick else (args.accuracy_epochs, args.seeds)
        log(f"accuracy: RigL on LeNet-300-100 / MNIST, {epochs} epochs, {seeds} seeds")
        results["accuracy"] = compare_accuracy.run(args.data_dir, epochs, seeds, log=log)
        results["commands"]["accuracy"] = command
    # merge into the file as it is now (another section may have been written meanwhile)
    merged = load_json(out)
    timing = results.pop("timing", None)
    if timing is not None:
        merged.setdefault("timing", {}).update(timing)
    for key in ("commands", "env"):
        merged.setdefault(key, {}).update(results.pop(key))
    merged.update(results)
    merged["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    merged.setdefault("seconds", {})[" ".join(args.sections)] = time.perf_counter() - t_all
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    log(f"wrote {out} ({time.perf_counter() - t_all:.0f} s)")
    compare_plots.render(merged, out.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
