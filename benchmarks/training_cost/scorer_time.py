"""Wall time of each pruning-at-initialization scorer on torchvision ResNet-18, in dense training steps.

For ResNet-18 (CIFAR-10 head) on a batch of 128 random 3x32x32 images, measures

- one dense training step: forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 5e-4) step;
- one full :func:`lightning_pai.core.prune` call per scorer at 90 % global sparsity on one batch — the
  exact call ``PruneAtInit`` makes at fit start, including restoring the model's state afterwards —
  for ``magnitude``, ``random``, ``snip``, ``grasp``, ``synflow`` (1 round) and ``synflow`` (100 rounds,
  its default);

and prints (and writes to ``benchmarks/training_cost/results/scorer_time.md``) each scorer's time as a ratio to the
median dense step measured in the same run.

Usage::

    python benchmarks/training_cost/scorer_time.py                 # ~2-4 min on 2 idle CPU cores
    python benchmarks/training_cost/scorer_time.py --repeats 1 --steps 3 --out /tmp/scorer_time.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from lightning_pai.core import ScoringContext, prune, select_targets

SCORERS = (("magnitude", 1), ("random", 1), ("snip", 1), ("grasp", 1), ("synflow", 1), ("synflow", 100))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed dense steps (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per scorer (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scorer_time.md"))
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def dense_step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    model.train()
    for _ in range(2):
        dense_step()
    step = statistics.median(dense_step() for _ in range(args.steps))
    print(f"dense step: {step * 1000:.1f} ms", flush=True)

    params = select_targets(model)
    ctx = ScoringContext(params=params, module=model, seed=0, batches=[(x, y)], extras={"temperature": 200.0})
    rows = []
    for method, iterations in SCORERS:
        repeats = 1 if iterations > 1 else args.repeats
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            masks = prune(ctx, method, 0.9, "global", iterations=iterations)
            times.append(time.perf_counter() - t0)
        kept = sum(int(m.sum()) for m in masks.values())
        seconds = statistics.median(times)
        rows.append((method, iterations, seconds, seconds / step, kept))
        print(f"{method} ({iterations} round(s)): {seconds:.2f} s = {seconds / step:.1f} dense steps", flush=True)

    total = sum(p.numel() for p in params.values())
    lines = [
        "# Scorer wall time on ResNet-18 (batch 128, 3x32x32)",
        "",
        "Command: `" + " ".join(["python benchmarks/training_cost/scorer_time.py", *raw]) + "`",
        "",
        f"One dense training step (forward, backward, SGD step): **{step * 1000:.1f} ms** (median of {args.steps}); "
        f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}. Each scorer: one `lightning_pai.core.prune` call at 90 % global sparsity on one "
        f"batch (median of {args.repeats} calls; 1 call for 100 rounds), {total:,} targeted weights.",
        "",
        "| scorer | rounds | wall time (s) | ÷ dense step | kept weights |",
        "|---|---|---|---|---|",
    ]
    for method, iterations, seconds, ratio, kept in rows:
        lines.append(f"| {method} | {iterations} | {seconds:.2f} | {ratio:.1f} | {kept:,} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
