"""LeNet-300-100 on MNIST, pruned at initialization with ``lightning_pai.PruneAtInit``.

The 784-300-100-10 MLP is pruned once when ``trainer.fit`` starts (the callback prints the per-layer
table), trained with the masks enforced, then evaluated on the MNIST test set. The final table is
computed from the trained weights themselves (nonzero counts), so it shows that the pruned weights
are still exactly zero after training.

Usage (from the repository root)::

    python examples/mnist_lenet.py                          # magnitude, 90 % sparsity, global
    python examples/mnist_lenet.py --method random --sparsity 0.95 --distribution erk
    python examples/mnist_lenet.py --epochs 1 --max-train-batches 50   # quick smoke run

MNIST is read with ``torchvision.datasets.MNIST(root=--data-dir)``; pass ``--download`` to fetch it
when it is not there.
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_pai import PruneAtInit, sparsity_report

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
VAL_SIZE = 5_000


class LeNet300100(pl.LightningModule):
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU (LeCun et al., 1998)."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=stage != "test", on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        # SGD + Nesterov momentum with a one-cycle schedule (stepped per batch) reaches ~98 % in a few
        # epochs; `estimated_stepping_batches` accounts for --epochs and --max-train-batches.
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_mnist(root: str, train: bool, download: bool = False) -> TensorDataset:
    """The whole MNIST split as one normalized float tensor (N, 784) plus int64 labels.

    Loading once and indexing tensors is far faster than torchvision's per-item PIL transforms.
    """
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root=root, train=train, download=download)
    except RuntimeError as err:
        raise SystemExit(f"{err}\n(looked in --data-dir={root!r}; pass --download to fetch MNIST there)") from None
    x = ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return TensorDataset(x, ds.targets.to(torch.int64))


class MNISTDataModule(pl.LightningDataModule):
    """MNIST from ``data_dir`` (torchvision layout) as in-memory tensors: 55k train, 5k validation, 10k test.

    Args:
        data_dir: torchvision ``MNIST`` root.
        batch_size: Training batch size.
        download: Download MNIST into ``data_dir`` if it is missing.
    """

    def __init__(self, data_dir: str = "../shared/data", batch_size: int = 128, download: bool = False) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.download = data_dir, batch_size, download

    def setup(self, stage: str) -> None:
        full = load_mnist(self.data_dir, train=True, download=self.download)
        self.train_set, self.val_set = random_split(
            full, [len(full) - VAL_SIZE, VAL_SIZE], generator=torch.Generator().manual_seed(0)
        )
        self.test_set = load_mnist(self.data_dir, train=False, download=self.download)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1_000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default="../shared/data", help="torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if it is missing")
    p.add_argument("--method", default="magnitude", help="PruneAtInit scorer (e.g. magnitude, random)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of Linear weights removed")
    p.add_argument("--distribution", default="global", help="per-layer split: global, uniform, erk, er, lamp")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of SGD's one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and stochastic scorers")
    p.add_argument("--max-train-batches", type=int, default=None, help="limit training batches per epoch (smoke runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Train, test and report; returns the test accuracy."""
    args = parse_args(argv)
    # Data are in-memory tensors: worker processes would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")  # inside Lightning, not ours
    pl.seed_everything(args.seed)

    data = MNISTDataModule(args.data_dir, args.batch_size, args.download)
    data.setup("fit")
    train_loader, val_loader, test_loader = data.train_dataloader(), data.val_dataloader(), data.test_dataloader()

    model = LeNet300100(lr=args.lr)
    pruning = PruneAtInit(args.method, args.sparsity, distribution=args.distribution, seed=args.seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=args.max_train_batches,
        callbacks=[pruning],
        enable_checkpointing=False,
        logger=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    train_s = time.perf_counter() - start
    (results,) = trainer.test(model, test_loader, verbose=False)
    acc = float(results["test_acc"])

    report = sparsity_report(model)  # counts nonzero weights of the trained model
    print(f"\nNonzero weights after training ({train_s:.1f} s of training), sparsity {report.sparsity:.4f}:")
    print(report)
    print(f"test accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
