"""The plain-loop API: a Sparsifier drives exactly the run a Lightning Trainer drives, resumes, and refuses misuse."""

from __future__ import annotations

import pytest
import torch
from helpers import TARGET_TOTAL, assert_enforced, make_dataloader, make_module, make_trainer, masks_equal
from torch.nn import functional as F

import lightning_pai
from lightning_pai import LotteryTicket, PruneAtInit, RigL, Sparsifier

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, STEPS = 2, 16  # 2 epochs of 8 batches
#: Every registered pruning method in its example configuration, and SNIP (a data-driven scorer) beside magnitude
#: (FISH, gradient-only: tests/test_fish.py).
METHODS = {cls.__name__: cls.example for cls in lightning_pai.list_methods() if cls.card.family != "gradient_only"}
METHODS["PruneAtInit-snip"] = lambda: PruneAtInit("snip", 0.8, verbose=False)


def _plain_loop(method, module, epochs: int = EPOCHS, stop_after: int | None = None, state=None, late_load=False):
    """The README's loop: zero_grad, forward, backward, ``sparsifier.step()``, ``epoch_end()``.

    With ``state``: resume, through ``Sparsifier(state=...)`` or (``late_load``) through ``load_state_dict`` on a
    running sparsifier followed by loading the model's and the optimizer's state.
    """
    optimizer = module.configure_optimizers()
    loader = make_dataloader()
    total = epochs * len(loader)
    if state is not None and not late_load:
        optimizer.load_state_dict(state["optimizer"])
        sparsifier = Sparsifier(method, module, optimizer, data=loader, total_steps=total, state=state["sparsifier"])
    else:
        sparsifier = Sparsifier(method, module, optimizer, data=loader, total_steps=total)
    if state is not None and late_load:
        sparsifier.load_state_dict(state["sparsifier"])
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    for _ in range(sparsifier.epoch, epochs):
        for i, (x, y) in enumerate(loader):
            if i < sparsifier.global_step - sparsifier.epoch * len(loader):
                continue  # resumed mid-epoch: these batches were trained before the interruption
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            sparsifier.step()
            if sparsifier.global_step == stop_after:
                return sparsifier, {
                    "model": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparsifier": sparsifier.state_dict(),
                }
        sparsifier.epoch_end()
    return sparsifier, None


@pytest.mark.parametrize("name", list(METHODS))
def test_plain_loop_and_trainer_end_identical(name):
    """Same batches, same order, same seeds: identical masks (0 differing entries) and weights."""
    by_trainer, module_a = METHODS[name](), make_module(seed=0)
    make_trainer(callbacks=[by_trainer], max_epochs=EPOCHS, max_steps=-1).fit(module_a, make_dataloader())
    by_loop, module_b = METHODS[name](), make_module(seed=0)
    sparsifier, _ = _plain_loop(by_loop, module_b)
    assert sparsifier.global_step == STEPS
    differing = sum(int((by_trainer.masks[n] != by_loop.masks[n]).sum()) for n in by_trainer.masks.names)
    assert differing == 0
    kept = sum(int(m.sum()) for _, m in by_loop.masks.items())
    if by_loop.card.exact_sparsity:
        assert abs(kept - (1 - by_loop.final_sparsity) * TARGET_TOTAL) <= 3
    for (n, a), b in zip(module_a.named_parameters(), module_b.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), n
    assert getattr(by_trainer, "updates", None) == getattr(by_loop, "updates", None)
    if by_loop.card.family == "learned":
        for n, s in by_trainer.session.scores.items():
            assert torch.allclose(s, by_loop.session.scores[n], rtol=0, atol=1e-5), n
    assert_enforced(by_loop, module_b)  # pruned weights are exactly zero after SGD with momentum and decay


