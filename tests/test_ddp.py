"""A real 2-process DDP fit on the CPU (gloo): masks are decided on rank zero and broadcast."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TARGET_SHAPES, TARGET_TOTAL, every_callback, masks_equal, topology_methods
from helpers import run_script as run_python

SCRIPT = Path(__file__).with_name("ddp_script.py")


def run_script(outdir: Path, strategy: str, method: str = "rank_random") -> subprocess.CompletedProcess:
    return run_python(SCRIPT, outdir, strategy, method)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("ddp")
    proc = run_script(outdir, "ddp")
    files = [outdir / "rank0.pt", outdir / "rank1.pt"]
    for f in files:
        assert f.exists(), f"{f.name} missing; stderr:\n{proc.stderr[-5000:]}"
    return [torch.load(f, weights_only=False) for f in files]


def test_both_ranks_trained(ddp_results):
    r0, r1 = ddp_results
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 20


def test_scorer_was_rank_dependent(ddp_results):
    """Each rank's own scores would have given different masks: equal final masks are not a coincidence."""
    r0, r1 = ddp_results
    assert (r0["scorer_rank"], r1["scorer_rank"]) == (0, 1)
    assert not masks_equal(r0["local_masks"], r1["local_masks"])


def test_masks_broadcast_from_rank_zero(ddp_results):
    r0, r1 = ddp_results
    assert masks_equal(r0["masks"], r1["masks"])
    assert masks_equal(r0["masks"], r0["local_masks"])  # rank zero's choice won
    assert not masks_equal(r1["masks"], r1["local_masks"])


def test_kept_count_exact(ddp_results):
    for r in ddp_results:
        assert sum(int(m.sum()) for m in r["masks"].values()) == round(0.2 * TARGET_TOTAL) == 389


def test_weights_masked_and_in_sync(ddp_results):
    r0, r1 = ddp_results
    for r in (r0, r1):
        for name, mask in r["masks"].items():
            assert torch.all(r["weights"][name][~mask] == 0), name
            assert torch.equal(r["zero"][name], r["weights"][name] == 0)
            # kept weights moved away from zero (a zero among them would have probability ~0)
            assert torch.equal(r["zero"][name], ~mask), name
    for name in r0["zero"]:
        assert torch.equal(r0["zero"][name], r1["zero"][name]), name
    assert set(r0["weights"]) == set(r1["weights"])
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name  # DDP keeps replicas identical


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_ddp_fork_launching_process_keeps_masks(tmp_path):
    """With ``ddp_fork``/``ddp_spawn`` training runs in worker processes; rank zero hands its masks back.

    The launching process's callback then reports them, saves them in checkpoints and would reuse them
    on a further ``fit`` instead of re-pruning.
    """
    run_script(tmp_path, "ddp_fork")
    main = torch.load(tmp_path / "main.pt", weights_only=False)
    zero = {n: main["weights"][n] == 0 for n in TARGET_SHAPES}
    assert sum(int((~z).sum()) for z in zero.values()) == round(0.2 * TARGET_TOTAL)  # the weights came back pruned
    assert main["masks"] is not None, "the launching process's callback has no masks after a ddp_fork fit"
    assert masks_equal(main["masks"], {n: ~z for n, z in zero.items()})
    assert main["ckpt_masks"] is not None and masks_equal(main["ckpt_masks"], main["masks"])
    assert main["report_kept"] == round(0.2 * TARGET_TOTAL)
    assert not Path(main["handoff"]).exists()  # the hand-off file left with the launching process
    # The script ran a second ddp_fork fit with the same callback before reading any of this, with a scorer
    # that raises if called: its workers found the first fit's masks (above: they match its zero pattern).


def test_snip_masks_identical_across_ranks(tmp_path):
    """SNIP scores each rank's own data shard; the masks every rank trains with are rank zero's."""
    run_script(tmp_path, "ddp", "snip_recorded")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert not masks_equal(r0["local_masks"], r1["local_masks"])  # the shards really disagree
    assert masks_equal(r0["masks"], r1["masks"]) and masks_equal(r0["masks"], r0["local_masks"])
    assert sum(int(m.sum()) for m in r0["masks"].values()) == round(0.2 * TARGET_TOTAL)
    for name in r0["masks"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name])
        assert torch.all(r0["weights"][name][~r0["masks"][name]] == 0)


