"""Pruning at initialization on LeNet-300-100 / MNIST, side by side with the SNIP paper.

Recipe (Lee et al. 2019, arXiv:1810.02340, Sec. 5): 784-300-100-10 MLP with ReLU, variance-scaling
initialisation (TF's ``variance_scaling_initializer``: truncated normal, fan-in, scale 1; biases 0),
SGD with momentum 0.9, batch 100, weight decay 5e-4 on the weights (the official code adds
``0.00025 * sum(w**2)`` to the loss), learning rate 0.1 decayed by 0.1 every ``--decay-every``
iterations (25k in the paper), 10 % of the training set held out for validation. The masks come from
the library's engine (:func:`lightning_pai.core.prune`, exactly what ``PruneAtInit`` calls) on one
training batch of 100 images; every method of one seed prunes the same initial weights. SynFlow runs
100 rounds on the exponential schedule, GraSP uses temperature 200; all methods rank globally.

CPU budget: every (method, sparsity, seed) model is trained *at the same time* as one batch of models
(``torch.baddbmm`` over a stacked weight tensor), each with its own data order, masks and optimizer
state; mathematically this is the same as training them one by one. Masks are enforced on the
gradients and re-applied after every step, so pruned weights stay exactly zero (checked at the end).

The script writes a markdown table (final test error, mean +- std over seeds) to
``benchmarks/reproductions/results/pai_mnist.md`` and prints it.

Usage::

    python benchmarks/reproductions/pai_mnist.py                      # full run (see --iterations)
    python benchmarks/reproductions/pai_mnist.py --iterations 300 --seeds 1 --out /tmp/smoke.md   # smoke run
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
from mnist_common import LENET_300_100, BatchStream, StackedMLP, base_parser, load_mnist, mlp, weight_names  # noqa: E402

from lightning_pai.core import ScoringContext, prune

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
#: Also available with ``--methods``: FORCE (de Jorge et al. 2021) and Iter-SNIP, both over 60 exponential rounds.
EXTRA_METHODS = ("force", "iter-snip")
SPARSITIES = (0.90, 0.95, 0.98)
# Lee et al. 2019, Table 1 (LeNet-300-100): SNIP error at 95 % / 98 % sparsity, reference (dense) error.
PAPER_SNIP = {0.95: 1.6, 0.98: 2.4}
PAPER_DENSE = 1.7


def lenet(seed: int) -> torch.nn.Sequential:
    """A variance-scaling-initialised LeNet-300-100 (biases zero)."""
    return mlp(LENET_300_100, seed, "variance_scaling")


def masks_for(method: str, sparsity: float, seed: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Keep-masks of ``method`` at ``sparsity`` for the seed's initial LeNet (library engine)."""
    net = lenet(seed)
    params = {n: p for n, p in net.named_parameters() if n in weight_names(net)}
    ctx = ScoringContext(params=params, module=net, seed=seed, batches=[batch], extras={"temperature": 200.0})
    iterations = {"synflow": 100, "force": 60, "iter-snip": 60}.get(method, 1)
    scorer = "snip" if method == "iter-snip" else method
    return prune(ctx, scorer, sparsity, "global", iterations=iterations)


