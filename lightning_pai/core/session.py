"""The sparse-training protocol, framework-free: one :class:`Session` per method run, driven by any loop.

A *session* owns everything a method does to a model: it computes the initial masks, enforces them around
every optimizer step, changes them on its schedule (topology updates, lottery rounds), and saves and
restores all of it (:meth:`Session.state_dict`). It never imports a training framework: the loop that
drives it is described by a :class:`Host` — the collectives, optimizers, data and loggers the loop offers.

The protocol, in the order a loop calls it::

    session.check(module)                       # bad target patterns fail before training
    session.prepare(module)                     # changes the method makes before the loop wraps the model
    session.start(module, host)                 # masks: restored, kept from a previous run, or initial
    session.train_start()                       # after a resumed loop loaded its optimizer state
    for each epoch:
        session.epoch_start(epoch)
        for each optimizer step t = 1, 2, ...:
            session.step_start(t)               # before the forward/backward passes of step t
            ... forward, backward (gradients accumulated and, under DDP, all-reduced) ...
            session.before_step(t, epoch_end)   # observe dense gradients, keep them for an update, mask them
            optimizer.step()                    # masked weights stay exactly zero
            session.after_step(t)               # topology update (if due)
        session.epoch_end(epoch, t)             # epoch-end updates, lottery round ends
    session.stop()                              # remove the hooks

Three adapters drive it: the Lightning callbacks (:mod:`lightning_pai.callbacks`), :class:`lightning_pai.Sparsifier`
(a plain PyTorch loop, Lightning Fabric, ``torch.distributed``) and :class:`lightning_pai.hf.SparsityCallback`
(the Hugging Face ``Trainer``). Collective decisions are made once, on rank zero, and broadcast through
:meth:`Host.broadcast`, so every rank holds the same masks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.dst import Plan, TopologyUpdater
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.nm import NMSpec, nm_fits, resolve_nm
from lightning_pai.core.pruning import sparse_init_
from lightning_pai.core.report import SparsityReport, coverage, skipped_line, sparsity_report
from lightning_pai.core.schedules import Cubic, resolve_window
from lightning_pai.core.sharding import full_dict
from lightning_pai.core.sparse_train import BACKENDS, SparseMaskSet, check_sparse_targets, ignore_in_ddp
from lightning_pai.core.targets import FROZEN, Selectors, select_targets, target_layouts
from lightning_pai.core.validation import check_choice


class Host:
    """What a training loop offers a :class:`Session`: collectives, optimizers, schedule length, data, loggers.

    The base class is one process with no data and no loggers; adapters override what their loop knows.

    Args:
        optimizers: The loop's optimizers (the underlying ``torch.optim`` objects).
        schedulers: Its learning-rate schedulers (rewound with the weights by lottery tickets).
        total_steps: Optimizer steps of the whole run (schedules are fractions of it), or None if unknown.
        length_hint: What to tell a user whose run has no known length (e.g. ``"pass `total_steps=`"``).
    """

    def __init__(
        self,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        schedulers: Sequence[Any] = (),
        total_steps: int | None = None,
        length_hint: str = "pass the run's number of optimizer steps",
    ) -> None:
        self._optimizers = list(optimizers)
        self._schedulers = list(schedulers)
        self._total_steps = total_steps
        self.length_hint = length_hint

    @property
    def world_size(self) -> int:
        """Number of processes training the model together (their masks must be identical)."""
        return 1

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is rank zero (it decides, prints and logs)."""
        return True

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose steps the masks are enforced around."""
        return self._optimizers

    @property
    def schedulers(self) -> list[Any]:
        """Learning-rate schedulers (objects with ``state_dict``/``load_state_dict``)."""
        return self._schedulers

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps of the whole run, or None when the loop cannot tell."""
        return self._total_steps

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (a collective: every rank calls it)."""
        return obj

    def all_reduce_mean(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place (a collective; one bucket for all).

        Uses the default ``torch.distributed`` process group, which every loop here (Lightning, Fabric, a plain
        ``torch.distributed`` loop, the Hugging Face ``Trainer``) initialises; a no-op on one process.
        """
        if self.world_size <= 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def batches(self, n: int) -> list[Any]:
        """The first ``n`` training batches, on the model's device (for data-driven scorers).

        Raises:
            ValueError: When the loop has no data to offer.
        """
        raise ValueError("This training loop provides no batches to score on; pass the training data.")

    def default_loss(self, user: str = "the scorer") -> Callable[[nn.Module, Any], Tensor] | None:
        """The loop's own loss ``fn(module, batch)`` for ``user`` (a scorer); None: cross-entropy of ``forward_fn``."""
        return None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send ``metrics`` to the loop's loggers (rank zero); the base class has none."""

    def echo(self, text: str) -> None:
        """Print ``text`` on rank zero."""
        if self.is_global_zero:
            print(text)

    def warn(self, text: str) -> None:
        """Warn on rank zero."""
        if self.is_global_zero:
            warnings.warn(text, UserWarning, stacklevel=3)


