"""DEEP R on LeNet-300-100 / MNIST at 90 % and 98 % sparsity, beside the published Deep-R figures.

The reference figures are the DEEP-R column of TimDettmers/sparse_learning's
``results/MNIST_sparse_summary.csv``: 98.19 % test accuracy at 90 % sparsity and 98.21 % at 98 %
(LeNet-300-100; that repository's MNIST recipe: SGD momentum 0.9, lr 0.1, batch 100, weight decay 5e-4,
100 epochs).

Unlike the stacked harnesses (``dst_mnist.py``), every model here is trained by the library's public
plain-loop adapter, :class:`lightning_pai.Sparsifier` driving a ``DeepR`` method object, exactly as a
user would: ``sparsifier.step()`` masks the gradients, steps SGD, applies DEEP R's L1 + noise move to the
active parameters and rewires the connections whose parameter crossed zero. So the table measures the
callback's own code path (one model at a time, slower than the stacked harness).

Recipe: PyTorch's default ``nn.Linear`` initialisation, ERK-like initial masks (``DeepR``'s default
``distribution="erk"``), SGD momentum 0.9, lr 0.1 decayed x0.1 at 50 % and 75 % of training, weight decay
5e-4 on the weights, batch 100, 10 % of the training set held out, ``DeepR`` defaults ``l1 = noise = 1e-5``.

Usage::

    python benchmarks/reproductions/deepr_mnist.py --epochs 20          # what the results file was made with
    python benchmarks/reproductions/deepr_mnist.py --epochs 1 --seeds 1 --out /tmp/smoke.md   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/mnist_common.py

import torch  # noqa: E402
from mnist_common import (  # noqa: E402
    base_parser,
    lenet_recipe,
    load_mnist,
    test_accuracy,
    train_sparsified,
    weight_names,
    write_results,
)

from lightning_pai import DeepR, Sparsifier  # noqa: E402

SPARSITIES = (0.90, 0.98)
#: TimDettmers/sparse_learning, results/MNIST_sparse_summary.csv, DEEP-R column (test accuracy %).
PAPER_DEEPR = {0.90: 98.19, 0.98: 98.21}


def run(sparsity: float, seed: int, data: tuple, args: argparse.Namespace) -> tuple[float, int, int]:
    """Train one DEEP R LeNet; return (test accuracy %, kept weights, topology updates)."""
    train_x, train_y, test_x, test_y = data
    model, optimizer, scheduler = lenet_recipe(seed, args, len(train_x))
    names = set(weight_names(model))
    total = args.epochs * (len(train_x) // args.batch_size)
    method = DeepR(sparsity, seed=seed, verbose=False)
    sparsifier = Sparsifier(method, model, optimizer, total_steps=total)
    train_sparsified(model, optimizer, scheduler, sparsifier, train_x, train_y, args, seed)
    acc = test_accuracy(model, test_x, test_y)
    masks = sparsifier.masks
    kept = sum(int(masks[n].sum()) for n in names)
    zero_ok = all(bool((p[~masks[n]] == 0).all()) for n, p in model.named_parameters() if n in names)
    assert zero_ok, "a dormant connection's weight is not zero"
    return acc, kept, method.updates


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "deepr_mnist.md")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    args = parser.parse_args(raw)
    torch.set_num_threads(args.threads)
    train_x, train_y, _, _, test_x, test_y = load_mnist(args.data_dir, args.download)
    data = (train_x, train_y, test_x, test_y)
    start = time.perf_counter()
    results: dict[float, list] = {}
    for sparsity in args.sparsities:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            out = run(sparsity, seed, data, args)
            results.setdefault(sparsity, []).append(out)
            print(f"sparsity {sparsity} seed {seed}: acc {out[0]:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# DEEP R: LeNet-300-100 on MNIST",
        "",
        "Command: `" + " ".join(["python benchmarks/reproductions/deepr_mnist.py", *raw]) + "`",
        "",
        f"Test accuracy %, mean ± std over seeds 0..{args.seeds - 1}; SGD lr {args.lr}, momentum 0.9, batch "
        f"{args.batch_size}, weight decay {args.weight_decay}, lr x0.1 at 50 % and 75 %, {args.epochs} epochs; "
        f"`DeepR(sparsity, seed=seed)` defaults (l1 = noise = 1e-5, ERK initial masks) through `Sparsifier`. "
        f"{minutes:.1f} min on {torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}). "
        "Dormant weights exactly zero after training: checked.",
        "",
        "| sparsity | DeepR (ours) | kept weights | topology updates | Deep-R, sparse_learning summary |",
        "|---|---|---|---|---|",
    ]
    for sparsity, rows in results.items():
        accs = [r[0] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        paper = PAPER_DEEPR.get(round(sparsity, 2))
        lines.append(
            f"| {sparsity:.0%} | {statistics.mean(accs):.2f} ± {std:.2f} | {rows[0][1]} | {rows[0][2]} | "
            f"{'' if paper is None else f'{paper:.2f}'} |"
        )
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
