"""A 2-process CPU DDP fit with PruneAtInit; run as ``python tests/ddp_script.py OUTDIR [STRATEGY]`` (see test_ddp.py).

With ``STRATEGY="ddp"`` (default): the scorer gives *different* random scores on every rank, so identical
masks on both ranks can only come from rank zero's masks being broadcast. Each rank writes
``OUTDIR/rank{r}.pt`` with its masks, the masks its own scores would have given, its final zero pattern
and its final weights.

With ``METHOD="lottery"``: a LotteryTicket fit (3 rounds, round 0 of 3 epochs, rewind to epoch 1, so later rounds
replay epochs 1-2; shuffled data);
each rank writes ``OUTDIR/lottery{r}.pt`` with its masks and weights at every epoch start and the first
batch of every epoch.

With ``STRATEGY="ddp_fork"`` (workers forked from this process, which only waits): this main process
writes ``OUTDIR/main.pt`` with what it holds after ``fit``: the callback's masks, the weights, and the
masks in a checkpoint it saves with ``trainer.save_checkpoint``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from helpers import every_callback, make_dataloader, make_module, scheduled_updates, topology_methods

from lightning_pai import (
    SET,
    GradualMagnitudePruning,
    LotteryTicket,
    PruneAtInit,
    RigL,
    compute_masks,
    get_scorer,
    register_scorer,
)
from lightning_pai.callbacks._compat import CallbackBase

SPARSITY = 0.8
MAX_STEPS = 20
_LOCAL: dict[str, object] = {}


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("LOCAL_RANK", "0"))


@register_scorer("rank_random", overwrite=True)
def rank_random(ctx):
    """Uniform scores from a generator seeded with this process's rank: each rank would pick other masks."""
    rank = _rank()
    gen = torch.Generator().manual_seed(1000 + rank)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in ctx.params.items()}
    _LOCAL["rank"] = rank
    _LOCAL["local_masks"] = compute_masks(scores, SPARSITY, "global")
    return scores


@register_scorer("fail_if_called", overwrite=True)
def fail_if_called(ctx):
    raise AssertionError("re-pruned: a later fit must reuse the callback's masks")


@register_scorer("snip_recorded", overwrite=True)
def snip_recorded(ctx):
    """SNIP on this rank's own shard of the data (DistributedSampler), recording the masks it would give."""
    scores = get_scorer("snip")(ctx)
    _LOCAL["rank"] = _rank()
    _LOCAL["local_masks"] = compute_masks(scores, SPARSITY, "global")
    return scores


class _RoundRecorder(pl.Callback):
    """After LotteryTicket: masks and weights at every epoch start, first batch of every epoch."""

    def __init__(self, cb: LotteryTicket) -> None:
        self.cb, self.masks, self.weights, self.first_x = cb, {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.masks[trainer.current_epoch] = self.cb.masks.state_dict()
        self.weights[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first_x[trainer.current_epoch] = batch[0].clone()


def lottery(outdir: str, strategy: str) -> None:
    module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
    cb = LotteryTicket(3, 0.3, 3, rewind_to="epoch:1", verbose=False)
    recorder = _RoundRecorder(cb)
    loader = make_dataloader(n=64, batch_size=8)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)
    trainer = _trainer(strategy, [cb, recorder], max_epochs=3 + 2 * 2, max_steps=-1)  # later rounds: epochs 1-2
    trainer.fit(module, loader)
    if strategy != "ddp":  # the launching process: rank zero's progress must have come back
        torch.save(
            {"round": cb.round, "results": cb.results, "masks": cb.state_dict()["masks"]}, Path(outdir) / "main.pt"
        )
        return
    rank = trainer.global_rank
    torch.save(
        {"rank": rank, "masks": recorder.masks, "weights": recorder.weights, "first_x": recorder.first_x},
        Path(outdir) / f"lottery{rank}.pt",
    )


class _MaskRecorder(CallbackBase):
    """After a DST callback: its masks at every batch start."""

    def __init__(self, cb) -> None:
        self.cb, self.masks = cb, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks[trainer.global_step] = self.cb.masks.state_dict()


def dynamic(outdir: str, method: str) -> None:
    """A topology-changing callback of ``helpers.every_callback`` under 2-process DDP (4 epochs of 4 steps)."""
    module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
    cb = every_callback()[method]()
    recorder = _MaskRecorder(cb)
    loader = make_dataloader(n=64, batch_size=8)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)
    trainer = _trainer("ddp", [cb, recorder], max_epochs=4, max_steps=-1)
    trainer.fit(module, loader)
    rank = trainer.global_rank
    opt = trainer.optimizers[0]
    momentum = {n: opt.state[p]["momentum_buffer"].cpu() for n, p in cb.masks.params.items()}
    params = dict(module.named_parameters())
    zero = all(bool((params[n].detach()[~m] == 0).all()) for n, m in cb.masks.items())
    result = {"rank": rank, "masks": recorder.masks, "updates": cb.updates, "momentum": momentum, "zero": zero}
    result["scheduled"] = scheduled_updates(cb, trainer.global_step, trainer.num_training_batches)
    torch.save(result, Path(outdir) / f"{method}{rank}.pt")