class Session:
    """One method's run over one model: masks, their enforcement, their changes and their state.

    The base class keeps the masks it was started with (restored from a checkpoint, kept from a previous run
    with the same session, or :meth:`initial_masks`, decided on rank zero and broadcast) and enforces them:
    gradients of masked weights are zeroed before every optimizer step (inside backward on one process,
    while each gradient is still in cache), the weights are re-zeroed after steps of optimizers that would
    move them, and the masked entries of the optimizer state are zeroed whenever the masks change.

    Args:
        name: The method's name, used in messages (e.g. ``"RigL"``).
        include: Prunable-parameter selection, see :func:`~lightning_pai.core.targets.select_targets`.
        exclude: Parameters removed from the selection.
        verbose: Print the sparsity table (rank zero) when the masks are set or change.
        frozen: Selected parameters with ``requires_grad=False``: ``"skip"`` leaves them dense (named in a
            warning and in the report), ``"prune"`` prunes them once at the start (methods whose masks follow
            gradients or regrow weights refuse them), ``"error"`` refuses them (see :data:`FROZEN`).
        backend: ``"masked"`` (dense weights, masks enforced around each step) or ``"sparse"``: the targets
            train as CSR matrices from :meth:`start` to :meth:`stop`, only their kept values stored, stepped and
            all-reduced (``nn.Linear`` and HF ``Conv1D`` targets; see :mod:`lightning_pai.core.sparse_train`).
    """

    def __init__(
        self,
        name: str,
        *,
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = True,
        frozen: str = "skip",
        backend: str = "masked",
    ):
        self.name = name
        self.include, self.exclude, self.verbose = include, exclude, verbose
        check_choice(frozen, FROZEN, "frozen")
        self.frozen = frozen
        check_choice(backend, BACKENDS, "backend")
        self.backend = backend
        self.skipped: list[str] = []  # frozen parameters left dense (`frozen="skip"`), found at `start`
        self.nm_unfit: list[str] = []  # targets N:M groups cannot fit (`nm_incompatible`), found at `start`
        self.masks: MaskSet | None = None
        self.module: nn.Module | None = None
        self.host: Host = Host()
        self._restored: dict[str, Tensor] | None = None
        self._in_backward = False

    # ------------------------------------------------------------------ to override
    @property
    def initial_pruner(self) -> Any:
        """The :class:`~lightning_pai.core.pruning.Pruner` that decides the initial masks, if any."""
        return None

    def _load_masks(self, masks: MaskSet, decide: Callable[[], Any]) -> bool:
        """Fill ``masks``: restored from a checkpoint, kept from a previous start, else ``decide()`` (returns True).

        ``decide`` returns a mask state (e.g. decided on rank zero and broadcast); it runs only on a fresh start.
        """
        if self._restored is not None:
            masks.load_state_dict(self._restored)
            self._restored = None
            return False
        if self.masks is not None:
            masks.load_state_dict(self.masks.state_dict())
            return False
        masks.load_state_dict(decide())
        return True

    def masks_decided(self) -> None:
        """Apply the initial pruner's ``weight_init`` (sparse fan-in, isometry) to the decided masks.

        Called once the initial masks are decided and broadcast, before they are applied (a fresh run only);
        the draw is seeded, so every rank gets the same weights.
        """
        pruner = self.initial_pruner
        if pruner is not None and pruner.weight_init is not None:
            masks = self.masks
            sparse_init_(masks.params, dict(masks.items()), masks.layouts, pruner.weight_init, pruner.seed)

    def initial_masks(self, masks: MaskSet) -> dict[str, Tensor]:
        """The masks to start with (computed on every rank; rank zero's are used). ``masks``: all kept."""
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in masks.params.items()}

    @property
    def dense_gradients(self) -> bool:
        """Whether masked weights' gradients reach the optimizer (their weights are re-zeroed after each step)."""
        return False

    def backward_masking(self) -> bool:
        """Whether gradients may be masked inside backward (False: some step reads every dense gradient)."""
        return True

    def needs_dense_grads(self, step: int) -> bool:
        """Whether optimizer step ``step`` must see the dense gradients (e.g. a gradient-growth update)."""
        return False

    # ------------------------------------------------------------------ protocol
    @property
    def nm_spec(self) -> NMSpec:
        """The method's N:M layers (``"2:4"``, ``{glob: "N:M"}`` or None)."""
        return None

    @property
    def nm_incompatible(self) -> str:
        """What becomes of targets the N:M groups cannot fit (see :data:`~lightning_pai.core.nm.NM_INCOMPATIBLE`)."""
        return "error"

    def nm_unfit_targets(self, module: nn.Module, targets: dict[str, nn.Parameter]) -> list[str]:
        """The ``targets`` the N:M groups cannot fit (none without ``nm``).

        Raises:
            ValueError: If there are some and ``nm_incompatible`` is ``"error"``, or an ``nm`` glob matches nothing.
        """
        if self.nm_spec is None:
            return []
        shapes, layouts = {n: p.shape for n, p in targets.items()}, target_layouts(module, list(targets))
        strict = "error" if self.nm_incompatible == "error" else "unstructured"  # globs checked on every target
        resolved = resolve_nm(self.nm_spec, shapes, layouts, strict)
        return [n for n, (_, m) in resolved.items() if not nm_fits(shapes[n], layouts[n], m)]

    def frozen_conflict(self) -> str | None:
        """Why the method cannot prune frozen parameters (None: it can, their masks never need a gradient)."""
        return None

    def sparse_conflict(self) -> str | None:
        """Why the method cannot train with ``backend="sparse"`` (None: it can)."""
        return None

    def check_backend(self) -> None:
        """Raise when ``backend="sparse"`` was asked of a method that cannot train that way.

        Raises:
            ValueError: Naming ``backend``, its values and the reason.
        """
        conflict = self.sparse_conflict() if self.backend == "sparse" else None
        if conflict is not None:
            raise ValueError(
                f"`{self.name}` cannot train with `backend='sparse'`: it {conflict}. Use `backend='masked'` (the "
                f"default; `backend` is one of {', '.join(map(repr, BACKENDS))})."
            )

    def select(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The targets in ``module``, frozen ones handled as ``frozen`` says (see :func:`select_targets`).

        With ``nm_incompatible="dense"`` the layers the N:M groups cannot fit are left out (dense).
        """
        targets = select_targets(module, self.include, self.exclude, self.frozen)
        if self.nm_incompatible == "dense":  # layers N:M groups cannot fit are left out, dense
            unfit = self.nm_unfit_targets(module, targets)
            targets = {n: p for n, p in targets.items() if n not in unfit}
        return targets

    def check(self, module: nn.Module) -> None:
        """Raise before training when the target patterns match nothing, or N:M groups cannot fit a layer."""
        targets = self.select(module)
        frozen = [n for n, p in targets.items() if not p.requires_grad]
        conflict = self.frozen_conflict() if frozen else None
        if conflict is not None:
            raise ValueError(
                f"`{self.name}` {conflict}, which a frozen parameter (`requires_grad=False`) cannot follow; frozen "
                f"targets: {', '.join(frozen)}. Leave them dense with `frozen='skip'` (the default), exclude them "
                f"(`exclude={frozen!r}`), or unfreeze them before fitting."
            )
        if self.nm_spec is not None:
            layouts = target_layouts(module, list(targets))
            resolve_nm(self.nm_spec, {n: p.shape for n, p in targets.items()}, layouts, self.nm_incompatible)
        if self.backend == "sparse":
            self.check_backend()
            check_sparse_targets(module, targets, self.name)

    def prepare(self, module: nn.Module) -> None:
        """Change ``module`` before the loop wraps it (DDP, FSDP), if the method must (e.g. freeze weights).

        Called after :meth:`check` and before the model is wrapped. With ``backend="sparse"`` the targets are left
        out of DDP (the session all-reduces their kept values); otherwise the base class changes nothing.
        """
        if self.backend == "sparse":
            ignore_in_ddp(module, self.select(module))

    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Set the masks on ``module`` and start enforcing them around ``host``'s optimizers.

        With ``backend="sparse"`` the targets then train as CSR matrices (until :meth:`stop`).
        """
        if isinstance(self.masks, SparseMaskSet):  # a start without a stop: the targets are dense again first
            self.masks = self.masks.revert()
        self.module, self.host = module, host if host is not None else Host()
        params = self.select(module)
        masks = MaskSet(params, layouts=target_layouts(module, list(params)))
        self._note_targets(module, params)
        if self._load_masks(masks, lambda: self.from_rank_zero(self.initial_masks(masks))):
            self.masks = masks
            self.masks_decided()
        self.masks = masks
        if self.backend == "sparse":
            self.masks = SparseMaskSet(masks, module, self.host.optimizers)
            self.masks.broadcast_values(self.host)
            self._in_backward = False
            self._announce()
            return
        dense = self.dense_gradients
        for opt in self.host.optimizers:
            if not dense:
                masks.mask_optimizer_state_(opt)
            masks.attach(opt, mask_grads=False, mask_weights=dense)
        self._in_backward = not dense and self.host.world_size == 1 and not masks._sharded and self.backward_masking()
        if self._in_backward:
            masks.mask_grads_in_backward()
        masks.apply_()
        self._announce()

    def _note_targets(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        """Record the frozen parameters left dense (``frozen="skip"``) and the targets N:M groups cannot fit."""
        if self.frozen == "skip":
            every = select_targets(module, self.include, self.exclude)
            self.skipped = [n for n, p in every.items() if n not in params and not p.requires_grad]
        self.nm_unfit = self.nm_unfit_targets(module, select_targets(module, self.include, self.exclude, self.frozen))

    def _announce(self) -> None:
        """Warn about low coverage, unfit N:M layers and skipped frozen parameters; log and print the masks."""
        self._warn_coverage()
        if self.nm_unfit:
            self.host.warn(f"`{self.name}`: {self._nm_line()}")
        if self.skipped:
            self.host.warn(
                f"`{self.name}`: {skipped_line(self.skipped)}. Pass `frozen='prune'` to prune them too, or exclude "
                f"them to silence this warning (`exclude={self.skipped[:5]!r}`)."
            )
        self.masks_changed()

    def train_start(self) -> None:
        """Clean the optimizer state again once a resumed loop has loaded it (a no-op for a matching checkpoint)."""
        if not self.dense_gradients:
            for opt in self.host.optimizers:
                self.masks.mask_optimizer_state_(opt)

    def catch_up(self, step: int) -> None:
        """Do work due after step ``step`` that an interrupted run skipped (a resumed fit, before its next step)."""

    def step_start(self, step: int) -> None:
        """Before the forward/backward passes of optimizer step ``step`` (1-based)."""
        if self._in_backward:
            self.masks.grad_hooks_active = not self.needs_dense_grads(step)
        elif isinstance(self.masks, SparseMaskSet):  # dense gradients computed only for a step that reads them
            self.masks.capture(self.needs_dense_grads(step))

    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """After backward, before ``optimizer.step()``: mask the gradients (unless masked inside backward).

        With ``backend="sparse"`` nothing is masked; under DDP the kept values' gradients are all-reduced here.
        """
        if isinstance(self.masks, SparseMaskSet):
            self.masks.reduce_grads(self.host, step)
        if not self.dense_gradients and not self.masks.grad_hooks_active:
            self.masks.mask_grads_()

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()`` of step ``step``."""

    def epoch_start(self, epoch: int) -> None:
        """At the start of training epoch ``epoch`` (0-based)."""

    def epoch_end(self, epoch: int, step: int) -> None:
        """At the end of epoch ``epoch`` (after validation), ``step`` optimizer steps into the run."""

    def record(self, value: float) -> None:
        """A value of the metric the method monitors (the lottery ticket's per-round results); else ignored."""

    @property
    def needs_epoch_length(self) -> bool:
        """Whether the method must know how many optimizer steps an epoch has (e.g. to spot an epoch's last step)."""
        return False

    def stop(self) -> None:
        """Remove every hook the session registered (masks and state are kept); sparse targets become dense again."""
        if isinstance(self.masks, SparseMaskSet):
            self.masks = self.masks.revert()
        if self.masks is not None:
            self.masks.detach()

    # ------------------------------------------------------------------ helpers
    def from_rank_zero(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rank zero's ``masks`` on every rank (as CPU tensors when broadcast; unchanged on one process)."""
        if self.host.world_size <= 1:
            return masks
        return self.host.broadcast({n: m.cpu() for n, m in masks.items()}, src=0)

    @property
    def has_masks(self) -> bool:
        """Whether the session holds masks, started or only restored (no copy is made to tell)."""
        return self.masks is not None or self._restored is not None

    def current_masks(self) -> dict[str, Tensor] | None:
        """The masks by name (CPU bool tensors) whether started or only restored; None before either."""
        if self.masks is not None:
            return self.masks.state_dict()
        return None if self._restored is None else dict(self._restored)

    def report(
        self, module: nn.Module | None = None, *, effective: bool = False, example_inputs: Any = None
    ) -> SparsityReport:
        """The current per-layer sparsity (see :func:`~lightning_pai.core.report.sparsity_report`).

        Args:
            module: The model the masks belong to (the report then says how much of it they cover).
            effective: Also report effective sparsity (Vysogorets & Kempe 2021), on ``example_inputs``.
            example_inputs: One input of the model, for ``effective`` on any graph (without: plain chains only).

        Raises:
            RuntimeError: Before the session has masks.
        """
        masks = self.masks if self.masks is not None else self._restored
        if masks is None:
            raise RuntimeError(f"`{self.name}` has no masks yet: they are set when training starts.")
        report = sparsity_report(module, masks, effective=effective, example_inputs=example_inputs)
        if self.nm_unfit:
            report = replace(report, notes=(*report.notes, self._nm_line()))
        return replace(report, skipped=tuple(self.skipped)) if self.skipped else report

    def _nm_line(self) -> str:
        """The report's line naming the targets N:M groups cannot fit, and what became of them."""
        what = {"dense": "left dense", "unstructured": "pruned unstructured to the same sparsity"}[self.nm_incompatible]
        plural = "s" if len(self.nm_unfit) > 1 else ""
        return (
            f"N:M: {len(self.nm_unfit)} layer{plural} the groups cannot fit (input channels not a multiple of M), "
            f"{what} (`nm_incompatible={self.nm_incompatible!r}`): {', '.join(self.nm_unfit)}."
        )

    def masks_changed(self, step: int | None = None) -> None:
        """Log ``sparsity/*`` metrics (incl. coverage) and, if verbose, print the table (rank zero)."""
        if not self.host.is_global_zero:
            return
        report = self.report(self.module)
        self.host.log(report.metrics(), step)
        if self.verbose:
            self.host.echo(f"{self.name}: {report.summary()}\n{report}")

    def _warn_coverage(self) -> None:
        cover = coverage(self.module, self.masks.names)
        if cover.matrix_fraction < 0.5:
            self.host.warn(
                f"`{self.name}`: {cover}. The reported sparsity is of the targeted weights only; "
                "widen the targets with `include=` (name patterns or module types) if that is not intended."
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The masks (CPU bool tensors by name; None before the first start)."""
        return {"masks": self.current_masks()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: applied at once when started, else at :meth:`start`."""
        masks = state.get("masks")
        if masks is None:
            return
        if self.masks is not None:
            self.masks.load_state_dict(masks)
            self.masks.apply_()
        else:
            self._restored = dict(masks)


class PruneSession(Session):
    """Masks decided once, at the start, by a :class:`~lightning_pai.core.pruning.Pruner`, then kept.

    Args:
        name: The method's name, used in messages.
        pruner: Scores the targets and keeps the top ones.
        include, exclude, verbose, frozen: As for :class:`Session`.
    """

    def __init__(self, name: str, pruner: Any, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.pruner = pruner

    @property
    def nm_spec(self) -> NMSpec:
        """The pruner's N:M layers."""
        return self.pruner.nm

    @property
    def nm_incompatible(self) -> str:
        """The pruner's choice for layers the N:M groups cannot fit."""
        return self.pruner.nm_incompatible

    def initial_masks(self, masks: MaskSet) -> dict[str, Tensor]:
        """Score the targets with the pruner's method and keep the top ones."""
        return self.pruner.masks(self.module, masks, self.host, self.name)

    @property
    def initial_pruner(self) -> Any:
        """The pruner."""
        return self.pruner

    def report(
        self, module: nn.Module | None = None, *, effective: bool = False, example_inputs: Any = None
    ) -> SparsityReport:
        """As :meth:`Session.report`; a pruner that pruned to an effective sparsity adds it on its own input."""
        report = super().report(module, effective=effective, example_inputs=example_inputs)
        follow = getattr(self.pruner, "effective_masks", None)
        if effective or module is None or follow is None:
            return report
        eff = follow(module, dict((self.masks if self.masks is not None else self._restored).items()))
        if eff is None:
            return report
        rows = [replace(r, effective_kept=int(torch.count_nonzero(eff[r.name]))) for r in report.rows]
        return replace(report, rows=rows)


class TopologySession(Session):
    """A session whose masks change during training, as a :class:`~lightning_pai.core.dst.Plan` says.

    At every step the dense gradients (accumulated, all-reduced, before masking and clipping) go to
    :meth:`TopologyUpdater.observe <lightning_pai.core.dst.TopologyUpdater.observe>`; on an update step they
    are kept for the update, which runs after that optimizer step (:meth:`after_step`) or at the end of the
    epoch (:meth:`epoch_end`, schedules with ``at_epoch_end``). A method that grows weights skips an update
    whose step had non-finite gradients and never updates at the last step. New masks are computed on every
    rank and rank zero's are used. The updater's state and an update still due at an epoch's end are saved.

    Args:
        name: The method's name, used in messages.
        plan: The method (update schedule, pruning and rewiring stages).
        initial: How the initial masks are made (a :class:`~lightning_pai.core.pruning.Pruner`), or None
            to start dense.
        seed: Seed of random rules.
        beta: Decay of the updater's own momentum buffer (optimizers without momentum).
        include, exclude, verbose, frozen: As for :class:`Session`.
    """

    def __init__(
        self, name: str, plan: Plan, *, initial: Any = None, seed: int = 0, beta: float = 0.9, **kwargs: Any
    ) -> None:
        super().__init__(name, **kwargs)
        plan.validate()
        self.plan, self.initial, self.seed, self.beta = plan, initial, int(seed), float(beta)
        self.check_backend()
        self.updater: TopologyUpdater | None = None
        self.pending: tuple[int, dict[str, Tensor] | None] | None = None
        self.total_steps = 0
        self._lr_slots: dict[str, tuple[int, int] | None] | None = None
        self._restored_updater: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Check the run's length, create (or restore) the updater, set the masks."""
        host = host if host is not None else Host()
        if len(host.optimizers) > 1:
            raise ValueError(f"`{self.name}` supports one optimizer; the training loop uses {len(host.optimizers)}.")
        total = host.total_steps
        if total is None or total == float("inf"):
            raise ValueError(f"`{self.name}` schedules its updates over the whole run: {host.length_hint}.")
        self.total_steps = int(total)
        self._make_updater(host)
        prune = self.plan.prune
        if prune is not None and isinstance(prune.sparsity, Cubic):
            resolve_window(prune.sparsity.start, prune.sparsity.end, self.total_steps)
        self._lr_slots = None  # found again for this run's optimizers (see _learning_rates)
        super().start(module, host)
        self.updater.bind(dict(self.masks.items()), self.masks.layouts)

    def _make_updater(self, host: Host) -> TopologyUpdater:
        if self.updater is None:
            self.updater = TopologyUpdater(self.plan, seed=self.seed, beta=self.beta)
            if self._restored_updater is not None:
                self.updater.load_state_dict(self._restored_updater)
                self._restored_updater = None
        self.updater.use_optimizer(host.optimizers[0] if host.optimizers else None)
        return self.updater

    def initial_masks(self, masks: MaskSet) -> dict[str, Tensor]:
        """Dense without an initial pruner, else its masks (e.g. random ERK masks at the method's sparsity)."""
        if self.initial is None:
            return super().initial_masks(masks)
        return self.initial.masks(self.module, masks, self.host, self.name)

    @property
    def initial_pruner(self) -> Any:
        """The pruner of the initial masks (None: a dense start)."""
        return self.initial

    def frozen_conflict(self) -> str | None:
        """Regrowing weights, or reading gradients during training, needs every target to train."""
        if self.plan.rewire is not None:
            return "regrows weights during training (a frozen weight regrown from zero would stay zero)"
        if self.plan.needs() or self.plan.observers():
            return "decides its masks from gradients during training"
        return None

    def sparse_conflict(self) -> str | None:
        """Rules that read every step's dense gradients or momentum, or change weights after each step."""
        plan, needs = self.plan, self.plan.needs()
        if plan.step_rule is not None:
            return f"changes every weight after each step (step rule {plan.step_rule!r})"
        if "momentum" in needs or plan.observers():
            return "reads dense gradients or momentum at every step"
        if "grads" in needs and plan.when.at_epoch_end:
            return "reads the dense gradients of an epoch's last step, which is known only once it ran"
        return None

    @property
    def nm_spec(self) -> NMSpec:
        """The plan's N:M layers (``options["nm"]``)."""
        return self.plan.options.get("nm")

    @property
    def nm_incompatible(self) -> str:
        """The plan's choice for layers the N:M groups cannot fit (``options["nm_incompatible"]``)."""
        return self.plan.options.get("nm_incompatible", "error")

    @property
    def dense_gradients(self) -> bool:
        """True when a momentum rule reads the optimizer's momentum of inactive weights (SNFS)."""
        return self.updater is not None and self.updater.dense_gradients

    def backward_masking(self) -> bool:
        """False when every step's dense gradients are read, or an epoch-end update needs them."""
        updater = self.updater
        if updater.reads_every_step:
            return False
        return not (updater.needs_grads and updater.plan.when.at_epoch_end)  # its last step is known late

    @property
    def needs_epoch_length(self) -> bool:
        """Whether updates happen at epoch ends (decided at each epoch's last step)."""
        return self.plan.when.at_epoch_end

    def needs_dense_grads(self, step: int) -> bool:
        """Whether ``step`` is an update step whose rules read the dense gradients."""
        return self.updater.needs_grads and self.updater.is_update(step, self.total_steps, False)

    @property
    def updates(self) -> int:
        """Number of topology updates applied so far."""
        if self.updater is not None:
            return self.updater.updates
        return int((self._restored_updater or {}).get("updates", 0))

    @property
    def itop(self) -> float:
        """Fraction of the targeted weights that have been active at some point (Liu et al. 2021)."""
        return 0.0 if self.updater is None else self.updater.itop

    # ------------------------------------------------------------------ stepping
    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """Observe the dense gradients and, on an update step, keep them for the update; then mask them."""
        updater = self.updater
        if isinstance(self.masks, SparseMaskSet):
            self.masks.reduce_grads(self.host, step)
        grads = self.masks.grads()
        complete = len(grads) == len(self.masks)
        if complete and updater.observes_every_step:  # sharded: on gathered tensors (every step, documented)
            updater.observe(full_dict(self.masks.weights()), full_dict(grads))
        if updater.is_update(step, self.total_steps, epoch_end):
            self.pending = None
            grows = updater.plan.rewire is not None
            grads = full_dict(grads) if complete else grads  # sharded: gathered once per update
            finite = complete and bool(torch.stack([g.isfinite().all() for g in grads.values()]).all())
            if finite or not grows:
                kept = {n: g.detach().clone() for n, g in grads.items()} if updater.needs_grads else None
                self.pending = (step, kept)
        super().before_step(step, epoch_end)

    def after_step(self, step: int) -> None:
        """Apply the plan's step rule (if any), then the update decided at ``step`` (unless due at the epoch end)."""
        if self.updater.step_rule_due(step):
            self.updater.apply_step_rule(self.masks.params, dict(self.masks.items()), step, self._learning_rates())
        if not self.plan.when.at_epoch_end:
            self.run_pending(step)

    def _learning_rates(self) -> dict[str, float]:
        """Each target's learning rate: its parameter group's ``lr`` (0 if no optimizer holds it).

        Where each target sits (optimizer, group) is found once per start; the group is read by position every
        step, since ``load_state_dict`` (a lottery rewind, a resume) replaces the group dicts.
        """
        if self._lr_slots is None:
            where = {id(p): (i, j) for i, opt in enumerate(self.host.optimizers)
                     for j, g in enumerate(opt.param_groups) for p in g["params"]}  # fmt: skip
            self._lr_slots = {n: where.get(id(p)) for n, p in self.masks.params.items()}
        opts = self.host.optimizers
        return {n: 0.0 if s is None else float(opts[s[0]].param_groups[s[1]]["lr"]) for n, s in self._lr_slots.items()}

    def epoch_end(self, epoch: int, step: int) -> None:
        """Run an epoch-end update decided at the epoch's last step ``step``."""
        if self.plan.when.at_epoch_end:
            self.run_pending(step)
        self.pending = None

    def catch_up(self, step: int) -> None:
        """An epoch-end update saved in a checkpoint taken after the epoch's last step, before its end."""
        self.run_pending(step)

    def run_pending(self, step: int) -> None:
        """Apply the update decided at optimizer step ``step``, if one is due (rank zero's masks win)."""
        if self.pending is None or self.pending[0] != step:
            return
        step, grads = self.pending
        self.pending = None
        masks, updater = self.masks, self.updater
        if grads is not None:
            grads = {n: g.to(masks[n].device) for n, g in grads.items()}
        old = {n: m.clone() for n, m in masks.items()}
        momentum = updater.current_momentum(masks.params)
        weights = full_dict(masks.weights())  # sharded: gathered (collective)
        momentum = None if momentum is None else full_dict(momentum)
        new = updater.compute(step, self.total_steps, weights, old, grads, momentum)
        fill = "mean" if updater.dense_gradients else "zero"
        if updater.dropped is not None:  # `Rewire.regrown="zero"`: what was dropped restarts at zero, regrown or not
            dropped = self.from_rank_zero(updater.dropped)
            masks.update_({n: m.to(old[n].device) for n, m in dropped.items()}, self.host.optimizers, fill=fill)
        new = self.from_rank_zero(new)
        new = {n: m.to(old[n].device) for n, m in new.items()}
        masks.update_(new, self.host.optimizers, fill=fill)
        update = updater.record(old, new)
        metrics = {"sparsity/global": 1.0 - masks.density, "sparsity/itop": updater.itop}
        metrics["dst/dropped"] = float(sum(update.dropped.values()))
        metrics["dst/grown"] = float(sum(update.grown.values()))
        if self.plan.rewire is not None:
            metrics["dst/fraction"] = self.plan.rewire.fraction(step, self.total_steps)
        self.host.log(metrics, step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, the updater's state and an update still due at the epoch's end."""
        state = super().state_dict()
        if self.updater is not None:
            state["updater"] = self.updater.state_dict()
        elif self._restored_updater is not None:
            state["updater"] = self._restored_updater
        if self.pending is not None:
            step, grads = self.pending
            state["pending"] = (step, None if grads is None else {n: g.cpu() for n, g in grads.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.pending = state.get("pending")
        if state.get("updater") is None:
            return
        if self.updater is not None:
            self.updater.load_state_dict(state["updater"])
            if self.masks is not None:  # already running: back onto the masks' devices
                self.updater.bind(dict(self.masks.items()), self.masks.layouts)
        else:
            self._restored_updater = state["updater"]
