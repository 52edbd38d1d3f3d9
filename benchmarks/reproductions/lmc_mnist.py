"""Linear mode connectivity (Frankle et al. ICML 2020) of LeNet-300-100 on MNIST, dense and sparse.

For each setting, a network at its fork point is copied twice; the copies are trained with different data
orders (SGD with different seeds) and ``lightning_pai.instability`` / ``masked_instability`` reports the test
error along the linear path between them (30 points) and its barrier ``max_α E(α) − (E(0) + E(1)) / 2``
(instability, in points of test error). As a control, two copies trained with the *same* data order must give
a barrier of exactly 0.

Settings (``--sparsity`` of the weights, magnitude masks of one dense training run = one-shot IMP, global):

- dense, fork at initialization (the paper: LeNet is stable at init, instability ≈ 0);
- sparse, rewound to initialization (step 0) with the magnitude mask at ``--sparsity`` (the paper: at high
  sparsity IMP subnetworks rewound to step 0 become unstable);
- sparse, rewound to step ``--rewind`` of the dense run (late rewinding: stable again);
- random reinitialization of the sparse mask (a control the paper finds unstable and not matching).

Usage::

    python benchmarks/reproductions/lmc_mnist.py                 # what the results file was made with
    python benchmarks/reproductions/lmc_mnist.py --epochs 1 --out /tmp/lmc.md   # smoke run
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/mnist_common.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mnist_common import LENET_300_100, base_parser, load_mnist, mlp, weight_names, write_results  # noqa: E402

from lightning_pai import instability  # noqa: E402
from lightning_pai.core.stability import masked_instability  # noqa: E402


def trainer(x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int, stop_at: int | None = None):
    """``train(model, seed)``: SGD momentum 0.9 on ``(x, y)``, data order from ``seed``; ``stop_at`` steps max."""

    def train(model: torch.nn.Module, seed: int) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        gen = torch.Generator().manual_seed(seed)
        step = 0
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for b in range(len(x) // batch):
                idx = order[b * batch : (b + 1) * batch]
                optimizer.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
                step += 1
                if stop_at is not None and step >= stop_at:
                    return

    return train


def error(x: torch.Tensor, y: torch.Tensor):
    def evaluate(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(1) != y).float().mean()) * 100

    return evaluate


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude masks over the LeNet's weights (biases dense)."""
    names = weight_names(model)
    params = dict(model.named_parameters())
    scores = torch.cat([params[n].detach().abs().flatten() for n in names])
    k = int(round((1 - sparsity) * scores.numel()))
    threshold = scores.topk(k).values.min()
    return {n: params[n].detach().abs() >= threshold for n in names}


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "lmc_mnist.md")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--rewind", type=int, default=500, help="late-rewinding step of the dense run")
    parser.add_argument("--points", type=int, default=30)
    args = parser.parse_args(raw)
    torch.set_num_threads(args.threads)
    train_x, train_y, _, _, test_x, test_y = load_mnist(args.data_dir, args.download)
    evaluate = error(test_x, test_y)
    train = trainer(train_x, train_y, args.epochs, args.lr, args.batch_size)
    start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        init = mlp(LENET_300_100, seed, "torch")
        # one dense run: its final weights give the magnitude mask, its step-k weights the late rewind point
        rewound = copy.deepcopy(init)
        trainer(train_x, train_y, args.epochs, args.lr, args.batch_size, stop_at=args.rewind)(rewound, 1000 + seed)
        trained = copy.deepcopy(rewound)
        trainer(train_x, train_y, args.epochs, args.lr, args.batch_size)(trained, 2000 + seed)
        masks = magnitude_masks(trained, args.sparsity)
        reinit = mlp(LENET_300_100, 10_000 + seed, "torch")
        settings = [
            ("dense, fork at init", init, None),
            ("sparse, rewind to step 0", init, masks),
            (f"sparse, rewind to step {args.rewind}", rewound, masks),
            ("sparse, random reinit", reinit, masks),
        ]
        for name, fork, fork_masks in settings:

            def run(seeds: tuple[int, int], fork=fork, fork_masks=fork_masks):  # noqa: ANN001, ANN202
                if fork_masks is None:
                    return instability(copy.deepcopy(fork), train, evaluate, seeds, args.points)
                return masked_instability(fork, fork_masks, train, evaluate, seeds, args.points)

            different = run((3 * seed, 3 * seed + 1))
            same = run((3 * seed, 3 * seed)) if name == "sparse, rewind to step 0" else None
            rows.append((name, seed, different, same))
            print(f"seed {seed} {name}: barrier {different.barrier:.2f} pts", flush=True)
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "# Linear mode connectivity: LeNet-300-100 on MNIST",
        "",
        "Command: `" + " ".join(["python benchmarks/reproductions/lmc_mnist.py", *raw]) + "`",
        "",
        f"Each copy trains {args.epochs} epochs (SGD lr {args.lr}, momentum 0.9, batch {args.batch_size}); test error "
        f"(%) at {args.points} points of the linear path; sparsity {args.sparsity:.1%} (global magnitude mask of "
        f"the dense run, one-shot IMP). {minutes:.1f} min on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}).",
        "",
        "| setting | seed | error copy 1 | error copy 2 | max error on path | barrier (pts) |"
        " same data order: barrier |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seed, r, same in rows:
        lines.append(
            f"| {name} | {seed} | {r.errors[0]:.2f} | {r.errors[-1]:.2f} | {max(r.errors):.2f} | {r.barrier:.2f} | "
            f"{'' if same is None else f'{same.barrier:.2f}'} |"
        )
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
