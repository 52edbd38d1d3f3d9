"""FreeTickets / EDST: the phases in steps, regular updates and large explorations by hand, the tickets, the ensemble,
monitoring, the plain loop, crash-and-resume and 2-process DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import TARGET_SHAPES, TARGET_TOTAL, make_dataloader, make_module, make_trainer, masks_equal, run_script
from torch.nn import functional as F

from lightning_pai import FreeTickets, Sparsifier, dense_state_dict
from lightning_pai.callbacks._compat import CallbackBase
from lightning_pai.core.dst import TopologyUpdater, drop_magnitude, grow
from lightning_pai.core.tickets import TicketPhases, ensemble_nll, expected_calibration_error, ticket_masks
from lightning_pai.deploy.ensemble import TicketEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")

#: ERK's per-layer counts at sparsity 0.8 on the test model (389 of 1944 kept; the conv layer is dense).
ERK_COUNTS = {"conv.weight": 24, "fc1.weight": 259, "fc2.weight": 106}


# ------------------------------------------------------------------------------------------------ the timeline
def test_phase_boundaries_in_steps():
    reference = TicketPhases(1 / 3, 3)  # the README's run: 450 epochs, 150 exploring, M = 3; 10 steps per epoch
    assert reference.table(4500) == {
        "explore_end": (1500,),
        "starts": (1500, 2500, 3500),
        "midpoints": (2000, 3000, 4000),
        "ends": (2500, 3500, 4500),
        "large": (2500, 3500),
    }
    # x = 30, L = 70: starts 30 + (0, ceil(70/3) = 24, ceil(140/3) = 47), midpoints 30 + ceil(70/6, 210/6, 350/6)
    odd = TicketPhases(0.3, 3)
    assert odd.table(100) == {
        "explore_end": (30,),
        "starts": (30, 54, 77),
        "midpoints": (42, 65, 89),
        "ends": (54, 77, 100),
        "large": (54, 77),
    }
    assert [odd.phase(t, 100) for t in (1, 30, 31, 54, 55, 77, 78, 100)] == [-1, -1, 0, 0, 1, 1, 2, 2]
    rates = [odd.learning_rate(t, 100) for t in range(1, 101)]
    assert rates == [0.1] * 30 + [0.01] * 12 + [0.001] * 12 + [0.01] * 11 + [0.001] * 12 + [0.01] * 12 + [0.001] * 11
    assert TicketPhases(0.0, 2).table(10)["starts"] == (0, 5)  # no exploration: ticket 0 starts at once
    TicketPhases(0.5, 3).check(6)  # 3 steps for 3 tickets: enough
    with pytest.raises(ValueError, match=r"has 5 optimizer steps, 3 of them exploring, which leaves 2 for 3 ticket"):
        TicketPhases(0.5, 3).check(5)


def test_regular_updates_at_multiples_of_delta_t_and_large_explorations_at_the_phase_starts():
    plan = FreeTickets(0.8, tickets=3, explore=0.3, delta_t=10, verbose=False).plan()
    updater = TopologyUpdater(plan)
    steps = [t for t in range(1, 101) if updater.is_update(t, 100)]
    assert steps == [10, 20, 30, 40, 50, 54, 60, 70, 77, 80, 90]  # never at the last step (100)
    fractions = {t: plan.rewire.fraction(t, 100) for t in steps}
    assert fractions == {t: 0.8 if t in (54, 77) else 0.5 for t in steps}
    assert (plan.rewire.drop, plan.rewire.growth, plan.rewire.redistribution) == ("magnitude", "gradient", "none")
    assert plan.rewire.regrown == "zero" and plan.options["rounding"] == "ceil"


# ------------------------------------------------------------------------------------------------ a recorded run
class _Recorder(CallbackBase):
    """Put *before* FreeTickets: dense gradients, weights and masks after each step (before its update), and the
    weights, masks and momentum at the next batch start (after it); what each validation saw."""

    def __init__(self, cb):
        self.cb = cb
        self.grads, self.weights, self.state, self.before, self.after, self.start = ({} for _ in range(6))
        self.momentum, self.val, self.lr = {}, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step + 1] = {n: p.grad.detach().clone() for n, p in self.cb.masks.params.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.weights[step] = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}
        self.state[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.before[step] = self.cb.masks.state_dict()
        self.lr[step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.after[step] = self.cb.masks.state_dict()
        self.start[step] = {n: p.detach().clone() for n, p in self.cb.masks.params.items()}
        opt = trainer.optimizers[0]
        self.momentum[step] = {n: opt.state[p]["momentum_buffer"].clone() for n, p in self.cb.masks.params.items()
                               if "momentum_buffer" in opt.state.get(p, {})}  # fmt: skip

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            value = float(trainer.callback_metrics["val_loss"])
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.val[trainer.global_step] = (value, self.cb.masks.state_dict(), state)


#: 5 epochs of 8 steps; explore 0.1: x = 4, tickets start at 4, 16, 28; large explorations after steps 16 (an
#: epoch's last step: at the epoch's end, after validation) and 28 (mid-epoch); regular updates every 5 steps.
RUN = {"tickets": 3, "explore": 0.1, "delta_t": 5}
UPDATES = (5, 10, 15, 16, 20, 25, 28, 30, 35)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tickets")
    cb = FreeTickets(0.8, **RUN, save_dir=str(folder), verbose=False)
    rec = _Recorder(cb)
    module = make_module(seed=0)
    trainer = make_trainer(callbacks=[rec, cb], max_epochs=5, max_steps=-1)
    trainer.fit(module, make_dataloader(), make_dataloader(n=16))
    assert trainer.global_step == 40 and cb.updates == len(UPDATES)
    return cb, rec, module, folder


def test_updates_match_the_rules_by_hand(recorded):
    """Each update: per layer, drop ceil(f * active) smallest |w| (f = 0.5, or q = 0.8 at 16 and 28), regrow as many at
    the largest |dense gradient| among all inactive weights; per-layer counts never change."""
    cb, rec, _, _ = recorded
    assert {n: int(m.sum()) for n, m in rec.after[0].items()} == ERK_COUNTS
    for step in range(1, 40):
        before, after = rec.before[step], rec.after[step]
        assert {n: int(m.sum()) for n, m in after.items()} == ERK_COUNTS, step
        if step not in UPDATES:
            assert masks_equal(before, after), step
            continue
        fraction = 0.8 if step in (16, 28) else 0.5
        counts = {n: math.ceil(fraction * ERK_COUNTS[n]) for n in before}
        dropped = drop_magnitude(rec.weights[step], before, counts)
        expected = grow({n: g.abs() for n, g in rec.grads[step].items()}, dropped, counts)
        assert masks_equal(after, expected), step
        assert not masks_equal(after, before), step


@pytest.mark.parametrize("step", [16, 28])
def test_a_large_exploration_restarts_exactly_ceil_q_active_weights_per_layer_at_zero(recorded, step):
    """Of each layer's active weights, ceil(0.8 * active) are zero afterwards (dropped, or dropped and regrown: every
    dropped weight restarts at zero) with zero momentum; the others keep their values exactly."""
    _, rec, _, _ = recorded
    before, after, old, new = rec.before[step], rec.after[step], rec.weights[step], rec.start[step]
    restarted = {}
    for n, m in before.items():
        zeroed = m & (new[n] == 0)
        restarted[n] = int(zeroed.sum())
        assert torch.equal(new[n][m & ~zeroed], old[n][m & ~zeroed]), n  # the survivors, untouched
        assert torch.equal(new[n][after[n] & ~m], torch.zeros(int((after[n] & ~m).sum()))), n  # grown at zero
        fresh = after[n] & (new[n] == 0)  # grown or restarted: zero momentum too
        assert torch.equal(rec.momentum[step][n][fresh], torch.zeros(int(fresh.sum()))), n
    assert restarted == {"conv.weight": 20, "fc1.weight": 208, "fc2.weight": 85}  # ceil(0.8 * 24, 259, 106)


def test_the_epoch_end_exploration_waits_for_validation(recorded):
    _, rec, _, _ = recorded
    _, seen, _ = rec.val[16]
    assert masks_equal(seen, rec.before[16]) and not masks_equal(seen, rec.after[16])


def test_tickets_are_the_phase_ends_at_the_runs_sparsity_and_differ(recorded):
    cb, rec, _, folder = recorded
    tickets = cb.tickets
    assert [(t["phase"], t["step"], t["value"]) for t in tickets] == [(0, 16, None), (1, 28, None), (2, 40, None)]
    masks = [ticket_masks(t) for t in tickets]
    for t, m in zip(tickets, masks):
        assert {n: int(v.sum()) for n, v in m.items()} == ERK_COUNTS  # sparsity 0.8 exactly (389 of 1944)
        assert sum(ERK_COUNTS.values()) == TARGET_TOTAL - round(0.8 * TARGET_TOTAL)
        assert masks_equal(m, rec.before[t["step"]])  # before that step's large exploration
        state = dense_state_dict(t["state"])
        assert all(torch.equal(state[k], v) for k, v in rec.state[t["step"]].items())  # biases too
        assert set(t["state"]["tensors"]["fc1.weight"]) == {"values", "mask", "shape", "dtype"}  # compressed
    for i in range(3):
        for j in range(i + 1, 3):
            assert sum(int((masks[i][n] != masks[j][n]).sum()) for n in TARGET_SHAPES) > 100, (i, j)
    assert sorted(p.name for p in folder.iterdir()) == ["ticket_0.pt", "ticket_1.pt", "ticket_2.pt"]


def test_the_ensemble_is_the_mean_of_the_members_softmax(recorded):
    cb, _, module, folder = recorded
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(3))
    ensemble = cb.ensemble(module).eval()
    probs = []
    for t in cb.tickets:  # by hand: a fresh model with the ticket's weights
        member = make_module(seed=7).eval()
        member.load_state_dict(dense_state_dict(t["state"]))
        probs.append(F.softmax(member(x), dim=1))
    with torch.no_grad():
        out = ensemble(x)
        assert torch.allclose(out, (probs[0] + probs[1] + probs[2]) / 3, rtol=0, atol=1e-7)
        assert torch.allclose(out.sum(1), torch.ones(6))
        assert not torch.allclose(probs[0], probs[2], atol=1e-3)  # diverse members
        from_files = TicketEnsemble(module, sorted(folder.iterdir())).eval()
        assert torch.equal(from_files(x), out)


def test_ensemble_nll_and_ece_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.35, 0.55, 0.1], [0.3, 0.25, 0.45], [0.05, 0.9, 0.05], [0.72, 0.18, 0.1]])
    targets = torch.tensor([0, 0, 2, 1, 1])
    nll = -(math.log(0.7) + math.log(0.35) + math.log(0.45) + math.log(0.9) + math.log(0.18)) / 5
    assert ensemble_nll(probs, targets) == pytest.approx(nll, abs=1e-6)
    # 15 bins: 0.7 and 0.72 share (10/15, 11/15]: |(1 - 0.7) + (0 - 0.72)|; 0.55, 0.45, 0.9 alone
    assert expected_calibration_error(probs, targets) == pytest.approx((0.42 + 0.55 + 0.55 + 0.1) / 5, abs=1e-6)
    assert expected_calibration_error(probs, targets, bins=1) == pytest.approx(abs(3 - 3.32) / 5, abs=1e-6)


# ------------------------------------------------------------------------------------------------ monitoring
def test_monitor_keeps_the_best_validated_network_of_each_phase_and_lr_follows_the_reference():
    """6 epochs of 4 steps, x = 8, phases (8, 16], (16, 24], the large exploration after step 16 (an epoch end).
    `mode="max"` on the loss keeps each phase's worst validation: not its end, so the choice is visible."""
    cb = FreeTickets(0.8, tickets=2, explore=1 / 3, delta_t=3, monitor="val_loss", mode="max", lr=True, verbose=False)
    rec = _Recorder(cb)
    trainer = make_trainer(callbacks=[rec, cb], max_epochs=6, max_steps=-1)
    trainer.fit(make_module(seed=0), make_dataloader(n=32), make_dataloader(n=16))
    assert sorted(rec.val) == [4, 8, 12, 16, 20, 24]
    assert [rec.lr[t] for t in range(1, 25)] == [0.1] * 8 + [0.01] * 4 + [0.001] * 4 + [0.01] * 4 + [0.001] * 4
    for phase, steps in ((0, (12, 16)), (1, (20, 24))):
        best = max(steps, key=lambda t: rec.val[t][0])
        ticket = cb.tickets[phase]
        assert (ticket["phase"], ticket["step"], ticket["value"]) == (phase, best, pytest.approx(rec.val[best][0]))
        assert masks_equal(ticket_masks(ticket), rec.val[best][1])
        state = dense_state_dict(ticket["state"])
        assert all(torch.equal(state[k], v) for k, v in rec.val[best][2].items())
    assert [t["step"] for t in cb.tickets] != [16, 24]  # not simply the phase ends


