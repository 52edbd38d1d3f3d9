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
``benchmarks/results/pai_mnist.md`` and prints it.

Usage::

    python benchmarks/pai_mnist.py                      # full run (see --iterations)
    python benchmarks/pai_mnist.py --iterations 300 --seeds 1 --out /tmp/smoke.md   # smoke run
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_pai.core import ScoringContext, prune

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
SPARSITIES = (0.90, 0.95, 0.98)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Lee et al. 2019, Table 1 (LeNet-300-100): SNIP error at 95 % / 98 % sparsity, reference (dense) error.
PAPER_SNIP = {0.95: 1.6, 0.98: 2.4}
PAPER_DENSE = 1.7


def variance_scaling_(weight: torch.Tensor, gen: torch.Generator) -> None:
    """TF ``variance_scaling_initializer()``: truncated normal (|z| < 2), std = sqrt(1 / fan_in) / 0.8796."""
    fan_in = weight.shape[1]
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        z = torch.randn(weight.shape, generator=gen)
        bad = z.abs() >= 2
        while bad.any():
            z[bad] = torch.randn(int(bad.sum()), generator=gen)
            bad = z.abs() >= 2
        weight.copy_(z * std)


def lenet(seed: int) -> nn.Sequential:
    """A variance-scaling-initialised LeNet-300-100 (biases zero)."""
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    gen = torch.Generator().manual_seed(seed)
    for layer in net:
        if isinstance(layer, nn.Linear):
            variance_scaling_(layer.weight, gen)
            nn.init.zeros_(layer.bias)
    return net


