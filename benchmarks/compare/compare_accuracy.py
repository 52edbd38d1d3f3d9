"""RigL through each library on LeNet-300-100 / MNIST, same recipe and seeds (part of ``compare.py``).

Recipe (as ``dst_mnist.py``): 784-300-100-10 MLP, PyTorch's default init (seeded), SGD lr 0.1, momentum 0.9,
weight decay 5e-4 on the weights (0 on biases), batch 100, lr x0.1 at 25/54 and 50/54 of training, 6k
training images held out; RigL every 100 steps until 75 % of training, drop fraction 0.3 cosine-decayed.
Every library sees the same initial weights and the same batches (order drawn from ``10_000 + seed``);
each draws its own random initial masks (ours from its ``seed``, the peers from the global RNG, seeded).

Rows: lightning_pai RigL with its default ERK budgets and with uniform budgets (the matched pair for
rigl-torch, whose only distribution is uniform; its first layer is made sparse so the sparsity is the
requested one, see ``peers.others.RigLTorch``), and sparsimony RigL (ERK). After training, every masked
weight is checked for being exactly zero in the forward weights ("leaks").
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from mnist_common import LENET_300_100, load_mnist, mlp  # noqa: E402
from peers import PRUNERS  # noqa: E402

#: (row key, adapter key, adapter options, label)
CONFIGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("pai_rigl_erk", "pai_rigl", {}, "lightning_pai RigL (ERK)"),
    ("pai_rigl_uniform", "pai_rigl", {"distribution": "uniform"}, "lightning_pai RigL (uniform)"),
    ("rigl_torch", "rigl_torch", {}, "rigl-torch RigLScheduler (uniform)"),
    ("sparsimony_rigl", "sparsimony_rigl", {}, "sparsimony RigL (ERK)"),
]
SPARSITIES = (0.9, 0.98)
#: lightning_pai's own 50-epoch result (benchmarks/reproductions/results/dst_mnist.md, RigL at 98 %: test error %)
OURS_50_EPOCHS = {0.98: 2.16}


def train_one(key: str, options: dict, sparsity: float, seed: int, data: tuple, epochs: int) -> dict[str, Any]:
    """Train one LeNet-300-100 with ``PRUNERS[key]``; returns test error, kept count, leaks, updates, time."""
    train_x, train_y, test_x, test_y = data
    net = mlp(LENET_300_100, seed, "torch")
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD(
        [{"params": weights, "weight_decay": 5e-4}, {"params": biases, "weight_decay": 0.0}], lr=0.1, momentum=0.9
    )
    per_epoch = len(train_x) // 100
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 25 / 54), int(total * 50 / 54)], gamma=0.1)
    pruner = PRUNERS[key](sparsity, seed=seed, total_steps=total, delta_t=100, **options)
    pruner.setup(net, opt)
    gen = torch.Generator().manual_seed(10_000 + seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(per_epoch):
            idx = order[i * 100 : (i + 1) * 100]
            pruner.train_step(net, opt, train_x[idx], train_y[idx])
            sched.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        net.eval()
        wrong = sum(
            int((net(test_x[i : i + 2000]).argmax(1) != test_y[i : i + 2000]).sum()) for i in range(0, 10000, 2000)
        )
    masks, eff = pruner.masks(), pruner.effective_weights()
    kept = sum(int(m.sum()) for m in masks.values())
    size = sum(m.numel() for m in masks.values())
    out = {
        "test_error": 100.0 * wrong / len(test_x),
        "kept": kept,
        "size": size,
        "density": kept / size,
        "leaks": sum(int(((eff[n] != 0) & ~m).sum()) for n, m in masks.items()),
        "layer_density": {n: float(m.float().mean()) for n, m in masks.items()},
        "seconds": seconds,
    }
    pruner.close()
    return out


def run(data_dir: str, epochs: int, seeds: int, configs: list[str] | None = None, log=print) -> dict[str, Any]:
    """Every config x sparsity x seed; returns the section of ``compare.json``."""
    train_x, train_y, _, _, test_x, test_y = load_mnist(data_dir)
    data = (train_x, train_y, test_x, test_y)
    rows: dict[str, Any] = {}
    for row, key, options, label in CONFIGS:
        if configs is not None and row not in configs or not PRUNERS[key].available():
            continue
        rows[row] = {"label": label, "library": PRUNERS[key].library, "results": {}}
        for sparsity in SPARSITIES:
            runs = []
            for seed in range(seeds):
                r = train_one(key, options, sparsity, seed, data, epochs)
                log(
                    f"  {label:36s} sparsity {sparsity:.2f} seed {seed}: test error {r['test_error']:.2f} %, "
                    f"density {r['density']:.4f}, leaks {r['leaks']}, {r['seconds']:.0f} s"
                )
                runs.append(r)
            errs = [r["test_error"] for r in runs]
            rows[row]["results"][f"{sparsity:g}"] = {
                "test_error_mean": statistics.mean(errs),
                "test_error_std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
                "test_errors": errs,
                "density": runs[0]["density"],
                "kept": runs[0]["kept"],
                "size": runs[0]["size"],
                "leaks": max(r["leaks"] for r in runs),
                "layer_density": runs[0]["layer_density"],
                "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
            }
    return {
        "epochs": epochs,
        "seeds": list(range(seeds)),
        "sparsities": list(SPARSITIES),
        "recipe": "LeNet-300-100, SGD lr 0.1 momentum 0.9, wd 5e-4 (weights), batch 100, lr x0.1 at 25/54 and "
        "50/54 of training, RigL delta_t 100, alpha 0.3 cosine, T_end 0.75",
        "rows": rows,
        "reference": {"lightning_pai RigL, 50 epochs (dst_mnist.md)": OURS_50_EPOCHS},
    }
