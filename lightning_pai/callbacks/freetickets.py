"""FreeTickets / EDST: an ensemble of sparse subnetworks from one dynamic-sparse-training run (Liu et al. 2022)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from typing_extensions import Unpack, override

from lightning_pai.callbacks.base import MethodOptions, require_validation
from lightning_pai.callbacks.dynamic import DynamicSparseTraining, base_kwargs, check_rates
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.dst import Plan
from lightning_pai.core.tickets import MODES, TicketFraction, TicketPhases, TicketSession, TicketUpdates, check_lr
from lightning_pai.core.validation import check_choice, check_number


class FreeTickets(DynamicSparseTraining):
    """FreeTickets / EDST (Liu et al., ICLR 2022, arXiv:2106.14568): one sparse run, ``tickets`` sparse networks.

    "Deep ensembling with no overhead for either training or testing": ERK masks at ``sparsity`` (exact counts)
    and, every ``delta_t`` optimizer steps through the whole run, RigL-style updates: per layer, drop the
    ``ceil(p * active)`` smallest-``|w|`` active weights (``p = drop_fraction``, constant) and regrow as many at
    the largest ``|dense gradient|`` among all inactive weights (just-dropped ones included; every dropped weight
    restarts at zero with zero optimizer state, as in the reference). The run of ``T`` optimizer steps is split
    (:class:`~lightning_pai.core.tickets.TicketPhases`) into exploration, steps ``1 .. x`` with
    ``x = ceil(explore * T)``, then ``M = tickets`` phases: ticket ``m`` trains steps ``s_m + 1 .. s_(m+1)``,
    ``s_m = x + ceil(m (T - x) / M)``, ``s_M = T``. At the start of every phase but the first (after step
    ``s_m``, ``m >= 1``) a *large exploration* replaces that step's update: per layer, drop
    ``ceil(q * active)`` by magnitude (``q = large_drop``) and regrow as many by gradient.

    Ticket ``m`` is the network at the end of its phase (before the next large exploration), or, with
    ``monitor``, the network with the best value of that logged metric among the validations within the phase
    (a phase without any validation keeps its end). Tickets are compressed sparse state dicts
    (:func:`lightning_pai.deploy.sparse_state_dict`: kept weights, a bit-packed mask per target, biases and
    buffers dense), in :attr:`tickets`, in the callback's checkpoint state and, with ``save_dir``, in
    ``{save_dir}/ticket_{m}.pt`` (read by :func:`lightning_pai.load_sparse`). :meth:`ensemble` returns the
    :class:`~lightning_pai.deploy.ensemble.TicketEnsemble`: the mean of the members' softmax probabilities.

    The reference's run (``main_EDST.py``, README): WRN-28-10 on CIFAR, 450 epochs, 150 exploring (``explore=1/3``),
    ``M = 3``, density 0.2, ``p = 0.5``, ``q = 0.8``, ``update_frequency=1000``, SGD with the rate 0.1 while
    exploring, 0.01 from each phase's start and 0.001 after its midpoint ``x + ceil((2m + 1)(T - x) / 2M)``;
    ``lr=True`` sets exactly these rates on the optimizer before every step (replacing a scheduler's value),
    ``lr=(a, b, c)`` others; :meth:`boundaries` gives the steps for a schedule of your own. Differences from the
    reference: tickets are taken per phase with a fresh best (the reference does not reset its best accuracy when
    exploration ends, so ticket 0 must beat every exploration epoch); grown weights get zero optimizer state (the
    reference keeps the momentum inactive weights accumulated); a regular update falling on a phase start is
    replaced by the large exploration (the reference runs both); boundaries are rounded in steps, not epochs.
    A large exploration due at an epoch's last step runs at the end of that epoch, after validation (the reference
    evaluates, saves, then explores).

    Args:
        sparsity: Fraction of the targeted weights removed (every ticket has exactly this sparsity).
        tickets: Number of tickets ``M`` (ensemble members), ``>= 1``.
        explore: Fraction of the run spent exploring, in ``[0, 1)``.
        drop_fraction: ``p``, the regular updates' drop fraction, in ``(0, 1)``.
        large_drop: ``q``, the large explorations' drop fraction, in ``(0, 1)``.
        delta_t: Optimizer steps between regular updates.
        growth: Growth rule (``"gradient"``, as the paper; the reference's script also runs ``"random"``).
        distribution: Per-layer budgets of the initial masks (``"erk"``).
        init: ``"random"`` or a registered scorer for the initial masks.
        monitor: A logged validation metric that chooses each phase's ticket (e.g. ``"val_acc"``), or None (each
            phase's end). A plain loop passes it to ``Sparsifier.epoch_end(metric)``.
        mode: ``"max"`` or ``"min"``: which value of ``monitor`` is the best.
        lr: True: set the reference's rates (0.1, 0.01, 0.001) per phase; a tuple of 3 rates; False: leave the
            optimizer's rate alone.
        save_dir: A folder to write every ticket to when it is taken (rank zero), or None.
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks.
        **common: ``include``, ``exclude``, ``frozen``, ``seed``, ``verbose``, ``resume`` (see
            :class:`~lightning_pai.MethodOptions`).

    Example::

        cb = FreeTickets(0.8, tickets=3, explore=1 / 3, delta_t=1000, monitor="val_acc", lr=True)
        Trainer(max_epochs=450, callbacks=[cb]).fit(model, datamodule=dm)
        ensemble = cb.ensemble(model).eval()  # probabilities, averaged over the 3 tickets
    """

    card = MethodCard(
        "dynamic", example={"tickets": 2, "explore": 0.5, "delta_t": 2}, keeps_layer_counts=True, keeps_total=True
    )
    session_class = TicketSession

    def __init__(
        self,
        sparsity: float = 0.8,
        *,
        tickets: int = 3,
        explore: float = 1 / 3,
        drop_fraction: float = 0.5,
        large_drop: float = 0.8,
        delta_t: int = 1000,
        growth: str = "gradient",
        distribution: str = "erk",
        init: str = "random",
        monitor: str | None = None,
        mode: str = "max",
        lr: bool | tuple[float, float, float] = False,
        save_dir: str | None = None,
        weight_init: str | None = None,
        **common: Unpack[MethodOptions],
    ) -> None:
        check_rates(drop_fraction, "drop_fraction")
        what = "the large exploration's drop fraction q"
        self.large_drop = check_number(large_drop, "large_drop", 0, 1, low_open=True, high_open=True, what=what)
        self.phases = TicketPhases(explore, tickets)
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"`monitor` must name a logged metric (e.g. 'val_acc') or be None; got {monitor!r}.")
        check_choice(mode, MODES, "mode")
        check_lr(lr)
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ValueError(f"`save_dir` must be a folder path or None; got {save_dir!r}.")
        self.num_tickets, self.explore, self.drop_fraction = self.phases.tickets, self.phases.explore, drop_fraction
        self.monitor, self.mode, self.lr, self.save_dir = monitor, mode, lr, save_dir
        fixed = {"alpha": drop_fraction, "decay": "constant", "t_end": 1.0, "rounding": "ceil"}
        super().__init__(sparsity, **base_kwargs(locals(), **fixed), drop="magnitude", redistribution="none", **common)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, tickets=self.num_tickets, explore=self.explore)

    def plan(self) -> Plan:
        """Every ``delta_t`` steps drop ``p``, at each later phase's start ``q``; dropped weights restart at zero."""
        plan = super().plan()
        fraction = TicketFraction(self.drop_fraction, self.large_drop, self.phases)
        rewire = replace(plan.rewire, fraction=fraction, regrown="zero")
        return replace(plan, when=TicketUpdates(self.delta_t, self.phases), rewire=rewire)

    def session_options(self) -> dict[str, Any]:
        """The topology session's options, and the phases, the ticket format, the monitoring, the rates, the folder."""
        from lightning_pai.deploy.export import sparse_state_dict

        extra = {"monitor": self.monitor is not None, "mode": self.mode, "lr": self.lr, "save_dir": self.save_dir}
        return {**super().session_options(), "phases": self.phases, "pack": sparse_state_dict, **extra}

    # ------------------------------------------------------------------ results
    @property
    def tickets(self) -> list[dict[str, Any]]:
        """The tickets taken so far, by phase: ``phase``, ``step``, ``value`` (of ``monitor``) and ``state``.

        ``state`` is a compressed sparse state dict of the whole model (see
        :func:`lightning_pai.deploy.dense_state_dict`, :func:`lightning_pai.core.tickets.ticket_masks`).
        """
        self._collect_handoff()  # after ddp_spawn/ddp_fork, rank zero's tickets
        return [t for _, t in sorted(self.session.tickets.items())]

    def ensemble(self, model: Any, **kwargs: Any) -> Any:
        """The :class:`~lightning_pai.deploy.ensemble.TicketEnsemble` of :attr:`tickets` on ``model``'s architecture.

        ``kwargs``: ``dim``, ``logits`` (see the class). It returns the mean of the members' softmax probabilities.

        Raises:
            ValueError: Before any ticket was taken.
        """
        from lightning_pai.deploy.ensemble import TicketEnsemble

        return TicketEnsemble(model, self.tickets, **kwargs)

    def boundaries(self, total_steps: int | None = None) -> dict[str, tuple[int, ...]]:
        """The phases in optimizer steps: ``explore_end``, ``starts``, ``midpoints``, ``ends``, ``large``.

        Args:
            total_steps: The run's optimizer steps (default: those of the running or last fit).

        Raises:
            ValueError: When the run's length is unknown (no fit yet and no ``total_steps``).
        """
        total = total_steps if total_steps is not None else self.session.total_steps
        if not total:
            raise ValueError("The run's length is not known before `trainer.fit` starts: pass `total_steps=`.")
        self.phases.check(int(total), type(self).__name__)
        return self.phases.table(int(total))

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        require_validation(
            trainer,
            type(self).__name__,
            self.monitor,
            "keeps the best validated network of each phase",
            " (each phase's last network)",
        )

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None or getattr(trainer.state.fn, "value", trainer.state.fn) != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:  # (the sanity check's validation tells before the first training step)
            raise KeyError(
                f"`{type(self).__name__}(monitor={self.monitor!r})`: no such logged metric; logged: "
                f"{sorted(trainer.callback_metrics)}."
            )
        if not trainer.sanity_checking:
            self.session.record(float(value))
