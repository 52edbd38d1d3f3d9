"""Training-step cost of RigL (delta_t = 100) against dense training: torchvision ResNet-18, one process.

Interleaves ``--pairs`` (dense, RigL) ``pytorch_lightning`` fits on synthetic CIFAR-shaped data
(``benchmarks/training_cost/step_time.py``'s module and loader). Each fit runs ``--warmup`` untimed steps and then
``delta_t`` timed steps; RigL's update at step ``delta_t`` falls inside that window (exactly one per
window), so the mean RigL step time is the amortized cost at the paper's update rate.
A step is the wall time from one ``on_train_batch_start`` to the next (or to the end of training),
so it includes every hook (gradient masking, dense-gradient capture, the topology update).

Reports: mean dense step, mean RigL step (window with one update), their ratio, the median ratio of
the non-update steps, and the update step's extra time.

Usage::

    python benchmarks/training_cost/rigl_overhead.py --pairs 4  # what the results file was made with, ~9 min, 2 cores
    python benchmarks/training_cost/rigl_overhead.py --pairs 1 --warmup 3 --delta-t 10   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from step_time import ResNetModule, make_loader

from lightning_pai import RigL

RESULTS = Path(__file__).resolve().parent / "results" / "rigl_overhead.md"


class StepClock(pl.Callback):
    """Wall time between consecutive ``on_train_batch_start`` calls (the last step ends at ``on_train_end``)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    @property
    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def fit_once(rigl: bool, args: argparse.Namespace) -> tuple[list[float], RigL | None]:
    torch.manual_seed(args.seed)
    model = ResNetModule()
    clock = StepClock()
    total = args.warmup + args.delta_t
    callbacks: list = [clock]
    cb = None
    if rigl:
        # t_end as a fraction of `total` steps: the update at step delta_t happens, later ones never.
        cb = RigL(args.sparsity, delta_t=args.delta_t, t_end=1.0, verbose=False)
        callbacks.insert(0, cb)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=total,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, make_loader(args.batch_size, total, args.seed))
    if cb is not None:
        assert cb.updates == 1, cb.updates
    return clock.steps[args.warmup :], cb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--delta-t", type=int, default=100)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.warmup >= args.delta_t:
        p.error("--warmup must be below --delta-t: the timed window has to contain the update")
    dense_steps: list[float] = []
    rigl_steps: list[float] = []
    update_extra: list[float] = []
    pair_means: list[dict[bool, float]] = []
    for pair in range(args.pairs):
        pair_means.append({})
        for rigl in (False, True) if pair % 2 == 0 else (True, False):
            steps, _ = fit_once(rigl, args)
            pair_means[-1][rigl] = statistics.mean(steps)
            (rigl_steps if rigl else dense_steps).extend(steps)
            if rigl:
                at = args.delta_t - args.warmup - 1  # index of step `delta_t` in the timed window
                others = steps[:at] + steps[at + 1 :]
                update_extra.append(steps[at] - statistics.median(others))
            print(f"pair {pair} {'rigl' if rigl else 'dense'}: mean {statistics.mean(steps) * 1e3:.1f} ms", flush=True)
    at = args.delta_t - args.warmup - 1
    n = args.delta_t
    per_fit = [rigl_steps[i * n : (i + 1) * n] for i in range(args.pairs)]
    rigl_plain = [s for fit in per_fit for j, s in enumerate(fit) if j != at]
    dense_mean, rigl_mean = statistics.mean(dense_steps), statistics.mean(rigl_steps)
    median_ratio = statistics.median(rigl_plain) / statistics.median(dense_steps)
    lines = [
        "# RigL step-time overhead: ResNet-18 (torchvision), synthetic 3x32x32, CPU",
        "",
        "Command: `" + " ".join(["python benchmarks/training_cost/rigl_overhead.py", *raw]) + "`",
        "",
        f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {torch.get_num_threads()} threads "
        f"({platform.processor() or platform.machine()}); batch {args.batch_size}, SGD(0.1, momentum 0.9, wd 5e-4); "
        f"RigL({args.sparsity}, delta_t={args.delta_t}, ERK); {args.pairs} interleaved (dense, RigL) fits of "
        f"{args.warmup} warm-up + {n} timed steps, each RigL window containing exactly one topology update.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| dense step, mean | {dense_mean * 1e3:.1f} ms |",
        f"| RigL step, mean over windows with one update per {n} steps | {rigl_mean * 1e3:.1f} ms |",
        f"| **ratio RigL / dense (amortized)** | **{rigl_mean / dense_mean:.3f}** |",
        "| ratio per (dense, RigL) pair | " + ", ".join(f"{m[True] / m[False]:.3f}" for m in pair_means) + " |",
        f"| ratio of medians, steps without update | {median_ratio:.3f} |",
        f"| update step minus median step | {statistics.mean(update_extra) * 1e3:.1f} ms |",
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
