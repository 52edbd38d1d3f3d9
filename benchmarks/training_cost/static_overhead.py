"""What a static mask costs per training step, beside any masked-dense method's floor: one pass over the gradients.

Issue 26, item 3. For every model of the step-time table of ``benchmarks/compare/results/compare.md`` (LeNet-300-100,
ResNet-18, ViT-Tiny, ResNet-50, ViT-S; same shapes, batches, SGD and 90 % sparsity, through ``compare.py``'s
step-level interleaved timing: one step of each row per round, order rotated), four rows:

- ``dense``: the baseline every ratio is taken against;
- ``PruneAtInit magnitude``: lightning_pai's masked-dense static mask (gradients masked inside backward by the
  compiled one-pass kernel, no post-step re-mask for SGD, the ``Sparsifier`` bookkeeping);
- ``floor``: dense training plus one in-place pass over every target's gradient right after backward
  accumulates it (``grad.mul_(1.0)`` in the same ``register_post_accumulate_grad_hook`` slot; PyTorch's fastest
  read-and-write of a tensor). A masked-dense method has to touch each target gradient (or each weight) at least
  once per step, so this is what no such method can go under; it reads no mask, so it is a loose floor;
- ``Lightning ModelPruning l1_unstructured``: the reference the issue names (forward pre-hooks ``w = w_orig * m``).

Each model runs ``--repeats`` times (fresh models each time); the table gives the median over repeats of each
repeat's median per-round ratio, and every repeat's value.

Usage::

    python benchmarks/training_cost/static_overhead.py                       # results/static_overhead.md
    python benchmarks/training_cost/static_overhead.py --models lenet --repeats 1 --out /tmp/x.md   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "compare"))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
from peers import PRUNERS, Pruner  # noqa: E402
from sparse_backend import cpu_facts, kernels_used, write_with_load  # noqa: E402

RESULTS = HERE / "results" / "static_overhead.md"
#: Timed rounds per repeat (the slow models get fewer).
ROUNDS = {"lenet": 1500, "resnet18": 80, "vit_tiny": 80, "resnet50": 24, "vit_small": 30}


class GradientPass(Pruner):
    """Dense training plus one in-place pass over each target's gradient inside backward (the floor row)."""

    key, library, method = "floor", "PyTorch", "floor: dense + one pass over the target gradients"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        params = dict(model.named_parameters())

        def touch(param: Tensor) -> None:
            with torch.no_grad():
                param.grad.mul_(1.0)

        for name in self.targets:
            params[name].register_post_accumulate_grad_hook(touch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(ROUNDS), default=list(ROUNDS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds-scale", type=float, default=1.0, help="multiply every model's timed rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    PRUNERS[GradientPass.key] = GradientPass
    keys = ["dense", "pai_pai", "floor", "modelpruning"]
    device = torch.device("cpu")
    cpu, flags = cpu_facts()
    load_before, started = os.getloadavg(), time.perf_counter()
    results: dict[str, list[dict]] = {}
    for name in args.models:
        rounds = max(5, int(ROUNDS[name] * args.rounds_scale))
        for r in range(args.repeats):
            print(f"{name}: repeat {r + 1}/{args.repeats}, {rounds} rounds", flush=True)
            results.setdefault(name, []).append(compare.time_model(name, keys, rounds, 5, device))
    labels = {k: PRUNERS[k]().label for k in keys}
    lines = [
        "# Static-mask step time against the one-pass floor (issue 26, item 3)",
        "",
        f"- command: `python {shlex.join(['benchmarks/training_cost/static_overhead.py', *(argv or sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
        f"{args.threads} threads",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; flags: {flags}",
        f"- masking kernel: {kernels_used()}",
        f"- sparsity {compare.SPARSITY} of every Conv/Linear weight; SGD(lr 0.01, momentum 0.9, wd 5e-4); "
        f"step-level interleaved rounds (compare.py's `time_model`), {args.repeats} repeats per model",
        "",
        "Each cell: median over repeats of the repeat's median per-round ratio to dense, then every repeat's value. "
        "`ours - floor`: the part of our overhead above one pass over the gradients.",
        "",
        "| model | dense step (ms) | " + " | ".join(labels[k] for k in keys[1:]) + " | ours - floor |",
        "|---|---|" + "---|" * len(keys),
    ]
    for reps in results.values():
        cells = []
        med = {}
        for k in keys[1:]:
            ratios = [rep["libraries"][k]["ratio_median"] for rep in reps]
            med[k] = statistics.median(ratios)
            cells.append(f"**{med[k]:.3f}** ({', '.join(f'{v:.3f}' for v in ratios)})")
        dense_ms = statistics.median(rep["libraries"]["dense"]["median_ms"] for rep in reps)
        lines.append(
            f"| {reps[0]['label']} | {dense_ms:.2f} | "
            + " | ".join(cells)
            + f" | {med['pai_pai'] - med['floor']:+.3f} |"
        )
    return write_with_load(args.out, lines, load_before, started)


if __name__ == "__main__":
    raise SystemExit(main())
