"""2-process CPU DDP fits with ``backend="masked"`` and ``backend="sparse"``; run as
``python tests/sparse_ddp_script.py OUTDIR`` (see test_sparse_backend.py).

One launch, four fits per rank: RigL (gradient growth every 4 steps) and SET (random growth every 4 steps),
each with both backends, from the same seed on the same per-rank batches. Each rank writes
``OUTDIR/{method}_{backend}_{rank}.pt`` with the final masks, the model's ``state_dict`` (dense ``weight``
either way), the optimizer's ``state_dict`` (dense-shaped state either way) and the number of updates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_pai import SET, RigL

STEPS = 24


class MLP(pl.LightningModule):
    """A 3-layer MLP on synthetic 20-feature inputs, 4 classes; SGD with momentum and weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def loader(batches: int = 2 * STEPS) -> torch.utils.data.DataLoader:
    """``batches`` batches of 8 (no shuffling); the default covers 2 ranks for :data:`STEPS` steps in one epoch."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * batches, 20, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


METHODS = {
    "RigL": lambda backend: RigL(0.8, delta_t=4, t_end=1.0, verbose=False, backend=backend),
    "SET": lambda backend: SET(0.8, update_on="step", delta_t=4, verbose=False, backend=backend),
}


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    for name, factory in METHODS.items():
        for backend in ("masked", "sparse"):
            cb = factory(backend)
            torch.manual_seed(0)
            module = MLP()
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=2,
                strategy="ddp",
                callbacks=[cb],
                max_steps=STEPS,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                logger=False,
            )
            trainer.fit(module, loader())
            optimizer = trainer.optimizers[0]
            result = {
                "masks": cb.masks.state_dict(),
                "model": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "updates": cb.updates,
                "steps": trainer.global_step,
                "type": type(module.net[0]).__name__,
            }
            torch.save(result, Path(outdir) / f"{name}_{backend}_{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
