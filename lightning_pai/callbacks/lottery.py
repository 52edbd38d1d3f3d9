"""Lottery tickets: iterative magnitude pruning with rewinding, all rounds inside one ``trainer.fit``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback, is_last_batch_of_epoch
from lightning_pai.core.lottery import (
    IMP_DISTRIBUTIONS,
    check_fractions,
    match_fractions,
    parse_rewind,
    prune_remaining,
    random_within,
    rng_state,
    set_rng_state,
    to_cpu,
)
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.nm import NMSpec, check_nm, group_budget, nm_keep, resolve_nm
from lightning_pai.core.packing import pack_mask, unpack_mask
from lightning_pai.core.pruning import check_choice, reinitialize_
from lightning_pai.core.sharding import full, gather_tree, load_full_state_, shard_optimizer_state
from lightning_pai.core.targets import Selectors, select_targets

CONTROLS = ("random_reinit", "random_prune")
MODES = ("max", "min")


class LotteryTicket(SparseCallback):
    """Iterative magnitude pruning (IMP) with weight, learning-rate or no rewinding, inside one fit.

    Round 0 trains the dense network for ``epochs_per_round`` epochs (``T`` optimizer steps). At the start of
    every later round the callback

    1. removes ``prune_fraction`` of the weights that are still kept, by magnitude ``|w|`` of the trained
       weights (see :func:`~lightning_pai.core.lottery.prune_remaining`; masks only ever shrink), so
       round ``r`` keeps about ``(1 - prune_fraction) ** r`` of the weights;
    2. rewinds, according to ``rewind_to``:

       - ``"init"`` — weights (all parameters and buffers), optimizer state and LR-scheduler state go
         back to their values at fit start (Frankle & Carbin 2019, arXiv:1803.03635);
       - ``"step:k"`` / ``"epoch:k"`` — the same, to their values after ``k`` optimizer steps / at the
         start of epoch ``k`` of round 0 ("late rewinding", Frankle et al. 2020, arXiv:1912.05671); the
         round then trains ``T - k`` steps, from the rewind point to where round 0 ended, as open_lth does,
         so the LR schedule continues from ``k`` and ends where it ended in round 0;
       - ``"lr"`` — the trained weights are kept and the optimizer and LR schedule restart from fit
         start ("learning-rate rewinding", Renda et al. 2020, arXiv:2003.02389);
       - ``"none"`` — fine-tuning: weights and optimizer state are kept, and the learning rate stays at
         the last value round 0 used (set before every step, overriding the schedule);
    3. re-applies the masks (pruned weights and their optimizer state are zero).

    Rewind points are kept on the CPU. Each round replays the data order of the rewind point (the global
    RNG state and the samplers' epoch are restored with the weights), so every round sees the same
    batches in the same order. **Configure the LR schedule for round 0** (``epochs_per_round`` epochs):
    later rounds replay it from the rewind point.

    Round lengths: with ``init``, ``lr``, ``none`` (``k = 0``) every round has ``epochs_per_round`` epochs
    and ``Trainer(max_epochs=rounds * epochs_per_round)``; with ``epoch:k`` pruned rounds have
    ``epochs_per_round - k`` epochs and ``max_epochs`` is their sum. With ``step:k`` (``k > 0``) pruned rounds
    train exactly ``T - k`` optimizer steps, so they begin and end mid-epoch: set
    ``Trainer(max_steps=T + (rounds - 1) (T - k), max_epochs=-1)`` (both checked before training; the messages
    give the numbers). A round that ends mid-epoch is validated at its last step (as with
    ``val_check_interval``), so every round's ``last`` metric is its final one. Data order with ``step:k``:
    the batches keep flowing from the running epoch (the dropout/RNG state is rewound, the epoch's shuffle
    is not), unlike ``init``/``epoch:k``, which replay the rewind point's batches exactly.

    Controls (from the same command): ``control="random_prune"`` removes, in every layer, as many
    weights as IMP would, chosen at random among the survivors (Frankle & Carbin's random-pruning
    control); ``control="random_reinit"`` prunes like IMP but, at every rewind, re-draws the kept weights
    from the original initial distribution: a seeded random permutation of each layer's own initial
    values, recorded at fit start (so the per-layer scale of a custom initialiser is kept exactly, see
    :func:`~lightning_pai.core.pruning.reinitialize_`). The LTH paper's control — the *ticket's* masks with
    a fresh initialization — is ``LotteryTicket(..., control="random_reinit", ticket=finished_ticket)``:
    round ``r`` then uses the finished ticket's round-``r`` masks (``ticket.mask_history``) instead of
    pruning its own weights.

    Results: with ``monitor`` set, the best and last value of that logged metric in every round are
    recorded (``callback.results``: one dict per round with ``round``, ``density``, ``best``, ``last``)
    and logged as ``lottery/best`` and ``lottery/last``; ``lottery/round`` and ``lottery/density`` are
    logged when a round starts. A round -> density -> metric table is printed on rank zero at the end.
    Everything (round, masks, rewind point, results) is in the callback's ``state_dict``: a fit resumed
    from a checkpoint continues the same round with the same masks and rewind point. Under DDP, the
    masks are computed on rank zero and broadcast after every prune.

    Args:
        rounds: Number of training rounds, including the dense round 0 (so ``rounds - 1`` prunes).
        prune_fraction: Fraction of the *remaining* weights removed per round, in ``(0, 1)``.
        epochs_per_round: Epochs of round 0 (default: derived from ``max_epochs``; required with ``step:k``).
        rewind_to: ``"init"``, ``"step:N"``, ``"epoch:N"``, ``"lr"`` or ``"none"`` (see above).
        distribution: ``"global"`` (one ranking across layers), ``"uniform"`` (each layer removes
            ``prune_fraction`` of its own survivors) or ``"lamp"``.
        layer_fractions: Per-layer fractions overriding ``prune_fraction`` (glob over parameter names ->
            fraction), pruned layer-wise; e.g. ``{"fc3.weight": 0.1}`` for the LTH paper's output layer.
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: Parameters left dense.
        control: ``None``, ``"random_reinit"`` or ``"random_prune"``.
        ticket: With ``control="random_reinit"``: a finished :class:`LotteryTicket` (or its
            ``mask_history``, one mask dict per round) whose masks each round uses.
        nm: N:M layers (``"2:4"`` or ``{glob: "N:M"}``, see :mod:`lightning_pai.core.nm`), pruned by
            magnitude on per-group budgets: round ``r`` keeps ``M - floor((M - N) r / (rounds - 1))`` of each
            group of ``M`` (``N`` in the last round); the other layers prune ``prune_fraction`` per round.
        monitor: Logged metric to record per round (e.g. ``"val_acc"``), or None.
        mode: ``"max"`` or ``"min"``: which value of ``monitor`` is the best.
        seed: Seed of the controls' random draws.
        verbose: Print the sparsity table after every prune and the results table at the end.

    Example::

        ticket = LotteryTicket(rounds=5, prune_fraction=0.2, epochs_per_round=10, monitor="val_acc")
        Trainer(max_epochs=50, callbacks=[ticket]).fit(model, datamodule=dm)
        print(ticket.results)
    """

    def __init__(
        self,
        rounds: int = 10,
        prune_fraction: float = 0.2,
        epochs_per_round: int | None = None,
        rewind_to: str = "init",
        distribution: str = "global",
        layer_fractions: Mapping[str, float] | None = None,
        include: Selectors = None,
        exclude: Selectors = None,
        *,
        control: str | None = None,
        ticket: LotteryTicket | Sequence[Mapping[str, Tensor]] | None = None,
        monitor: str | None = None,
        mode: str = "max",
        seed: int = 0,
        verbose: bool = True,
        nm: NMSpec = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"`rounds` must be a positive integer; got {rounds!r}.")
        if (
            isinstance(prune_fraction, bool)
            or not isinstance(prune_fraction, (int, float))
            or not 0 < prune_fraction < 1
        ):
            raise ValueError(f"`prune_fraction` must be in (0, 1); got {prune_fraction!r}.")
        if epochs_per_round is not None and (
            isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, int) or epochs_per_round < 1
        ):
            raise ValueError(f"`epochs_per_round` must be a positive integer or None; got {epochs_per_round!r}.")
        self.rewind = parse_rewind(rewind_to)
        check_choice(distribution, IMP_DISTRIBUTIONS, "distribution")
        check_choice(control, CONTROLS, "control", optional=True)
        check_choice(mode, MODES, "mode")
        if control == "random_reinit" and not self.rewind.rewinds_weights:
            raise ValueError(
                f"`control='random_reinit'` re-draws the weights at each rewind; it needs `rewind_to` 'init', "
                f"'step:N' or 'epoch:N', got {rewind_to!r}."
            )
        if ticket is not None and control != "random_reinit":
            raise ValueError(
                "`ticket` hands a finished ticket's masks to the random-reinitialization control: pass "
                f"`control='random_reinit'` with it (got control={control!r})."
            )
        if ticket is not None and not isinstance(ticket, (LotteryTicket, Sequence)):
            raise ValueError(f"`ticket` must be a LotteryTicket or a list of per-round masks; got {ticket!r}.")
        check_fractions(layer_fractions)  # the patterns are matched against the model at setup
        check_nm(nm)
        self.nm = nm
        self.rounds = rounds
        self.prune_fraction = float(prune_fraction)
        self.epochs_per_round = epochs_per_round
        self.rewind_to = rewind_to
        self.distribution = distribution
        self.layer_fractions = dict(layer_fractions or {})
        self.control = control
        self.ticket = ticket
        self.monitor = monitor
        self.mode = mode
        self.seed = int(seed)
        # Progress, all of it in `state_dict`.
        self._round = 0
        self._rewind_point: dict[str, Any] | None = None
        self._results: list[dict[str, Any]] = []
        self._values: list[float] = []
        self._last_lrs: list[list[float]] | None = None
        self._frozen_lrs: list[list[float]] | None = None
        self._history: list[dict[str, Tensor]] = []  # bit-packed masks of every round
        self._initial: dict[str, Tensor] | None = None  # initial target values (random_reinit)
        self._steps_per_epoch: int | None = None
        self._validated_at = -1
        self._epoch_started = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            rounds=self.rounds, prune_fraction=self.prune_fraction, rewind_to=self.rewind_to, control=self.control
        )

    @property
    def round(self) -> int:
        """Index of the current (or, after fit, the last) round; 0 is the dense round."""
        self._collect_handoff()  # after ddp_spawn/ddp_fork, rank zero's progress
        return self._round

    @property
    def mask_history(self) -> list[dict[str, Tensor]]:
        """The masks of every round started so far (round 0: all kept), as bool CPU tensors by name."""
        self._collect_handoff()
        return [{n: unpack_mask(p, shape) for n, (p, shape) in r.items()} for r in self._history]

    @property
    def results(self) -> list[dict[str, Any]]:
        """One dict per finished round: ``round``, ``density``, ``best`` and ``last`` value of ``monitor``."""
        self._collect_handoff()  # after ddp_spawn/ddp_fork, rank zero's results
        return [dict(r) for r in self._results]

    # ------------------------------------------------------------ validation
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        name = type(self).__name__
        if trainer.max_steps not in (-1, None) and not self._step_rounds:
            raise ValueError(
                f"`{name}` counts rounds in epochs: leave `Trainer(max_steps=...)` unset (got {trainer.max_steps})."
            )
        max_epochs = trainer.max_epochs
        late = self.rewind.at if self.rewind.kind == "epoch" else 0
        if self.epochs_per_round is None:
            if self.rewind.kind == "step" and self.rewind.at > 0:
                raise ValueError(
                    f"`{name}(rewind_to={self.rewind_to!r})`: pass `epochs_per_round` (round 0's length); the "
                    "later rounds' length then follows from it."
                )
            # max_epochs = E + (rounds - 1) * (E - k)  =>  E = (max_epochs + (rounds - 1) * k) / rounds
            total = None if max_epochs is None else max_epochs + (self.rounds - 1) * late
            if total is None or max_epochs < self.rounds or total % self.rounds:
                rule = (
                    f"must be a positive multiple of {self.rounds}"
                    if late == 0
                    else f"must equal E + {self.rounds - 1} * (E - {late}) for a round-0 length of E epochs"
                )
                raise ValueError(
                    f"`{name}(rounds={self.rounds}, rewind_to={self.rewind_to!r})` derives `epochs_per_round` from "
                    f"`Trainer(max_epochs=...)`, which {rule}; got max_epochs={max_epochs}. Or pass `epochs_per_round`."
                )
            self.epochs_per_round = total // self.rounds
        if self.rewind.kind == "epoch" and self.rewind.at >= self.epochs_per_round:
            raise ValueError(
                f"`rewind_to={self.rewind_to!r}` must rewind to an epoch of round 0 (< epochs_per_round="
                f"{self.epochs_per_round})."
            )
        if not self._step_rounds:  # step:k is checked at train start, when the epoch's length is known
            self._check_epochs(max_epochs, self.epochs_per_round - late)
        match_fractions(list(select_targets(pl_module, self.include, self.exclude)), self.layer_fractions)

    def _check_epochs(self, max_epochs: int | None, later: int) -> None:
        """Raise unless ``max_epochs`` is round 0's epochs plus ``rounds - 1`` later rounds of ``later`` epochs."""
        needed = self.epochs_per_round + (self.rounds - 1) * later
        if max_epochs != needed:
            raise ValueError(
                f"`{type(self).__name__}(rounds={self.rounds}, epochs_per_round={self.epochs_per_round}, "
                f"rewind_to={self.rewind_to!r})` trains {needed} epochs (round 0: {self.epochs_per_round}, each "
                f"later round: {later}): set `Trainer(max_epochs={needed})` (got max_epochs={max_epochs})."
            )

    @property
    def _step_rounds(self) -> bool:
        """``step:k`` with ``k > 0``: pruned rounds are ``T - k`` optimizer steps and start mid-epoch."""
        return self.rewind.kind == "step" and self.rewind.at > 0

    def _round_start_step(self, round_index: int) -> int:
        """Optimizer step at which round ``round_index`` begins with ``step:k``: ``T + (round - 1) (T - k)``."""
        steps = self.epochs_per_round * self._steps_per_epoch
        return 0 if round_index == 0 else steps + (round_index - 1) * (steps - self.rewind.at)

    def _round_of_epoch(self, epoch: int) -> tuple[int, int]:
        """(round, epoch within the round) of trainer epoch ``epoch`` (rounds of whole epochs)."""
        if epoch < self.epochs_per_round:
            return 0, epoch
        later = self.epochs_per_round - (self.rewind.at if self.rewind.kind == "epoch" else 0)
        index, within = divmod(epoch - self.epochs_per_round, later)
        return index + 1, within

    def initial_masks(self, trainer: Any, pl_module: Any, masks: MaskSet) -> dict[str, Tensor]:
        """Round 0 is dense: every weight is kept."""
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in masks.params.items()}

    # ------------------------------------------------------------ the rounds
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self._history:
            self._record_history()
        if self.control == "random_reinit" and self._initial is None:
            self._initial = {n: full(p.detach()).to("cpu", copy=True) for n, p in self.masks.params.items()}
        if self._rewind_point is None and self._round == 0 and self._at_init:
            # Before the first batch is drawn: Lightning creates epoch 0's data iterator after this hook.
            self._rewind_point = self._capture(trainer, pl_module, sampler_epoch=0)

    def _record_history(self) -> None:
        self._history.append({n: (pack_mask(m.cpu()), tuple(m.shape)) for n, m in self.masks.items()})

    @property
    def _at_init(self) -> bool:
        kind = self.rewind.kind
        return kind in ("init", "lr") or (kind in ("step", "epoch") and self.rewind.at == 0)

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._steps_per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
        if self.rewind.kind == "step":
            steps = self.epochs_per_round * self._steps_per_epoch
            if self.rewind.at > steps:
                raise ValueError(
                    f"`rewind_to={self.rewind_to!r}` lies beyond round 0, which has {steps} optimizer steps."
                )
            needed = self._round_start_step(self.rounds)
            if self._step_rounds and trainer.max_steps != needed:
                raise ValueError(
                    f"`{type(self).__name__}(rounds={self.rounds}, epochs_per_round={self.epochs_per_round}, "
                    f"rewind_to={self.rewind_to!r})` trains {needed} optimizer steps (round 0: {steps}, each later "
                    f"round: {steps} - {self.rewind.at}): set `Trainer(max_steps={needed}, max_epochs=-1)` (got "
                    f"max_steps={trainer.max_steps})."
                )

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_started = trainer.current_epoch
        if self._step_rounds:
            if self._round == 0 and trainer.current_epoch < self.epochs_per_round:
                self._maybe_capture_epoch(trainer, pl_module)
            return
        epoch = trainer.current_epoch
        round_index, epoch_in_round = self._round_of_epoch(epoch)
        if round_index > self._round:
            self._next_round(trainer, pl_module, round_index)
        self._maybe_capture_epoch(trainer, pl_module)
        if self._round > 0 and self.rewind.kind != "none" and self._rewind_point is not None:
            _set_sampler_epoch(trainer, self._rewind_point["sampler_epoch"] + epoch_in_round)

    def _maybe_capture_epoch(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        if self._round == 0 and self.rewind.kind == "epoch" and epoch == self.rewind.at > 0 and not self._rewind_point:
            self._rewind_point = self._capture(trainer, pl_module, sampler_epoch=epoch)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._epoch_started != trainer.current_epoch:
            # Resumed from a checkpoint saved after an epoch's last step: Lightning starts the next epoch
            # without its epoch-start hooks (nor the previous epoch's end hooks); catch up on both.
            self._catch_up(trainer, pl_module)
        if (
            self._step_rounds
            and self._round + 1 < self.rounds
            and trainer.global_step >= self._round_start_step(self._round + 1)
        ):
            if self._validated_at != trainer.global_step:  # the round ends mid-epoch: validate it there
                self._validate(trainer)
            self._finish_round(trainer)
            self._next_round(trainer, pl_module, self._round + 1)
        if self.rewind.kind != "none":
            return
        if self._round == 0:
            self._last_lrs = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        elif self._frozen_lrs is not None:
            for opt, lrs in zip(trainer.optimizers, self._frozen_lrs):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr

    def _catch_up(self, trainer: Any, pl_module: Any) -> None:
        if not self._step_rounds and trainer.current_epoch > 0:
            previous, within = self._round_of_epoch(trainer.current_epoch - 1)
            if previous == self._round and self._round_of_epoch(trainer.current_epoch)[0] > previous:
                self._finish_round(trainer)
        self.on_train_epoch_start(trainer, pl_module)

    def _validate(self, trainer: Any) -> None:
        """Run the validation loop now, as Lightning does for an in-epoch validation (``val_check_interval``)."""
        every = trainer.check_val_every_n_epoch
        if not trainer.enable_validation or (every is not None and (trainer.current_epoch + 1) % every):
            return
        # as `_TrainingEpochLoop.on_advance_end` does around `val_loop.run()` (Lightning 2.x)
        connector = getattr(trainer, "_logger_connector", None)
        first = getattr(connector, "_first_loop_iter", None)
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        if connector is not None and hasattr(connector, "_first_loop_iter"):
            connector._first_loop_iter = first

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = self._step_rounds and trainer.global_step == self._round_start_step(self.rounds)
        if last and not is_last_batch_of_epoch(trainer):  # max_steps ends the fit mid-epoch, without validation
            self._validate(trainer)
        if (
            self.rewind.kind == "step"
            and self.rewind.at > 0
            and self._round == 0
            and self._rewind_point is None
            and trainer.global_step >= self.rewind.at
        ):
            self._rewind_point = self._capture(trainer, pl_module, sampler_epoch=trainer.current_epoch + 1)

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._validated_at = trainer.global_step
        if self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"`{type(self).__name__}(monitor={self.monitor!r})`: no such logged metric; logged: "
                f"{sorted(trainer.callback_metrics)}."
            )
        self._values.append(float(value))

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._step_rounds:
            return
        round_index, within = self._round_of_epoch(trainer.current_epoch)
        length = self.epochs_per_round - (self.rewind.at if self.rewind.kind == "epoch" and round_index else 0)
        if within + 1 == length:
            self._finish_round(trainer)

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._step_rounds and trainer.global_step >= self._round_start_step(self.rounds):
            self._finish_round(trainer)  # the last step:k round ends with the fit

    def _finish_round(self, trainer: Any) -> None:
        """Record the round's best and last ``monitor`` value (once per round)."""
        if len(self._results) > self._round:
            return
        best = (max if self.mode == "max" else min)(self._values) if self._values else None
        last = self._values[-1] if self._values else None
        self._results.append({"round": self._round, "density": self.masks.density, "best": best, "last": last})
        self._values = []
        if self.monitor is not None and best is not None:
            self._log_metrics(trainer, {"lottery/best": best, "lottery/last": last})

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.verbose and trainer.is_global_zero and self._results:
            print(self.results_table())

    def results_table(self) -> str:
        """The per-round results as a text table."""
        metric = self.monitor or "metric"
        lines = [f"{'round':>5}  {'density':>8}  {'best ' + metric:>16}  {'last ' + metric:>16}"]
        for r in self.results:
            best = "-" if r["best"] is None else f"{r['best']:.4f}"
            last = "-" if r["last"] is None else f"{r['last']:.4f}"
            lines.append(f"{r['round']:>5}  {r['density']:>8.4f}  {best:>16}  {last:>16}")
        return "\n".join(lines)

    def _next_round(self, trainer: Any, pl_module: Any, round_index: int) -> None:
        """Prune the trained weights, rewind, re-apply the masks (rank zero decides, all ranks apply)."""
        masks = self.masks
        current = masks.state_dict()
        if self.ticket is not None:
            new = self._ticket_masks(round_index)
        else:
            scores = {n: full(p.detach()).abs().cpu() for n, p in masks.params.items()}  # sharded: gathered
            nm = resolve_nm(self.nm, {n: m.shape for n, m in current.items()}, masks.layouts)
            rest = [n for n in masks.names if n not in nm]
            fractions = {n: f for n, f in match_fractions(masks.names, self.layer_fractions).items() if n not in nm}
            new = {}
            if rest:
                new = prune_remaining(
                    {n: scores[n] for n in rest},
                    {n: current[n] for n in rest},
                    self.prune_fraction,
                    self.distribution,
                    fractions,
                )
            progress = round_index / (self.rounds - 1)
            for n, (k, m) in nm.items():  # per-group budgets shrinking from M to N over the rounds
                survivors = scores[n].masked_fill(~current[n], -math.inf)
                new[n] = nm_keep(survivors, group_budget(k, m, progress), m, masks.layouts[n])
            new = {n: new[n] for n in masks.names}
            if self.control == "random_prune":
                counts = {n: int(m.sum()) for n, m in new.items()}
                new = random_within(current, counts, self.seed + round_index)
                gen = torch.Generator().manual_seed(self.seed + round_index)
                for n, (k, m) in nm.items():  # random, but still within the groups' budgets
                    drawn = torch.rand(current[n].shape, generator=gen).masked_fill(~current[n], -math.inf)
                    new[n] = nm_keep(drawn, group_budget(k, m, progress), m, masks.layouts[n])
        new = self._from_rank_zero(trainer, new)
        if self.rewind.kind == "none":
            self._frozen_lrs = self._frozen_lrs or self._last_lrs
        elif self._rewind_point is not None:
            self._restore(trainer, pl_module, self._rewind_point)
            if self.control == "random_reinit":
                reinitialize_(pl_module, masks.names, seed=self.seed + 7919 * round_index, initial=self._initial)
        masks.update_(new, trainer.optimizers)
        self._round = round_index
        self._record_history()
        self._log_metrics(trainer, {"lottery/round": float(round_index), "lottery/density": masks.density})
        self.on_masks_changed(trainer, pl_module)

    def _ticket_masks(self, round_index: int) -> dict[str, Tensor]:
        """Round ``round_index``'s masks of the finished ticket handed to the control."""
        history = self.ticket.mask_history if isinstance(self.ticket, LotteryTicket) else list(self.ticket)
        if round_index >= len(history):
            raise ValueError(
                f"`ticket` has masks for {len(history)} rounds; this control needs round {round_index} "
                f"(rounds={self.rounds})."
            )
        masks = {n: m.detach().cpu().bool() for n, m in history[round_index].items()}
        if set(masks) != set(self.masks.names):
            raise ValueError("`ticket`'s masks were made for other parameters than this model's targets.")
        return masks

    def _capture(self, trainer: Any, pl_module: Any, sampler_epoch: int) -> dict[str, Any]:
        # Sharded (FSDP2) tensors are gathered: a rewind point is full and the same on every rank, so that the
        # checkpoint (written by rank zero) restores every rank's shards.
        point = {
            "optimizers": [to_cpu(gather_tree(opt.state_dict())) for opt in trainer.optimizers],
            "schedulers": [to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
            "rng": to_cpu(rng_state()),
            "sampler_epoch": sampler_epoch,
            "step": trainer.global_step,
        }
        if self.rewind.rewinds_weights:
            point["model"] = to_cpu(gather_tree(pl_module.state_dict()))
        return point

    def _restore(self, trainer: Any, pl_module: Any, point: dict[str, Any]) -> None:
        sharded = self.masks._sharded
        if "model" in point:
            if sharded:
                load_full_state_(pl_module, point["model"])
            else:
                pl_module.load_state_dict(point["model"])
        for opt, state in zip(trainer.optimizers, point["optimizers"]):
            state = to_cpu(state)  # a copy: the optimizer must not alias the rewind point
            opt.load_state_dict(shard_optimizer_state(state, opt) if sharded else state)
        for cfg, state in zip(trainer.lr_scheduler_configs, point["schedulers"]):
            cfg.scheduler.load_state_dict(to_cpu(state))
        set_rng_state(point["rng"])

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            round=self._round,
            epochs_per_round=self.epochs_per_round,
            rewind_point=self._rewind_point,
            results=[dict(r) for r in self._results],
            values=list(self._values),
            last_lrs=self._last_lrs,
            frozen_lrs=self._frozen_lrs,
            history=[{n: (p, list(shape)) for n, (p, shape) in r.items()} for r in self._history],
            initial=self._initial,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._round = int(state_dict.get("round", 0))
        self.epochs_per_round = state_dict.get("epochs_per_round", self.epochs_per_round)
        self._rewind_point = state_dict.get("rewind_point")
        self._results = [dict(r) for r in state_dict.get("results", [])]
        self._values = list(state_dict.get("values", []))
        self._last_lrs = state_dict.get("last_lrs")
        self._frozen_lrs = state_dict.get("frozen_lrs")
        self._history = [{n: (p, tuple(shape)) for n, (p, shape) in r.items()} for r in state_dict.get("history", [])]
        self._initial = state_dict.get("initial")


def _set_sampler_epoch(trainer: Any, epoch: int) -> None:
    """Set the epoch of every train sampler with ``set_epoch`` (DistributedSampler shuffles by seed + epoch)."""
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    for dl in getattr(loader, "flattened", []) or []:
        for sampler in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
