"""Truly sparse training (``backend="sparse"``) reaches the accuracy of the masked-dense backend: MNIST, Fashion-MNIST.

Issue 26, item 4. LeNet-300-100 trained by SET and RigL at 98 % sparsity (and any ``--sparsities``), each with
``backend="masked"`` (dense weights, masks enforced) and ``backend="sparse"`` (CSR values only, the compiled
kernels), on the same seeds, initial weights and data order, through the public plain-loop adapter
(:class:`lightning_pai.Sparsifier`). Reported per dataset, method and sparsity: test accuracy (mean ± std over
seeds) of each backend, the per-seed differences, whether the two runs' final masks are identical, and the
wall time of one training epoch of each backend (update steps included).

The two backends compute the same steps in a different floating-point order (the CSR products sum the kept
terms per row; the dense GEMM sums all terms in blocks), so after thousands of steps their weights drift apart
by rounding and a magnitude-ranked drop can pick a different weight: the runs are equal in distribution, not
bit for bit (the 100-step equality is a unit test, ``tests/test_sparse_backend.py``).

Recipe: PyTorch's default ``nn.Linear`` initialisation, SGD momentum 0.9, lr 0.1 decayed x0.1 at 50 % and 75 %
of training, weight decay 5e-4 on the weights, batch 100, 10 % of the training set held out; ``SET(sparsity,
backend=...)`` (ER, ζ = 0.3 at every epoch end) and ``RigL(sparsity, backend=...)`` (ERK, ΔT = 100, α = 0.3,
cosine decay to 75 % of training) defaults.

Usage::

    python benchmarks/reproductions/sparse_backend_mnist.py --data-dir ../shared/data   # the results file
    python benchmarks/reproductions/sparse_backend_mnist.py --epochs 1 --seeds 1 --datasets MNIST --out /tmp/s.md
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

from lightning_pai import SET, RigL, Sparsifier  # noqa: E402

METHODS = {"SET": SET, "RigL": RigL}
BACKENDS = ("masked", "sparse")


def run(method: str, backend: str, sparsity: float, seed: int, data: tuple, args: argparse.Namespace) -> dict:
    """Train one LeNet-300-100; return its test accuracy %, final masks, weights and seconds per epoch."""
    train_x, train_y, test_x, test_y = data
    model, optimizer, scheduler = lenet_recipe(seed, args, len(train_x))
    names = set(weight_names(model))
    per_epoch = len(train_x) // args.batch_size
    sparsifier = Sparsifier(
        METHODS[method](sparsity, seed=seed, verbose=False, backend=backend),
        model,
        optimizer,
        total_steps=args.epochs * per_epoch,
        steps_per_epoch=per_epoch,
    )
    start = time.perf_counter()
    train_sparsified(model, optimizer, scheduler, sparsifier, train_x, train_y, args, seed)
    seconds = (time.perf_counter() - start) / args.epochs
    masks = {n: sparsifier.masks[n].clone() for n in sparsifier.masks.names}
    sparsifier.close()  # a sparse run's layers become nn.Linear again (dense weight, zeros where pruned)
    acc = test_accuracy(model, test_x, test_y)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in names:
        assert bool((state[n][~masks[n]] == 0).all()), f"{n}: a pruned weight is not zero"
    return {"acc": acc, "masks": masks, "state": state, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "sparse_backend_mnist.md")
    parser.add_argument("--datasets", nargs="+", default=["MNIST", "FashionMNIST"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.98])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    args = parser.parse_args(raw)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        train_x, train_y, _, _, test_x, test_y = load_mnist(args.data_dir, args.download, dataset)
        data = (train_x, train_y, test_x, test_y)
        for method in args.methods:
            for sparsity in args.sparsities:
                runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
                for seed in range(args.seeds):
                    for backend in BACKENDS:
                        out = run(method, backend, sparsity, seed, data, args)
                        runs[backend].append(out)
                        print(
                            f"{dataset} {method} {sparsity} seed {seed} {backend}: {out['acc']:.2f} % "
                            f"({out['seconds']:.2f} s/epoch)",
                            flush=True,
                        )
                rows.append((dataset, method, sparsity, runs))
    minutes = (time.perf_counter() - started) / 60

    def mean_std(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"

    lines = [
        "# Truly sparse vs masked-dense training: LeNet-300-100 test accuracy",
        "",
        "Command: `" + " ".join(["python benchmarks/reproductions/sparse_backend_mnist.py", *raw]) + "`",
        "",
        f"Test accuracy %, mean ± std over seeds 0..{args.seeds - 1} (same initial weights, masks and data order "
        f"per seed for both backends); SGD lr {args.lr}, momentum 0.9, batch {args.batch_size}, weight decay "
        f"{args.weight_decay}, lr x0.1 at 50 % and 75 %, {args.epochs} epochs; method defaults through "
        f"`Sparsifier`. {minutes:.1f} min on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}). Pruned weights exactly zero after training: checked. "
        "`s/epoch`: wall time of one training epoch (updates included) while nothing else ran in this process.",
        "",
        "| dataset | method | sparsity | masked | sparse | sparse - masked, per seed | final masks equal | "
        "s/epoch masked / sparse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, method, sparsity, runs in rows:
        masked, sparse = runs["masked"], runs["sparse"]
        diffs = ", ".join(f"{s['acc'] - m['acc']:+.2f}" for m, s in zip(masked, sparse))
        equal = []
        for m, s in zip(masked, sparse):
            differ = sum(int((m["masks"][n] != s["masks"][n]).sum()) for n in m["masks"])
            total = sum(int(m["masks"][n].sum()) for n in m["masks"])
            equal.append("yes" if differ == 0 else f"{differ / (2 * total):.1%} of kept differ")
        sec_m = statistics.median(r["seconds"] for r in masked)
        sec_s = statistics.median(r["seconds"] for r in sparse)
        lines.append(
            f"| {dataset} | {method} | {sparsity:.0%} | {mean_std([r['acc'] for r in masked])} | "
            f"{mean_std([r['acc'] for r in sparse])} | {diffs} | {'; '.join(equal)} | {sec_m:.2f} / {sec_s:.2f} |"
        )
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
