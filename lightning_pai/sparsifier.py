"""Every lightning_pai method in a plain PyTorch loop, Lightning Fabric or ``torch.distributed``: :class:`Sparsifier`.

The same engine :class:`~lightning_pai.core.session.Session` the Lightning callbacks drive, driven from your
loop: ``sparsifier.step()`` replaces ``optimizer.step()`` and ``sparsifier.epoch_end()`` ends an epoch.

Example::

    method = RigL(sparsity=0.9, delta_t=100)
    sparsifier = Sparsifier(method, model, optimizer, data=loader, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            sparsifier.step()  # masks the gradients, steps, updates the topology on schedule
        sparsifier.epoch_end()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_pai.core.lottery import LotterySession
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.report import SparsityReport
from lightning_pai.core.session import Host, Session


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside Fabric (``_FabricModule``), DDP/DataParallel and ``torch.compile`` wrappers.

    Masks are keyed by the parameter names of this module, so they are the same with or without the wrappers.
    """
    while True:
        if hasattr(model, "_original_module") and isinstance(model._original_module, nn.Module):  # Fabric
            model = model._original_module
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _check_sparse_ddp(session: Session, model: nn.Module, module: nn.Module) -> None:
    """Refuse ``backend="sparse"`` under a DDP wrapper made before the session could leave the targets out of it.

    Raises:
        ValueError: Naming the targets DDP would still all-reduce, and how to order the set-up.
    """
    if getattr(session, "backend", "masked") != "sparse":
        return
    ddp = model
    while not isinstance(ddp, nn.parallel.DistributedDataParallel):
        inner = getattr(ddp, "_forward_module", None) or getattr(ddp, "module", None) or getattr(ddp, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is ddp:
            return
        ddp = inner
    tracked = [n for n in session.select(module) if n not in ddp.parameters_to_ignore]
    if tracked:
        raise ValueError(
            f"`{session.name}(backend='sparse')`: the model was wrapped in DistributedDataParallel before the "
            f"Sparsifier, so DDP all-reduces the dense weights the sparse layers replace ({', '.join(tracked[:3])}"
            f"{', ...' if len(tracked) > 3 else ''}). Create the Sparsifier on the unwrapped model first, then wrap it "
            "(DDP then leaves the sparse layers to the Sparsifier, which all-reduces their kept values), or use "
            "`backend='masked'`."
        )


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside Fabric's ``_FabricOptimizer`` or accelerate's ``AcceleratedOptimizer``.

    Raises:
        TypeError: If no ``torch.optim.Optimizer`` is found.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or Fabric's wrapper of one); got {optimizer!r}.")
    return inner


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class LoopHost(Host):
    """A :class:`~lightning_pai.core.session.Host` over a plain loop.

    ``torch.distributed`` collectives when a process group is initialized (DDP, Fabric), batches from ``data``,
    metrics to ``logger``.
    """

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        total_steps: int | None,
        data: Iterable[Any] | None,
        device: torch.device,
        logger: Callable[[dict[str, float], int], Any] | None,
    ) -> None:
        super().__init__(optimizers, schedulers, total_steps, "pass `total_steps=` (optimizer steps of the run)")
        self.data, self.device, self.logger = data, device, logger
        self.last_step = 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def is_global_zero(self) -> bool:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size <= 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def batches(self, n: int) -> list[Any]:
        if self.data is None:
            raise ValueError("This method scores on training batches: pass `data=` (an iterable of batches).")
        return [_to_device(b, self.device) for b in islice(iter(self.data), n)]

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.logger is not None and self.is_global_zero:
            self.logger(metrics, self.last_step if step is None else step)


