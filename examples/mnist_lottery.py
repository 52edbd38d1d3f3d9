"""Lottery tickets on LeNet-300-100 / MNIST with ``lightning_pai.LotteryTicket``, inside one ``trainer.fit``.

Frankle & Carbin's recipe (Adam lr 1.2e-3, batch 60; each round prunes 20 % of the remaining hidden
weights and 10 % of the output layer, then rewinds to the initial weights). Every round trains
``--epochs-per-round`` epochs; the callback prints a round -> density -> validation accuracy table at the
end, and the pruned network is evaluated on the test set.

Usage (from the repository root)::

    python examples/mnist_lottery.py                                   # 5 rounds x 2 epochs, rewind to init
    python examples/mnist_lottery.py --rewind-to epoch:1 --rounds 8
    python examples/mnist_lottery.py --control random_reinit           # the control, same command
    python examples/mnist_lottery.py --rounds 2 --epochs-per-round 1 --max-train-batches 20   # smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch
from mnist_lenet import VAL_SIZE, LeNet300100, load_mnist
from torch.utils.data import DataLoader, random_split

from lightning_pai import LotteryTicket, sparsity_report


class LotteryLeNet(LeNet300100):
    """LeNet-300-100 with the LTH paper's optimizer: Adam at a constant 1.2e-3."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default="../shared/data", help="torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if it is missing")
    p.add_argument("--rounds", type=int, default=5, help="training rounds, including the dense round 0")
    p.add_argument("--epochs-per-round", type=int, default=2)
    p.add_argument("--prune-fraction", type=float, default=0.2, help="of the remaining hidden weights, per round")
    p.add_argument("--rewind-to", default="init", help="init, step:N, epoch:N, lr or none")
    p.add_argument("--control", default=None, help="random_reinit or random_prune")
    p.add_argument("--lr", type=float, default=1.2e-3)
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-batches", type=int, default=None, help="limit training batches per epoch (smoke runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Run the rounds, test the final ticket; returns its test accuracy."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    pl.seed_everything(args.seed)
    full_train = load_mnist(args.data_dir, train=True, download=args.download)
    test_set = load_mnist(args.data_dir, train=False, download=args.download)
    train_set, val_set = random_split(
        full_train, [len(full_train) - VAL_SIZE, VAL_SIZE], generator=torch.Generator().manual_seed(0)
    )
    ticket = LotteryTicket(
        rounds=args.rounds,
        prune_fraction=args.prune_fraction,
        epochs_per_round=args.epochs_per_round,
        rewind_to=args.rewind_to,
        distribution="uniform",  # layer-wise, as in the paper's LeNet experiments
        layer_fractions={"net.4.weight": args.prune_fraction / 2},  # the output layer prunes at half the rate
        control=args.control,
        monitor="val_acc",
        seed=args.seed,
        verbose=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.rounds * args.epochs_per_round,
        limit_train_batches=args.max_train_batches,
        callbacks=[ticket],
        enable_checkpointing=False,
        enable_progress_bar=False,
        logger=False,
    )
    model = LotteryLeNet(lr=args.lr)
    start = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(val_set, batch_size=1_000),
    )
    print(f"\n{args.rounds} rounds in {time.perf_counter() - start:.1f} s (rewind_to={args.rewind_to!r})")
    print(ticket.results_table())
    (results,) = trainer.test(model, DataLoader(test_set, batch_size=1_000), verbose=False)
    acc = float(results["test_acc"])
    print(f"\nfinal ticket: {sparsity_report(model).kept:,} nonzero weights, test accuracy {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
