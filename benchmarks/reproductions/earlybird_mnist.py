"""Early-Bird tickets vs full-training-then-prune (network slimming) vs dense, on a small BatchNorm VGG.

You et al. 2020 ("Drawing early-bird tickets", ICLR, arXiv:1909.11957): train with network slimming's L1 penalty
on the BatchNorm scales (``--s 1e-4``), compute each epoch the channel mask pruning ``p`` of the channels by one
global ranking of ``|γ|``, and draw the ticket once the last 5 masks differ by at most 0.1 (normalised Hamming
distance); then the pruned network trains on. Network slimming (Liu et al. 2017, arXiv:1708.06519) trains the
whole schedule with the same penalty, prunes ``p`` of the channels by ``|γ|`` and fine-tunes.

Runs, per seed, all on the same VGG-style network (``--cfg``, 3x3 conv + BatchNorm + ReLU, max pooling, global
average pooling, one linear classifier) and the same SGD recipe (lr 0.1, momentum 0.9, weight decay 1e-4,
lr x0.1 at 50 % and 75 % of ``--epochs``, batch 128):

- **dense**: ``--epochs`` epochs;
- **EB**: :class:`lightning_pai.EarlyBird` (``p = --sparsity``, ``l1 = 1e-4``, window 5, ``epsilon = 0.1``) in one
  fit of ``--epochs`` epochs: the ticket is drawn after ``drawn`` epochs, then the pruned network (channels masked
  exactly) trains for the remaining epochs, on the same learning-rate schedule;
- **NS** (full training, then prune): :class:`lightning_pai.ChannelPruning` (``scorer="bn_gamma"``,
  ``distribution="global"``, ``l1=1e-4``) pruning once after ``--epochs`` epochs, then ``--finetune`` epochs of
  fine-tuning (lr 0.01, then 0.001 for the second half), in one fit.

Accuracy is the test set's after the last epoch (no selection). Parameters and MACs are those left once the
pruned channels are removed (:func:`lightning_pai.core.channels.predicted_shrunk_params`, their consumers'
inputs included). CPU budget: a ``--train-subset`` of the training set and few epochs (the paper: CIFAR, 160).

Usage::

    python benchmarks/reproductions/earlybird_mnist.py --threads 1          # the recorded run (about 30 min)
    python benchmarks/reproductions/earlybird_mnist.py --threads 1 --epochs 6 --train-subset 1000 --seeds 1 \
        --sparsities 0.5 --out eb.md                                         # a smoke run

With 2 intra-op threads on a shared 2-core machine these small convolutions run several times slower: use 1.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/mnist_common.py

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from mnist_common import base_parser, load_mnist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_pai import ChannelPruning, EarlyBird  # noqa: E402

OUT = Path(__file__).with_name("results") / "earlybird_mnist.md"


class VGG(pl.LightningModule):
    """``cfg`` entries: an int is a 3x3 conv (+BN+ReLU) with that many channels, ``"M"`` a 2x2 max pool."""

    def __init__(self, cfg: list, epochs: int, finetune: int = 0, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)
        self.epochs, self.finetune = epochs, finetune
        for m in self.modules():  # the reference VGG's initialisation (BN γ = 0.5, as network slimming's code)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)]

    def lr_factor(self, epoch: int) -> float:
        """x0.1 at 50 % and 75 % of ``epochs``; fine-tuning after them restarts at 0.01, then 0.001 halfway."""
        if epoch >= self.epochs:
            return 0.1 if epoch < self.epochs + self.finetune // 2 else 0.01
        return 1.0 if epoch < self.epochs // 2 else 0.1 if epoch < self.epochs * 3 // 4 else 0.01


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def fit(model: VGG, callbacks: list, epochs: int, loader: DataLoader) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader)


def main() -> None:
    parser = base_parser(__doc__, OUT)
    parser.add_argument("--dataset", default="FashionMNIST", choices=["MNIST", "FashionMNIST"])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--finetune", type=int, default=8)
    parser.add_argument("--train-subset", type=int, default=6000)
    parser.add_argument("--sparsities", default="0.5,0.3", help="channel ratios p, comma-separated")
    parser.add_argument("--cfg", default="32,M,64,M,128,M")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = [c if c == "M" else int(c) for c in args.cfg.split(",")]
    train_x, train_y, _, _, test_x, test_y = load_mnist(args.data_dir, args.download, args.dataset)
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.train_subset]
    train_x, train_y = train_x[subset].view(-1, 1, 28, 28), train_y[subset]
    test_x = test_x.view(-1, 1, 28, 28)
    data = TensorDataset(train_x, train_y)
    rows = []
    for seed in range(args.seeds):

        def loader(seed: int = seed) -> DataLoader:
            return DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))

        start = time.time()
        torch.manual_seed(seed)
        dense = VGG(cfg, args.epochs)
        fit(dense, [], args.epochs, loader())
        dense_acc = accuracy(dense, test_x, test_y)
        for p in (float(v) for v in args.sparsities.split(",")):
            row: dict = {"seed": seed, "p": p, "dense": dense_acc}
            torch.manual_seed(seed)
            model = VGG(cfg, args.epochs)
            eb = EarlyBird(p, l1=1e-4, window=5, epsilon=0.1, verbose=False)
            fit(model, [eb], args.epochs, loader())
            report = eb.report(model)
            row.update(eb=accuracy(model, test_x, test_y), drawn=eb.drawn_epoch, distances=eb.distances)
            row.update(
                eb_params=report.params, eb_macs=report.macs, eb_layers=[f"{r.kept}/{r.total}" for r in report.rows]
            )

            torch.manual_seed(seed)
            model = VGG(cfg, args.epochs, args.finetune)
            prune_at = args.epochs * len(loader())
            ns = ChannelPruning(p, scorer="bn_gamma", distribution="global", start=prune_at, l1=1e-4, verbose=False)
            fit(model, [ns], args.epochs + args.finetune, loader())
            report = ns.report(model)
            row.update(ns=accuracy(model, test_x, test_y), ns_params=report.params, ns_macs=report.macs)
            row.update(ns_layers=[f"{r.kept}/{r.total}" for r in report.rows], seconds=time.time() - start)
            start = time.time()
            row["gap"] = row["eb"] - row["ns"]
            rows.append(row)
            print(row, flush=True)
    write(rows, args)


def _share(pair: tuple[int, int]) -> str:
    return f"{pair[1] / pair[0]:.1%}"


def write(rows: list[dict], args) -> None:
    def mean(rs: list[dict], key: str) -> str:
        values = [r[key] for r in rs]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"

    command = "python benchmarks/reproductions/earlybird_mnist.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Early-Bird tickets on {args.dataset} (small BatchNorm VGG)",
        "",
        f"Command: `{command.strip()}` ({args.threads} CPU thread{'s' if args.threads > 1 else ''}).",
        "",
        f"Network `{args.cfg}` (3x3 conv + BN + ReLU, `M` = 2x2 max pool, global average pool, linear 10); "
        f"{args.train_subset:,} training images (a fixed random subset), the full test set; SGD lr 0.1, momentum "
        f"0.9, weight decay 1e-4, batch 128, lr x0.1 at epochs {args.epochs // 2} and {args.epochs * 3 // 4}; "
        f"{args.epochs} epochs. Channel ratio p: the fraction of the prunable channels removed (every conv is "
        "prunable; the classifier is not). **EB**: `EarlyBird(p, l1=1e-4, window=5, epsilon=0.1)` in one "
        f"{args.epochs}-epoch fit: dense training with L1 on γ until the ticket is drawn, then the pruned network "
        "(channels masked exactly) trains on for the remaining epochs. **NS** (network slimming: full training, then "
        f"prune): `ChannelPruning(p, scorer='bn_gamma', distribution='global', l1=1e-4)` pruning after {args.epochs} "
        f"epochs, then {args.finetune} epochs of fine-tuning (lr 0.01, 0.001 for the second half) in the same fit. "
        "Test accuracy (%) after the last epoch, no selection. Params / MACs: what is left once the pruned channels "
        "are removed (`predicted_shrunk_params` / `_macs`, the next layers' inputs included), share of dense.",
        "",
    ]
    ok = True
    for p in dict.fromkeys(r["p"] for r in rows):
        rs = [r for r in rows if r["p"] == p]
        lines += [
            f"## p = {p:g}",
            "",
            "| seed | dense | EB ticket | NS (train, prune, fine-tune) | EB - NS | EB drawn after (epochs) | "
            "EB params / MACs | NS params / MACs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rs:
            lines.append(
                f"| {r['seed']} | {r['dense']:.2f} | {r['eb']:.2f} | {r['ns']:.2f} | {r['gap']:+.2f} | "
                f"{r['drawn']} of {args.epochs} | {_share(r['eb_params'])} / {_share(r['eb_macs'])} | "
                f"{_share(r['ns_params'])} / {_share(r['ns_macs'])} |"
            )
        drawn = [r["drawn"] for r in rs if r["drawn"] is not None]
        mean_drawn = f"{statistics.mean(drawn):.1f}" if drawn else "-"
        lines += [
            f"| mean | {mean(rs, 'dense')} | {mean(rs, 'eb')} | {mean(rs, 'ns')} | {mean(rs, 'gap')} | "
            f"{mean_drawn} | | |",
            "",
            "Largest mask distance per check (before training, then after each epoch; `-` while the window of 5 "
            "fills), and the channels kept per conv layer (EB ticket; NS):",
            "",
        ]
        for r in rs:
            shown = ", ".join("-" if d is None else f"{d:.3f}" for d in r["distances"])
            lines.append(f"- seed {r['seed']}: {shown} — {', '.join(r['eb_layers'])}; {', '.join(r['ns_layers'])}")
        met = all(r["drawn"] is not None and r["drawn"] < args.epochs / 2 and r["gap"] >= -1.0 for r in rs)
        ok = ok and met
        lines += [
            "",
            f"Done-when at p = {p:g} (every seed: EB drawn before 50 % of the epochs, EB accuracy at least NS - 1 "
            f"point): {'met' if met else 'NOT met'}.",
            "",
        ]
    lines += [f"All met: {'yes' if ok else 'no'}. Wall time: {sum(r['seconds'] for r in rows) / 60:.1f} min.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
