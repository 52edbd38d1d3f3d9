"""Per-optimizer-step time of dense vs. PruneAtInit (90 % magnitude) vs. Lightning's ModelPruning on ResNet-18.

Runs ``pytorch_lightning.Trainer`` on synthetic CIFAR-shaped data, interleaving dense, sparse (ours) and
ModelPruning fits in one process (the order rotates every repeat, so slow drift of the machine's speed
cancels), and reports the median step time of each, the ratio to dense per repeat and their median, the
mask memory, a check that pruned weights stay exactly zero, and the isolated cost of the two per-step
mask operations (``MaskSet.mask_grads_`` and ``MaskSet.apply_``). ModelPruning (``l1_unstructured``,
global, amount 0.9 on the same layers) prunes at train start, so both sparse runs train masked from
step 0.

Usage::

    python benchmarks/training_cost/step_time.py  # defaults: 4 x (dense, sparse) fits of 5 + 25 steps, ~2 min, 2 cores
    python benchmarks/training_cost/step_time.py --repeats 2 --steps 50 --warmup 5 --batch-size 64 --threads 2

Step times are only meaningful on an otherwise idle machine: each fit's process-CPU / wall ratio is
printed, and a warning is shown when it falls well below the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_pai
from lightning_pai import MaskSet, PruneAtInit

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.md"


# --------------------------------------------------------------------------- model, data, timing
class ResNetModule(pl.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


PHASES = ("forward", "backward", "mask_grads", "opt_step")


class StepTimer(pl.Callback):
    """Wall time of each training batch: forward, backward and optimizer step (data loading excluded).

    Also splits each step into phases. Lightning runs, inside ``optimizer.step(closure)``: forward,
    ``on_before_backward``, backward, ``on_after_backward``, then ``on_before_optimizer_step`` of every
    callback in list order (this timer first, ``PruneAtInit.mask_grads_()`` next, :class:`Mark` last),
    then the SGD update and the optimizer's step post-hooks (``MaskSet.apply_()``), then
    ``on_train_batch_end``. So ``mask_grads`` = first -> last ``on_before_optimizer_step`` and
    ``opt_step`` = SGD update + ``apply_`` (+ Lightning bookkeeping).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._t: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = {"start": time.perf_counter()}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._t["before_bwd"] = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._t["after_bwd"] = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._t["before_opt"] = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t, end = self._t, time.perf_counter()
        self.times.append(end - t["start"])
        self.phases.append(
            {
                "forward": t["before_bwd"] - t["start"],
                "backward": t["after_bwd"] - t["before_bwd"],
                "mask_grads": t["mark"] - t["before_opt"],
                "opt_step": end - t["mark"],
            }
        )


class Mark(pl.Callback):
    """Placed after the pruning callback: stamps the end of all ``on_before_optimizer_step`` hooks."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.timer._t["mark"] = time.perf_counter()


def make_loader(batch_size: int, n_batches: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size * n_batches, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size * n_batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=0)


class ModelPruningAtStart(pl.callbacks.ModelPruning):
    """Lightning's ModelPruning, pruning once when training starts (instead of at the first epoch's end)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.apply_pruning(self.amount)


MODES = ("dense", "sparse", "modelpruning")


def fit_once(mode: str, args: argparse.Namespace) -> tuple[StepTimer, ResNetModule, PruneAtInit | None]:
    """One fit of ``warmup + steps`` optimizer steps from the same seed; the timer keeps post-warm-up steps only."""
    torch.manual_seed(args.seed)
    model = ResNetModule()
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    cb = None
    if mode == "sparse":
        cb = PruneAtInit("magnitude", sparsity=args.sparsity, verbose=False)
        callbacks.append(cb)
    elif mode == "modelpruning":
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        callbacks.append(
            ModelPruningAtStart(
                "l1_unstructured",
                parameters_to_prune=layers,
                amount=args.sparsity,
                use_global_unstructured=True,
                apply_pruning=False,
                verbose=0,
            )
        )
    callbacks.append(Mark(timer))
    n = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=n,
        max_epochs=1,
        callbacks=callbacks,
    )
    trainer.fit(model, make_loader(args.batch_size, n, args.seed))
    if len(timer.times) != n:
        raise RuntimeError(f"expected {n} timed steps, got {len(timer.times)}")
    timer.times, timer.phases = timer.times[args.warmup :], timer.phases[args.warmup :]
    return timer, model, cb


