"""Lottery tickets on LeNet-300-100 / MNIST: Frankle & Carbin 2019, Fig. 3, side by side.

Recipe (Frankle & Carbin 2019, arXiv:1803.03635, Fig. 2 and App. G): 784-300-100-10 MLP, Gaussian Glorot
initialisation, Adam lr 1.2e-3, batch 60; each round prunes 20 % of the remaining weights of the hidden
layers and 10 % of the output layer, layer-wise by magnitude, then rewinds the survivors to their
initial values. 5,000 images of the training set are held out for validation (the paper's early-stopping
criterion is the minimum validation loss). Round ``r`` keeps ``0.8**r`` of the hidden weights.

Runs, all from the same engine call :class:`lightning_pai.LotteryTicket` makes every round
(:func:`lightning_pai.core.lottery.prune_remaining` with ``distribution="uniform"`` and
``layer_fractions={"5.weight": 0.1}``):

- **ticket** (``rewind_to="init"``), one per seed;
- **random reinit** control: each ticket's masks of round ``r``, trained from a fresh Glorot draw (the
  paper's control: structure kept, initialisation replaced), one per seed and round;
- **rewind to epoch 1** (``rewind_to="epoch:1"``, Frankle et al. 2020) and **learning-rate rewinding**
  (``rewind_to="lr"``, Renda et al. 2020: trained weights kept, optimizer restarted; with this constant-LR
  Adam recipe there is no schedule to replay), seed 0 only.

Every round has the same length (``--iterations``) and replays the same data order (from the rewind
point). CPU budget: the models are trained together as one stack (see ``mnist_common``); the control of
round ``r`` trains alongside the tickets' round ``r + 1``. The paper trains 50,000 iterations per round;
the default here is fewer (see ``--iterations``) — reported in the table header.

Usage::

    python benchmarks/reproductions/lottery_mnist.py                                   # full run
    python benchmarks/reproductions/lottery_mnist.py --rounds 3 --iterations 300 --seeds 1 --out /tmp/lt.md   # smoke
    # the same run split over two processes (one CPU thread each), then merged:
    python benchmarks/reproductions/lottery_mnist.py --seed-list 0 --threads 1 --json /tmp/a.json &
    python benchmarks/reproductions/lottery_mnist.py --seed-list 1,2 --threads 1 --json /tmp/b.json; wait
    python benchmarks/reproductions/lottery_mnist.py --merge /tmp/a.json /tmp/b.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/mnist_common.py

import torch  # noqa: E402
from mnist_common import (  # noqa: E402
    LENET_300_100,
    BatchStream,
    StackedMLP,
    adam_step,
    base_parser,
    load_mnist,
    mlp,
    weight_names,
)

from lightning_pai.core.lottery import prune_remaining

OUTPUT_LAYER = "5.weight"
# Frankle & Carbin 2019, Fig. 3 (LeNet-300-100): densities (% of weights remaining) shown in the figure.
PAPER_NOTE = (
    "Paper anchor (Frankle & Carbin 2019, Fig. 3): winning tickets at 51.3 % and 21.1 % of the weights reach at "
    "least the dense network's test accuracy, at 3.6 % about the dense accuracy; randomly reinitialised tickets "
    "fall behind below ~50 % remaining."
)


class Slots:
    """The stacked models and their per-model Adam state, with per-model resets (rewinds)."""

    def __init__(self, nets: list, names: list[str], seeds: list[int], batch_size: int, n_train: int) -> None:
        self.names = names
        self.model = StackedMLP(nets, [None] * len(nets))
        zeros = lambda: [torch.zeros_like(p) for p in self.model.params]  # noqa: E731
        self.adam = {"exp_avg": zeros(), "exp_avg_sq": zeros()}
        self.steps = torch.zeros(len(nets))
        self.stream = BatchStream(n_train, batch_size, seeds)

    @torch.no_grad()
    def set(self, k: int, weights: dict, biases: list, masks: dict, adam: dict | None, steps: int, pos: int) -> None:
        """Load model ``k``: weights ``{name: [out, in]}`` (masked here), biases, masks, Adam state, data position."""
        for i, name in enumerate(self.names):
            self.model.masks[i][k] = masks[name].t().float()
            self.model.weights[i][k] = weights[name].t() * self.model.masks[i][k]
            self.model.biases[i][k] = biases[i]
        for key in ("exp_avg", "exp_avg_sq"):
            for j, buf in enumerate(self.adam[key]):
                buf[k] = 0 if adam is None else adam[key][j]
                if j < len(self.names):  # the state of newly pruned weights is zeroed once, here
                    buf[k] *= self.model.masks[j][k]
        self.steps[k] = steps
        self.stream.pos[k] = pos

    def capture(self, k: int) -> dict:
        """Model ``k``'s weights, biases, Adam state, step and data position (a rewind point)."""
        return {
            "weights": self.model.model_weights(k, self.names),
            "biases": [b[k].detach().clone() for b in self.model.biases],
            "adam": {key: [buf[k].clone() for buf in bufs] for key, bufs in self.adam.items()},
            "steps": int(self.steps[k]),
            "pos": self.stream.pos[k],
        }

    def masks(self, k: int) -> dict:
        return {n: m[k].t().bool().clone() for n, m in zip(self.names, self.model.masks)}

    def step(self, data: tuple, lr: float) -> None:
        idx = self.stream.next()
        loss = self.model.losses(data[0][idx], data[1][idx]).sum()
        for p in self.model.params:
            p.grad = None
        loss.backward()
        self.model.mask_grads_()
        adam_step(self.model.params, self.adam, self.steps, lr)
        self.model.apply_masks_()  # masked grads keep the (zeroed) Adam state of pruned weights at zero


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "lottery_mnist.md")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds (overrides --seeds)")
    parser.add_argument("--json", default=None, help="also write the raw results here (for --merge)")
    parser.add_argument("--merge", nargs="+", default=None, help="only merge these --json files into the table")
    parser.add_argument("--rounds", type=int, default=16, help="training rounds incl. the dense round 0")
    parser.add_argument("--iterations", type=int, default=8_000, help="per round (paper: 50,000)")
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--eval-every", type=int, default=1_000)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args.merge:
        merge(args.merge, args.out)
        return
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data_dir, args.download, holdout=5_000 / 60_000)
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    n_train = len(data[0])
    epoch_steps = n_train // args.batch_size

    # Slots: tickets (one per seed), epoch:1 ticket, lr-rewind ticket, then one random-reinit control per seed.
    extra = [("epoch1", 0), ("lr", 0)] if 0 in seeds else []
    kinds = [("ticket", s) for s in seeds] + extra + [("reinit", s) for s in seeds]
    inits = {k: mlp(LENET_300_100, seed, "glorot_normal") for k, (kind, seed) in enumerate(kinds) if kind != "reinit"}
    nets = [inits.get(k) or mlp(LENET_300_100, 500 + seed, "glorot_normal") for k, (_, seed) in enumerate(kinds)]
    names = weight_names(nets[0])
    slots = Slots(nets, names, [seed for _, seed in kinds], args.batch_size, n_train)
    init_points = {k: slots.capture(k) for k in inits}
    late_point: dict | None = None
    ticket_masks: dict[tuple[int, int], dict] = {}  # (seed, round) -> masks, for the controls
    results: dict[tuple[str, int, int], dict] = {}  # (kind, seed, round) -> metrics
    fractions = {OUTPUT_LAYER: 0.1}
    start = time.perf_counter()
    for rnd in range(args.rounds + 1):  # the extra round trains the last controls
        for k, (kind, seed) in enumerate(kinds):
            if kind == "reinit":
                if rnd >= 1:  # the control of round rnd-1: that round's ticket masks, a fresh init per round
                    fresh = mlp(LENET_300_100, 1_000 * (rnd - 1) + 500 + seed, "glorot_normal")
                    point = slots.capture(k)
                    point["weights"] = {n: fresh.get_parameter(n).detach() for n in names}
                    point["biases"] = [torch.zeros_like(b) for b in point["biases"]]
                    slots.set(k, point["weights"], point["biases"], ticket_masks[seed, rnd - 1], None, 0, 0)
                continue
            if rnd == 0 or rnd >= args.rounds:
                continue
            trained = slots.capture(k)
            scores = {n: w.abs() for n, w in trained["weights"].items()}
            masks = prune_remaining(scores, slots.masks(k), 0.2, "uniform", fractions)
            if kind == "ticket":
                p = init_points[k]
                slots.set(k, p["weights"], p["biases"], masks, None, 0, 0)
            elif kind == "epoch1":
                p = late_point
                slots.set(k, p["weights"], p["biases"], masks, p["adam"], p["steps"], p["pos"])
            else:  # lr rewinding: trained weights, restarted optimizer, data order from the start
                slots.set(k, trained["weights"], trained["biases"], masks, None, 0, 0)
        for k, (kind, seed) in enumerate(kinds):
            if kind == "ticket" and rnd < args.rounds:
                ticket_masks[seed, rnd] = slots.masks(k)
        best_val = torch.full((len(kinds),), float("inf"))
        early = torch.zeros(len(kinds))
        for it in range(1, args.iterations + 1):
            slots.step(data, args.lr)
            if rnd == 0 and it == min(epoch_steps, args.iterations) and extra:  # end of epoch 0
                late_point = slots.capture(kinds.index(("epoch1", 0)))
            if it % args.eval_every == 0 or it == args.iterations:
                _, val_loss = slots.model.evaluate(data[2], data[3])
                test_err, _ = slots.model.evaluate(data[4], data[5])
                better = val_loss < best_val
                best_val = torch.where(better, val_loss, best_val)
                early = torch.where(better, test_err, early)
        assert slots.model.pruned_weights_zero()
        kept = slots.model.kept()
        for k, (kind, seed) in enumerate(kinds):
            r = rnd - 1 if kind == "reinit" else rnd
            if 0 <= r < args.rounds:
                total = sum(m[k].numel() for m in slots.model.masks)
                results[kind, seed, r] = {
                    "density": float(kept[k]) / total,
                    "final": 100 - float(test_err[k]),
                    "early": 100 - float(early[k]),
                }
        elapsed = time.perf_counter() - start
        ticket_acc = [results["ticket", s, rnd]["final"] for s in seeds] if rnd < args.rounds else []
        print(
            f"round {rnd}: {elapsed / 60:.1f} min; ticket final acc {ticket_acc}; "
            f"density {results.get(('ticket', 0, rnd), {}).get('density', float('nan')):.4f}",
            flush=True,
        )
    meta = {
        "iterations": args.iterations,
        "eval_every": args.eval_every,
        "lr": args.lr,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "minutes": (time.perf_counter() - start) / 60,
        "command": " ".join(["python benchmarks/reproductions/lottery_mnist.py", *raw]),
    }
    if args.json:
        rows = [[kind, seed, r, metrics] for (kind, seed, r), metrics in results.items()]
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}))
    if 0 not in seeds:  # the table needs seed 0's rewinding variants: merge with the run that has them
        return
    text = table(results, [meta], args.out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def merge(paths: list[str], out: str) -> None:
    """Combine the ``--json`` results of split runs into one table."""
    results, metas = {}, []
    for path in paths:
        blob = json.loads(Path(path).read_text())
        metas.append(blob["meta"])
        results.update({(kind, seed, r): metrics for kind, seed, r, metrics in blob["results"]})
    text = table(results, metas, out)
    Path(out).write_text(text)
    print(text)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(results: dict, metas: list[dict], out: str) -> str:
    """Markdown: per round, density and test accuracy (final / at min val loss) of every run."""
    seeds = sorted({seed for kind, seed, _ in results if kind == "ticket"})
    m = metas[0]
    commands = "; ".join(f"`{x['command']}` ({x['minutes']:.1f} min, {x['threads']} thread(s))" for x in metas)
    lines = [
        "# Lottery tickets: LeNet-300-100 on MNIST",
        "",
        f"Command(s): {commands}" + (f"; merged into `{out}`" if len(metas) > 1 else ""),
        "",
        f"Test accuracy (%) after {m['iterations']} iterations per round (paper: 50,000) at the end of the round "
        f"(**final**) and at the evaluation (every {m['eval_every']} iterations) with the lowest validation loss "
        f"(**early**, the paper's early-stopping criterion); mean ± std over seeds {seeds}. Adam lr {m['lr']}, "
        f"batch {m['batch_size']}, Glorot-normal init, hidden layers pruned 20 %/round and the output layer 10 %, "
        "layer-wise.",
        "",
        PAPER_NOTE,
        "",
        "| round | weights remaining | ticket final | reinit final | ticket early | reinit early | "
        "ticket − reinit (early) | epoch:1 rewind final (seed 0) | lr rewind final (seed 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in range(m["rounds"]):
        t_final = [results["ticket", s, r]["final"] for s in seeds]
        c_final = [results["reinit", s, r]["final"] for s in seeds]
        t_early = [results["ticket", s, r]["early"] for s in seeds]
        c_early = [results["reinit", s, r]["early"] for s in seeds]
        gap = statistics.mean(t_early) - statistics.mean(c_early)
        lines.append(
            f"| {r} | {100 * results['ticket', 0, r]['density']:.1f} % | {_cell(t_final)} | {_cell(c_final)} | "
            f"{_cell(t_early)} | {_cell(c_early)} | {gap:+.2f} | {results['epoch1', 0, r]['final']:.2f} | "
            f"{results['lr', 0, r]['final']:.2f} |"
        )
    lines += [
        "",
        "Ticket vs random reinit at ≤ 21.1 % of the weights remaining (mean gap; largest seed std of either):",
        "",
    ]
    for r in range(m["rounds"]):
        density = results["ticket", seeds[0], r]["density"]
        if density > 0.2115:
            continue
        parts = []
        for key in ("final", "early"):
            t = [results["ticket", s, r][key] for s in seeds]
            c = [results["reinit", s, r][key] for s in seeds]
            spread = max(statistics.stdev(t), statistics.stdev(c)) if len(seeds) > 1 else float("nan")
            gap = statistics.mean(t) - statistics.mean(c)
            parts.append(f"{key} {gap:+.2f} pts (std {spread:.2f}{', gap > spread' if gap > spread else ''})")
        lines.append(f"- {100 * density:.1f} %: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
