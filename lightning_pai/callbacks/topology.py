"""The Lightning adapter of :class:`~lightning_pai.core.session.TopologySession`: masks that change in training.

:class:`TopologyCallback` is the base of every method whose masks change during training; a method is its
:meth:`~TopologyCallback.plan` (registered rules and schedules, see :mod:`lightning_pai.core.dst`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.dst import Plan, TopologyUpdater
from lightning_pai.core.nm import NMSpec, check_nm_incompatible, nm_sparsity
from lightning_pai.core.pruning import SPARSE_INITS, Pruner
from lightning_pai.core.scorers import get_scorer
from lightning_pai.core.session import TopologySession
from lightning_pai.core.sparse_train import BACKENDS
from lightning_pai.core.targets import Selectors
from lightning_pai.core.validation import check_choice, check_number, check_sparsity


class TopologyCallback(SparseCallback):
    """Base of the callbacks that change the masks during training; subclasses only say *what* (:meth:`plan`).

    The engine (:class:`~lightning_pai.core.session.TopologySession`) reads every step's dense gradients
    (accumulated, all-reduced under DDP, before masking and clipping), runs the plan's updates after their
    step or at the epoch's end (after validation), skips a growing update whose step had non-finite
    gradients, decides new masks on rank zero, and saves masks and the updater's state in the checkpoint.

    Args:
        sparsity: Final fraction of the targeted weights removed.
        distribution: Per-layer budgets of the initial masks.
        init: ``"random"`` or a registered scorer for the initial masks.
        seed: Seed of the initial masks and of random rules.
        beta: Decay of the updater's own momentum buffer (used when the optimizer has no momentum).
        include: Prunable parameters, see :func:`~lightning_pai.core.targets.select_targets`.
        exclude: Parameters left dense.
        verbose: Print the sparsity table at fit start (rank zero).
        nm: N:M structured sparsity (``"2:4"`` or ``{glob: "N:M"}``, see :mod:`lightning_pai.core.nm`); the
            other layers follow ``sparsity``.
        resume: Checkpoint state saved under other arguments: None refuses, ``"checkpoint"`` uses it, ``"recompute"``
            ignores it (see :class:`~lightning_pai.TargetOptions`).
        frozen: Frozen (``requires_grad=False``) targets: ``"skip"`` (default) leaves them dense, ``"prune"``
            prunes them, ``"error"`` refuses (see :class:`~lightning_pai.TargetOptions`).
        nm_incompatible: Layers the ``nm`` groups cannot fit (input channels not a multiple of ``M``):
            ``"error"`` (default) refuses before training, ``"dense"`` leaves them dense, ``"unstructured"``
            prunes them unstructured to the pattern's sparsity; they are named in a warning and in the report.
        weight_init: None, ``"sparse_fan_in"`` or ``"isometry"``: re-draw the kept weights for the initial masks
            (see :func:`lightning_pai.core.pruning.sparse_init_`; dense starts are left alone).
        backend: ``"masked"`` (default: dense weights, masks enforced around each step) or ``"sparse"``: the
            ``nn.Linear`` targets train as CSR matrices, only their kept values stored and stepped (see
            :mod:`lightning_pai.core.sparse_train`).
    """

    #: The engine session the method runs in (a subclass adds its own work, e.g. FreeTickets' tickets).
    session_class: ClassVar[type[TopologySession]] = TopologySession

    def __init__(
        self,
        sparsity: float | None,
        *,
        distribution: str,
        init: str = "random",
        seed: int = 0,
        beta: float = 0.9,
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = True,
        nm: NMSpec = None,
        resume: str | None = None,
        frozen: str = "skip",
        nm_incompatible: str = "error",
        weight_init: str | None = None,
        backend: str = "masked",
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose, resume=resume, frozen=frozen)
        check_choice(weight_init, SPARSE_INITS, "weight_init", optional=True)
        check_choice(backend, BACKENDS, "backend")
        self.backend = backend
        self.weight_init = weight_init
        self.nm, self.nm_incompatible = nm, check_nm_incompatible(nm_incompatible)
        self.sparsity = check_sparsity(nm_sparsity(sparsity, nm))
        get_distribution(distribution)
        get_scorer(init, "init")
        self.beta = check_number(beta, "beta", 0.0, 1.0, high_open=True, what="the momentum decay")
        self.distribution, self.init, self.seed = distribution, init, int(seed)

    # ------------------------------------------------------------- to override
    def plan(self) -> Plan:
        """The method: update schedule, pruning and rewiring stages (see :class:`~lightning_pai.core.dst.Plan`)."""
        raise NotImplementedError

    @property
    def initial_sparsity_of_masks(self) -> float:
        """Sparsity of the initial masks (gradual methods start below their final ``sparsity``)."""
        return self.sparsity

    def _check(self) -> None:
        """Build the session once so that bad arguments fail in ``__init__``."""
        self.build_session()

    def build_session(self) -> TopologySession:
        """The engine session: this plan, initial masks from ``init`` at the starting sparsity (dense at 0)."""
        start = self.initial_sparsity_of_masks
        nm = {"nm": self.nm, "nm_incompatible": self.nm_incompatible}
        initial = None
        if start > 0:
            initial = Pruner(self.init, start, self.distribution, seed=self.seed, weight_init=self.weight_init, **nm)
        plan = self.plan()
        return self.session_class(
            type(self).__name__,
            replace(plan, options={**plan.options, "nm_incompatible": self.nm_incompatible}),
            initial=initial,
            seed=self.seed,
            beta=self.beta,
            backend=self.backend,
            **self.session_options(),
        )

    # ------------------------------------------------------------- progress
    @property
    def updater(self) -> TopologyUpdater:
        """The engine object that owns the method's state (created at fit start)."""
        if self.session.updater is None:
            raise RuntimeError(f"`{type(self).__name__}` has no updater yet: it is created when `trainer.fit` starts.")
        return self.session.updater

    @property
    def updates(self) -> int:
        """Number of topology updates applied so far."""
        self._collect_handoff()
        return self.session.updates

    @property
    def itop(self) -> float:
        """Fraction of the targeted weights that have been active at some point (Liu et al. 2021)."""
        return self.session.itop

    def target_sparsity(self, step: int) -> float:
        """The pruning stage's target sparsity ``s_t`` at optimizer step ``step`` of the running fit.

        Raises:
            ValueError: If the method has no pruning stage.
        """
        prune = self.plan().prune
        if prune is None:
            raise ValueError(f"`{type(self).__name__}` has no pruning stage; its sparsity is constant.")
        return prune.sparsity(step, self.session.total_steps)
