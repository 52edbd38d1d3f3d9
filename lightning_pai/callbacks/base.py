"""The Lightning adapter: trainer hooks -> :class:`~lightning_pai.core.session.Session`, and the method registry."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_pai.callbacks._compat import CallbackBase, check_strategy, rank_zero_warn
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.report import SparsityReport
from lightning_pai.core.session import Host, Session
from lightning_pai.core.targets import Selectors, validate_selectors

FAMILIES = ("prune_at_init", "lottery", "dynamic", "gradual")


@dataclass(frozen=True)
class MethodCard:
    """What a method tells the test suites, the CLI check and the benchmarks about itself.

    A method class declares ``card = MethodCard(...)`` in its body and is registered when the class is
    created (:func:`~lightning_pai.callbacks.list_methods`); every registry-parametrized suite picks it up.

    Attributes:
        family: ``"prune_at_init"``, ``"lottery"``, ``"dynamic"`` (drop-and-grow) or ``"gradual"`` (pruning
            during training).
        example: A small configuration (keyword arguments besides the sparsity) that reaches its final
            sparsity within a fit of 2 epochs of 8 optimizer steps; used by :meth:`SparseCallback.example`.
        sparsity_argument: The argument that sets how much is pruned (``"sparsity"``; the lottery ticket's
            example prunes ``prune_fraction`` once, in 2 rounds).
        keeps_layer_counts: Every topology update keeps each layer's kept count (RigL, SET).
        keeps_total: Every topology update keeps the total kept count.
    """

    family: str
    example: dict[str, Any] = field(default_factory=dict)
    sparsity_argument: str = "sparsity"
    keeps_layer_counts: bool = False
    keeps_total: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {', '.join(map(repr, FAMILIES))}; got {self.family!r}.")


#: Every registered method class, in registration (documentation) order.
_METHODS: dict[str, type[SparseCallback]] = {}


class LightningHost(Host):
    """A :class:`~lightning_pai.core.session.Host` over a Lightning ``Trainer`` and its ``LightningModule``."""

    def __init__(self, trainer: Any, pl_module: Any) -> None:
        super().__init__(length_hint="set `max_steps` or `max_epochs` on the Trainer (training length is unbounded)")
        self.trainer, self.pl_module = trainer, pl_module

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.trainer.optimizers

    @property
    def schedulers(self) -> list[Any]:
        return [cfg.scheduler for cfg in self.trainer.lr_scheduler_configs]

    @property
    def total_steps(self) -> int | None:
        total = self.trainer.estimated_stepping_batches
        return None if total == float("inf") else int(total)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.trainer.strategy.broadcast(obj, src=src)

    def batches(self, n: int) -> list[Any]:
        trainer = self.trainer
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        if loader is None or not isinstance(loader, Iterable) or isinstance(loader, (dict, list, tuple)):
            raise ValueError(f"Scoring uses the batches of a single train dataloader; got {type(loader).__name__}.")
        return [trainer.strategy.batch_to_device(b) for b in islice(iter(loader), n)]

    def default_loss(self, user: str = "the scorer") -> Callable[[nn.Module, Any], Tensor]:
        """The loss ``training_step`` returns (its ``self.log`` calls silenced).

        Raises:
            ValueError: Under manual optimization, where ``training_step`` would step the optimizer.
        """
        if not self.pl_module.automatic_optimization:
            raise ValueError(
                f"`{user}` cannot score with `training_step` under manual optimization (it would step the "
                "optimizer): pass `loss_fn=`."
            )
        return _training_step_loss

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step if step is None else step)

    def warn(self, text: str) -> None:
        rank_zero_warn(text)


class SparseCallback(CallbackBase):
    """Base of the method callbacks: Lightning hooks wired to the method's engine :class:`Session`.

    A method class says *what* it does by building its session (:meth:`build_session`); this class only
    says *when*: ``setup`` checks the strategy and the target patterns, ``on_fit_start`` starts the session
    (masks from a checkpoint being resumed, from a previous ``fit`` with this callback, or computed on rank
    zero and broadcast), and every batch, optimizer step and epoch end is forwarded to it. The session's
    state is the callback's ``state_dict``, so masks and progress are in every checkpoint. The same method
    object drives a plain loop through :class:`lightning_pai.Sparsifier` and the Hugging Face ``Trainer``
    through :class:`lightning_pai.hf.SparsityCallback`.

    Args:
        include: Prunable-parameter selection, see :func:`~lightning_pai.core.targets.select_targets`.
        exclude: Parameters removed from the selection.
        verbose: Print the sparsity table (rank zero) when masks are set.
    """

    #: Set in a method class's body to register it (see :class:`MethodCard`).
    card: ClassVar[MethodCard | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("card") is not None:
            _METHODS[cls.__name__] = cls

    def __init__(self, *, include: Selectors = None, exclude: Selectors = None, verbose: bool = True) -> None:
        validate_selectors(include, exclude)
        self.include = include
        self.exclude = exclude
        self.verbose = verbose
        self._session: Session | None = None
        # ddp_spawn/ddp_fork train in child processes: rank zero hands its state back to the launching
        # process through this file (the callback object is copied to the children with this path in it).
        self._handoff = os.path.join(tempfile.gettempdir(), f"lightning_pai_{uuid.uuid4().hex}.pt")

    # ------------------------------------------------------------- the method
    def build_session(self) -> Session:
        """The engine session that runs this method (built once, on first use)."""
        raise NotImplementedError

    @property
    def session(self) -> Session:
        """The method's engine :class:`~lightning_pai.core.session.Session` (its masks and state)."""
        if self._session is None:
            self._session = self.build_session()
        return self._session

    @property
    def final_sparsity(self) -> float:
        """The fraction of the targeted weights removed at the end of training."""
        return self.sparsity

    @classmethod
    def example(cls, sparsity: float = 0.8, **overrides: Any) -> SparseCallback:
        """The method's small example configuration (its :class:`MethodCard`) at ``sparsity``, quiet.

        Raises:
            TypeError: If the class has no card.
        """
        card = cls.__dict__.get("card")
        if card is None:
            raise TypeError(f"`{cls.__name__}` declares no `card`, so it has no example configuration.")
        kwargs = {card.sparsity_argument: sparsity, **card.example, "verbose": False, **overrides}
        return cls(**kwargs)

    @property
    def masks(self) -> MaskSet | None:
        """The masks being enforced (None before the first fit starts)."""
        return self.session.masks

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy, type(self).__name__)
            self.session.check(pl_module)  # bad patterns fail before training

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._collect_handoff()
        self.session.start(pl_module, LightningHost(trainer, pl_module))

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # A resumed fit loads the optimizer state after `on_fit_start`: clean it again.
        self.session.train_start()

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.epoch_start(trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Work due after the previous step that an interrupted fit did not do (e.g. an epoch-end update of a
        # fit resumed from a checkpoint saved after the epoch's last step: Lightning skips that epoch's end).
        self.session.catch_up(trainer.global_step)
        self.session.step_start(trainer.global_step + 1)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.session.before_step(trainer.global_step + 1, is_last_batch_of_epoch(trainer))

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.session.after_step(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.epoch_end(trainer.current_epoch, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        launcher = getattr(trainer.strategy, "launcher", None)
        if trainer.is_global_zero and type(launcher).__name__ == "_MultiProcessingLauncher":
            torch.save(self.state_dict(), self._handoff)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.session.stop()

    def _collect_handoff(self) -> None:
        """Adopt the state (masks and any progress) rank zero of a ddp_spawn/ddp_fork fit left behind.

        Runs in the launching process, or in the workers of a later fit. The file is read, never deleted
        here: every worker of a later fit must see it, and rank zero overwrites it at the end of each such
        fit. It lives in the system temp directory.
        """
        if self.session.current_masks() is None and os.path.exists(self._handoff):
            self.session.load_state_dict(torch.load(self._handoff, weights_only=True))

    # --------------------------------------------------------------- reporting
    def report(self, module: Any = None) -> SparsityReport:
        """The current per-layer sparsity (see :func:`~lightning_pai.core.report.sparsity_report`).

        With ``module`` (the model the masks belong to) the report also says how much of it the masks cover.
        """
        self._collect_handoff()
        return self.session.report(module)

    def make_permanent(self, module: Any) -> Any:
        """A plain copy of ``module`` with this callback's zeros baked in and nothing attached.

        For users who just want the sparse weights: no callback, hooks or masks are needed to use, save or
        export the result (see :func:`lightning_pai.export.make_permanent`, and
        :func:`~lightning_pai.export.save_sparse` for a compressed file).
        """
        from lightning_pai.export import make_permanent

        self._collect_handoff()
        masks = self.session.current_masks()
        if masks is None:
            raise RuntimeError(f"`{type(self).__name__}` has no masks yet: they are set when `trainer.fit` starts.")
        return make_permanent(module, masks)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        self._collect_handoff()
        return self.session.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)


def list_methods(family: str | None = None) -> list[type[SparseCallback]]:
    """The registered method classes (those declaring a :class:`MethodCard`), optionally of one ``family``."""
    return [cls for cls in _METHODS.values() if family is None or cls.card.family == family]


def is_last_batch_of_epoch(trainer: Any) -> bool:
    """Whether the running training batch is the epoch's last (Lightning's own test, or False if unavailable)."""
    loop = trainer.fit_loop.epoch_loop
    return loop._num_ready_batches_reached() if hasattr(loop, "_num_ready_batches_reached") else False


def _training_step_loss(module: Any, batch: Any) -> Tensor:
    """The loss ``module.training_step(batch, 0)`` returns, with ``self.log`` silenced."""
    saved = module.__dict__.get("log"), module.__dict__.get("log_dict")
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        out = module.training_step(batch, 0)
    finally:
        for attr, value in zip(("log", "log_dict"), saved):
            if value is None:
                delattr(module, attr)
            else:
                setattr(module, attr, value)
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(
            "`training_step` must return a scalar loss (or a dict with 'loss') for scoring; or pass `loss_fn=`."
        )
    return loss
