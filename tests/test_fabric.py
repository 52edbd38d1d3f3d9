"""Sparsifier under Lightning Fabric with 2 CPU processes (gloo): every rank holds the same masks at every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TARGET_TOTAL, masks_equal, run_script

SCRIPT = Path(__file__).with_name("fabric_script.py")
pytest.importorskip("lightning.fabric")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("fabric")
    run_script(SCRIPT, outdir)
    return [torch.load(outdir / f"fabric{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("method", ["prune_at_init", "rigl", "set"])
def test_masks_identical_across_ranks_at_every_step(ranks, method):
    r0, r1 = ranks[0][method], ranks[1][method]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] == 8  # 64 samples, 2 ranks, batch 8, 2 epochs
    assert sorted(r0["masks"]) == sorted(r1["masks"]) == list(range(1, 9))
    for step in r0["masks"]:
        differing = sum(int((r0["masks"][step][n] != r1["masks"][step][n]).sum()) for n in r0["masks"][step])
        assert differing == 0, (method, step)
        assert sum(int(m.sum()) for m in r0["masks"][step].values()) == round(0.2 * TARGET_TOTAL) == 389
    for name in r0["weights"]:  # DDP keeps the replicas identical, the masks keep the pruned weights at zero
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    assert r0["zero"] and r1["zero"]


def test_rank_zero_decides_the_initial_masks(ranks):
    r0, r1 = ranks[0]["prune_at_init"], ranks[1]["prune_at_init"]
    assert not masks_equal(r0["local_masks"], r1["local_masks"])  # each rank alone would keep other weights
    assert masks_equal(r0["masks"][8], r0["local_masks"]) and masks_equal(r1["masks"][8], r0["local_masks"])


@pytest.mark.parametrize(("method", "updates"), [("rigl", 3), ("set", 2)])
def test_topology_changes_on_schedule_on_both_ranks(ranks, method, updates):
    r0, r1 = ranks[0][method], ranks[1][method]
    assert r0["updates"] == r1["updates"] == updates  # RigL: steps 2, 4, 6 (never the last); SET: steps 3, 6
    changed = [s for s in range(2, 9) if not masks_equal(r0["masks"][s], r0["masks"][s - 1])]
    assert changed == ([2, 4, 6] if method == "rigl" else [3, 6])
