"""The Lightning adapter: trainer hooks -> :class:`~lightning_pai.core.session.Session`."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import weakref
from typing import Any, ClassVar, TypedDict

import torch
from typing_extensions import override

from lightning_pai.callbacks._compat import CallbackBase, check_strategy
from lightning_pai.callbacks.host import LightningHost, is_last_batch_of_epoch
from lightning_pai.callbacks.registry import MethodCard, register_method
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.report import SparsityReport
from lightning_pai.core.session import Session
from lightning_pai.core.targets import FROZEN, Selectors, validate_selectors
from lightning_pai.core.validation import check_choice

RESUME = ("checkpoint", "recompute")


def require_validation(trainer: Any, method: str, monitor: str | None, needs: str, otherwise: str = "") -> None:
    """Refuse a ``monitor`` the fit cannot provide: it has no validation loop.

    Args:
        trainer: The Lightning trainer.
        method: The method's class name (for the message).
        monitor: The monitored metric, or None (nothing to check).
        needs: What the method does with it (e.g. ``"records a validation metric per round"``).
        otherwise: What leaving ``monitor`` unset does, e.g. ``" (each phase's last network)"``.

    Raises:
        ValueError: When ``monitor`` is set and the fit validates nothing.
    """
    if monitor is not None and not trainer.enable_validation:
        raise ValueError(
            f"`{method}(monitor={monitor!r})` {needs}, but this fit has no validation loop (no val dataloader, no "
            f"`validation_step`, or `limit_val_batches=0`): add one, or leave `monitor` unset{otherwise}."
        )


class TargetOptions(TypedDict, total=False):
    """Keyword options every method takes (``**common`` in the method signatures).

    Attributes:
        include: Prunable parameters, see :func:`~lightning_pai.core.targets.select_targets` (default: every
            linear-like weight).
        exclude: Parameters left dense (name globs, module types, presets such as ``"stem"``, ``"head"``).
        verbose: Print the sparsity table (rank zero) when the masks are set.
        resume: What a resumed fit does with this method's state saved under other arguments (e.g. a
            ``RigL(0.8)`` checkpoint resumed with ``RigL(0.9)``): None (default) refuses before training,
            ``"checkpoint"`` continues from the saved masks and progress, ``"recompute"`` starts from new masks.
        frozen: What happens to selected parameters that do not train (``requires_grad=False``, e.g. a frozen
            backbone): ``"skip"`` (default) leaves them dense and names them in a warning and in the report,
            ``"prune"`` prunes them once at the start (methods that regrow weights or follow gradients refuse
            them, naming them), ``"error"`` refuses to start while any is selected.
    """

    include: Selectors
    exclude: Selectors
    verbose: bool
    resume: str | None
    frozen: str


class MethodOptions(TargetOptions, total=False):
    """:class:`TargetOptions` and ``seed``, the seed of the method's random choices (masks, growth, noise)."""

    seed: int


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
        resume: With a checkpoint holding this method's state under other arguments: None refuses,
            ``"checkpoint"`` uses that state, ``"recompute"`` ignores it (see :class:`TargetOptions`).
        frozen: Frozen (``requires_grad=False``) targets: ``"skip"``, ``"prune"`` or ``"error"`` (see
            :class:`TargetOptions`).
    """

    #: Set in a method class's body to register it (see :class:`MethodCard`).
    card: ClassVar[MethodCard | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("card") is not None:
            register_method(cls)

    def __init__(
        self,
        *,
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = True,
        resume: str | None = None,
        frozen: str = "skip",
    ) -> None:
        validate_selectors(include, exclude)
        check_choice(resume, RESUME, "resume", optional=True)
        check_choice(frozen, FROZEN, "frozen")
        self.include = include
        self.exclude = exclude
        self.verbose = verbose
        self.resume = resume
        self.frozen = frozen
        self._session: Session | None = None
        # ddp_spawn/ddp_fork train in child processes: rank zero hands its state back to the launching
        # process through this file (the callback object is copied to the children with this path in it). It is
        # removed when this object (in the process that created it, not in its copies) is collected or at exit.
        self._handoff = os.path.join(tempfile.gettempdir(), f"lightning_pai_{uuid.uuid4().hex}.pt")
        weakref.finalize(self, _remove_file, self._handoff)

    # ------------------------------------------------------------- the method
    def build_session(self) -> Session:
        """The engine session that runs this method (built once, on first use)."""
        raise NotImplementedError

    def session_options(self) -> dict[str, Any]:
        """The options every session takes from the method: ``include``, ``exclude``, ``verbose``, ``frozen``."""
        return {"include": self.include, "exclude": self.exclude, "verbose": self.verbose, "frozen": self.frozen}

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
        kwargs = {card.sparsity_argument: sparsity} if card.sparsity_argument is not None else {}
        kwargs.update({**card.example, "verbose": False, **overrides})
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
            self.session.prepare(pl_module)  # before the strategy wraps the model (DDP records what trains)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """A resumed fit: find this method's state saved under other arguments (another ``state_key``)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        prefix = type(self).__qualname__ + "{"
        other = [k for k, v in states.items() if k.startswith(prefix) and isinstance(v, dict) and "masks" in v]
        if not other or self.resume == "recompute":
            return
        if self.resume == "checkpoint":
            self.session.load_state_dict(states[other[0]])
            return
        raise ValueError(
            f"The checkpoint holds `{type(self).__name__}` state saved with other arguments ({other[0]}); this "
            f"callback is {self.state_key}. Lightning would drop the saved masks and training would restart from "
            f"new ones. Pass `{type(self).__name__}(..., resume='checkpoint')` to continue from the checkpoint's "
            "masks and progress, or `resume='recompute'` to start from new masks."
        )

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

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # An interrupted fit skips `teardown`: layers training sparse (`backend="sparse"`) become dense layers again.
        if getattr(self.session, "backend", "masked") == "sparse":
            self.session.stop()

    def _collect_handoff(self) -> None:
        """Adopt the state (masks and any progress) rank zero of a ddp_spawn/ddp_fork fit left behind.

        Runs in the launching process, or in the workers of a later fit. The file is read, never deleted
        here: every worker of a later fit must see it, and rank zero overwrites it at the end of each such
        fit. It lives in the system temp directory.
        """
        if not self.session.has_masks and os.path.exists(self._handoff):
            self.session.load_state_dict(torch.load(self._handoff, weights_only=True))

    # --------------------------------------------------------------- reporting
    def report(self, module: Any = None, *, effective: bool = False, example_inputs: Any = None) -> SparsityReport:
        """The current per-layer sparsity (see :func:`~lightning_pai.core.report.sparsity_report`).

        With ``module`` (the model the masks belong to) the report also says how much of it the masks cover;
        ``effective=True`` adds effective sparsity (Vysogorets & Kempe 2021), followed on any graph from
        ``example_inputs`` (default: the module's ``example_input_array``; without either, plain chains only).
        """
        self._collect_handoff()
        if not effective:
            return self.session.report(module)
        if example_inputs is None:
            example_inputs = getattr(module, "example_input_array", None)
        return self.session.report(module, effective=True, example_inputs=example_inputs)

    def make_permanent(self, module: Any) -> Any:
        """A plain copy of ``module`` with this callback's zeros baked in and nothing attached.

        For users who just want the sparse weights: no callback, hooks or masks are needed to use, save or
        export the result (see :func:`lightning_pai.deploy.make_permanent`, and
        :func:`~lightning_pai.deploy.save_sparse` for a compressed file).
        """
        from lightning_pai.deploy import make_permanent

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


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