def timm_rigl(outdir: str) -> None:
    """RigL on a timm ViT (pytorch_lightning namespace, ``exclude="stem_and_head"``) under 2-process DDP."""
    import pytorch_lightning

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from timm_finetune import TimmClassifier

    torch.manual_seed(0)
    module = TimmClassifier("vit_tiny_patch16_224", 10, model_kwargs={"img_size": 32})
    cb = RigL(0.8, delta_t=2, t_end=1.0, exclude="stem_and_head", verbose=False)
    recorder = _MaskRecorder(cb)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,)))
    trainer = pytorch_lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[cb, recorder],
        max_steps=8,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
    params = dict(module.named_parameters())
    zero = {n: bool((params[n][~m] == 0).all()) for n, m in cb.masks.items()}
    result = {"masks": recorder.masks, "updates": cb.updates, "names": cb.masks.names, "zero": zero}
    torch.save(result, Path(outdir) / f"timm{trainer.global_rank}.pt")


class _FinalMasks(CallbackBase):
    """In every worker: write the DST callback's final masks to ``{outdir}/spawn_{name}_{rank}.pt``."""

    def __init__(self, cb, outdir: str, name: str) -> None:
        self.cb, self.outdir, self.name = cb, outdir, name

    def on_train_end(self, trainer, pl_module):
        state = {"masks": self.cb.masks.state_dict(), "updates": getattr(self.cb, "updates", None)}
        torch.save(state, Path(self.outdir) / f"spawn_{self.name}_{trainer.global_rank}.pt")


#: Under ddp_spawn: a step-update, an epoch-update and a pruning-only method (the hand-back is the base class's).
SPAWN = ("RigL", "SET", "GradualMagnitudePruning")


def spawn_dst(outdir: str) -> None:
    """Each topology-changing callback under ``ddp_spawn``; the launching process records what it holds afterwards."""
    main = {}
    for name in SPAWN:
        cb = every_callback()[name]()
        module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
        trainer = _trainer("ddp_spawn", [cb, _FinalMasks(cb, outdir, name)], max_epochs=2)
        trainer.fit(module, make_dataloader(n=64, batch_size=8))
        params = dict(module.named_parameters())
        masks = cb.state_dict()["masks"]
        main[name] = {
            "global_step": trainer.global_step,
            "masks": masks,
            "updates": getattr(cb, "updates", None),
            "zero": all(bool((params[n].detach()[~m] == 0).all()) for n, m in masks.items()),
        }
    torch.save(main, Path(outdir) / "spawn_main.pt")


def learned(outdir: str) -> None:
    """Every learned-mask method under 2-process DDP (2 epochs of 4 steps, each rank its own shuffled half of
    the data): masks at every step, final scores and weights per rank."""
    for name, factory in every_callback().items():
        cb = factory()
        if cb.card.family != "learned":
            continue
        module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
        recorder = _MaskRecorder(cb)
        loader = make_dataloader(n=64, batch_size=8)
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)
        trainer = _trainer("ddp", [cb, recorder], max_epochs=2, max_steps=-1)
        trainer.fit(module, loader)
        result = {
            "masks": {**recorder.masks, trainer.global_step: cb.masks.state_dict()},
            "scores": {n: s.detach().cpu().clone() for n, s in cb.session.scores.items()},
            "weights": {n: p.detach().cpu().clone() for n, p in module.named_parameters()},
            "global_step": trainer.global_step,
        }
        torch.save(result, Path(outdir) / f"learned_{name}_{trainer.global_rank}.pt")


