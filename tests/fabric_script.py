"""Sparsifier under Lightning Fabric on 2 CPU processes: ``python tests/fabric_script.py OUTDIR`` (test_fabric.py).

Each rank trains the tests' tiny model on its own shard of shuffled data (DistributedSampler) with three
methods in turn — PruneAtInit with a scorer whose scores differ per rank (so equal masks can only come from
rank zero's broadcast), RigL (growth by the all-reduced dense gradient) and SET (seeded random growth) — and
writes ``OUTDIR/fabric{rank}.pt``: for every method, its masks after every optimizer step, the number of
topology updates, its final weights and whether every masked weight is exactly zero (and, for PruneAtInit,
the masks this rank's own scores would have given).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import make_dataloader, make_module
from lightning.fabric import Fabric
from torch.nn import functional as F

from lightning_pai import SET, PruneAtInit, RigL, Sparsifier, compute_masks, register_scorer

EPOCHS = 2
_LOCAL: dict[str, dict] = {}


@register_scorer("rank_random_fabric", needs="nothing", overwrite=True)
def rank_random(ctx):
    """Uniform scores seeded with this process's rank: each rank alone would choose other masks."""
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in ctx.params.items()}
    _LOCAL["masks"] = compute_masks(scores, 0.8, "global")  # what this rank alone would keep
    return scores


METHODS = {
    "prune_at_init": lambda: PruneAtInit("rank_random_fabric", 0.8, verbose=False),
    "rigl": lambda: RigL(0.8, delta_t=2, t_end=1.0, verbose=False),
    "set": lambda: SET(0.8, update_on="step", delta_t=3, verbose=False),
}


def run(fabric: Fabric, name: str) -> dict:
    model = make_module("lightning.pytorch", optimizer="sgd", seed=0)
    optimizer = model.configure_optimizers()
    model, optimizer = fabric.setup(model, optimizer)
    data = make_dataloader(n=64, batch_size=8).dataset
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=8, shuffle=True))
    method = METHODS[name]()
    sparsifier = Sparsifier(method, model, optimizer, data=loader, total_steps=EPOCHS * len(loader))
    history = {}
    for _ in range(EPOCHS):
        loader.sampler.set_epoch(sparsifier.data_epoch)
        for x, y in loader:
            optimizer.zero_grad()
            fabric.backward(F.cross_entropy(model(x), y))
            sparsifier.step()
            history[sparsifier.global_step] = sparsifier.masks.state_dict()
        sparsifier.epoch_end()
    params = dict(sparsifier.module.named_parameters())
    zero = all(bool((params[n].detach()[~m] == 0).all()) for n, m in sparsifier.masks.items())
    return {
        "masks": history,
        "updates": getattr(method, "updates", None),
        "weights": {n: p.detach().cpu().clone() for n, p in params.items()},
        "zero": zero,
        "steps": sparsifier.global_step,
        "world_size": sparsifier.host.world_size,
    }


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    results = {name: run(fabric, name) for name in METHODS}
    results["prune_at_init"]["local_masks"] = _LOCAL["masks"]
    torch.save(results, Path(outdir) / f"fabric{fabric.global_rank}.pt")
    fabric.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
