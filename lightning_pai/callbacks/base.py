"""Shared machinery of all lightning_pai callbacks: a mask set bound to the LightningModule."""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_pai.callbacks._compat import CallbackBase, check_strategy, rank_zero_warn
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.report import SparsityReport, coverage, sparsity_report
from lightning_pai.core.targets import Selectors, select_targets, validate_selectors


class SparseCallback(CallbackBase):
    """Base of the pruning callbacks: owns a :class:`~lightning_pai.core.masks.MaskSet` and enforces it.

    At fit start the masks come, in this order of precedence, from a checkpoint being resumed, from a
    previous ``fit`` with this callback, or from :meth:`initial_masks` (computed on rank zero and
    broadcast, so every DDP rank holds the same masks). Every optimizer step then sees masked gradients
    (``on_before_optimizer_step``, i.e. before gradient clipping) and masked weights afterwards (a step
    post-hook). Masks live in the callback's ``state_dict`` and so in every checkpoint.

    Args:
        include: Prunable-parameter selection, see :func:`~lightning_pai.core.targets.select_targets`.
        exclude: Parameters removed from the selection.
        verbose: Print the sparsity table (rank zero) when masks are set.

    """

    def __init__(self, *, include: Selectors = None, exclude: Selectors = None, verbose: bool = True) -> None:
        validate_selectors(include, exclude)
        self.include = include
        self.exclude = exclude
        self.verbose = verbose
        self.masks: MaskSet | None = None
        self._restored: dict[str, Tensor] | None = None
        # ddp_spawn/ddp_fork train in child processes: rank zero hands its masks back to the launching
        # process through this file (the callback object is copied to the children with this path in it).
        self._handoff = os.path.join(tempfile.gettempdir(), f"lightning_pai_{uuid.uuid4().hex}.pt")

    # ------------------------------------------------------------- to override
    def initial_masks(self, trainer: Any, pl_module: Any, masks: MaskSet) -> dict[str, Tensor]:
        """Compute the masks to start training with (runs on every rank; rank zero's result is broadcast).

        ``masks`` is the (all-kept) :class:`~lightning_pai.core.masks.MaskSet` of the targets: its ``params``
        and ``layouts``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy, type(self).__name__)
            select_targets(pl_module, self.include, self.exclude)  # bad patterns fail before training

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        masks = MaskSet.from_module(pl_module, self.include, self.exclude)
        self._collect_handoff()
        if self._restored is not None:
            masks.load_state_dict(self._restored)
            self._restored = None
        elif self.masks is not None:
            masks.load_state_dict(self.masks.state_dict())
        else:
            computed = self.initial_masks(trainer, pl_module, masks)
            masks.load_state_dict(self._from_rank_zero(trainer, computed))
        self.masks = masks
        dense = self._dense_gradients(trainer)
        for opt in trainer.optimizers:
            if not dense:
                masks.mask_optimizer_state_(opt)
            masks.attach(opt, mask_grads=False, mask_weights=dense)
        # Single process: mask each gradient inside backward, as soon as it is accumulated (cache-hot).
        self._in_backward = not dense and trainer.world_size == 1 and not masks._sharded and self._backward_masking()
        if self._in_backward:
            masks.mask_grads_in_backward()
        masks.apply_()
        self._warn_coverage(pl_module)
        self.on_masks_changed(trainer, pl_module)

    def _dense_gradients(self, trainer: Any) -> bool:
        """Whether masked weights' gradients reach the optimizer.

        If so, their weights are re-zeroed after each step and their optimizer state is left alone; by
        default (False) their gradients are masked before every step.
        """
        return False

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # A resumed fit loads the optimizer state after `on_fit_start`: clean it again (a no-op when the
        # checkpoint was saved with these masks, essential when it was saved dense).
        if not self._dense_gradients(trainer):
            for opt in trainer.optimizers:
                self.masks.mask_optimizer_state_(opt)

    def _backward_masking(self) -> bool:
        """Whether gradients may be masked inside backward (False: some step reads every dense gradient)."""
        return True

    def _needs_dense_grads(self, trainer: Any) -> bool:
        """Whether the coming optimizer step must see the dense gradients (e.g. a gradient-growth update)."""
        return False

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_in_backward", False):
            self.masks.grad_hooks_active = not self._needs_dense_grads(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._dense_gradients(trainer) and not self.masks.grad_hooks_active:
            self.masks.mask_grads_()

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        launcher = getattr(trainer.strategy, "launcher", None)
        if trainer.is_global_zero and type(launcher).__name__ == "_MultiProcessingLauncher":
            torch.save(self.state_dict(), self._handoff)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.masks is not None:
            self.masks.detach()

    @staticmethod
    def _from_rank_zero(trainer: Any, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rank zero's ``masks`` on every rank (as CPU tensors when broadcast; unchanged on one process)."""
        if trainer.world_size <= 1:
            return masks
        return trainer.strategy.broadcast({n: m.cpu() for n, m in masks.items()}, src=0)

    @staticmethod
    def _log_metrics(trainer: Any, metrics: dict[str, float], step: int | None = None) -> None:
        """Send ``metrics`` to every logger of the trainer, from rank zero only."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step if step is None else step)

    def _collect_handoff(self) -> None:
        """Adopt the state (masks and any callback progress) rank zero of a ddp_spawn/ddp_fork fit left behind.

        Runs in the launching process, or in the workers of a later fit. The file is read, never deleted
        here: every worker of a later fit must see it, and rank zero overwrites it at the end of each such
        fit. It lives in the system temp directory.
        """
        if self.masks is None and self._restored is None and os.path.exists(self._handoff):
            self.load_state_dict(torch.load(self._handoff, weights_only=True))

    # --------------------------------------------------------------- reporting
    def report(self, module: Any = None) -> SparsityReport:
        """The current per-layer sparsity (see :func:`~lightning_pai.core.report.sparsity_report`).

        With ``module`` (the model the masks belong to) the report also says how much of it the masks cover.
        """
        self._collect_handoff()
        masks = self.masks if self.masks is not None else self._restored
        if masks is None:
            raise RuntimeError(f"`{type(self).__name__}` has no masks yet: they are set when `trainer.fit` starts.")
        return sparsity_report(module, masks)

    def make_permanent(self, module: Any) -> Any:
        """A plain copy of ``module`` with this callback's zeros baked in and nothing attached.

        For users who just want the sparse weights: no callback, hooks or masks are needed to use, save or
        export the result (see :func:`lightning_pai.export.make_permanent`, and
        :func:`~lightning_pai.export.save_sparse` for a compressed file).
        """
        from lightning_pai.export import make_permanent

        self._collect_handoff()
        masks = self.masks if self.masks is not None else self._restored
        if masks is None:
            raise RuntimeError(f"`{type(self).__name__}` has no masks yet: they are set when `trainer.fit` starts.")
        return make_permanent(module, masks)

    def on_masks_changed(self, trainer: Any, pl_module: Any) -> None:
        """Log ``sparsity/*`` (incl. ``sparsity/coverage``, ``coverage_2d``) and print the table (rank zero)."""
        if not trainer.is_global_zero:
            return
        report = self.report(pl_module)
        self._log_metrics(trainer, report.metrics())
        if self.verbose:
            print(f"{type(self).__name__}: {report.summary()}\n{report}")

    def _warn_coverage(self, pl_module: Any) -> None:
        """Warn (rank zero) when more than half of the model's >=2-D parameters are under no mask."""
        cover = coverage(pl_module, self.masks.names)
        if cover.matrix_fraction < 0.5:
            rank_zero_warn(
                f"`{type(self).__name__}`: {cover}. The reported sparsity is of the targeted weights only; "
                "widen the targets with `include=` (name patterns or module types) if that is not intended."
            )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        self._collect_handoff()
        return {"masks": self.masks.state_dict() if self.masks is not None else self._restored}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = state_dict.get("masks")
        if masks is None:
            return
        if self.masks is not None:
            self.masks.load_state_dict(masks)
            self.masks.apply_()
        else:
            self._restored = masks


def is_last_batch_of_epoch(trainer: Any) -> bool:
    """Whether the running training batch is the epoch's last (Lightning's own test, or False if unavailable)."""
    loop = trainer.fit_loop.epoch_loop
    return loop._num_ready_batches_reached() if hasattr(loop, "_num_ready_batches_reached") else False
