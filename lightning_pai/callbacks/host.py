"""A :class:`~lightning_pai.core.session.Host` over a Lightning ``Trainer``, and the trainer facts the adapters read."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.callbacks._compat import rank_zero_warn
from lightning_pai.core.session import Host


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


def run_validation(trainer: Any) -> None:
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
