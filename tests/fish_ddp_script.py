"""A 2-process CPU DDP fit with FISH; run as ``python tests/fish_ddp_script.py OUTDIR`` (see test_fish.py).

Each rank trains on its own half of the data (Lightning's DistributedSampler, shuffled with seed 0) with SGD
(momentum 0.9, weight decay 5e-4) and writes ``OUTDIR/fish{rank}.pt``: its masks, the masks its own half's first
samples would give, how many Fisher estimates it made, its initial and final parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import make_dataloader, make_module
from torch.utils.data import DataLoader, DistributedSampler

from lightning_pai import FISH
from lightning_pai.core.fish import empirical_fisher, fish_masks, resolve_head, trainable_budget

DENSITY, SAMPLES = 0.2, 16


def own_masks(rank: int) -> dict[str, torch.Tensor]:
    """The FISH masks of this rank's first samples on the initial weights (Lightning's sampler: shuffled, seed 0)."""
    module = make_module("lightning.pytorch", seed=0)
    dataset = make_dataloader(n=64, batch_size=8).dataset
    loader = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, 2, rank))  # as Lightning's
    targets = dict(module.named_parameters())
    head = resolve_head(module, targets)
    k = trainable_budget(sum(p.numel() for p in targets.values()), sum(targets[n].numel() for n in head), DENSITY)
    rest = {n: p for n, p in targets.items() if n not in head}
    fisher = empirical_fisher(module, rest, list(loader), samples=SAMPLES)
    return fish_masks(fisher.values, {n: p.shape for n, p in targets.items()}, head, k)


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = FISH(density=DENSITY, samples=SAMPLES, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[cb],
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(module, make_dataloader(n=64, batch_size=8))
    rank = trainer.global_rank
    torch.save(
        {
            "rank": rank,
            "global_step": trainer.global_step,
            "masks": cb.masks.state_dict(),
            "own_masks": own_masks(rank),
            "estimates": cb.session.estimates,
            "samples": cb.session.fisher_samples,
            "initial": initial,
            "final": {n: p.detach().clone() for n, p in module.named_parameters()},
        },
        Path(outdir) / f"fish{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