class Sparsifier:
    """Run a lightning_pai method in your own training loop: ``sparsifier.step()`` replaces ``optimizer.step()``.

    ``method`` is any method object — ``RigL(...)``, ``PruneAtInit(...)``, ``LotteryTicket(...)``, ... — and
    the run is the same as under a Lightning ``Trainer``: the masks are set when the sparsifier is created
    (scored on ``data`` for data-driven scorers; decided on rank zero and broadcast when a
    ``torch.distributed`` process group is initialized, as under DDP or Lightning Fabric), every
    :meth:`step` masks the gradients (after your ``backward``; all-reduced already under DDP), steps the
    optimizer and runs the method's topology update when one is due, and :meth:`epoch_end` runs epoch-end
    updates and lottery rounds (prune, rewind). Masked weights, their gradients and their optimizer state
    stay exactly zero.

    Args:
        method: A method object (a ``lightning_pai`` method callback) or an engine ``Session``.
        model: The model: plain, DDP-wrapped, ``torch.compile``-d or set up by Lightning Fabric.
        optimizer: Its optimizer (plain or Fabric's); :meth:`step` calls its ``step()``.
        data: Training batches (an iterable, e.g. the ``DataLoader``): data-driven scorers (SNIP, GraSP) draw
            their first batches from it, and ``len(data)`` is the default ``steps_per_epoch``.
        total_steps: Optimizer steps of the whole run (methods with schedules need it: RigL, GMP, ...).
        steps_per_epoch: Optimizer steps per epoch (default ``len(data)``), for epoch-end updates (SET, SNFS).
        schedulers: Learning-rate schedulers; a lottery ticket rewinds them with the weights.
        logger: ``logger(metrics, step)`` receiving the method's metrics (e.g. Fabric's ``fabric.log_dict``).
        state: A :meth:`state_dict` to resume from: its masks and progress are used instead of new initial
            masks (nothing is scored, no weight is zeroed that the saved masks keep).

    Raises:
        ValueError: When the method needs something the loop did not give (``total_steps``, ``data``, ...).

    Example::

        sparsifier = Sparsifier(PruneAtInit("snip", 0.9), model, optimizer, data=loader)
        for epoch in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                sparsifier.step()
            sparsifier.epoch_end()
        torch.save({"model": model.state_dict(), "sparsity": sparsifier.state_dict()}, "ckpt.pt")
    """

    def __init__(
        self,
        method: Any,
        model: nn.Module,
        optimizer: Any,
        data: Iterable[Any] | None = None,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        schedulers: Sequence[Any] = (),
        logger: Callable[[dict[str, float], int], Any] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        session = method if isinstance(method, Session) else getattr(method, "session", None)
        if not isinstance(session, Session):
            raise TypeError(f"`method` must be a lightning_pai method (e.g. `RigL(...)`) or a Session; got {method!r}.")
        self.method, self.session = method, session
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        if steps_per_epoch is None and data is not None and hasattr(data, "__len__"):
            steps_per_epoch = len(data)
        self.steps_per_epoch = steps_per_epoch
        name = session.name
        if session.needs_epoch_length and steps_per_epoch is None:
            raise ValueError(
                f"`{name}` must know which optimizer step ends an epoch: pass `steps_per_epoch=` or a sized `data=`."
            )
        if isinstance(session, LotterySession):
            if session.step_rounds:
                raise ValueError(
                    f"`{name}(rewind_to={session.rewind_to!r})` ends rounds mid-epoch, which a plain loop cannot "
                    "validate at the right step: use rewind_to 'init', 'epoch:k', 'lr', 'none' or 'step:0' here (or "
                    "the Lightning callback)."
                )
            if session.epochs_per_round is None:
                raise ValueError(f"`{name}`: pass `epochs_per_round` (round 0's length in epochs) for a plain loop.")
            if session.rewind.kind == "step":
                session.check_steps(steps_per_epoch)
        device = next(self.module.parameters()).device
        self.host = LoopHost([unwrap_optimizer(optimizer)], schedulers, total_steps, data, device, logger)
        self._step = self._epoch = self._in_epoch = 0
        session.check(self.module)
        session.prepare(self.module)
        _check_sparse_ddp(session, model, self.module)
        if state is not None:  # as a resumed Trainer does: the saved masks, not new ones
            session.load_state_dict(dict(state["session"]))
            self._set_counters(state)
        session.start(self.module, self.host)
        session.epoch_start(self._epoch)
        session.step_start(self._step + 1)

    # ----------------------------------------------------------------- the loop
    def step(self, scaler: Any = None) -> Any:
        """Mask the gradients, ``optimizer.step()``, re-zero what the step touched, update the masks if due.

        Call it after ``backward`` (and gradient clipping, if any), where you would call ``optimizer.step()``.

        Args:
            scaler: A ``torch.amp.GradScaler``: the gradients are unscaled first, the step goes through
                ``scaler.step`` and ``scaler.update()`` follows (a step skipped for inf/NaN never updates masks).

        Returns:
            What the optimizer's ``step`` returned.

        Raises:
            RuntimeError: If an epoch-end update is still waiting: call :meth:`epoch_end` after every epoch.
        """
        t = self._step + 1
        pending = getattr(self.session, "pending", None)
        if pending is not None and pending[0] < t and self.session.needs_epoch_length:
            raise RuntimeError(
                f"`{self.session.name}` has an epoch-end update waiting since step {pending[0]}: call "
                "`sparsifier.epoch_end()` at the end of every epoch (after validation)."
            )
        if scaler is not None:
            scaler.unscale_(self.host.optimizers[0])
        last = self.steps_per_epoch is not None and self._in_epoch + 1 == self.steps_per_epoch
        self.session.before_step(t, last)
        if scaler is not None:
            out = scaler.step(self.optimizer)
            scaler.update()
        else:
            out = self.optimizer.step()
        self._step, self._in_epoch = t, self._in_epoch + 1
        self.host.last_step = t
        self.session.after_step(t)
        self.session.step_start(t + 1)
        return out

    def epoch_end(self, metric: float | None = None) -> None:
        """End the running epoch: epoch-end updates, the end of a lottery round (and the next one's prune and rewind).

        Call it after the epoch's validation, before iterating the next epoch's data (a lottery rewind restores
        the RNG that shuffles it).

        Args:
            metric: The monitored value of this epoch (e.g. validation accuracy), recorded in a lottery
                ticket's per-round ``results``.
        """
        if metric is not None:
            self.session.record(float(metric))
        self.session.epoch_end(self._epoch, self._step)
        self._epoch, self._in_epoch = self._epoch + 1, 0
        self.session.epoch_start(self._epoch)
        self.session.step_start(self._step + 1)

    # ----------------------------------------------------------------- results
    @property
    def masks(self) -> MaskSet:
        """The masks being enforced (a :class:`~lightning_pai.core.masks.MaskSet`)."""
        return self.session.masks

    @property
    def global_step(self) -> int:
        """Optimizer steps taken through this sparsifier."""
        return self._step

    @property
    def epoch(self) -> int:
        """The running epoch (0-based)."""
        return self._epoch

    @property
    def data_epoch(self) -> int:
        """The epoch whose data order to replay: pass it to a ``DistributedSampler``'s ``set_epoch``.

        It differs from :attr:`epoch` in a lottery ticket's rewound rounds, which replay the rewind point's order.
        """
        replay = getattr(self.session, "data_epoch", None)
        epoch = replay(self._epoch) if replay is not None else None
        return self._epoch if epoch is None else epoch

    def report(self) -> SparsityReport:
        """The current per-layer sparsity of the model, with its coverage."""
        return self.session.report(self.module)

    def close(self) -> None:
        """Remove the hooks on the model and the optimizer (the masks stay in :attr:`masks`)."""
        self.session.stop()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The method's state (masks, topology-update or lottery progress) and the loop counters."""
        return {
            "session": self.session.state_dict(),
            "step": self._step,
            "epoch": self._epoch,
            "in_epoch": self._in_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` into a running sparsifier: masks, progress and counters.

        The masks are applied at once, so load the model's saved weights *after* this (the initial masks may
        have zeroed weights the saved masks keep), or resume with ``Sparsifier(..., state=...)`` instead.
        """
        self.session.load_state_dict(dict(state["session"]))
        self._set_counters(state)
        self.session.train_start()
        self.session.step_start(self._step + 1)

    def _set_counters(self, state: Mapping[str, Any]) -> None:
        self._step, self._epoch, self._in_epoch = int(state["step"]), int(state["epoch"]), int(state["in_epoch"])
        self.host.last_step = self._step
