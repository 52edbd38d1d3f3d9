"""Correctness checks for every library on LeNet-300-100 with synthetic data (part of ``compare.py``).

The checks lightning_pai's own suite makes, run on every library through the same harness:

- **(a) DDP**: 2 gloo processes, each building its model from a *different* seed (so different initial
  weights and RNG streams) and seeing different data; the library is set up as its documentation shows
  (peers: on the model, then ``DistributedDataParallel``; Lightning callbacks: ``Trainer(strategy="ddp",
  devices=2)``), trained 16 steps with topology updates every 3-4 steps; then the masks of both ranks are
  compared (number of differing entries) and the forward weights (largest difference).
- **(b) resume**: train 16 steps uninterrupted; separately train the first steps, save every state the
  library offers (model, optimizer and the library's own ``state_dict``), restore them into *fresh*
  objects built from another seed, continue, and compare the final masks (differing entries) and weights.
  Peers through their plain-PyTorch APIs; our callbacks and ``ModelPruning`` through
  ``trainer.save_checkpoint`` and ``Trainer.fit(ckpt_path=...)``.
- **(c) exact zeros**: after 16 steps of SGD (lr 0.1, momentum 0.9, weight decay 5e-4), the number of
  masked weights whose forward value is not exactly 0 ("leaks"), the number of masked entries still nonzero
  in the stored parameter (reparametrised libraries keep a dense copy), and the kept count.
- **(d) updates**: the steps at which the masks actually changed, for the methods that should change them.

Run alone: ``python benchmarks/compare/compare_checks.py`` (prints the table); the DDP workers are this file too
(``ddp-peer KEY OUT`` / ``ddp-lightning KEY OUT``).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this group's modules, and benchmarks/mnist_common.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mnist_common import LENET_300_100, mlp  # noqa: E402
from peers import PRUNERS, installed  # noqa: E402
from torch import Tensor, nn  # noqa: E402

SPARSITY = 0.9
STEPS = 16
BATCH = 32
PLAIN_DELTA = 4  # peers: updates at steps 4, 8 (and 12 where T_end = 0.75 * 16 counts); resume after step 6
PLAIN_STOP = 6
LIGHTNING_DELTA = 3  # callbacks: updates every 3 steps; 4 steps per epoch; checkpoint at step 8, crash at 10
LIGHTNING_STOP = 8
STEPS_PER_EPOCH = 4
#: the rows measured through Lightning: our callbacks and ModelPruning (as timed, and with its defaults)
LIGHTNING_KEYS = ("pai_pai", "pai_rigl", "pai_gmp", "pai_lottery", "modelpruning", "modelpruning_default")
LIGHTNING_LABELS = {
    "pai_pai": ("lightning_pai", "PruneAtInit magnitude"),
    "pai_rigl": ("lightning_pai", "RigL"),
    "pai_gmp": ("lightning_pai", "GradualMagnitudePruning"),
    "pai_lottery": ("lightning_pai", "LotteryTicket (4 rounds of 1 epoch, 50 %/round)"),
    "modelpruning": ("Lightning", "ModelPruning l1_unstructured, pruned once at train start"),
    "modelpruning_default": ("Lightning", "ModelPruning l1_unstructured, defaults (amount 0.5 every epoch end)"),
}


def lenet(seed: int) -> nn.Module:
    return mlp(LENET_300_100, seed, "torch")


def synthetic(seed: int, n: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 784, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(n)]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def mask_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> int:
    if set(a) != set(b):
        return -1
    return sum(int((a[n].bool() != b[n].bool()).sum()) for n in a)


def weight_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


# ------------------------------------------------------------------------------------------- (b, c, d) plain
def _train(pruner, model, opt, data, first_step: int, changes: list[int]) -> None:
    for i, (x, y) in enumerate(data):
        before = pruner.masks()
        pruner.train_step(model, opt, x, y)
        if mask_diff(before, pruner.masks()):
            changes.append(first_step + i + 1)


def plain_checks(key: str) -> dict[str, Any]:
    """(b) resume, (c) zeros, (d) updates through the library's own plain-PyTorch API."""
    cls, data = PRUNERS[key], synthetic(7)
    torch.manual_seed(0)
    model, changes = lenet(0), []
    opt = sgd(model)
    pruner = cls(SPARSITY, seed=0, total_steps=STEPS, delta_t=PLAIN_DELTA)
    pruner.setup(model, opt)
    _train(pruner, model, opt, data, 0, changes)
    masks, eff, stored = pruner.masks(), pruner.effective_weights(), pruner.stored_weights()
    size = sum(m.numel() for m in masks.values())
    out: dict[str, Any] = {
        "leaks": sum(int(((eff[n] != 0) & ~m).sum()) for n, m in masks.items()),
        "stored_nonzero_masked": sum(int(((stored[n].detach() != 0) & ~m).sum()) for n, m in masks.items()),
        "kept": sum(int(m.sum()) for m in masks.values()),
        "expected_kept": round((1 - SPARSITY) * size),
        "size": size,
        "mask_changes": changes,
    }
    pruner.close()
    # interrupted at PLAIN_STOP, every state through a checkpoint file's round trip, fresh objects
    torch.manual_seed(0)
    model = lenet(0)
    opt = sgd(model)
    pruner = cls(SPARSITY, seed=0, total_steps=STEPS, delta_t=PLAIN_DELTA)
    pruner.setup(model, opt)
    _train(pruner, model, opt, data[:PLAIN_STOP], 0, [])
    buf = io.BytesIO()
    try:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "lib": pruner.state_dict()}, buf)
    except Exception as e:  # noqa: BLE001 - a library state that cannot be saved is a finding
        out["resume_error"] = f"saving: {type(e).__name__}: {e}"
        return out
    pruner.close()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    torch.manual_seed(99)
    fresh = lenet(99)
    fresh_opt = sgd(fresh)
    restored = cls(SPARSITY, seed=0, total_steps=STEPS, delta_t=PLAIN_DELTA)
    try:
        restored.restore(fresh, fresh_opt, saved["lib"], saved["model"], saved["opt"])
        restored.step = PLAIN_STOP  # the adapter's own counter only; the library keeps whatever it restored
        _train(restored, fresh, fresh_opt, data[PLAIN_STOP:], PLAIN_STOP, [])
    except Exception as e:  # noqa: BLE001
        out["resume_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return out
    out["resume_mask_diff"] = mask_diff(masks, restored.masks())
    out["resume_weight_diff"] = weight_diff(eff, restored.effective_weights())
    out["resume_notes"] = restored.notes
    restored.close()
    return out


def sparsimony_set_odd_delta() -> str | None:
    """sparsimony SET with an odd ``delta_t`` (its step counter only sees odd steps): what its first update does."""
    if "sparsimony_set" not in installed():
        return None
    torch.manual_seed(0)
    model = lenet(0)
    opt = sgd(model)
    pruner = PRUNERS["sparsimony_set"](SPARSITY, seed=0, total_steps=STEPS, delta_t=3)
    pruner.setup(model, opt)
    try:
        for x, y in synthetic(7):
            pruner.train_step(model, opt, x, y)
    except Exception as e:  # noqa: BLE001
        where = traceback.extract_tb(e.__traceback__)[-1].line
        return f"delta_t=3: {type(e).__name__} at step {pruner.step + 1} ({where})"
    return "delta_t=3: no error"


# ------------------------------------------------------------------------------------------- Lightning rows
def callback(key: str):
    """The Lightning callback behind ``key`` (our methods and ModelPruning), with the check's schedule."""
    from lightning_pai import GradualMagnitudePruning, LotteryTicket, PruneAtInit, RigL

    if key == "pai_pai":
        return PruneAtInit("magnitude", SPARSITY, verbose=False)
    if key == "pai_rigl":
        return RigL(SPARSITY, delta_t=LIGHTNING_DELTA, verbose=False)
    if key == "pai_gmp":
        return GradualMagnitudePruning(SPARSITY, frequency=LIGHTNING_DELTA, verbose=False)
    if key == "pai_lottery":
        return LotteryTicket(rounds=STEPS // STEPS_PER_EPOCH, prune_fraction=0.5, epochs_per_round=1, verbose=False)
    if key == "modelpruning":
        from step_time import ModelPruningAtStart

        return ModelPruningAtStart(
            "l1_unstructured",
            parameter_names=["weight"],  # as timed (its default also pools the biases)
            amount=SPARSITY,
            use_global_unstructured=True,
            apply_pruning=False,
            verbose=0,
        )
    if key == "modelpruning_default":  # every epoch end: prune 50 % of weights and biases left, reset to the init
        from pytorch_lightning.callbacks import ModelPruning

        return ModelPruning("l1_unstructured", verbose=0)
    raise KeyError(key)


def _lightning():
    import pytorch_lightning as pl

    class LitLeNet(pl.LightningModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.net = lenet(seed)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return sgd(self)

    class Recorder(pl.Callback):
        """After the pruning callback: the masks and forward weights at the end of every step (last kept)."""

        def __init__(self, cb) -> None:
            self.cb, self.masks, self.weights, self.stored, self.changes, self.steps = cb, None, None, None, [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append(trainer.global_step)
            masks = current_masks(self.cb, pl_module)
            if self.masks is not None and mask_diff(self.masks, masks):
                self.changes.append(trainer.global_step)
            self.masks = masks
            owners = {n: _owner(pl_module, n) for n in masks}
            # the forward weight (ModelPruning's is recomputed from weight_orig * weight_mask at the next forward)
            self.weights = {n: _forward_weight(m, a) for n, (m, a) in owners.items()}
            self.stored = {n: getattr(m, a + "_orig", getattr(m, a)).detach().clone() for n, (m, a) in owners.items()}

    return pl, LitLeNet, Recorder


def _forward_weight(module: nn.Module, attr: str) -> Tensor:
    if hasattr(module, attr + "_orig"):
        return (getattr(module, attr + "_orig") * getattr(module, attr + "_mask")).detach().clone()
    return getattr(module, attr).detach().clone()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return module.get_submodule(path), attr


def current_masks(cb, module: nn.Module) -> dict[str, Tensor]:
    if getattr(cb, "masks", None) is not None and hasattr(cb.masks, "items"):  # a lightning_pai callback
        return {n: m.detach().cpu().clone() for n, m in cb.masks.items()}
    out = {}  # ModelPruning: torch.nn.utils.prune buffers, or (made permanent) the zero pattern
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            mask = getattr(m, "weight_mask", None)
            out[f"{n}.weight"] = (mask if mask is not None else m.weight != 0).detach().bool().cpu().clone()
    return out


def _trainer(pl, callbacks: list, max_steps: int, **kwargs):
    """A quiet CPU trainer of ``max_steps`` (LotteryTicket counts in epochs: ``max_epochs`` only)."""
    lottery = any(type(c).__name__ == "LotteryTicket" for c in callbacks)
    options = {
        "accelerator": "cpu",
        "max_steps": -1 if lottery else max_steps,
        "max_epochs": STEPS // STEPS_PER_EPOCH,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    }
    return pl.Trainer(**{**options, **kwargs})


def _loader(world_size: int = 1):
    from torch.utils.data import DataLoader, TensorDataset

    data = synthetic(11, STEPS_PER_EPOCH * world_size)
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Crash(RuntimeError):
    """Raised by the check to stop a fit as a crash would."""


def lightning_resume(key: str) -> dict[str, Any]:
    """(b) for a Lightning callback: an uninterrupted fit vs the same fit crashing after its step-8 checkpoint.

    The crashed fit saves a checkpoint with ``ModelCheckpoint(every_n_train_steps=8)`` (the last batch of
    epoch 2), crashes at step 10; a fresh module (another seed) and a fresh callback resume from the
    checkpoint with ``fit(ckpt_path=...)`` and run to the end (step 16).
    """
    pl, LitLeNet, Recorder = _lightning()

    class CrashAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == LIGHTNING_STOP + 2:
                raise Crash(f"simulated crash at step {trainer.global_step}")

    cb = callback(key)
    full = Recorder(cb)
    _trainer(pl, [cb, full], STEPS).fit(LitLeNet(0), _loader())
    with tempfile.TemporaryDirectory() as tmp:
        cb = callback(key)
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp, every_n_train_steps=LIGHTNING_STOP, save_top_k=-1)
        trainer = _trainer(pl, [cb, Recorder(cb), saver, CrashAt()], STEPS, enable_checkpointing=True)
        try:
            trainer.fit(LitLeNet(0), _loader())
        except Crash:
            pass
        path = next(Path(tmp).glob("*.ckpt"))
        cb = callback(key)
        resumed = Recorder(cb)
        try:
            _trainer(pl, [cb, resumed], STEPS).fit(LitLeNet(99), _loader(), ckpt_path=str(path))
        except Exception as e:  # noqa: BLE001
            return {"resume_error": f"{type(e).__name__}: {str(e)[:200]}", "mask_changes": full.changes}
    masks = full.masks
    return {
        "leaks": sum(int(((full.weights[n] != 0) & ~m).sum()) for n, m in masks.items()),
        "stored_nonzero_masked": sum(int(((full.stored[n] != 0) & ~m).sum()) for n, m in masks.items()),
        "kept": sum(int(m.sum()) for m in masks.values()),
        "size": sum(m.numel() for m in masks.values()),
        "mask_changes": full.changes,
        "resume_mask_diff": mask_diff(full.masks, resumed.masks),
        "resume_weight_diff": weight_diff(full.weights, resumed.weights),
        "resumed_steps": resumed.steps,
    }


def ddp_lightning_worker(key: str, outdir: str) -> None:
    """One rank of ``Trainer(strategy="ddp", devices=2)``; Lightning re-launches this file for rank 1."""
    pl, LitLeNet, Recorder = _lightning()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(rank)
    cb = callback(key)
    rec = Recorder(cb)
    trainer = _trainer(pl, [cb, rec], STEPS, devices=2, strategy="ddp")
    trainer.fit(LitLeNet(seed=rank), _loader(world_size=2))
    torch.save({"masks": rec.masks, "weights": rec.weights, "changes": rec.changes}, Path(outdir) / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------- DDP, peers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_peer_worker(rank: int, key: str, outdir: str, port: int) -> None:
    """One rank: a model from seed ``rank``, the library set up on it, then DDP, 16 steps on this rank's data."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        model = lenet(rank)
        opt = sgd(model)
        pruner = PRUNERS[key](SPARSITY, seed=None, total_steps=STEPS, delta_t=PLAIN_DELTA)
        pruner.setup(model, opt)
        ddp = DistributedDataParallel(model)
        changes: list[int] = []
        _train(pruner, ddp, opt, synthetic(100 + rank), 0, changes)
        torch.save(
            {"masks": pruner.masks(), "weights": pruner.effective_weights(), "changes": changes},
            Path(outdir) / f"rank{rank}.pt",
        )
    except Exception as e:  # noqa: BLE001
        (Path(outdir) / f"rank{rank}.err").write_text(f"{type(e).__name__}: {str(e)[:300]}")
        os._exit(1)
    dist.destroy_process_group()


def ddp_check(key: str, timeout: int = 240) -> dict[str, Any]:
    """(a): launch the 2-rank run in a subprocess and compare what both ranks wrote."""
    mode = "ddp-lightning" if key in LIGHTNING_KEYS else "ddp-peer"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, mode, key, tmp], capture_output=True, text=True, env=env, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"ddp_error": f"timed out after {timeout} s (a rank hung in a collective)"}
        errs = sorted(Path(tmp).glob("rank*.err"))
        if errs:
            return {"ddp_error": errs[0].read_text()}
        files = [Path(tmp) / f"rank{r}.pt" for r in (0, 1)]
        if proc.returncode != 0 or not all(f.exists() for f in files):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"ddp_error": f"exit {proc.returncode}: {tail[0][:300]}"}
        r0, r1 = (torch.load(f, weights_only=False) for f in files)
    return {
        "ddp_mask_diff": mask_diff(r0["masks"], r1["masks"]),
        "ddp_weight_diff": weight_diff(r0["weights"], r1["weights"]),
        "ddp_changes": r0["changes"],
    }


# ------------------------------------------------------------------------------------------- all
def run_all(keys: list[str] | None = None, log=print) -> dict[str, Any]:
    """Every check for every installed library; rows keyed like ``peers.PRUNERS`` (plus ``modelpruning_default``)."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    chosen = [k for k in installed(keys) if k != "dense"]
    if "modelpruning" in chosen:
        chosen.insert(chosen.index("modelpruning") + 1, "modelpruning_default")
    rows: dict[str, Any] = {}
    for key in chosen:
        if key in LIGHTNING_KEYS:
            library, method = LIGHTNING_LABELS[key]
            row: dict[str, Any] = {"library": library, "method": method, "via": "Lightning callback"}
            row.update(lightning_resume(key))
            constant = key not in ("pai_lottery", "modelpruning_default")  # those prune by rounds, not to 0.9
            row["expected_kept"] = round((1 - SPARSITY) * row["size"]) if "size" in row and constant else None
        else:
            cls = PRUNERS[key]
            row = {"library": cls.library, "method": cls.method, "via": "plain PyTorch"}
            row.update(plain_checks(key))
        row["dynamic"] = key in ("pai_rigl", "pai_gmp", "pai_lottery", "modelpruning_default") or (
            key in PRUNERS and PRUNERS[key].dynamic
        )
        row.update(ddp_check(key))
        if key == "sparsimony_set":
            row["note"] = sparsimony_set_odd_delta()
        rows[key] = row
        log(f"  {key:20s} " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("library", "method")))
    return {
        "model": "LeNet-300-100, synthetic batches of 32",
        "sparsity": SPARSITY,
        "steps": STEPS,
        "plain_delta_t": PLAIN_DELTA,
        "plain_resume_after": PLAIN_STOP,
        "lightning_delta_t": LIGHTNING_DELTA,
        "lightning_checkpoint_at": LIGHTNING_STOP,
        "rows": rows,
    }


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    if len(sys.argv) > 1 and sys.argv[1] == "ddp-lightning":
        ddp_lightning_worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "ddp-peer":
        import torch.multiprocessing as mp

        mp.spawn(ddp_peer_worker, args=(sys.argv[2], sys.argv[3], _free_port()), nprocs=2, join=True)
    else:
        print(json.dumps(run_all(sys.argv[1:] or None), indent=1, default=str))
