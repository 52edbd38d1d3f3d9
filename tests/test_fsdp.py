"""FSDP2 (Lightning's ModelParallelStrategy + ``fully_shard``) on 2 CPU processes: sharded parameters, masks
identical to a single-process run on the same weights and data, and crash-and-resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_script import STEPS, Trace, methods, trainer_kwargs
from helpers import (
    TARGET_SHAPES,
    TARGET_TOTAL,
    every_callback,
    make_dataloader,
    make_module,
    make_trainer,
    masks_equal,
    run_script,
    topology_methods,
)
from torch.utils.data import DataLoader, TensorDataset

SCRIPT = Path(__file__).with_name("fsdp_script.py")
EQUIVALENCE = ("magnitude", "snip", "lottery", "rigl")
EVERY = tuple(name for name in methods() if name.startswith("every_"))
REFUSED = tuple(name for name in methods() if name.startswith("refused_"))  # learned masks: scores not sharded

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def run(outdir: Path, names: str, crash_step: int = -1, ckpt: str = "") -> None:
    run_script(SCRIPT, outdir, names, crash_step, ckpt, timeout=600)


def load(outdir: Path, method: str) -> tuple[dict, dict]:
    return tuple(torch.load(outdir / f"{method}{r}.pt", weights_only=False) for r in (0, 1))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("fsdp")
    run(outdir, ",".join(EQUIVALENCE + EVERY + REFUSED))
    return outdir


def single_process(method: str) -> tuple[Trace, dict]:
    """The same model, weights (float64) and data in one process: a batch of 16 is the union of the two ranks'
    batches of 8 (DistributedSampler interleaves), and FSDP2 averages the ranks' gradients."""
    torch.manual_seed(0)
    module = make_module(seed=None).double()
    cb = methods()[method]()
    trace = Trace(cb, None)
    loader = make_dataloader(n=128, batch_size=16)
    data = DataLoader(TensorDataset(loader.dataset.tensors[0].double(), loader.dataset.tensors[1]), batch_size=16)
    make_trainer(callbacks=[cb, trace], **trainer_kwargs(method)).fit(module, data)
    return trace, {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("method", EQUIVALENCE)
def test_fsdp2_masks_equal_the_single_process_masks(sharded, method):
    r0, r1 = load(sharded, method)
    assert r0["dtensor"] and r1["dtensor"]  # the parameters really were sharded DTensors
    assert r0["zero"] and r1["zero"]  # the local shards of pruned weights are exactly zero
    steps = sorted(r0["masks"])
    assert steps == sorted(r1["masks"]) == list(range(16 if method == "lottery" else STEPS))
    reference, weights = single_process(method)
    assert sorted(reference.masks) == steps
    for step in steps:
        assert masks_equal(r0["masks"][step], r1["masks"][step]), step
        differing = sum(int((r0["masks"][step][n] != reference.masks[step][n]).sum()) for n in TARGET_SHAPES)
        assert differing == 0, (step, differing)
    kept = sum(int(m.sum()) for m in r0["final"].values())
    assert kept == (TARGET_TOTAL - round(0.5 * TARGET_TOTAL) if method == "lottery" else round(0.2 * TARGET_TOTAL))
    for n, w in weights.items():  # the trained weights agree too, up to the all-reduce's float64 rounding
        assert torch.allclose(r0["weights"][n], w, atol=1e-10), n
    if method == "rigl":
        assert r0["updates"] == r1["updates"] == 5  # steps 2, 4, 6, 8, 10 (never the last)
        changes = sum(not masks_equal(r0["masks"][s], r0["masks"][s - 1]) for s in steps[1:])
        assert changes >= 3


@pytest.mark.parametrize("method", EVERY)
def test_every_callback_trains_under_fsdp2(sharded, method):
    r0, r1 = load(sharded, method)
    assert r0["dtensor"] and r0["zero"] and r1["zero"]
    for step in r0["masks"]:
        assert masks_equal(r0["masks"][step], r1["masks"][step]), step
    assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in r0["weights"])
    kept = sum(int(m.sum()) for m in r0["final"].values())
    expected = TARGET_TOTAL - round(0.8 * TARGET_TOTAL)
    assert abs(kept - expected) <= 3  # GMP / movement: per-layer rounding
    cb = every_callback()[method.removeprefix("every_")]()
    if method.removeprefix("every_") in topology_methods() and not cb.plan().when.at_epoch_end:
        assert r0["updates"] >= 3


@pytest.mark.parametrize("method", REFUSED)
def test_learned_masks_refuse_sharded_parameters_before_training(sharded, method):
    r0, r1 = load(sharded, method)
    for result in (r0, r1):
        assert result["global_step"] == 0
        assert result["error"] == (
            f"`{method.removeprefix('refused_')}` learns its mask from per-weight scores, which are not sharded yet: "
            "it does not run on FSDP2-sharded parameters (conv.weight, fc1.weight, fc2.weight). Use DDP, or a method "
            "of another family."
        )


@pytest.mark.parametrize("method", ["rigl", "lottery"])
def test_fsdp2_crash_and_resume_reproduces_the_uninterrupted_masks(sharded, tmp_path, method):
    """Crash at step 10, resume from the distributed checkpoint saved after step 8 (the end of the first epoch)."""
    run(tmp_path, method, crash_step=10)
    ckpt = tmp_path / "ckpt"
    (saved,) = [p for p in ckpt.iterdir() if p.name.endswith("step=8.ckpt")]
    assert saved.is_dir() and (saved / "meta.pt").exists()  # Lightning's distributed (DCP) checkpoint
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    run(resumed_dir, method, ckpt=str(saved))
    full, _ = load(sharded, method)
    r0, r1 = load(resumed_dir, method)
    assert r0["global_step"] == full["global_step"]
    assert sorted(r0["masks"])[0] == 8
    for step in sorted(r0["masks"]):
        assert masks_equal(r0["masks"][step], full["masks"][step]), step
        assert masks_equal(r1["masks"][step], full["masks"][step]), step
    assert masks_equal(r0["final"], full["final"])
    assert all(torch.allclose(r0["weights"][n], full["weights"][n], atol=1e-12) for n in full["weights"])
    if method == "rigl":
        assert r0["updates"] == full["updates"] == 5


def test_fsdp1_and_deepspeed_are_rejected_with_the_supported_path():
    import lightning.pytorch as pl

    from lightning_pai import RigL

    fsdp1 = type("FSDPStrategy", (pl.strategies.SingleDeviceStrategy,), {})  # strategy="fsdp" needs a GPU
    trainer = make_trainer(callbacks=[RigL(0.8, verbose=False)], strategy=fsdp1(device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match=r"use FSDP2: `ModelParallelStrategy\(data_parallel_size=N"):
        trainer.fit(make_module(seed=0), make_dataloader())
    deepspeed = type("DeepSpeedStrategy", (pl.strategies.SingleDeviceStrategy,), {})
    trainer = make_trainer(callbacks=[RigL(0.8, verbose=False)], strategy=deepspeed(device=torch.device("cpu")))
    with pytest.raises(RuntimeError, match="DDP family .* and FSDP2"):
        trainer.fit(make_module(seed=0), make_dataloader())