def test_lottery_ticket_masks_identical_across_ranks_every_round(tmp_path):
    """3 rounds under 2-process DDP, round 0 of 3 epochs, rewind to epoch 1 (later rounds: 2 epochs, T - k):
    same masks and weights on both ranks at every epoch start, and each round replays epochs 1-2's batches."""
    run_script(tmp_path, "ddp", "lottery")
    r0, r1 = (torch.load(tmp_path / f"lottery{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert sorted(r0["masks"]) == sorted(r1["masks"]) == list(range(7))
    kept = []
    for epoch in range(7):
        assert masks_equal(r0["masks"][epoch], r1["masks"][epoch]), epoch
        for k, v in r0["weights"][epoch].items():
            assert torch.equal(v, r1["weights"][epoch][k]), (epoch, k)
        kept.append(sum(int(m.sum()) for m in r0["masks"][epoch].values()))
    first = TARGET_TOTAL - round(0.3 * TARGET_TOTAL)
    second = first - round(0.3 * first)
    assert kept == [TARGET_TOTAL] * 3 + [first] * 2 + [second] * 2
    for r in (r0, r1):  # rewind to epoch 1: each round replays epochs 1, 2 of this rank's shard
        assert torch.equal(r["first_x"][3], r["first_x"][1]) and torch.equal(r["first_x"][5], r["first_x"][1])
        assert torch.equal(r["first_x"][4], r["first_x"][2]) and torch.equal(r["first_x"][6], r["first_x"][2])
        assert not torch.equal(r["first_x"][2], r["first_x"][1])
    assert not torch.equal(r0["first_x"][1], r1["first_x"][1])  # the two ranks see different shards


def test_lottery_ticket_progress_returns_from_ddp_fork(tmp_path):
    """Under ddp_fork (as ddp_spawn) the workers train; the launching process gets rank zero's rounds and results."""
    run_script(tmp_path, "ddp_fork", "lottery")
    main = torch.load(tmp_path / "main.pt", weights_only=False)
    assert main["round"] == 2
    assert [r["round"] for r in main["results"]] == [0, 1, 2]
    expected = TARGET_TOTAL - round(0.3 * TARGET_TOTAL)
    expected -= round(0.3 * expected)
    assert sum(int(m.sum()) for m in main["masks"].values()) == expected
    assert main["results"][-1]["density"] == expected / TARGET_TOTAL


DYNAMIC = topology_methods()


@pytest.fixture(scope="module")
def dynamic_results(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dynamic")
    run_script(outdir, "ddp", ",".join(DYNAMIC))
    return outdir


@pytest.mark.parametrize("method", DYNAMIC)
def test_dynamic_topology_identical_across_ranks(dynamic_results, method):
    """2-process DDP (gloo), 4 epochs of 4 steps per rank: the same masks on both ranks at every step."""
    r0, r1 = (torch.load(dynamic_results / f"{method}{r}.pt", weights_only=False) for r in (0, 1))
    # as the plan schedules them in 16 steps: RigL every 2 but never the last (7), SET every epoch end but the
    # last (3), GMP every 2 up to step 6 (3), ...
    assert r0["updates"] == r1["updates"] == r0["scheduled"] >= 3
    steps = sorted(r0["masks"])
    assert steps == sorted(r1["masks"]) == list(range(16))
    changes = 0
    initial = {n: int(m.sum()) for n, m in r0["masks"][0].items()}
    for step in steps:
        assert masks_equal(r0["masks"][step], r1["masks"][step]), step
        kept = {n: int(m.sum()) for n, m in r0["masks"][step].items()}
        card = every_callback()[method]().card
        if card.keeps_layer_counts:
            assert kept == initial  # every layer's count is constant
        elif card.keeps_total:
            assert sum(kept.values()) == sum(initial.values())  # budgets move between layers, the total stays
        if step and not masks_equal(r0["masks"][step], r0["masks"][step - 1]):
            changes += 1
    assert changes >= 3
    final = {n: int(m.sum()) for n, m in r0["masks"][15].items()}
    assert abs(sum(final.values()) - (TARGET_TOTAL - round(0.8 * TARGET_TOTAL))) <= 3  # gradual: by step 6
    # all-reduced gradients: the optimizer's momentum (SNFS reads it) is bit-identical on both ranks
    assert all(torch.equal(r0["momentum"][n], r1["momentum"][n]) for n in r0["momentum"])
    assert r0["zero"] and r1["zero"]


def test_rigl_on_a_timm_vit_identical_across_ranks(tmp_path):
    """2-process DDP, RigL every 2 steps on vit_tiny (stem and head dense): same topology on both ranks."""
    run_script(tmp_path, "ddp", "timm")
    r0, r1 = (torch.load(tmp_path / f"timm{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["updates"] == r1["updates"] == 3  # steps 2, 4, 6 (not 8, the last)
    assert "net.patch_embed.proj.weight" not in r0["names"] and "net.head.weight" not in r0["names"]
    assert len(r0["names"]) == 48
    assert sorted(r0["masks"]) == sorted(r1["masks"]) == list(range(8))
    for step in range(8):
        assert masks_equal(r0["masks"][step], r1["masks"][step]), step
    assert not masks_equal(r0["masks"][0], r0["masks"][7])
    assert all(r0["zero"].values()) and all(r1["zero"].values())


def test_dynamic_callbacks_under_ddp_spawn(tmp_path):
    """ddp_spawn (2 CPU workers, 2 epochs of 4 steps each): both workers end with the same masks, and the
    launching process gets rank zero's masks, update count and trained weights back."""
    run_script(tmp_path, "ddp_spawn", "spawn_dst")
    main = torch.load(tmp_path / "spawn_main.pt", weights_only=False)
    # 2 epochs of 4 steps: RigL every 2 steps but never the last (8): 3; SET at epoch 0's end: 1; GMP at 2, 4
    expected_updates = {"RigL": 3, "SET": 1, "GradualMagnitudePruning": 2}
    for name, got in main.items():
        w0, w1 = (torch.load(tmp_path / f"spawn_{name}_{r}.pt", weights_only=False) for r in (0, 1))
        assert masks_equal(w0["masks"], w1["masks"]), name
        assert masks_equal(got["masks"], w0["masks"]), name
        assert got["zero"], name  # the trained weights came back (Lightning does not restore global_step)
        assert got["updates"] == w0["updates"] == expected_updates[name], name
        kept = sum(int(m.sum()) for m in got["masks"].values())
        assert abs(kept - round(0.2 * TARGET_TOTAL)) <= 3, name


def test_learned_masks_under_ddp(tmp_path):
    """Each rank trains on its own half of the data, so the ranks' score gradients differ: identical masks and
    scores at every step (0 differing entries) come from the gradients being averaged before each step."""
    from lightning_pai.callbacks import CALLBACKS

    run_script(tmp_path, "ddp", "learned")
    learned = [cls.__name__ for cls in CALLBACKS if cls.card.family == "learned"]
    assert learned == ["EdgePopup", "Supermask", "MovementPruning", "TrainableThresholds", "ContinuousSparsification"]
    for name in learned:
        r0, r1 = (torch.load(tmp_path / f"learned_{name}_{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["global_step"] == r1["global_step"] == 8
        assert sorted(r0["masks"]) == sorted(r1["masks"]) == list(range(9)), name
        for step in r0["masks"]:
            differing = sum(int((r0["masks"][step][n] != r1["masks"][step][n]).sum()) for n in r0["masks"][step])
            assert differing == 0, (name, step)
        assert not masks_equal(r0["masks"][0], r0["masks"][8]), name  # the masks were learned
        for n, s in r0["scores"].items():
            assert torch.equal(s, r1["scores"][n]), (name, n)
        for n, w in r0["weights"].items():
            assert torch.equal(w, r1["weights"][n]), (name, n)


def test_nm_masks_under_ddp(tmp_path):
    """2-process DDP: N:M (2:4 on fc1/fc2) with RigL, SET, LotteryTicket, GMP and SNIP; every group of 4 keeps
    exactly 2 at the end (RigL and SET at every step) on both ranks, and the ranks agree."""
    from lightning_pai.core.nm import is_nm

    run_script(tmp_path, "ddp", "nm")
    for name in ("rigl", "set", "lottery", "gmp", "snip"):
        r0, r1 = (torch.load(tmp_path / f"nm_{name}{r}.pt", weights_only=False) for r in (0, 1))
        assert masks_equal(r0["final"], r1["final"]), name
        layouts = r0["layouts"]
        for step, masks in r0["masks"].items():
            assert masks_equal(masks, r1["masks"][step]), (name, step)
        final = r0["final"]
        for n in ("fc1.weight", "fc2.weight"):
            assert is_nm(final[n], 2, 4, layouts[n]), (name, n)
        if name in ("rigl", "set"):
            assert all(is_nm(m["fc1.weight"], 2, 4, layouts["fc1.weight"]) for m in r0["masks"].values())
            assert not masks_equal(r0["masks"][0], final)  # it did rewire