def train(models: StackedMLP, data: tuple, seeds: list[int], args: argparse.Namespace) -> float:
    """Train all stacked models; model ``k`` draws its batches in the order of ``seeds[k]``."""
    train_x, train_y = data[0], data[1]
    optimizer = torch.optim.SGD(
        [{"params": models.weights, "weight_decay": args.weight_decay}, {"params": models.biases, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.decay_every, gamma=0.1)
    stream = BatchStream(len(train_x), args.batch_size, seeds)
    start = time.perf_counter()
    for it in range(args.iterations):
        idx = stream.next()
        # Sum of per-model mean losses: each model's gradient is that of its own mean loss.
        loss = models.losses(train_x[idx], train_y[idx]).sum()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        models.mask_grads_()
        optimizer.step()
        models.apply_masks_()
        scheduler.step()
        if args.log_every and (it + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - start
            val = models.evaluate(data[2], data[3])[0]
            print(
                f"it {it + 1}/{args.iterations}  loss/model {loss.item() / len(seeds):.4f}  "
                f"val err min/median/max {val.min():.2f}/{val.median():.2f}/{val.max():.2f} %  "
                f"{elapsed / (it + 1) * 1000:.0f} ms/it",
                flush=True,
            )
    return time.perf_counter() - start


def table(results: dict, args: argparse.Namespace, seconds: float, zero_ok: bool) -> str:
    """Markdown results table: test error mean +- std per (method, sparsity)."""

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    epochs = args.iterations * args.batch_size / 54_000
    lines = [
        "# Pruning at initialization: LeNet-300-100 on MNIST",
        "",
        "Command: `" + " ".join(["python benchmarks/reproductions/pai_mnist.py", *args.argv]) + "`",
        "",
        f"Final test error (%), mean ± std over seeds {args.seeds_list}; global ranking; SGD lr {args.lr}, "
        f"momentum 0.9, batch {args.batch_size}, weight decay {args.weight_decay}, "
        f"lr x0.1 every {args.decay_every} iterations, "
        f"{args.iterations} iterations (~{epochs:.0f} epochs on 54k images); variance-scaling init; "
        "6k images held out.",
        f"Trained {len(args.runs)} models at once in {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}). Pruned weights exactly zero after training: {zero_ok}.",
        "",
        "| method | " + " | ".join(f"{s:.1%} sparsity" for s in args.sparsities) + " |",
        "|---|" + "---|" * len(args.sparsities),
        f"| dense | {cell(results['dense', 0.0])} (all sparsities) |" + " |" * (len(args.sparsities) - 1),
    ]
    for method in args.methods:
        lines.append(f"| {method} | " + " | ".join(cell(results[method, s]) for s in args.sparsities) + " |")
    paper = [f"{PAPER_SNIP[s]:.1f}" if s in PAPER_SNIP else "–" for s in args.sparsities]
    lines.append("| SNIP, paper (Lee et al. 2019, Table 1) | " + " | ".join(paper) + " |")
    lines.append(f"| dense, paper | {PAPER_DENSE:.1f} |" + " |" * (len(args.sparsities) - 1))
    lines.append("")
    gaps = [
        f"{s:.0%}: {statistics.mean(results['snip', s]) - PAPER_SNIP[s]:+.2f} pts"
        for s in args.sparsities
        if s in PAPER_SNIP and ("snip", s) in results
    ]
    if gaps:
        lines.append("SNIP minus paper: " + ", ".join(gaps) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "pai_mnist.md")
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--decay-every", type=int, default=25_000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--log-every", type=int, default=2000)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *EXTRA_METHODS])
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    args.argv = raw
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data_dir, args.download)
    args.seeds_list = list(range(args.seeds))

    runs, nets, masks = [], [], []
    start = time.perf_counter()
    for seed in args.seeds_list:
        gen = torch.Generator().manual_seed(20_000 + seed)
        pick = torch.randperm(len(data[0]), generator=gen)[: args.batch_size]
        batch = (data[0][pick], data[1][pick])
        runs.append(("dense", 0.0, seed))
        nets.append(lenet(seed))
        masks.append(None)
        for method in args.methods:
            for sparsity in args.sparsities:
                runs.append((method, sparsity, seed))
                nets.append(lenet(seed))
                masks.append(masks_for(method, sparsity, seed, batch))
    print(f"masks for {len(runs)} models in {time.perf_counter() - start:.1f} s", flush=True)
    args.runs = runs

    models = StackedMLP(nets, masks)
    seconds = train(models, data, [r[2] for r in runs], args)
    errors = models.evaluate(data[4], data[5])[0]
    zero_ok = models.pruned_weights_zero()
    kept = models.kept()
    results: dict = {}
    for k, (method, sparsity, _seed) in enumerate(runs):
        total = 784 * 300 + 300 * 100 + 100 * 10
        if method != "dense":
            assert int(kept[k]) == total - round(sparsity * total), (method, sparsity, int(kept[k]))
        results.setdefault((method, sparsity), []).append(float(errors[k]))
    text = table(results, args, seconds, zero_ok)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
