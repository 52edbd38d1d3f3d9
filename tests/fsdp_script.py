"""FSDP2 on 2 CPU processes (gloo): Lightning's ModelParallelStrategy with ``fully_shard`` in ``configure_model``.

Run as ``python tests/fsdp_script.py OUTDIR METHODS [CRASH_STEP] [CKPT]`` (see test_fsdp.py), ``METHODS``
comma-separated (one fit each, in one 2-process launch); Lightning re-executes this script for rank 1.
The model is the tests' tiny Conv1d + MLP in float64, so that the sharded run and a single-process run on
the union of the two ranks' batches agree to rounding far below any gap between scores. Each rank writes
``OUTDIR/{METHOD}{rank}.pt``: the full masks at every batch start, the update count, whether every
parameter was a ``DTensor``, whether the local shards of the pruned weights are exactly zero, and the full
final weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import IN_CHANNELS, LENGTH, _module_class, every_callback, make_dataloader
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_pai import LotteryTicket, PruneAtInit, RigL
from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.core.sharding import full, local, local_slice

STEPS = 12  # 3 epochs of 4 steps per rank (64 samples, batch 8 per rank)


def sharded_module_class():
    base = _module_class("lightning.pytorch")  # the class only: building one would consume the RNG

    class Sharded(base):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.conv, self.fc1, self.fc2):
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    Sharded.__name__ = Sharded.__qualname__ = "Sharded"
    return Sharded


def methods() -> dict:
    out = {
        "magnitude": lambda: PruneAtInit("magnitude", 0.8, distribution="erk", verbose=False),
        "snip": lambda: PruneAtInit("snip", 0.8, distribution="global", verbose=False),
        "lottery": lambda: LotteryTicket(rounds=2, prune_fraction=0.5, epochs_per_round=1, verbose=False),
        "rigl": lambda: RigL(0.8, delta_t=2, t_end=1.0, verbose=False),
    }
    every = every_callback()
    out.update({f"every_{name}": f for name, f in every.items() if f().card.family != "learned"})
    out.update({f"refused_{name}": f for name, f in every.items() if f().card.family == "learned"})
    return out


def trainer_kwargs(method: str) -> dict:
    return {"max_epochs": 2, "max_steps": -1} if "lottery" in method.lower() else {"max_steps": STEPS}


class Trace(CallbackBase):
    def __init__(self, cb, crash_step: int | None) -> None:
        self.cb, self.crash_step, self.masks = cb, crash_step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_step:
            raise RuntimeError("simulated crash")
        self.masks[trainer.global_step] = self.cb.masks.state_dict()


def main(outdir: str, names: str, crash_step: str = "-1", ckpt: str = "") -> None:
    torch.set_num_threads(1)
    try:
        for method in names.split(","):
            fit(outdir, method, crash_step, ckpt)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # both ranks have written their results
            torch.distributed.destroy_process_group()


def fit(outdir: str, method: str, crash_step: str = "-1", ckpt: str = "") -> None:
    torch.manual_seed(0)
    module = sharded_module_class()().double()
    cb = methods()[method]()
    trace = Trace(cb, int(crash_step) if int(crash_step) >= 0 else None)
    callbacks = [cb, trace]
    if int(crash_step) >= 0 or ckpt:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=Path(outdir) / "ckpt", every_n_train_steps=8))
    loader = make_dataloader(n=128, batch_size=8)
    dataset = torch.utils.data.TensorDataset(loader.dataset.tensors[0].double(), loader.dataset.tensors[1])
    # rank r reads samples r, r + 2, ...: its batches of 8 and the other rank's make one batch of 16 samples
    sampler = DistributedSampler(dataset, num_replicas=2, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False)
    data = DataLoader(dataset, batch_size=8, sampler=sampler)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=len(callbacks) > 2,
        logger=False,
        use_distributed_sampler=False,
        **trainer_kwargs(method),
    )
    try:
        trainer.fit(module, data, ckpt_path=ckpt or None)
    except RuntimeError as error:
        if "simulated crash" not in str(error):
            raise
        return
    except ValueError as error:  # methods that refuse sharded parameters: the message, and no step taken
        if not method.startswith("refused_"):
            raise
        result = {"error": str(error), "global_step": trainer.global_step}
        torch.save(result, Path(outdir) / f"{method}{trainer.global_rank}.pt")
        return
    rank = trainer.global_rank
    params = dict(module.named_parameters())
    zero = all(bool((local(params[n].detach())[~local_slice(m, params[n])] == 0).all()) for n, m in cb.masks.items())
    result = {
        "rank": rank,
        "masks": trace.masks,
        "final": cb.masks.state_dict(),
        "updates": getattr(cb, "updates", None),
        "dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "zero": zero,
        "weights": {n: full(p.detach()).cpu() for n, p in params.items()},
        "global_step": trainer.global_step,
    }
    torch.save(result, Path(outdir) / f"{method}{rank}.pt")


if __name__ == "__main__":
    assert IN_CHANNELS and LENGTH  # the tiny model's input shape, shared with helpers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:5])
    # Skip the interpreter's teardown: a C++ thread left joinable by the distributed stack aborts it now and then
    # ("terminate called without an active exception", 1 in ~8 crash-step runs with the same result files).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
