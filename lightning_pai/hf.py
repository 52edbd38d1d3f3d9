"""Every lightning_pai method in the Hugging Face ``Trainer``: :class:`SparsityCallback` (imports ``transformers``).

The callback drives the same engine :class:`~lightning_pai.core.session.Session` as the Lightning callbacks
and :class:`~lightning_pai.Sparsifier`, from the ``TrainerCallback`` events::

    from lightning_pai import RigL
    from lightning_pai.hf import SparsityCallback

    trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[SparsityCallback(RigL(0.9))])
    trainer.train()

``transformers`` is imported here only; ``import lightning_pai`` never needs it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from lightning_pai.core.session import Session
from lightning_pai.sparsifier import LoopHost, unwrap_model, unwrap_optimizer

#: The file each checkpoint folder (``checkpoint-<step>``) gets with the method's state.
STATE_FILE = "lightning_pai_state.pt"


class HFHost(LoopHost):
    """A :class:`~lightning_pai.core.session.Host` over a Hugging Face ``Trainer`` run.

    ``torch.distributed`` collectives (the ``Trainer``'s process group), its optimizer and LR scheduler, its
    ``max_steps``, batches from its train dataloader, the model's own loss (``outputs.loss``) for scorers, and
    metrics appended to ``state.log_history`` (so they are in ``trainer_state.json``).
    """

    def __init__(self, state: Any, model: nn.Module, optimizer: Any, lr_scheduler: Any, train_dataloader: Any):
        device = next(model.parameters()).device
        schedulers = [] if lr_scheduler is None else [lr_scheduler]
        super().__init__([unwrap_optimizer(optimizer)], schedulers, state.max_steps, train_dataloader, device, None)
        self.length_hint = "set `max_steps` or `num_train_epochs` in the TrainingArguments"
        self.state = state

    def default_loss(self, user: str = "the scorer") -> Any:
        """The model's own loss for HF-style dict batches with labels (``model(**batch).loss``), else None."""

        def hf_loss(module: nn.Module, batch: Any) -> Tensor:
            out = module(**batch)
            loss = getattr(out, "loss", None)
            if loss is None and isinstance(out, dict):
                loss = out.get("loss")
            if not isinstance(loss, Tensor):
                raise ValueError(f"`{user}`: the model returned no loss for a batch; pass `loss_fn=` to the method.")
            return loss

        return hf_loss

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.is_global_zero:
            self.state.log_history.append({**metrics, "step": self.state.global_step if step is None else step})


class SparsityCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` running any lightning_pai method: ``SparsityCallback(RigL(0.9))``.

    Events -> the method's engine session: ``on_train_begin`` sets the masks (scoring the first training
    batches with the model's own loss for data-driven scorers; rank zero decides under ``torch.distributed``),
    ``on_step_begin`` / ``on_pre_optimizer_step`` / ``on_step_end`` are the step protocol around each
    optimizer step (gradients masked before the step, weights and optimizer state of pruned weights exactly
    zero after it, topology updates on schedule), ``on_epoch_begin`` / ``on_epoch_end`` the epoch protocol
    (epoch-end updates, lottery rounds). ``on_save`` writes the method's state (masks, progress) into the
    checkpoint folder as :data:`STATE_FILE`; ``trainer.train(resume_from_checkpoint=...)`` with a new
    callback of the same method restores it instead of computing new masks. Metrics (``sparsity/*``,
    ``dst/*``) go to ``trainer.state.log_history``.

    The ``Trainer`` clips gradients *before* ``on_pre_optimizer_step``: on one process the gradients are
    masked inside backward (so clipping sees masked gradients) except at steps whose update reads the dense
    gradient; under ``torch.distributed`` the norm includes the pruned weights' gradients.

    Args:
        method: A method object (``RigL(...)``, ``PruneAtInit(...)``, ``LotteryTicket(...)``, ...) or a Session.
    """

    def __init__(self, method: Any) -> None:
        session = method if isinstance(method, Session) else getattr(method, "session", None)
        if not isinstance(session, Session):
            raise TypeError(f"`method` must be a lightning_pai method (e.g. `RigL(...)`) or a Session; got {method!r}.")
        self.method, self.session = method, session
        self.host: HFHost | None = None
        self._steps_per_epoch: int | None = None
        self._epoch = 0

    @property
    def masks(self) -> Any:
        """The masks being enforced (a :class:`~lightning_pai.core.masks.MaskSet`; None before training)."""
        return self.session.masks

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = unwrap_model(kwargs["model"])
        loader = kwargs.get("train_dataloader")
        if loader is not None and hasattr(loader, "__len__"):
            self._steps_per_epoch = max(math.ceil(len(loader) / args.gradient_accumulation_steps), 1)
        if self.session.needs_epoch_length and self._steps_per_epoch is None:
            raise ValueError(f"`{self.session.name}` must know the epoch's length: use a sized train dataset.")
        self.host = HFHost(state, model, kwargs["optimizer"], kwargs.get("lr_scheduler"), loader)
        if state.global_step > 0:  # resumed: the method's state from the checkpoint being resumed
            self.session.load_state_dict(_load_state(args, state))
        self.session.check(model)
        self.session.prepare(model)
        self.session.start(model, self.host)
        self.session.train_start()
        self._epoch = int(math.floor((state.epoch or 0) + 1e-9))
        self.session.epoch_start(self._epoch)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = int(math.floor((state.epoch or 0) + 1e-9))
        if epoch != self._epoch:  # (the first epoch was announced at train begin)
            self._epoch = epoch
            self.session.epoch_start(epoch)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.catch_up(state.global_step)
        self.session.step_start(state.global_step + 1)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1
        last = self._steps_per_epoch is not None and step % self._steps_per_epoch == 0
        self.session.before_step(step, last)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.host.last_step = state.global_step
        self.session.after_step(state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.epoch_end(self._epoch, state.global_step)
        self._epoch += 1
        self.session.epoch_start(self._epoch)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.session.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.stop()


def _load_state(args: Any, state: Any) -> dict[str, Any]:
    """The method's state saved with the checkpoint of step ``state.global_step`` in ``args.output_dir``.

    Raises:
        FileNotFoundError: If that checkpoint has no :data:`STATE_FILE` (e.g. saved without this callback).
    """
    path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Resuming at step {state.global_step}, but {path} does not exist: the checkpoint was saved without "
            "`SparsityCallback`, or outside `output_dir`. The masks cannot be restored without it."
        )
    return torch.load(path, map_location="cpu", weights_only=True)