def nm_fits(outdir: str) -> None:
    """N:M (``fc*`` layers 2:4, the conv unstructured) with every family under 2-process DDP."""
    factories = {
        "rigl": lambda: RigL(0.8, delta_t=2, t_end=1.0, nm={"fc*": "2:4"}, verbose=False),
        "lottery": lambda: LotteryTicket(3, 0.3, 1, nm={"fc*": "2:4"}, verbose=False),
        "snip": lambda: PruneAtInit("snip", 0.8, nm={"fc*": "2:4"}, verbose=False),
        "gmp": lambda: GradualMagnitudePruning(0.8, end=10, frequency=2, nm={"fc*": "2:4"}),
        "set": lambda: SET(0.8, update_on="step", delta_t=3, nm={"fc*": "2:4"}, verbose=False),
    }
    for name, factory in factories.items():
        cb = factory()
        recorder = _MaskRecorder(cb)
        loader = make_dataloader(n=64, batch_size=8)
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)
        trainer = _trainer("ddp", [cb, recorder], max_epochs=3, max_steps=-1)
        trainer.fit(make_module("lightning.pytorch", optimizer="sgd", seed=0), loader)
        result = {"masks": recorder.masks, "final": cb.masks.state_dict(), "layouts": cb.masks.layouts}
        torch.save(result, Path(outdir) / f"nm_{name}{trainer.global_rank}.pt")


class _ValLoss(CallbackBase):
    """This rank's own ``val_loss`` (logged without ``sync_dist``) after every validation, by step."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


def freetickets(outdir: str) -> None:
    """FreeTickets under 2-process DDP (4 epochs of 4 steps, tickets chosen by each rank's own ``val_loss``,
    validated every 2 steps): masks at every step, the tickets, the rank's validation values."""
    from lightning_pai import FreeTickets

    cb = FreeTickets(0.8, tickets=2, explore=0.5, delta_t=2, monitor="val_loss", mode="min", verbose=False)
    recorder, values = _MaskRecorder(cb), _ValLoss()
    loader = make_dataloader(n=64, batch_size=8)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=8, shuffle=True)
    trainer = _trainer("ddp", [cb, recorder, values], max_epochs=4, max_steps=-1, val_check_interval=2)
    trainer.fit(make_module("lightning.pytorch", optimizer="sgd", seed=0), loader, make_dataloader(n=32))
    result = {"masks": recorder.masks, "tickets": cb.tickets, "val": values.values, "updates": cb.updates}
    torch.save(result, Path(outdir) / f"freetickets{trainer.global_rank}.pt")


def _trainer(strategy: str, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        **kwargs,
    )


def main(outdir: str, strategy: str = "ddp", method: str = "rank_random") -> None:
    torch.set_num_threads(1)
    if method == "lottery":
        lottery(outdir, strategy)
        return
    if method == "spawn_dst":
        spawn_dst(outdir)
        return
    if method == "nm":
        nm_fits(outdir)
        return
    if method == "learned":
        learned(outdir)
        return
    if method == "timm":
        timm_rigl(outdir)
        return
    if method == "freetickets":
        freetickets(outdir)
        return
    if all(name in topology_methods() for name in method.split(",")):
        for name in method.split(","):  # one 2-process launch, one fit per method
            dynamic(outdir, name)
        return
    module = make_module("lightning.pytorch", optimizer="sgd", seed=0)
    cb = PruneAtInit(method, sparsity=SPARSITY, seed=0, batches=2, verbose=False)

    def fit() -> pl.Trainer:
        trainer = _trainer(strategy, [cb], max_steps=MAX_STEPS)
        trainer.fit(module, make_dataloader(n=64, batch_size=8))
        return trainer

    trainer = fit()
    if strategy != "ddp":  # the launching process, after its workers finished
        # Nothing here touches `cb` before the second fit: its workers must find the masks themselves.
        weights = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        global_step = trainer.global_step
        # A second fit with the same callback: the workers must reuse the masks, never prune again.
        cb.method = "fail_if_called"
        fit()
        ckpt_path = Path(outdir) / "main.ckpt"
        trainer.save_checkpoint(ckpt_path)
        ckpt = torch.load(ckpt_path, weights_only=False)
        torch.save(
            {
                "global_step": global_step,
                "masks": cb.state_dict()["masks"],
                "report_kept": cb.report().kept,
                "ckpt_masks": ckpt["callbacks"][cb.state_key]["masks"],
                "weights": weights,
                "handoff": cb._handoff,
            },
            Path(outdir) / "main.pt",
        )
        return
    rank = trainer.global_rank
    params = dict(module.named_parameters())
    torch.save(
        {
            "rank": rank,
            "scorer_rank": _LOCAL.get("rank"),
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "masks": cb.masks.state_dict(),
            "local_masks": _LOCAL.get("local_masks"),
            "zero": {n: (params[n] == 0).cpu() for n in cb.masks.names},
            "weights": {n: p.detach().cpu().clone() for n, p in params.items()},
        },
        Path(outdir) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