@pytest.mark.parametrize("late_load", [False, True], ids=["state=", "load_state_dict"])
@pytest.mark.parametrize("name", ["RigL", "SET", "GraNet", "LotteryTicket", "MovementPruning", "Supermask"])
def test_interrupted_and_resumed_loop_repeats_the_run(name, late_load):
    full, module = METHODS[name](), make_module(seed=0)
    _plain_loop(full, module)
    first, interrupted = METHODS[name](), make_module(seed=0)
    _, state = _plain_loop(first, interrupted, stop_after=11)
    # a new process: fresh objects, the model's and the sparsifier's saved state
    resumed_method, resumed = METHODS[name](), make_module(seed=1)
    if not late_load:
        resumed.load_state_dict(state["model"])
    sparsifier, _ = _plain_loop(resumed_method, resumed, state=state, late_load=late_load)
    assert sparsifier.global_step == STEPS
    assert masks_equal(dict(full.masks.items()), dict(resumed_method.masks.items()))
    for (n, a), b in zip(module.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n
    assert getattr(full, "updates", None) == getattr(resumed_method, "updates", None)


def test_lottery_rounds_in_a_plain_loop_record_results_and_rewind():
    ticket, module = LotteryTicket(3, 0.5, epochs_per_round=1, verbose=False), make_module(seed=0)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = module.configure_optimizers()
    loader = make_dataloader()
    sparsifier = Sparsifier(ticket, module, optimizer, data=loader)
    for epoch in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            sparsifier.step()
        sparsifier.epoch_end(metric=float(epoch))
        if epoch < 2:  # the next round started: pruned, and the survivors rewound to their initial values
            for n, p in module.named_parameters():
                mask = ticket.masks[n] if n in ticket.masks.names else torch.ones_like(p, dtype=torch.bool)
                assert torch.equal(p.detach(), initial[n] * mask), n
    assert [r["round"] for r in ticket.results] == [0, 1, 2]
    assert [r["last"] for r in ticket.results] == [0.0, 1.0, 2.0]
    assert [r["density"] for r in ticket.results] == pytest.approx([1.0, 0.5, 0.25], abs=1e-3)
    assert ticket.round == 2


def test_schedules_need_the_runs_length():
    module = make_module(seed=0)
    with pytest.raises(ValueError, match=r"`RigL` schedules its updates over the whole run: pass `total_steps=`"):
        Sparsifier(RigL(0.8, verbose=False), module, module.configure_optimizers())


def test_epoch_end_updates_need_the_epochs_length():
    module = make_module(seed=0)
    with pytest.raises(ValueError, match=r"`SET` must know which optimizer step ends an epoch: pass `steps_per_epoch"):
        Sparsifier(lightning_pai.SET(0.8, verbose=False), module, module.configure_optimizers(), total_steps=16)


def test_a_forgotten_epoch_end_is_an_error():
    module = make_module(seed=0)
    optimizer = module.configure_optimizers()
    loader = make_dataloader()
    sparsifier = Sparsifier(lightning_pai.SET(0.8, verbose=False), module, optimizer, data=loader, total_steps=16)
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            if sparsifier.global_step == 8:  # epoch 0 ended without `epoch_end()`
                with pytest.raises(RuntimeError, match=r"call `sparsifier.epoch_end\(\)` at the end of every epoch"):
                    sparsifier.step()
                return
            sparsifier.step()
    pytest.fail("the missing epoch_end was not noticed")


def test_data_driven_scorers_need_data_and_mid_epoch_rounds_need_the_trainer():
    module = make_module(seed=0)
    with pytest.raises(ValueError, match="pass `data=`"):
        Sparsifier(PruneAtInit("snip", 0.8, verbose=False), module, module.configure_optimizers())
    with pytest.raises(ValueError, match="ends rounds mid-epoch"):
        Sparsifier(
            LotteryTicket(2, 0.5, 1, rewind_to="step:2", verbose=False),
            module,
            module.configure_optimizers(),
            data=make_dataloader(),
        )
    with pytest.raises(TypeError, match="`method` must be a lightning_pai method"):
        Sparsifier("rigl", module, module.configure_optimizers())


def test_ddp_and_compile_wrappers_are_seen_through():
    module = make_module(seed=0)
    compiled = torch.compile(module, backend="eager")
    sparsifier = Sparsifier(PruneAtInit("magnitude", 0.8, verbose=False), compiled, module.configure_optimizers())
    assert sparsifier.module is module
    assert sparsifier.masks.names == ["conv.weight", "fc1.weight", "fc2.weight"]
