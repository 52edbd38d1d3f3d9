"""Lottery tickets inside one ``trainer.fit``: the Lightning adapter of the engine's ``LotterySession``."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks.base import SparseCallback, require_validation
from lightning_pai.callbacks.host import is_last_batch_of_epoch, run_validation
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.lottery import LotterySession
from lightning_pai.core.nm import NMSpec
from lightning_pai.core.stability import masked_instability
from lightning_pai.core.targets import Selectors


class LotteryTicket(SparseCallback):
    """Iterative magnitude pruning (IMP) with weight, learning-rate or no rewinding, inside one fit.

    The algorithm — pruning ``prune_fraction`` of the survivors by magnitude at the start of every round
    after the dense round 0, rewinding (``rewind_to``: ``"init"`` as Frankle & Carbin 2019, ``"step:k"`` /
    ``"epoch:k"`` late rewinding as Frankle et al. 2020 with later rounds of ``T - k`` steps, ``"lr"`` as
    Renda et al. 2020, ``"none"``: fine-tuning at round 0's last learning rate), the controls
    (``"random_prune"``, ``"random_reinit"``, and the LTH paper's ``ticket=`` control) and N:M budgets — is the
    engine's :class:`~lightning_pai.core.lottery.LotterySession`, documented there; a plain loop runs the same
    through :class:`~lightning_pai.Sparsifier`. Each round replays the rewind point's data order (RNG state
    and the samplers' epoch). **Configure the LR schedule for round 0** (``epochs_per_round`` epochs).

    Round lengths: with ``init``, ``lr``, ``none`` (``k = 0``) every round has ``epochs_per_round`` epochs
    and ``Trainer(max_epochs=rounds * epochs_per_round)``; with ``epoch:k`` pruned rounds have
    ``epochs_per_round - k`` epochs and ``max_epochs`` is their sum. With ``step:k`` (``k > 0``) pruned rounds
    train exactly ``T - k`` optimizer steps, so they begin and end mid-epoch: set
    ``Trainer(max_steps=T + (rounds - 1) (T - k), max_epochs=-1)`` (both checked before training; the messages
    give the numbers). A round that ends mid-epoch is validated at its last step (as with
    ``val_check_interval``), so every round's ``last`` metric is its final one. Data order with ``step:k``:
    the batches keep flowing from the running epoch (the dropout/RNG state is rewound, the epoch's shuffle
    is not), unlike ``init``/``epoch:k``, which replay the rewind point's batches exactly.

    Results: with ``monitor``, each round's best and last value of that metric (``callback.results``, logged
    as ``lottery/best``, ``lottery/last``; ``lottery/round``, ``lottery/density`` when a round starts; a table
    at the end). Round, masks, rewind point and results are in the ``state_dict``: a resumed fit continues
    the same round. Under DDP rank zero decides the masks after every prune.

    Args:
        rounds: Number of training rounds, including the dense round 0 (so ``rounds - 1`` prunes).
        prune_fraction: Fraction of the *remaining* weights removed per round, in ``(0, 1)``.
        epochs_per_round: Epochs of round 0 (default: derived from ``max_epochs``; required with ``step:k``).
        rewind_to: ``"init"``, ``"step:N"``, ``"epoch:N"``, ``"lr"``, ``"none"`` or ``"signed_constant"`` (kept
            weights rewound to ``sign(w_0) · std`` of their layer's initial weights, Zhou et al. 2019).
        criterion: The mask criterion of Zhou et al. 2019 ("Deconstructing lottery tickets"): ``"large_final"``
            (``|w_f|``, the default: magnitude pruning), ``"magnitude_increase"`` (``|w_f| - |w_i|``),
            ``"movement"`` (``|w_f - w_i|``), ``"large_init_large_final"``, ``"large_final_same_sign"``, ...
            (:data:`lightning_pai.core.lottery.CRITERIA`); ``w_i`` are the weights at fit start.
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
        nm_incompatible: Layers the ``nm`` groups cannot fit (input channels not a multiple of ``M``):
            ``"error"`` (default) refuses before training, ``"dense"`` leaves them dense, ``"unstructured"``
            prunes them unstructured on the same budgets; they are named in a warning and in the report.
        monitor: Logged metric to record per round (e.g. ``"val_acc"``), or None.
        mode: ``"max"`` or ``"min"``: which value of ``monitor`` is the best.
        seed: Seed of the controls' random draws.
        verbose: Print the sparsity table after every prune and the results table at the end.
        resume: Checkpoint state saved under other arguments: None refuses, ``"checkpoint"`` uses it, ``"recompute"``
            ignores it (see :class:`~lightning_pai.TargetOptions`).
        frozen: Frozen (``requires_grad=False``) targets: ``"skip"`` (default) leaves them dense, ``"prune"``
            prunes them, ``"error"`` refuses (see :class:`~lightning_pai.TargetOptions`).

    Example::

        ticket = LotteryTicket(rounds=5, prune_fraction=0.2, epochs_per_round=10, monitor="val_acc")
        Trainer(max_epochs=50, callbacks=[ticket]).fit(model, datamodule=dm)
        print(ticket.results)
    """

    card = MethodCard("lottery", example={"rounds": 2, "epochs_per_round": 1}, sparsity_argument="prune_fraction")

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
        nm_incompatible: str = "error",
        resume: str | None = None,
        frozen: str = "skip",
        criterion: str = "large_final",
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose, resume=resume, frozen=frozen)
        self.criterion = criterion
        self.rounds, self.prune_fraction, self.epochs_per_round = rounds, prune_fraction, epochs_per_round
        self.rewind_to, self.distribution, self.layer_fractions = rewind_to, distribution, dict(layer_fractions or {})
        self.control, self.ticket, self.monitor, self.mode = control, ticket, monitor, mode
        self.seed, self.nm, self.nm_incompatible = int(seed), nm, nm_incompatible
        self.rewind = self.session.rewind  # builds the session: every argument is checked here
        self.prune_fraction = self.session.prune_fraction
        self._validated_at = -1
        self._epoch_started = -1

    def build_session(self) -> LotterySession:
        """The engine session for these arguments."""
        return LotterySession(
            type(self).__name__,
            rounds=self.rounds,
            prune_fraction=self.prune_fraction,
            epochs_per_round=self.epochs_per_round,
            rewind_to=self.rewind_to,
            distribution=self.distribution,
            layer_fractions=self.layer_fractions,
            control=self.control,
            ticket=self.ticket,
            mode=self.mode,
            seed=self.seed,
            nm=self.nm,
            nm_incompatible=self.nm_incompatible,
            criterion=self.criterion,
            **self.session_options(),
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            rounds=self.rounds, prune_fraction=self.prune_fraction, rewind_to=self.rewind_to, control=self.control
        )

    def instability(
        self, module: Any, train: Any, evaluate: Any, seeds: tuple[int, int] = (0, 1), points: int = 30
    ) -> Any:
        """The instability of this ticket's rewind point (Frankle et al. 2020, linear mode connectivity).

        A copy of ``module`` at the rewind point with the ticket's masks is forked and trained twice, by
        ``train(copy, seed)`` (the seed sets the data order), and the error barrier between the two is measured
        (:func:`lightning_pai.core.stability.masked_instability`).

        Raises:
            RuntimeError: Before a rewind point with weights exists (``rewind_to`` ``"lr"``/``"none"`` keep none).
        """
        point = self.session.rewind_point
        if point is None or "model" not in point:
            raise RuntimeError(
                f"`{type(self).__name__}` holds no rewind point with weights (rewind_to={self.rewind_to!r})."
            )
        start = copy.deepcopy(module)
        start.load_state_dict(point["model"])
        return masked_instability(start, self.session.current_masks(), train, evaluate, seeds, points)

    @property
    def final_sparsity(self) -> float:
        """About ``1 - (1 - prune_fraction) ** (rounds - 1)`` (exact counts round per round)."""
        return 1.0 - (1.0 - self.prune_fraction) ** (self.rounds - 1)

    @property
    def round(self) -> int:
        """Index of the current (or, after fit, the last) round; 0 is the dense round."""
        self._collect_handoff()  # after ddp_spawn/ddp_fork, rank zero's progress
        return self.session.round

    @property
    def mask_history(self) -> list[dict[str, Tensor]]:
        """The masks of every round started so far (round 0: all kept), as bool CPU tensors by name."""
        self._collect_handoff()
        return self.session.mask_history

    @property
    def results(self) -> list[dict[str, Any]]:
        """One dict per finished round: ``round``, ``density``, ``best`` and ``last`` value of ``monitor``."""
        self._collect_handoff()  # after ddp_spawn/ddp_fork, rank zero's results
        return self.session.results

    def results_table(self) -> str:
        """The per-round results as a text table."""
        self._collect_handoff()
        return self.session.results_table(self.monitor)

    # ------------------------------------------------------------ validation
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.max_steps not in (-1, None) and not self.session.step_rounds:
            raise ValueError(
                f"`{type(self).__name__}` counts rounds in epochs: leave `Trainer(max_steps=...)` unset (got "
                f"{trainer.max_steps})."
            )
        self.epochs_per_round = self.session.fit_epochs(trainer.max_epochs, "Trainer(max_epochs={})")

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        require_validation(trainer, type(self).__name__, self.monitor, "records a validation metric per round")
        steps_per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
        self.session.check_steps(steps_per_epoch, trainer.max_steps, "Trainer(max_steps={}, max_epochs=-1)")

    # ------------------------------------------------------------ the rounds
    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_started = trainer.current_epoch
        super().on_train_epoch_start(trainer, pl_module)
        data_epoch = self.session.data_epoch(trainer.current_epoch)
        if data_epoch is not None:  # every round replays the rewind point's data order
            _set_sampler_epoch(trainer, data_epoch)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        session = self.session
        if self._epoch_started != trainer.current_epoch:
            # Resumed from a checkpoint saved after an epoch's last step: Lightning starts the next epoch
            # without its epoch-start hooks (nor the previous epoch's end hooks); catch up on both.
            if not session.step_rounds and trainer.current_epoch > 0:
                previous, _ = session.round_of_epoch(trainer.current_epoch - 1)
                if previous == session.round and session.round_of_epoch(trainer.current_epoch)[0] > previous:
                    session.finish_round()
            self.on_train_epoch_start(trainer, pl_module)
        if session.round_due(trainer.global_step):
            if self._validated_at != trainer.global_step:  # the round ends mid-epoch: validate it there
                run_validation(trainer)
            session.finish_round()
            session.next_round(session.round + 1)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        session = self.session
        last = session.step_rounds and trainer.global_step == session.round_start_step(self.rounds)
        if last and not is_last_batch_of_epoch(trainer):  # max_steps ends the fit mid-epoch, without validation
            run_validation(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            if not trainer.sanity_checking:
                self._validated_at = trainer.global_step
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:  # (the sanity check's validation tells before the first training step)
            raise KeyError(
                f"`{type(self).__name__}(monitor={self.monitor!r})`: no such logged metric; logged: "
                f"{sorted(trainer.callback_metrics)}."
            )
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step
            self.session.record(float(value))

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        session = self.session
        if session.step_rounds and trainer.global_step >= session.round_start_step(self.rounds):
            session.finish_round()  # the last step:k round ends with the fit

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.verbose and trainer.is_global_zero and self.session.results:
            print(self.results_table())


def _set_sampler_epoch(trainer: Any, epoch: int) -> None:
    """Set the epoch of every train sampler with ``set_epoch`` (DistributedSampler shuffles by seed + epoch)."""
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    for dl in getattr(loader, "flattened", []) or []:
        for sampler in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
