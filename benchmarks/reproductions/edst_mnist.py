"""FreeTickets / EDST on LeNet-300-100 / MNIST: the ensemble of M = 3 tickets against each ticket alone.

Liu et al., ICLR 2022 ("Deep ensembling with no overhead for either training or testing"), scaled down to
MNIST: each model is ``FreeTickets(sparsity, tickets=3, explore=1/3, delta_t=...)`` — ERK masks, every
``delta_t`` iterations per-layer drop of ceil(0.5 active) by magnitude and regrowth by |grad| (dropped weights
restart at zero), large explorations (q = 0.8) at the starts of tickets 2 and 3 — driven by the library's own
plan (``TopologyUpdater(FreeTickets(...).plan())``, as ``dst_mnist.py`` drives every DST method) and the
reference's learning rates from ``TicketPhases.learning_rate``: 0.1 while exploring, 0.01 from each phase's
start, 0.001 after its midpoint. Ticket ``m`` is model ``m``'s weights at the end of its phase (no validation
set: the callback's default, ``monitor=None``). SGD momentum 0.9, weight decay 5e-4, batch 100, PyTorch's
default init, 6k training images held out (unused). All (sparsity, seed) models train at once, stacked.

Reported on the 10k test images, mean ± std over seeds: each ticket's error, the ensemble's (argmax of the mean
softmax), NLL and ECE (15 bins) of the ensemble and of the tickets alone, and the tickets' prediction
disagreement (fraction of test images on which two tickets' argmax differ, averaged over pairs). Ticket 3 is
the network at the end of the run: the single network one DST run of the same length gives.

Usage::

    python benchmarks/reproductions/edst_mnist.py --data-dir /work/shared/data --epochs 30 --seeds 2
    python benchmarks/reproductions/edst_mnist.py --epochs 3 --seeds 1 --out /tmp/smoke.md   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/mnist_common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # dst_mnist.py

import torch  # noqa: E402
from dst_mnist import DSTTrainer, Run  # noqa: E402
from mnist_common import LENET_300_100, base_parser, load_mnist, write_results  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_pai import FreeTickets  # noqa: E402
from lightning_pai.core.tickets import ensemble_nll, expected_calibration_error  # noqa: E402

SPARSITIES = (0.9, 0.95)
TICKETS = 3


class EDSTTrainer(DSTTrainer):
    """The stacked DST trainer with the reference's per-phase learning rate and a weight snapshot at each phase end."""

    def __init__(self, runs: list[Run], args: argparse.Namespace, per_epoch: int) -> None:
        super().__init__(runs, LENET_300_100, args, per_epoch)
        self.phases = runs[0].callback.phases  # the same timeline for every model
        self.ends = self.phases.ends(self.total)
        self.tickets: list[list[tuple[list, list]]] = []  # [phase][model] -> (weights, biases)

    def step_start(self, t: int) -> None:
        rate = self.phases.learning_rate(t, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def step_end(self, t: int) -> None:
        if t in self.ends:  # before this iteration's large exploration
            self.tickets.append(
                [
                    (
                        [w[k].detach().clone() for w in self.models.weights],
                        [b[k].detach().clone() for b in self.models.biases],
                    )
                    for k in range(len(self.runs))
                ]
            )


@torch.no_grad()
def probabilities(weights: list, biases: list, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of one MLP (weights ``[in, out]``, biases ``[1, out]``) on ``x``."""
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = torch.addmm(b, h, w)
        if i < len(weights) - 1:
            h = F.relu(h)
    return F.softmax(h, dim=-1)


def _cell(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    parser = base_parser(__doc__, Path(__file__).resolve().parent / "results" / "edst_mnist.md")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--delta-t", type=int, default=1000, help="iterations between regular updates")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--log-every", type=int, default=2000)
    args = parser.parse_args(raw)
    args.argv, args.lr, args.decay_at, args.init, args.granet_delta_t = raw, 0.1, [], "torch", 200
    torch.set_num_threads(args.threads)

    train_x, train_y, _, _, test_x, test_y = load_mnist(args.data_dir, args.download)
    runs = []
    for seed in range(args.seeds):
        for sparsity in SPARSITIES:
            run = Run("static", sparsity, seed)  # (static: no callback built; the FreeTickets one is set here)
            run.method = "freetickets"
            run.callback = FreeTickets(sparsity, tickets=TICKETS, explore=1 / 3, delta_t=args.delta_t, verbose=False)
            run.distribution, run.start = run.callback.distribution, sparsity
            runs.append(run)
    trainer = EDSTTrainer(runs, args, len(train_x) // args.batch_size)
    seconds = trainer.train(train_x, train_y, 0.0, args.log_every)

    rows: dict[float, dict[str, list[float]]] = {s: {} for s in SPARSITIES}
    for k, run in enumerate(runs):
        members = [probabilities(*trainer.tickets[m][k], test_x) for m in range(TICKETS)]
        ensemble = torch.stack(members).mean(0)
        row = rows[run.sparsity]
        for m, p in enumerate(members):
            row.setdefault(f"ticket {m + 1}", []).append(100.0 * float((p.argmax(-1) != test_y).float().mean()))
        row.setdefault("ensemble", []).append(100.0 * float((ensemble.argmax(-1) != test_y).float().mean()))
        row.setdefault("nll_single", []).append(statistics.mean(ensemble_nll(p, test_y) for p in members))
        row.setdefault("nll_ensemble", []).append(ensemble_nll(ensemble, test_y))
        row.setdefault("ece_single", []).append(statistics.mean(expected_calibration_error(p, test_y) for p in members))
        row.setdefault("ece_ensemble", []).append(expected_calibration_error(ensemble, test_y))
        pairs = itertools.combinations(range(TICKETS), 2)
        disagreement = [float((members[i].argmax(-1) != members[j].argmax(-1)).float().mean()) for i, j in pairs]
        row.setdefault("disagreement", []).append(100.0 * statistics.mean(disagreement))
        kept = trainer.models.kept()[k]
        row.setdefault("kept", []).append(float(kept))

    table = trainer.phases.table(trainer.total)
    lines = [
        "# FreeTickets / EDST: LeNet-300-100 on MNIST, the M = 3 ensemble against its tickets",
        "",
        "Command: `" + " ".join(["python benchmarks/reproductions/edst_mnist.py", *args.argv]) + "`",
        "",
        f"{args.epochs} epochs = {trainer.total} iterations of batch {args.batch_size}; exploration to iteration "
        f"{table['explore_end'][0]}, tickets ending at {list(table['ends'])}, large explorations (q = 0.8) after "
        f"{list(table['large'])}, regular updates (p = 0.5) every {args.delta_t} iterations; learning rate 0.1 / "
        f"0.01 / 0.001 (midpoints {list(table['midpoints'])}); SGD momentum 0.9, weight decay {args.weight_decay}. "
        f"Mean ± std over seeds 0..{args.seeds - 1}, on the 10k test images.",
        f"Trained {len(runs)} models at once in {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}). Pruned weights exactly zero after training: "
        f"{trainer.models.pruned_weights_zero()}.",
        "",
        "| sparsity | ticket 1 error % | ticket 2 error % | ticket 3 error % | ensemble error % | NLL: tickets (mean) "
        "| NLL: ensemble | ECE %: tickets (mean) | ECE %: ensemble | disagreement % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in SPARSITIES:
        r = rows[s]
        cells = [_cell(r[f"ticket {m + 1}"]) for m in range(TICKETS)] + [_cell(r["ensemble"])]
        cells += [_cell(r["nll_single"], 4), _cell(r["nll_ensemble"], 4)]
        cells += [_cell([100 * v for v in r["ece_single"]]), _cell([100 * v for v in r["ece_ensemble"]])]
        cells.append(_cell(r["disagreement"]))
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in SPARSITIES:
        r = rows[s]
        best = min(statistics.mean(r[f"ticket {m + 1}"]) for m in range(TICKETS))
        gain = best - statistics.mean(r["ensemble"])
        lines.append(
            f"At {s:.0%} ({int(r['kept'][0])} of 266200 weights kept): ensemble error minus the best ticket's: "
            f"{-gain:+.2f} pts; minus ticket 3's (one DST run of the same length): "
            f"{statistics.mean(r['ensemble']) - statistics.mean(r['ticket 3']):+.2f} pts."
        )
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