def load_mnist(data_dir: str, download: bool) -> tuple[torch.Tensor, ...]:
    """Normalised MNIST as (train_x, train_y, val_x, val_y, test_x, test_y); 10 % of train held out."""

    def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=download)
        x = (ds.data.float().div(255).sub(MNIST_MEAN).div(MNIST_STD)).flatten(1)
        return x, ds.targets.clone()

    x, y = tensors(True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_val = len(x) // 10
    val, train = perm[:n_val], perm[n_val:]
    test_x, test_y = tensors(False)
    return x[train], y[train], x[val], y[val], test_x, test_y


def masks_for(method: str, sparsity: float, seed: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Keep-masks of ``method`` at ``sparsity`` for the seed's initial LeNet (library engine)."""
    net = lenet(seed)
    params = {n: p for n, p in net.named_parameters() if n.endswith("weight")}
    ctx = ScoringContext(params=params, module=net, seed=seed, batches=[batch], extras={"temperature": 200.0})
    iterations = 100 if method == "synflow" else 1
    return prune(ctx, method, sparsity, "global", iterations=iterations)


class StackedLeNets:
    """``M`` LeNet-300-100s trained at once: weights ``[M, in, out]``, biases ``[M, 1, out]``."""

    def __init__(self, nets: list[nn.Sequential], masks: list[dict | None]) -> None:
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        self.weights, self.biases, self.masks = [], [], []
        for i in range(3):
            w = torch.stack([lin[i].weight.detach().t() for lin in linears]).contiguous()
            b = torch.stack([lin[i].bias.detach()[None] for lin in linears]).contiguous()
            name = f"{[1, 3, 5][i]}.weight"
            m = torch.stack(
                [
                    torch.ones_like(lin[i].weight.t()) if mk is None else mk[name].t().float()
                    for lin, mk in zip(linears, masks)
                ]
            )
            self.weights.append(nn.Parameter(w * m))
            self.biases.append(nn.Parameter(b))
            self.masks.append(m.contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[M, B, 784]`` -> logits ``[M, B, 10]``."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < 2:
                h = F.relu(h)
        return h

    @torch.no_grad()
    def error(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
        """Classification error (%) of every model on (x, y)."""
        wrong = torch.zeros(len(self.weights[0]))
        for i in range(0, len(x), chunk):
            xb = x[i : i + chunk].expand(len(wrong), -1, -1)
            wrong += (self(xb).argmax(-1) != y[i : i + chunk]).sum(-1).float()
        return 100.0 * wrong / len(x)


def train(models: StackedLeNets, data: tuple, seeds: list[int], args: argparse.Namespace) -> float:
    """Train all stacked models; model ``k`` draws its batches from a generator seeded with ``seeds[k]``."""
    train_x, train_y = data[0], data[1]
    n = len(train_x)
    optimizer = torch.optim.SGD(
        [{"params": models.weights, "weight_decay": args.weight_decay}, {"params": models.biases, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.decay_every, gamma=0.1)
    gens = {s: torch.Generator().manual_seed(10_000 + s) for s in set(seeds)}
    orders: dict[int, torch.Tensor] = {}
    pos = 0
    per_epoch = n // args.batch_size
    start = time.perf_counter()
    for it in range(args.iterations):
        if it % per_epoch == 0:
            orders = {s: torch.randperm(n, generator=g) for s, g in gens.items()}
            pos = 0
        idx = torch.stack([orders[s][pos : pos + args.batch_size] for s in seeds])
        pos += args.batch_size
        logits = models(train_x[idx])
        # Sum of per-model mean losses: each model's gradient is that of its own mean loss.
        loss = F.cross_entropy(logits.flatten(0, 1), train_y[idx].flatten(), reduction="none").view(idx.shape)
        loss = loss.mean(1).sum()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch._foreach_mul_([w.grad for w in models.weights], models.masks)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(models.weights, models.masks)
        scheduler.step()
        if args.log_every and (it + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - start
            val = models.error(data[2], data[3])
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
        "Command: `" + " ".join(["python benchmarks/pai_mnist.py", *args.argv]) + "`",
        "",
        f"Final test error (%), mean ± std over seeds {args.seeds_list}; global ranking; SGD lr {args.lr}, "
        f"momentum 0.9, batch {args.batch_size}, weight decay {args.weight_decay}, "
        f"lr x0.1 every {args.decay_every} iterations, "
        f"{args.iterations} iterations (~{epochs:.0f} epochs on 54k images); variance-scaling init; "
        "6k images held out.",
        f"Trained {len(args.runs)} models at once in {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}). Pruned weights exactly zero after training: {zero_ok}.",
        "",
        "| method | " + " | ".join(f"{s:.0%} sparsity" for s in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
        f"| dense | {cell(results['dense', 0.0])} (all sparsities) |" + " |" * (len(SPARSITIES) - 1),
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(cell(results[method, s]) for s in SPARSITIES) + " |")
    paper = [f"{PAPER_SNIP[s]:.1f}" if s in PAPER_SNIP else "–" for s in SPARSITIES]
    lines.append("| SNIP, paper (Lee et al. 2019, Table 1) | " + " | ".join(paper) + " |")
    lines.append(f"| dense, paper | {PAPER_DENSE:.1f} |" + " |" * (len(SPARSITIES) - 1))
    lines.append("")
    gaps = [
        f"{s:.0%}: {statistics.mean(results['snip', s]) - PAPER_SNIP[s]:+.2f} pts"
        for s in SPARSITIES
        if s in PAPER_SNIP
    ]
    lines.append("SNIP minus paper: " + ", ".join(gaps) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30_000)
    parser.add_argument("--decay-every", type=int, default=25_000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pai_mnist.md"))
    import sys

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
        for method in METHODS:
            for sparsity in SPARSITIES:
                runs.append((method, sparsity, seed))
                nets.append(lenet(seed))
                masks.append(masks_for(method, sparsity, seed, batch))
    print(f"masks for {len(runs)} models in {time.perf_counter() - start:.1f} s", flush=True)
    args.runs = runs

    models = StackedLeNets(nets, masks)
    seconds = train(models, data, [r[2] for r in runs], args)
    errors = models.error(data[4], data[5])
    with torch.no_grad():
        zero_ok = all(bool((w[m == 0] == 0).all()) for w, m in zip(models.weights, models.masks))
        kept = sum(m.sum((1, 2)) for m in models.masks)
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
