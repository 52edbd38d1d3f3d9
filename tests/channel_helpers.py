"""Small BatchNorm conv nets and synthetic image data for the channel-pruning tests (and their DDP script)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

#: Output channels of :class:`BNNet`'s two prunable convolutions.
WIDTHS = {"c1": 8, "c2": 12}


class BNNet(pl.LightningModule):
    """``conv(1->8)-BN-ReLU-maxpool, conv(8->12)-BN-ReLU-avgpool(2)-flatten, linear(48->3)`` on ``(B, 1, 8, 8)``."""

    def __init__(self, lr: float = 0.1, bias: bool = True) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, bias=bias), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4, 3)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = F.adaptive_avg_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def image_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """An easy 3-class task on ``(1, 8, 8)`` images: the class is which third of the image is brightest."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=gen)
    for c in range(3):
        x[y == c, :, :, 3 * c : 3 * c + 2] += 1.5
    return TensorDataset(x, y)


def image_loader(n: int = 64, batch_size: int = 16, seed: int = 0, shuffle: bool = False) -> DataLoader:
    """A loader of :func:`image_data`."""
    return DataLoader(image_data(n, seed), batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU trainer; ``kwargs`` override the defaults."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})