def test_gradient_accumulation_takes_each_ticket_once_before_the_exploration():
    """With `accumulate_grad_batches=2` Lightning reports each optimizer step twice (a micro-batch without a step
    follows): the ticket of the phase ending at step 6 keeps the masks step 6 trained with, not those after the large
    exploration that followed it."""
    cb = FreeTickets(0.8, tickets=2, explore=0.5, delta_t=5, verbose=False)  # 8 steps: x = 4, ends 6 and 8
    used = {}

    class _Used(CallbackBase):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            used[trainer.global_step + 1] = cb.masks.state_dict()

    trainer = make_trainer(callbacks=[cb, _Used()], max_epochs=2, max_steps=-1, accumulate_grad_batches=2)
    trainer.fit(make_module(seed=0), make_dataloader())
    assert trainer.global_step == 8 and [t["step"] for t in cb.tickets] == [6, 8]
    assert masks_equal(ticket_masks(cb.tickets[0]), used[6]) and not masks_equal(used[6], used[7])
    assert masks_equal(ticket_masks(cb.tickets[1]), cb.masks.state_dict())


# ------------------------------------------------------------------------------------------------ misuse
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tickets": 0}, r"`tickets` \(the number of subnetworks\) must be a positive integer; got 0"),
        ({"explore": 1.0}, r"`explore` \(the fraction of the run spent exploring\) must be a number in \[0, 1\)"),
        ({"explore": -0.1}, r"`explore` .* in \[0, 1\)"),
        ({"large_drop": 1.0}, r"`large_drop` \(the large exploration's drop fraction q\) must be a number in \(0, 1\)"),
        ({"drop_fraction": 0.0}, r"`drop_fraction` .* in \(0, 1\)"),
        ({"mode": "best"}, "`mode` must be one of 'max', 'min'; got 'best'"),
        ({"lr": (0.1, 0.01)}, r"`lr` sets the optimizer's learning rate per phase: True .* got \(0.1, 0.01\)"),
        ({"lr": (0.1, 0.01, -1.0)}, r"`lr` \(a learning rate\) must be a number in \(0, inf\]"),
        ({"monitor": 3}, "`monitor` must name a logged metric"),
        ({"delta_t": 0}, r"`delta_t` \(optimizer steps between updates\) must be a positive integer"),
        ({"growth": "hebbian"}, "Unknown `growth` 'hebbian'"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FreeTickets(0.8, **kwargs)


def test_a_run_too_short_for_the_phases_fails_before_training():
    module = make_module(seed=0)
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = make_trainer(callbacks=[FreeTickets(0.8, tickets=3, explore=0.5, verbose=False)], max_steps=5)
    with pytest.raises(ValueError, match=r"`FreeTickets\(explore=0.5, tickets=3\)`: the run has 5 optimizer steps, 3"):
        trainer.fit(module, make_dataloader())
    assert trainer.global_step == 0
    assert all(torch.equal(p, weights[n]) for n, p in module.named_parameters())  # nothing pruned yet


def test_monitor_without_validation_or_logged_metric_fails_before_training():
    trainer = make_trainer(callbacks=[FreeTickets(0.8, **RUN, monitor="val_loss", verbose=False)], max_steps=40)
    with pytest.raises(ValueError, match=r"`FreeTickets\(monitor='val_loss'\)` .* no validation loop"):
        trainer.fit(make_module(seed=0), make_dataloader())
    assert trainer.global_step == 0
    trainer = make_trainer(callbacks=[FreeTickets(0.8, **RUN, monitor="val_acc", verbose=False)], max_steps=40)
    with pytest.raises(KeyError, match=r"no such logged metric; logged: \['val_loss'\]"):
        trainer.fit(make_module(seed=0), make_dataloader(), make_dataloader(n=16))
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------------ other loops
def test_a_plain_loop_takes_the_same_tickets_as_the_trainer(recorded):
    cb_trainer, _, module_a, _ = recorded
    cb, module = FreeTickets(0.8, **RUN, verbose=False), make_module(seed=0)
    optimizer, loader = module.configure_optimizers(), make_dataloader()
    sparsifier = Sparsifier(cb, module, optimizer, data=loader, total_steps=40)
    for _ in range(5):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            sparsifier.step()
        sparsifier.epoch_end()
    assert cb.updates == cb_trainer.updates == len(UPDATES)
    assert [t["step"] for t in cb.tickets] == [16, 28, 40]
    for a, b in zip(cb_trainer.tickets, cb.tickets):
        assert masks_equal(ticket_masks(a), ticket_masks(b))
        sa, sb = dense_state_dict(a["state"]), dense_state_dict(b["state"])
        assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-5) for k in sa)