# --------------------------------------------------------------------------- mask checks and micro-benchmark
def mask_memory(cb: PruneAtInit, model: nn.Module) -> dict[str, float]:
    mask_bytes = sum(m.numel() * m.element_size() for _, m in cb.masks.items())
    masked = sum(m.numel() for _, m in cb.masks.items())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "mask_bytes": mask_bytes,
        "masked_params": masked,
        "bytes_per_masked_param": mask_bytes / masked,
        "param_bytes": param_bytes,
        "n_params": n_params,
        "extra_vs_params": mask_bytes / param_bytes,
    }


def zero_check(cb: PruneAtInit) -> tuple[float, bool, float]:
    """Fraction of exactly-zero weights among the pruned ones, whether all are zero, and the measured sparsity."""
    params = cb.masks.params
    pruned = zeros = total = 0
    all_zero = True
    with torch.no_grad():
        for name, mask in cb.masks.items():
            off = params[name][~mask]
            pruned += off.numel()
            zeros += int((off == 0).sum())
            all_zero &= bool((off == 0).all())
            total += mask.numel()
    return zeros / max(pruned, 1), all_zero, pruned / total


def time_call(fn, iters: int, warmup: int = 5) -> float:
    """Median ms per call of ``fn`` over ``iters`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def mask_op_times(cb: PruneAtInit, model: ResNetModule, args: argparse.Namespace) -> dict[str, float]:
    """Isolated cost of ``mask_grads_`` / ``apply_`` on ResNet-18 with populated gradients."""
    model.train()
    model.zero_grad(set_to_none=True)
    x, y = next(iter(make_loader(args.batch_size, 1, args.seed + 1)))
    nn.functional.cross_entropy(model(x), y).backward()
    n_grads = sum(p.grad is not None for p in cb.masks.params.values())
    out = {
        "mask_grads_ms": time_call(cb.masks.mask_grads_, args.micro_iters),
        "apply_ms": time_call(cb.masks.apply_, args.micro_iters),
        "n_tensors": len(cb.masks),
        "n_grads": n_grads,
    }
    # Reference point: the same amount of elementwise work as a plain float multiply (no bool promotion).
    params = cb.masks.params
    plist = list(params.values())
    fmasks = [cb.masks[n].to(p.dtype) for n, p in params.items()]
    with torch.no_grad():
        out["foreach_float_mul_ms"] = time_call(lambda: torch._foreach_mul_(plist, fmasks), args.micro_iters)
    model.zero_grad(set_to_none=True)
    return out


RAW_MODES = ("dense", "sparse", "modelpruning")


def raw_interleaved(cb: PruneAtInit, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Step-interleaved measurement without Lightning: dense, ours and torch.nn.utils.prune, one step each in turn.

    Fit-level interleaving cannot cancel this VM's speed drift (it moves by 10-20 % within seconds);
    step-level interleaving can: each step of every mode is compared with the dense step next to it in time,
    and the median of those per-step ratios is reported. The order of the three modes cycles through all 6
    permutations. "sparse" is ``cb``'s masks with the callback's own enforcement on a single process
    (:meth:`MaskSet.mask_grads_in_backward`, ``attach``); "modelpruning" is what Lightning's ModelPruning
    does: ``torch.nn.utils.prune.global_unstructured(L1Unstructured, amount)`` on the same layers, i.e. a
    ``weight_orig`` parameter and a forward pre-hook computing ``weight = weight_orig * weight_mask``.
    """
    from torch.nn.utils import prune as torch_prune

    models = {}
    for mode in RAW_MODES:
        torch.manual_seed(args.seed)
        net = torchvision.models.resnet18(num_classes=10)
        if mode == "modelpruning":
            layers = [(m, "weight") for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=args.sparsity)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        models[mode] = (net, opt)
    params = dict(models["sparse"][0].named_parameters())  # plain resnet18: names without the "net." prefix
    masks = MaskSet({n.removeprefix("net."): params[n.removeprefix("net.")] for n in cb.masks.names})
    masks.load_state_dict({n.removeprefix("net."): m for n, m in cb.masks.state_dict().items()})
    masks.apply_()
    masks.attach(models["sparse"][1], mask_grads=False)
    masks.mask_grads_in_backward()
    batches = list(make_loader(args.batch_size, 4, args.seed + 2))
    res: dict[str, list[tuple[float, float, float]]] = {m: [] for m in RAW_MODES}
    orders = list(itertools.permutations(RAW_MODES))
    for i in range(args.warmup + args.raw_pairs):
        for mode in orders[i % len(orders)]:
            net, opt = models[mode]
            x, y = batches[i % len(batches)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            t1 = time.perf_counter()
            loss.backward()  # ours: masked inside backward
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if i >= args.warmup:
                res[mode].append((t1 - t0, t2 - t1, t3 - t2))
    zero = all(bool((p[~m] == 0).all()) for p, m in zip(masks._plist, masks._mlist))
    masks.detach()
    out: dict[str, dict[str, float]] = {}
    dense_totals = [sum(r) for r in res["dense"]]
    for m, v in res.items():
        ratios = sorted(sum(r) / d for r, d in zip(v, dense_totals))
        out[m] = {
            "forward": ms([r[0] for r in v]),
            "backward": ms([r[1] for r in v]),
            "opt_step": ms([r[2] for r in v]),
            "total": ms([sum(r) for r in v]),
            "ratio": statistics.median(ratios),
            "q1": ratios[len(ratios) // 4],
            "q3": ratios[(3 * len(ratios)) // 4],
        }
    out["sparse"]["zero"] = float(zero)
    return out


# --------------------------------------------------------------------------- reporting
def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu})"


def ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="timed steps per fit (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per fit")
    p.add_argument("--repeats", type=int, default=6, help="number of (dense, sparse, ModelPruning) fit triples")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--micro-iters", type=int, default=50, help="calls per mask-op micro-benchmark")
    p.add_argument(
        "--raw-pairs", type=int, default=90, help="rounds of the step-interleaved (dense, ours, ModelPruning) run"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    command = "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])
    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "lightning_pai": lightning_pai.__version__,
        "threads": torch.get_num_threads(),
        "device": device_name(),
    }
    print(f"command: {command}")
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(
        f"resnet18(num_classes=10), batch {args.batch_size}x3x32x32, SGD(lr=0.1, momentum=0.9, wd=5e-4), "
        f"{args.repeats}x(dense, sparse, ModelPruning) fits of {args.warmup} warm-up + {args.steps} timed steps\n"
    )

    t_start = time.perf_counter()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    per_run: dict[str, list[float]] = {m: [] for m in MODES}
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    utils: list[float] = []
    load0 = os.getloadavg()[0]
    last_sparse = None
    for r in range(args.repeats):
        order = MODES[r % 3 :] + MODES[: r % 3]  # rotate: each mode runs first, second and third equally often
        for mode in order:
            t0, c0 = time.perf_counter(), time.process_time()
            timer, model, cb = fit_once(mode, args)
            run_times = timer.times
            phases[mode] += timer.phases
            util = (time.process_time() - c0) / (time.perf_counter() - t0)
            utils.append(util)
            times[mode] += run_times
            per_run[mode].append(ms(run_times))
            lo, hi, fit_s = 1e3 * min(run_times), 1e3 * max(run_times), time.perf_counter() - t0
            print(
                f"run {r + 1}/{args.repeats} {mode:12s}: median {ms(run_times):7.1f} ms/step "
                f"(min {lo:.1f}, max {hi:.1f}; fit {fit_s:.1f} s, cpu/wall {util:.2f}, load {os.getloadavg()[0]:.2f})"
            )
            if cb is not None:
                last_sparse = (model, cb)

    dense, sparse, mp = ms(times["dense"]), ms(times["sparse"]), ms(times["modelpruning"])
    ratio = sparse / dense
    load1 = os.getloadavg()[0]
    if min(utils) < 0.8 * env["threads"]:
        print(
            f"\nWARNING: this process got only {min(utils):.2f} CPUs of {env['threads']} threads in some fit "
            "(other load on the machine?); the step times are unreliable."
        )
    pair_ratios = [s_ / d for s_, d in zip(per_run["sparse"], per_run["dense"])]
    mp_ratios = [m_ / d for m_, d in zip(per_run["modelpruning"], per_run["dense"])]
    pair_median, mp_median = statistics.median(pair_ratios), statistics.median(mp_ratios)
    print(f"\ndense       : median {dense:.1f} ms/step over {len(times['dense'])} steps")
    print(f"sparse (ours): median {sparse:.1f} ms/step")
    print(f"ModelPruning: median {mp:.1f} ms/step")
    print(
        f"ratio ours/dense: {ratio:.3f} (per repeat: {', '.join(f'{x:.3f}' for x in pair_ratios)}; "
        f"median of repeats {pair_median:.3f}, spread {min(pair_ratios):.3f}-{max(pair_ratios):.3f})"
    )
    print(
        f"ratio ModelPruning/dense: {mp / dense:.3f} (per repeat: {', '.join(f'{x:.3f}' for x in mp_ratios)}; "
        f"median of repeats {mp_median:.3f})"
    )
    ph = {m: {k: ms([p[k] for p in phases[m]]) for k in PHASES} for m in phases}
    print("\nphase medians (ms)   " + "".join(f"{k:>11s}" for k in PHASES))
    for m in MODES:
        print(f"  {m:19s}" + "".join(f"{ph[m][k]:11.2f}" for k in PHASES))
    print("  sparse - dense     " + "".join(f"{ph['sparse'][k] - ph['dense'][k]:+11.2f}" for k in PHASES))

    model, cb = last_sparse
    mem = mask_memory(cb, model)
    zfrac, all_zero, measured_sparsity = zero_check(cb)
    print(
        f"\nmasks: {len(cb.masks)} tensors, {mem['masked_params']:,} masked of {mem['n_params']:,} params, "
        f"{mem['mask_bytes']:,} bytes -> {mem['bytes_per_masked_param']:.2f} byte/masked param; "
        f"extra {mem['mask_bytes']:,} B vs {mem['param_bytes']:,} B of parameters "
        f"= {100 * mem['extra_vs_params']:.1f} %"
    )
    print(
        f"after training: pruned fraction {measured_sparsity:.4f}; fraction of exactly-zero pruned weights "
        f"{zfrac:.6f}; (param[~mask] == 0).all() for every layer: {all_zero}"
    )

    ops = mask_op_times(cb, model, args)
    overhead = ops["mask_grads_ms"] + ops["apply_ms"]
    print(
        f"\nmask ops ({ops['n_tensors']} tensors, {ops['n_grads']} with grads; median of {args.micro_iters} calls):\n"
        f"  mask_grads_: {ops['mask_grads_ms']:.2f} ms/call "
        f"({100 * ops['mask_grads_ms'] / dense:.1f} % of dense step)\n"
        f"  apply_     : {ops['apply_ms']:.2f} ms/call ({100 * ops['apply_ms'] / dense:.1f} % of dense step)\n"
        f"  sum        : {overhead:.2f} ms/step = {100 * overhead / dense:.1f} % of dense step {dense:.1f} ms "
        f"(measured sparse-dense difference: {sparse - dense:+.1f} ms)\n"
        f"  reference  : _foreach_mul_(params, float masks) {ops['foreach_float_mul_ms']:.2f} ms/call"
    )
    d = {k: ph["sparse"][k] - ph["dense"][k] for k in PHASES}
    fwd_bwd = d["forward"] + d["backward"]
    print(
        f"  in-step (phase medians): mask_grads_ {d['mask_grads']:+.2f} ms, opt_step incl. apply_ "
        f"{d['opt_step']:+.2f} ms, forward+backward {fwd_bwd:+.2f} ms (no mask work there: noise)"
    )
    if ratio > 1.05:
        print(
            f"  ratio {ratio:.3f} > 1.05: in isolation {_larger(ops['mask_grads_ms'], ops['apply_ms'])}; "
            f"in-step {_larger(d['mask_grads'], d['opt_step'])}; mask ops explain "
            f"{d['mask_grads'] + d['opt_step']:+.1f} ms of the {sparse - dense:+.1f} ms step difference"
        )

    raw = raw_interleaved(cb, args) if args.raw_pairs > 0 else None
    if raw is not None:
        print(f"\nstep-interleaved without Lightning, {args.raw_pairs} rounds of (dense, ours, ModelPruning) (ms):")
        print("                     forward   backward  step (+ mask ops)      total   median ratio (IQR)")
        for m in RAW_MODES:
            r = raw[m]
            print(
                f"  {m:17s}{r['forward']:10.2f}{r['backward']:11.2f}{r['opt_step']:19.2f}{r['total']:11.2f}"
                f"   {r['ratio']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})"
            )
        print(f"  pruned weights exactly zero after the steps (ours): {bool(raw['sparse']['zero'])}")

    rows = [
        ("dense step (median)", f"{dense:.1f} ms"),
        ("sparse step, PruneAtInit magnitude 0.9 (median)", f"{sparse:.1f} ms"),
        ("ModelPruning l1_unstructured 0.9, pruned at train start (median)", f"{mp:.1f} ms"),
        ("ratio sparse / dense (all steps pooled)", f"{ratio:.3f}"),
        ("ratio sparse / dense per repeat", ", ".join(f"{x:.3f}" for x in pair_ratios)),
        ("**ratio sparse / dense, median of repeats**", f"**{pair_median:.3f}**"),
        ("ratio ModelPruning / dense per repeat", ", ".join(f"{x:.3f}" for x in mp_ratios)),
        ("**ratio ModelPruning / dense, median of repeats**", f"**{mp_median:.3f}**"),
        *(
            (
                f"phase `{k}`: dense / sparse / diff",
                f"{ph['dense'][k]:.1f} / {ph['sparse'][k]:.1f} / {ph['sparse'][k] - ph['dense'][k]:+.1f} ms",
            )
            for k in PHASES
        ),
        ("`MaskSet.mask_grads_()`", f"{ops['mask_grads_ms']:.2f} ms/call ({100 * ops['mask_grads_ms'] / dense:.1f} %)"),
        ("`MaskSet.apply_()`", f"{ops['apply_ms']:.2f} ms/call ({100 * ops['apply_ms'] / dense:.1f} %)"),
        *(
            [
                (
                    "**step-interleaved (plain PyTorch, same enforcement), median of per-step ratios: ours**",
                    f"**{raw['sparse']['ratio']:.3f}** (IQR {raw['sparse']['q1']:.3f}-{raw['sparse']['q3']:.3f}; "
                    f"{raw['dense']['total']:.1f} / {raw['sparse']['total']:.1f} ms)",
                ),
                (
                    "**same, ModelPruning's mechanism (torch.nn.utils.prune global L1)**",
                    f"**{raw['modelpruning']['ratio']:.3f}** (IQR {raw['modelpruning']['q1']:.3f}-"
                    f"{raw['modelpruning']['q3']:.3f}; {raw['modelpruning']['total']:.1f} ms)",
                ),
            ]
            if raw is not None
            else []
        ),
        ("mask memory per masked param", f"{mem['bytes_per_masked_param']:.2f} byte"),
        (
            "mask memory total vs parameter bytes",
            f"{mem['mask_bytes'] / 2**20:.2f} MiB vs {mem['param_bytes'] / 2**20:.2f} MiB "
            f"({100 * mem['extra_vs_params']:.1f} %)",
        ),
        ("pruned fraction after training", f"{measured_sparsity:.4f}"),
        ("exactly-zero fraction of pruned weights", f"{zfrac:.6f}"),
    ]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    md = (
        "# Step time: dense vs. PruneAtInit vs. ModelPruning (ResNet-18, synthetic 3x32x32)\n\n"
        f"- command: `{command}`\n"
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"- torch {env['torch']}, torchvision {env['torchvision']}, pytorch_lightning {env['pytorch_lightning']}, "
        f"lightning_pai {env['lightning_pai']}\n"
        f"- device: {env['device']}, torch threads: {env['threads']}; process cpu/wall per fit: "
        f"{', '.join(f'{u:.2f}' for u in utils)}; 1-min load average {load0:.2f} at start, {load1:.2f} after the fits\n"
        f"- setup: resnet18(num_classes=10), batch {args.batch_size}, SGD(lr=0.1, momentum=0.9, weight_decay=5e-4); "
        f"{args.repeats} interleaved (dense, sparse, ModelPruning) fits, order rotated per repeat, of "
        f"{args.warmup} warm-up + {args.steps} timed steps; "
        f"step = `on_train_batch_start` -> `on_train_batch_end`; mask ops: median of {args.micro_iters} calls\n\n"
        f"{table}\n"
    )
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(f"\nwrote {_rel(args.out)} (total {time.perf_counter() - t_start:.0f} s)")
    return 0


def _larger(mask_grads: float, apply: float, tol: float = 0.2) -> str:
    """Which of the two mask ops costs more, or 'about equal' when within ``tol`` of each other."""
    if abs(mask_grads - apply) <= tol * max(mask_grads, apply):
        return f"mask_grads_ ~ apply_ (about equal, {mask_grads:.1f} vs {apply:.1f} ms)"
    big = "mask_grads_" if mask_grads > apply else "apply_"
    return f"{big} dominates ({mask_grads:.1f} vs {apply:.1f} ms)"


def _rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
