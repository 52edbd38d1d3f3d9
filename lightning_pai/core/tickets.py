"""FreeTickets / EDST: an ensemble of sparse subnetworks from one dynamic-sparse-training run (Liu et al. 2022).

Liu et al., ICLR 2022, "Deep ensembling with no overhead for either training or testing: the all-round blessings
of dynamic sparsity" (arXiv:2106.14568; reference code VITA-Group/FreeTickets, ``main_EDST.py``). EDST trains one
sparse network (ERK masks at ``sparsity``) with RigL-style updates every ``delta_t`` optimizer steps — per layer,
drop the ``ceil(p * active)`` smallest-``|w|`` active weights and regrow as many inactive ones with the largest
``|dense gradient|`` (``p`` constant, 0.5) — and splits the run of ``T`` optimizer steps into phases
(:class:`TicketPhases`):

- exploration: steps ``1 .. x``, ``x = ceil(explore * T)``;
- ticket ``m`` (``m = 0 .. M-1``, ``L = T - x``): steps ``s_m + 1 .. s_(m+1)``, ``s_m = x + ceil(m L / M)``,
  ``s_M = T``. At each ``s_m`` with ``m >= 1`` (the start of every ticket phase but the first) a *large
  exploration* replaces the regular update: per layer, drop ``ceil(q * active)`` by magnitude (``q`` = 0.8) and
  regrow as many by gradient. Every weight the drop removed restarts at zero, regrown or not.
- the reference's learning rate: 0.1 while exploring, 0.01 from each ticket phase's start, 0.001 after its
  midpoint ``x + ceil((2m + 1) L / (2M))`` (:meth:`TicketPhases.learning_rate`).

Ticket ``m`` is the network at the end of its phase (before the next large exploration), or, with a monitored
metric, the best-valued network validated within the phase. Each is kept in the form a ``pack`` function gives it
(the callback's: :func:`lightning_pai.deploy.sparse_state_dict`, the kept weights and a bit-packed mask per target,
every other entry dense); :class:`lightning_pai.deploy.ensemble.TicketEnsemble` averages the members' softmax
probabilities, :func:`ensemble_nll` and :func:`expected_calibration_error` score them.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.dst import Plan
from lightning_pai.core.packing import unpack_mask
from lightning_pai.core.schedules import Schedule, UpdateSchedule
from lightning_pai.core.session import Host, TopologySession
from lightning_pai.core.sharding import full
from lightning_pai.core.validation import check_choice, check_fraction, check_number, check_positive_int

#: The reference's learning rates: exploration, first half of a ticket phase, second half (``main_EDST.py``).
REFERENCE_LR = (0.1, 0.01, 0.001)
#: Which monitored value is the best: ``"max"`` (accuracy) or ``"min"`` (a loss).
MODES = ("max", "min")


@dataclass(frozen=True)
class TicketPhases:
    """EDST's timeline over a run of ``total`` optimizer steps: exploration, then ``tickets`` equal phases.

    Boundaries are optimizer steps (1-based steps ``t``; "at ``s``" means after step ``s``). For the reference's
    CIFAR run (450 epochs of ``E`` steps, 150 exploring, ``M = 3``): ``explore=1/3`` gives ticket starts
    ``150E, 250E, 350E`` and midpoints ``200E, 300E, 400E``, the reference's epochs; they coincide with its epoch
    boundaries whenever ``L / M`` and ``L / 2M`` are whole epochs (the reference rounds in epochs, here in steps).

    Attributes:
        explore: Fraction of the run spent exploring, in ``[0, 1)``.
        tickets: Number of tickets ``M`` (ensemble members), ``>= 1``.

    Raises:
        ValueError: On a bad ``explore`` or ``tickets`` (naming the argument).
    """

    explore: float = 1 / 3
    tickets: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "tickets", check_positive_int(self.tickets, "tickets", "the number of subnetworks"))
        what = "the fraction of the run spent exploring"
        object.__setattr__(self, "explore", check_fraction(self.explore, "explore", what))

    def explore_steps(self, total: int) -> int:
        """``x = ceil(explore * total)``: the last exploration step."""
        return math.ceil(self.explore * total - 1e-9)

    def starts(self, total: int) -> tuple[int, ...]:
        """``s_m = x + ceil(m L / M)``: ticket ``m`` trains steps ``s_m + 1 .. s_(m+1)`` (``s_M = total``)."""
        x = self.explore_steps(total)
        return tuple(x + -(-m * (total - x) // self.tickets) for m in range(self.tickets))

    def ends(self, total: int) -> tuple[int, ...]:
        """The last step of every ticket phase (where its end-of-phase ticket is taken)."""
        return (*self.starts(total)[1:], total)

    def midpoints(self, total: int) -> tuple[int, ...]:
        """``x + ceil((2m + 1) L / (2M))``: the steps after which the reference lowers the rate to its last value."""
        x = self.explore_steps(total)
        return tuple(x + -(-(2 * m + 1) * (total - x) // (2 * self.tickets)) for m in range(self.tickets))

    def large_steps(self, total: int) -> tuple[int, ...]:
        """The steps after which a large exploration runs: ``s_1 .. s_(M-1)``."""
        return self.starts(total)[1:]

    def phase(self, step: int, total: int) -> int:
        """The phase optimizer step ``step`` belongs to: -1 while exploring, else the ticket ``m``."""
        starts = self.starts(total)
        if step <= starts[0]:
            return -1
        return max(m for m, s in enumerate(starts) if s < step)

    def learning_rate(self, step: int, total: int, rates: Sequence[float] = REFERENCE_LR) -> float:
        """The learning rate of optimizer step ``step`` (the reference's: 0.1, 0.01, 0.001).

        ``rates[0]`` while exploring, ``rates[1]`` from a phase's start up to its midpoint (included), ``rates[2]``
        after it.
        """
        m = self.phase(step, total)
        if m < 0:
            return float(rates[0])
        return float(rates[1] if step <= self.midpoints(total)[m] else rates[2])

    def check(self, total: int, name: str = "FreeTickets") -> None:
        """Raise unless every ticket phase of a ``total``-step run has at least one step.

        Raises:
            ValueError: Naming the run's length, the exploration and the steps the tickets would need.
        """
        x = self.explore_steps(total)
        if total - x < self.tickets:
            raise ValueError(
                f"`{name}(explore={self.explore:g}, tickets={self.tickets})`: the run has {total} optimizer steps, "
                f"{x} of them exploring, which leaves {total - x} for {self.tickets} ticket phases; each needs at "
                f"least one step. Train longer, lower `explore`, or ask for fewer `tickets`."
            )

    def table(self, total: int) -> dict[str, tuple[int, ...]]:
        """The boundaries of a ``total``-step run: ``explore_end``, ``starts``, ``midpoints``, ``ends``, ``large``."""
        return {
            "explore_end": (self.explore_steps(total),),
            "starts": self.starts(total),
            "midpoints": self.midpoints(total),
            "ends": self.ends(total),
            "large": self.large_steps(total),
        }


@dataclass(frozen=True)
class TicketUpdates(UpdateSchedule):
    """Every ``every`` optimizer steps (counted from the run's start), and at every large exploration."""

    every: int
    phases: TicketPhases

    def is_update(self, step: int, total: int, epoch_end: bool) -> bool:
        return step % self.every == 0 or step in self.phases.large_steps(total)


@dataclass(frozen=True)
class TicketFraction(Schedule):
    """The drop fraction: ``large`` at a large exploration, ``regular`` at every other update."""

    regular: float
    large: float
    phases: TicketPhases

    def __call__(self, step: int, total: int) -> float:
        return self.large if step in self.phases.large_steps(total) else self.regular


def check_lr(lr: object) -> tuple[float, float, float] | None:
    """``lr=`` of :class:`TicketSession`: True -> :data:`REFERENCE_LR`, False/None -> None, or 3 positive rates.

    Raises:
        ValueError: On anything else.
    """
    if lr is None or lr is False:
        return None
    if lr is True:
        return REFERENCE_LR
    if isinstance(lr, (str, bytes)) or not isinstance(lr, Sequence) or len(lr) != 3:
        raise ValueError(
            "`lr` sets the optimizer's learning rate per phase: True (the reference's 0.1, 0.01, 0.001), False, or "
            f"3 rates (exploring, a phase's first half, its second half); got {lr!r}."
        )
    return tuple(check_number(r, "lr", 0, math.inf, low_open=True, what="a learning rate") for r in lr)  # type: ignore[return-value]


#: ``pack(state, masks) -> ticket state``: how a ticket is stored (e.g. ``lightning_pai.deploy.sparse_state_dict``).
Pack = Callable[[Mapping[str, Any], Mapping[str, Tensor]], dict[str, Any]]


def capture_ticket(module: nn.Module, masks: Mapping[str, Tensor], pack: Pack, host: Host | None = None) -> Any:
    """``pack(state, masks)`` of CPU copies of ``module``'s state dict and of its keep-``masks``.

    Sharded (FSDP2) entries are gathered (a collective); under several processes the buffers (e.g. batch-norm
    statistics, which DDP does not average) are rank zero's, so every rank holds the same ticket.
    """
    source = module.state_dict()
    state: OrderedDict[str, Any] = OrderedDict(
        (k, full(v).detach().to("cpu", copy=True) if isinstance(v, Tensor) else v) for k, v in source.items()
    )
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    if host is not None and host.world_size > 1:
        params = {n for n, _ in module.named_parameters()}
        buffers = {k: v for k, v in state.items() if k not in params and isinstance(v, Tensor)}
        if buffers:
            state.update(host.broadcast(buffers, src=0))
    return pack(state, {n: m.detach().cpu() for n, m in masks.items()})


def ticket_masks(ticket: Mapping[str, Any]) -> dict[str, Tensor]:
    """The keep-masks of a ticket (a :class:`TicketSession` ticket or its sparse state dict), bool CPU tensors.

    For tickets packed by :func:`lightning_pai.deploy.sparse_state_dict` (the callback's).
    """
    payload = ticket["state"] if "state" in ticket else ticket
    return {
        n: unpack_mask(e["mask"], e["shape"]).cpu()
        for n, e in payload["tensors"].items()
        if isinstance(e, Mapping) and "mask" in e
    }


class TicketSession(TopologySession):
    """A :class:`~lightning_pai.core.session.TopologySession` that also takes EDST's tickets.

    The plan (regular updates and large explorations, see :class:`TicketUpdates` and :class:`TicketFraction`)
    is the topology session's. This session checks the run is long enough for its :class:`TicketPhases`, sets
    the learning rate per phase if asked (``lr``; it replaces a scheduler's value at every step), and takes the
    tickets (:attr:`tickets`, by phase): at the last step of each phase, before that step's large exploration;
    with a monitored value (:meth:`record`, rank zero's value on every rank) the best-valued network validated
    within the phase replaces it. A large exploration due at an epoch's last step runs at the epoch's end, after
    validation (as the reference evaluates, saves, then explores). Tickets are in :meth:`state_dict`; a fit that
    is not resumed starts a new ensemble.

    Args:
        name: The method's name, used in messages.
        plan: The method's plan.
        phases: The timeline.
        pack: ``pack(state, masks)``: how a ticket is stored, from a CPU copy of the module's state dict and the
            bool CPU masks (the callback's: ``lightning_pai.deploy.sparse_state_dict``).
        monitor: Whether a monitored value chooses the tickets (:meth:`record`).
        mode: ``"max"`` or ``"min"``: which monitored value is the best.
        lr: The learning rates to set per phase (see :meth:`TicketPhases.learning_rate`), or None.
        save_dir: A folder to write every ticket to (``ticket_{m}.pt``, read by ``lightning_pai.load_sparse``).
        **kwargs: As for :class:`~lightning_pai.core.session.TopologySession`.
    """

    def __init__(
        self,
        name: str,
        plan: Plan,
        *,
        phases: TicketPhases,
        pack: Pack,
        monitor: bool = False,
        mode: str = "max",
        lr: Sequence[float] | None = None,
        save_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, plan, **kwargs)
        check_choice(mode, MODES, "mode")
        self.phases, self.monitor, self.mode, self.lr = phases, bool(monitor), mode, check_lr(lr)
        self.pack, self.save_dir = pack, save_dir
        self.tickets: dict[int, dict[str, Any]] = {}
        self.last_step = 0
        self._explored = -1  # the step of the last large exploration applied
        self._deferred: int | None = None  # a large exploration waiting for its epoch's end
        self._resumed = False

    # ------------------------------------------------------------------ set-up
    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Check the run against the phases, then start (a fit not resumed from saved tickets starts a new ensemble)."""
        host = host if host is not None else Host()
        total = host.total_steps
        if total is not None and total != float("inf"):
            self.phases.check(int(total), self.name)
        if not self._resumed:
            self.tickets, self.last_step, self._explored = {}, 0, -1
        self._resumed, self._deferred = False, None
        super().start(module, host)

    @property
    def needs_epoch_length(self) -> bool:
        """With a monitored value: a large exploration at an epoch's end must wait for that epoch's validation."""
        return self.monitor or super().needs_epoch_length

    # ------------------------------------------------------------------ stepping
    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """Set the phase's learning rate (if asked), then observe and mask as the topology session does."""
        if self._deferred is not None and self._deferred < step:  # the loop never ended that epoch: run it now
            self.run_pending(self._deferred)
            self._deferred = None
        if self.lr is not None:
            rate = self.phases.learning_rate(step, self.total_steps, self.lr)
            for opt in self.host.optimizers:
                for group in opt.param_groups:
                    group["lr"] = rate
        super().before_step(step, epoch_end)
        large = step in self.phases.large_steps(self.total_steps)
        due = self.pending is not None and self.pending[0] == step
        self._deferred = step if epoch_end and large and due else None

    def after_step(self, step: int) -> None:
        """Take the ending phase's ticket, then run the step's update (a large exploration at an epoch's end waits).

        A loop may report the same step again (Lightning, after a micro-batch that did not step the optimizer): the
        ticket is taken once, before the step's large exploration.
        """
        again, self.last_step = step == self.last_step, step
        ends = self.phases.ends(self.total_steps)
        if step in ends and not again:
            m = ends.index(step)
            held = self.tickets.get(m)
            if not self.monitor or held is None or held["value"] is None:
                self._take(m, step, None)
        if self._deferred == step:
            return  # (a plan with a step rule would run it here; this one has none)
        super().after_step(step)

    def epoch_end(self, epoch: int, step: int) -> None:
        """Run a large exploration left for the epoch's end (after its validation)."""
        if self._deferred is not None and self._deferred == step:
            self._deferred = None
            self.run_pending(step)
        super().epoch_end(epoch, step)

    def run_pending(self, step: int) -> None:
        """Apply the update decided at ``step``, noting a large exploration (later values belong to the next phase)."""
        due = self.pending is not None and self.pending[0] == step
        super().run_pending(step)
        if due and step in self.phases.large_steps(self.total_steps):
            self._explored = step

    def record(self, value: float) -> None:
        """A monitored value of the network as it is now: it becomes its phase's ticket if it is the phase's best.

        Rank zero's value is used on every rank (a collective: every rank calls it). Values before the first
        ticket phase, and without ``monitor``, are ignored.
        """
        if not self.monitor or self.module is None:
            return
        value = float(self.host.broadcast(float(value), src=0))
        m = self.phases.phase(self.last_step, self.total_steps)
        if self._explored == self.last_step:  # validated after this step's large exploration: the next phase
            m += 1
        if m < 0 or m >= self.phases.tickets:
            return
        held = self.tickets.get(m)
        best = held is None or held["value"] is None
        if not best:
            best = value > held["value"] if self.mode == "max" else value < held["value"]
        if best:
            self._take(m, self.last_step, value)

    def _take(self, m: int, step: int, value: float | None) -> None:
        """Keep the network as ticket ``m`` (every rank holds the same one); write it and log it on rank zero."""
        state = capture_ticket(self.module, dict(self.masks.items()), self.pack, self.host)
        self.tickets[m] = {"phase": m, "step": step, "value": value, "state": state}
        if not self.host.is_global_zero:
            return
        if self.save_dir is not None:
            os.makedirs(self.save_dir, exist_ok=True)
            torch.save(state, os.path.join(self.save_dir, f"ticket_{m}.pt"))
        metrics = {"freetickets/ticket": float(m)}
        if value is not None:
            metrics["freetickets/value"] = value
        self.host.log(metrics, step)
        if self.verbose:
            of = f" ({value:.4g})" if value is not None else ""
            self.host.echo(f"{self.name}: ticket {m + 1} of {self.phases.tickets} taken at step {step}{of}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The topology session's state, the tickets, and where the phases stand."""
        state = super().state_dict()
        state["tickets"] = dict(self.tickets)
        state["last_step"], state["explored"] = self.last_step, self._explored
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the next start continues this ensemble)."""
        super().load_state_dict(state)
        if "tickets" in state:
            self.tickets = {int(m): t for m, t in state["tickets"].items()}
            self.last_step, self._explored = int(state.get("last_step", 0)), int(state.get("explored", -1))
            self._resumed = True


def ensemble_nll(probs: Tensor, targets: Tensor) -> float:
    """The mean negative log-likelihood ``-mean_i log p_i[y_i]`` of predicted probabilities (``N, C``).

    Probabilities are clamped at the dtype's smallest normal number, so a zero gives a large finite value.
    """
    p = probs.detach().gather(-1, targets.long().reshape(-1, 1)).squeeze(-1)
    return float(-p.clamp_min(torch.finfo(p.dtype).tiny).log().mean())


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``sum_b |sum_(i in b) (correct_i - conf_i)| / N`` over equal-width confidence bins.

    ``conf_i`` is sample ``i``'s largest probability, ``correct_i`` whether that class is ``targets[i]``; bin ``b``
    (0-based) holds ``b / bins < conf <= (b + 1) / bins`` (a confidence of 0 goes to the first). The reference's
    ``expected_calibration_error`` bins with ``np.linspace(0, 1, 15)`` edges, i.e. 14 intervals of width 1/14.

    Raises:
        ValueError: If ``bins`` is not a positive integer.
    """
    bins = check_positive_int(bins, "bins", "the number of confidence bins")
    conf, pred = probs.detach().double().max(dim=-1)
    correct = (pred == targets.reshape(pred.shape).to(pred.device)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=conf.device)[1:]
    index = torch.bucketize(conf, edges).clamp_max(bins - 1)
    gaps = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, index, correct - conf)
    return float(gaps.abs().sum() / conf.numel())