class _Crash(CallbackBase):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_gives_the_same_masks_and_tickets(tmp_path):
    """6 epochs of 4 steps, tickets at 16 and 24, the large exploration after step 16 waiting for the epoch's end.
    Crash at step 18, resume from the checkpoint saved after step 16 (ticket 0 taken, the exploration still due):
    every later mask, both tickets and the final weights equal the uninterrupted run's."""
    pl = pytest.importorskip("lightning.pytorch")
    run = {"tickets": 2, "explore": 1 / 3, "delta_t": 3, "verbose": False}

    def fit(folder, crash=None, ckpt_path=None):
        cb = FreeTickets(0.8, **run)
        rec = _Recorder(cb)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=4, save_top_k=-1)
        callbacks = [rec, cb, ckpt] + ([_Crash(crash)] if crash else [])
        trainer = make_trainer(callbacks=callbacks, max_epochs=6, max_steps=-1, enable_checkpointing=True)
        module = make_module(seed=0)
        trainer.fit(module, make_dataloader(n=32), ckpt_path=ckpt_path)
        return cb, rec, module

    full, full_rec, full_module = fit("full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit("crashed", crash=18)
    resumed, rec, module = fit("resumed", ckpt_path=tmp_path / "crashed" / "epoch=3-step=16.ckpt")
    assert sorted(rec.before) == list(range(17, 25))  # the masks each step trained with
    for step in range(17, 25):
        assert masks_equal(rec.before[step], full_rec.before[step]), step
    assert not masks_equal(rec.before[17], full_rec.before[16])  # the large exploration ran before step 17
    assert resumed.updates == full.updates
    assert [(t["phase"], t["step"]) for t in resumed.tickets] == [(0, 16), (1, 24)]
    for a, b in zip(full.tickets, resumed.tickets):
        assert a["state"]["checksums"] == b["state"]["checksums"]  # bit for bit
    assert all(torch.equal(p, full_module.get_parameter(n)) for n, p in module.named_parameters())


def test_ddp_masks_and_tickets_identical_across_ranks(tmp_path):
    """2 processes, each validating its own half of the data (rank-dependent `val_loss`, not synced): rank zero's
    value chooses the tickets, so both ranks hold the same masks at every step and the same tickets."""
    run_script(Path(__file__).with_name("ddp_script.py"), tmp_path, "ddp", "freetickets")
    r0, r1 = (torch.load(tmp_path / f"freetickets{r}.pt", weights_only=False) for r in (0, 1))
    assert sorted(r0["masks"]) == sorted(r1["masks"]) == list(range(16))
    for step in r0["masks"]:
        assert masks_equal(r0["masks"][step], r1["masks"][step]), step
    assert r0["val"] != r1["val"]  # the ranks' own values differ
    assert [t["step"] for t in r0["tickets"]] == [t["step"] for t in r1["tickets"]]
    assert [t["value"] for t in r0["tickets"]] == [t["value"] for t in r1["tickets"]]
    assert all(t["value"] == r0["val"][t["step"]] for t in r1["tickets"])  # rank zero's values
    for a, b in zip(r0["tickets"], r1["tickets"]):
        assert a["state"]["checksums"] == b["state"]["checksums"]
    assert len(r0["tickets"]) == 2 and r0["updates"] == r1["updates"] == 7  # 2, 4, ..., 14 (12: the large one)
