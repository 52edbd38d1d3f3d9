"""Prune once at the start of fit and keep the masks for the rest of training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from torch import Tensor

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.distributions import Distribution
from lightning_pai.core.nm import NMSpec
from lightning_pai.core.pruning import Pruner, _name
from lightning_pai.core.scorers import Scorer
from lightning_pai.core.session import PruneSession
from lightning_pai.core.sparse_train import BACKENDS
from lightning_pai.core.targets import Selectors
from lightning_pai.core.validation import check_choice


class PruneAtInit(SparseCallback):
    """Pruning at initialization: score every prunable weight at fit start, keep the top ones.

    The kept count is exactly ``round((1 - sparsity) * N)`` over the ``N`` targeted weights, split
    across layers by ``distribution``; within a layer the highest scores are kept (ties broken by
    position). With ``iterations=k`` the scorer runs ``k`` times and the sparsity grows on ``schedule``;
    weights pruned in a round are zero (masked) in the next round's scoring pass and stay pruned.
    Scoring leaves the model as it found it (weights, BatchNorm statistics, train/eval flags,
    ``requires_grad``) apart from the masks. Under DDP the masks are decided on rank zero and
    broadcast; they are enforced on every step (weights, gradients and optimizer state of pruned
    weights stay exactly zero) and saved in checkpoints: a resumed fit, or a second ``fit`` with the
    same callback, reuses them instead of pruning again.

    Scorers: ``"magnitude"`` (``|w|``), ``"random"``, ``"snip"`` (Lee et al. 2019, ``|g ⊙ w|``),
    ``"grasp"`` (Wang et al. 2020, ``θ ⊙ Hg`` kept highest), ``"synflow"`` (Tanaka et al. 2020,
    data-free, ``|θ ⊙ ∂R/∂θ|``; 100 exponential rounds by default) — see
    :mod:`lightning_pai.core.saliency` for the formulas.

    Scoring data: the first ``batches`` batches of the trainer's train dataloader, moved to the
    module's device. The loss is the one the module's ``training_step`` returns (its ``self.log``
    calls are silenced while scoring) unless ``loss_fn(logits, targets)`` is given, which is applied to
    ``forward_fn(module, batch)`` (default: ``module(x), y`` for batches ``(x, y, ...)``). GraSP always
    uses ``cross_entropy(logits / temperature, targets)`` on ``forward_fn``. SynFlow needs only the
    input shape of one batch (or ``input_shape``).

    Args:
        method: Scorer name (:func:`~lightning_pai.core.scorers.list_scorers`) or a callable
            ``fn(ScoringContext) -> scores``.
        sparsity: Fraction of the targeted weights removed, in ``[0, 1)``; with ``nm``, of the layers not
            kept N:M (``None`` when ``nm`` covers every layer).
        distribution: How the kept count is split across layers: ``"global"`` (scores ranked across
            layers), ``"uniform"``, ``"erk"``, ``"er"``, ``"lamp"`` (per-layer budgets, ranked within
            each layer) or a registered/callable one.
        iterations: Scoring rounds (default: the scorer's registered ``iterations``: 100 for ``"synflow"``,
            else 1).
        schedule: ``"exponential"`` (same fraction of the remaining weights each round) or ``"linear"``.
        batches: Number of train batches the data-driven scorers use.
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``, every
            layer including the first and the last — the papers' set-ups vary, e.g. ``exclude="stem_and_head"``);
            glob patterns over parameter names or module types.
        exclude: Parameters left dense; same forms as ``include``.
        ablation: Sanity-check control (Frankle et al. 2021; Su et al. 2020): ``"shuffle"`` (permute each
            layer's mask), ``"reinit"`` (re-draw the kept weights from the layer's own initial values, a
            seeded permutation: the original per-layer init distribution, see
            :func:`~lightning_pai.core.pruning.reinitialize_`),
            ``"invert"`` (keep the lowest-scored weights, same per-layer counts), or None.
        min_density: Every layer keeps at least this fraction of its weights (layer-collapse guard).
        loss_fn: Optional ``loss_fn(logits, targets) -> loss`` replacing ``training_step`` for SNIP and
            custom scorers.
        forward_fn: Optional ``forward_fn(module, batch) -> (logits, targets)``.
        input_shape: Input shape of one sample for SynFlow and ``effective=True`` (default: from the first batch).
        temperature: GraSP's softmax temperature (200 in the paper's code).
        seed: Seed for stochastic scorers and ablations.
        verbose: Print the per-layer table at fit start (rank zero).
        nm: N:M structured sparsity (:mod:`lightning_pai.core.nm`): ``"2:4"`` keeps the 2 highest-scored of
            every 4 consecutive input weights of every layer (density fixed at N/M), or ``{"glob": "2:4"}``
            for the matching layers only, the others pruned unstructured to ``sparsity``. Iterative scoring
            prunes the N:M layers in its last round.
        nm_incompatible: Layers the ``nm`` groups cannot fit (input channels not a multiple of ``M``, e.g. a
            3-channel stem or a depthwise convolution): ``"error"`` (default) refuses before training,
            ``"dense"`` leaves them dense (NVIDIA ASP's choice), ``"unstructured"`` prunes each to the pattern's
            sparsity ``1 - N/M``; they are named in a warning and in the report.
        effective: ``sparsity`` is the *effective* sparsity (Vysogorets & Kempe 2021, "Connectivity Matters",
            arXiv:2107.02306): weights cut off from the input or the output by the pruning count as pruned, so the
            method prunes fewer weights directly — the most for which the effective sparsity stays at or below
            ``sparsity``, found by binary search over the number pruned in the method's order (lowest scores first
            for ``"global"``; the distribution's budgets at a lower overall sparsity for layer-wise ones; the
            rounds' removal order for iterative scoring). Paths are followed by synaptic flow from one all-ones
            input (``input_shape``, else the first batch's shape; see
            :func:`~lightning_pai.core.effective.effective_masks_by_flow`), so residual and concatenating networks
            work; the table printed at fit start gains an effective-density column. Not with ``nm``.
        weight_init: None (keep the weights) or an initialisation for the pruned network, applied once the masks
            are decided: ``"sparse_fan_in"`` (Evci et al. 2022: kept weights of unit ``i`` from ``N(0, 2 / k_i)``,
            ``k_i`` its kept inputs) or ``"isometry"`` (Lee et al. 2020: each layer's masked matrix optimised
            towards orthonormal columns); see :func:`lightning_pai.core.pruning.sparse_init_`.
        resume: Checkpoint state saved under other arguments: None refuses, ``"checkpoint"`` uses it, ``"recompute"``
            ignores it (see :class:`~lightning_pai.TargetOptions`).
        frozen: Frozen (``requires_grad=False``) targets: ``"skip"`` (default) leaves them dense, ``"prune"``
            prunes them, ``"error"`` refuses (see :class:`~lightning_pai.TargetOptions`).
        backend: ``"masked"`` (default: dense weights, masks enforced around each step) or ``"sparse"``: once the
            masks are decided, the ``nn.Linear`` targets train as CSR matrices, only their kept values stored,
            stepped and all-reduced (Liu, Mocanu et al. 2020, see :mod:`lightning_pai.core.sparse_train`).

    Example::

        trainer = Trainer(callbacks=[PruneAtInit("snip", sparsity=0.95, batches=1)])
    """

    card = MethodCard("prune_at_init", example={"method": "magnitude"})

    def __init__(
        self,
        method: str | Scorer = "magnitude",
        sparsity: float | None = 0.9,
        *,
        distribution: str | Distribution = "global",
        iterations: int | None = None,
        schedule: str = "exponential",
        batches: int = 1,
        include: Selectors = None,
        exclude: Selectors = None,
        ablation: str | None = None,
        min_density: float = 0.0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        forward_fn: Callable[[Any, Any], tuple[Tensor, Tensor]] | None = None,
        input_shape: tuple[int, ...] | None = None,
        temperature: float = 200.0,
        seed: int = 0,
        verbose: bool = True,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        resume: str | None = None,
        frozen: str = "skip",
        weight_init: str | None = None,
        effective: bool = False,
        backend: str = "masked",
    ) -> None:
        super().__init__(include=include, exclude=exclude, verbose=verbose, resume=resume, frozen=frozen)
        check_choice(backend, BACKENDS, "backend")
        self.backend = backend
        given = locals()
        pruner = Pruner(**{f.name: given[f.name] for f in fields(Pruner)})  # checks every argument
        for f in fields(Pruner):  # the arguments, as the pruner normalised them (e.g. the default iterations)
            setattr(self, f.name, getattr(pruner, f.name))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=_name(self.method),
            sparsity=self.sparsity,
            distribution=_name(self.distribution),
            ablation=self.ablation,
            **({"effective": True} if self.effective else {}),  # keys of direct-sparsity runs unchanged
        )

    def pruner(self) -> Pruner:
        """The engine's pruning-at-initialization configuration for these arguments."""
        return Pruner(**{f.name: getattr(self, f.name) for f in fields(Pruner)})

    def build_session(self) -> PruneSession:
        """Masks scored once, at the start, then kept."""
        return PruneSession(type(self).__name__, self.pruner(), backend=self.backend, **self.session_options())
