"""Masks learned by gradient: a score per weight (or per row), trained, and a mask drawn from the scores.

Where every other method keeps zeros *in* the weights, a learned mask is a function of trained scores,
``m = m(s)``, that can change at every step: a weight pruned now may come back later with its value intact.
So the weights are never zeroed during training; the forward pass sees the *effective* weight ``w ⊙ m(s)``
instead, computed by a forward pre-hook that swaps it in for the module's parameter and swapped back by a
forward hook (``always_call``, so a failing forward restores the parameter too). The parameter itself stays
the module's, under its own name, so ``state_dict`` keys never change and any checkpoint loads into an
un-pruned model.

**Gradients.** ``w ⊙ m(s)`` is differentiated by a single autograd function (:class:`_MaskedWeight`):
``∂L/∂w = ∂L/∂w' ⊙ m`` and, for a hard (binary) mask with a straight-through estimator,
``∂L/∂s = ∂L/∂w' ⊙ w ⊙ ∂m̃/∂s`` where ``m̃`` is the rule's surrogate (``|s|`` for edge-popup, so the factor is
``sign(s)``; ``σ(s)`` for Bernoulli supermasks; the identity for movement pruning). A soft mask
(continuous sparsification) is differentiated by ordinary autograd.

**Rules** (:class:`MaskRule`, registered by name: :func:`register_mask_rule`, :func:`get_mask_rule`) say how
scores start, how the binary mask is drawn from them and what reaches the scores. The session
(:class:`LearnedMaskSession`) owns the scores, trains them with its own optimizer (each method's paper's
by default; scores are not module parameters, so they stay out of the user's optimizer and out of the model's
``state_dict``), all-reduces their gradients across processes, and keeps :attr:`Session.masks` equal to the
current binary mask, so reports, export, inference and N:M work as for any other method. It saves the scores,
their optimizer state and its random state with the masks (exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_pai.core.lottery import capture_point, restore_point
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.nm import NMSpec, nm_keep, resolve_nm
from lightning_pai.core.registry import Registry
from lightning_pai.core.select import topk_mask
from lightning_pai.core.session import Host, Session
from lightning_pai.core.sharding import is_sharded
from lightning_pai.core.targets import Layout, target_layouts


class _MaskedWeight(torch.autograd.Function):
    """``w ⊙ m`` for a binary ``m``; straight-through gradient ``∂L/∂w' ⊙ w ⊙ factor`` to the scores."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, scores: Tensor, mask: Tensor, factor: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, mask, factor)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        weight, mask, factor = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = grad * weight
            if factor is not None:
                grad_scores.mul_(factor)
        return grad_weight, grad_scores, None, None


def masked_weight(weight: Tensor, scores: Tensor, mask: Tensor, factor: Tensor | None = None) -> Tensor:
    """``weight ⊙ mask`` whose gradient reaches ``scores`` straight through: ``∂L/∂s = ∂L/∂w' ⊙ w ⊙ factor``.

    Args:
        weight: The parameter.
        scores: Its scores (same shape).
        mask: The binary mask drawn from the scores, in the weight's dtype.
        factor: ``∂m̃/∂s`` of the rule's surrogate, or None for the identity.
    """
    return _MaskedWeight.apply(weight, scores, mask, factor)


# --------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class MaskRule:
    """How one family of learned masks turns scores into a mask, and what gradient reaches the scores.

    Subclasses override :meth:`init`, :meth:`binarize` and, for non-identity straight-through estimators,
    :meth:`factor`; soft masks override :meth:`effective`. ``sampled`` rules draw a new mask at every forward
    pass of training (their :meth:`binarize` uses the generator).
    """

    name = "rule"
    #: Whether the training mask is drawn anew at every forward pass (Bernoulli masks).
    sampled = False
    #: Whether the rule keeps a prescribed number of weights per layer (top-k), so ``sparsity`` applies.
    counted = True

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        """Initial scores for ``param`` (same shape, float32, on the parameter's device)."""
        raise NotImplementedError

    def binarize(
        self, scores: Tensor, param: Tensor, density: float, nm: tuple[int, int] | None, layout: Layout, gen: Any
    ) -> Tensor:
        """The bool mask of ``param`` from its ``scores`` at ``density`` (fraction kept, for counted rules)."""
        raise NotImplementedError

    def eval_mask(
        self, scores: Tensor, param: Tensor, density: float, nm: Any, layout: Layout, gen: torch.Generator
    ) -> Tensor:
        """The mask published after each step: reported, exported, used outside training (default: :meth:`binarize`).

        ``gen`` is seeded from the session's seed and step, so a rule that samples it draws the same mask on
        every process and again on resume.
        """
        return self.binarize(scores, param, density, nm, layout, None)

    def factor(self, scores: Tensor) -> Tensor | None:
        """``∂m̃/∂s`` of the straight-through surrogate (None: the identity)."""
        return None

    def effective(self, weight: Tensor, scores: Tensor, mask: Tensor, level: float = 0.0) -> Tensor:
        """The weight a training forward pass sees (default: ``w ⊙ m``, straight-through to the scores)."""
        return masked_weight(weight, scores, mask.to(weight.dtype), self.factor(scores))


def top_k(values: Tensor, keep: int, nm: tuple[int, int] | None, layout: Layout) -> Tensor:
    """Bool mask of the ``keep`` largest entries of ``values`` (at least one); with ``nm=(N, M)``, N per group.

    :func:`~lightning_pai.core.select.topk_mask`: ties at the k-th value go to the earliest entries, so equal
    inputs give equal masks on every process.
    """
    if nm is not None:
        return nm_keep(values, nm[0], nm[1], layout)
    return topk_mask(values.detach(), max(1, min(values.numel(), keep)))


_RULES: Registry[MaskRule] = Registry("mask rule", "rule", "register_mask_rule")


def register_mask_rule(name: str, rule: MaskRule, *, overwrite: bool = False) -> MaskRule:
    """Register the :class:`MaskRule` instance ``rule`` under ``name``."""
    return _RULES.register(name, rule, overwrite=overwrite)


def get_mask_rule(name: str | MaskRule) -> MaskRule:
    """The registered rule ``name`` (a :class:`MaskRule` passes through)."""
    return name if isinstance(name, MaskRule) else _RULES.get(name)


def list_mask_rules() -> list[str]:
    """Names of the registered mask rules."""
    return _RULES.list()


class TopKAbs(MaskRule):
    """Edge-popup (Ramanujan et al. 2020): keep the top ``density`` fraction of ``|s|`` per layer.

    Scores start as ``nn.Linear``/``nn.Conv2d`` weights do (Kaiming uniform, ``a = sqrt(5)``), the mask is
    ``m = 1[|s| among the top k of its layer]`` and the straight-through gradient is
    ``∂L/∂s = ∂L/∂w' ⊙ w ⊙ sign(s)`` (the derivative of ``|s|``; ``GetSubnet`` passes ``∂L/∂m`` unchanged).
    A layer of ``n`` weights at density ``k`` keeps ``n - floor((1 - k) n)``, as ``GetSubnet`` does.
    """

    name = "topk_abs"

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        fan_in = param[0].numel() if param.dim() > 1 else param.numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound gain*sqrt(3/fan_in)
        scores = torch.empty(param.shape, dtype=torch.float32)
        return scores.uniform_(-bound, bound, generator=generator).to(param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        n = scores.numel()
        return top_k(scores.abs(), n - int((1 - density) * n), nm, layout)

    def factor(self, scores: Tensor) -> Tensor | None:
        return scores.sign()


class TopK(MaskRule):
    """Hard movement pruning (Sanh et al. 2020): keep the top ``density`` fraction of ``s`` per layer.

    The reference's ``TopKBinarizer``: scores start at 0, the mask keeps the ``floor(k n)`` highest raw scores
    of each layer with ``k`` from the cubic schedule, and the gradient passes straight through
    (``∂L/∂s = ∂L/∂w' ⊙ w``), so pruned weights keep receiving score gradients and can come back.
    """

    name = "topk"

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        return top_k(scores, int(density * scores.numel()), nm, layout)


@dataclass(frozen=True)
class Bernoulli(MaskRule):
    """Supermasks (Zhou et al. 2019): ``m ~ Bernoulli(σ(s))``, drawn at every training forward pass.

    Straight-through through the sampling: ``∂L/∂s = ∂L/∂w' ⊙ w ⊙ σ(s)(1 - σ(s))`` (the reference's
    ``Bernoulli(σ(s)).sample() + σ(s) - stop_gradient(σ(s))``); scores start at ``start`` (0: ``p = 0.5``).
    The mask reported, exported and used outside training is published after every step (see ``published``);
    the reference's default evaluation samples anew at every forward pass (the callback's ``eval_mask``).
    """

    #: Initial score of every weight (the reference's ``sigmoid_bias``): ``σ(start)`` is the initial density.
    start: float = 0.0
    #: The published mask: ``"fixed"`` is one sample ``Bernoulli(σ(s))``, drawn from the session's seed and step
    #: (each sample is a network as good as the sampled ones it was trained with); ``"round"`` keeps
    #: ``σ(s) > 0.5`` (the reference's ``round_mask`` evaluation).
    published: str = "fixed"
    name = "bernoulli"
    sampled = True
    counted = False

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        return torch.full(param.shape, self.start, dtype=torch.float32, device=param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        return torch.rand(scores.shape, generator=gen, device=scores.device) < torch.sigmoid(scores)

    def eval_mask(self, scores, param, density, nm, layout, gen):  # noqa: D102
        return scores > 0 if self.published == "round" else self.binarize(scores, param, density, nm, layout, gen)

    def factor(self, scores: Tensor) -> Tensor | None:
        probability = torch.sigmoid(scores)
        return probability * (1 - probability)


class SigmoidThreshold(MaskRule):
    """Soft movement pruning (Sanh et al. 2020): ``m = 1[σ(s) > τ]``, straight-through to ``s``.

    The reference's ``ThresholdBinarizer(sigmoid=True)``: the sigmoid is inside the binarizer, so the
    straight-through gradient has no ``σ'`` factor (``∂L/∂s = ∂L/∂w' ⊙ w``), and a layer keeps at least
    ``floor(0.005 n) + 1`` weights (its highest scores). Sparsity comes from an L1 penalty on ``σ(s)`` (the
    session's ``penalty``), not from a count, so ``level`` is the threshold ``τ``.
    """

    name = "sigmoid_threshold"
    counted = False

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        mask = torch.sigmoid(scores) > density
        least = int(0.005 * scores.numel()) + 1
        if int(mask.sum()) < least:
            mask = top_k(scores, least, None, layout)
        return mask


class _ThresholdStep(torch.autograd.Function):
    """``W ⊙ H(|W| - t)`` per row, with the long-tailed estimator of Liu et al. 2020 for ``H'``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, threshold: Tensor) -> Tensor:
        x = weight.abs() - threshold.unsqueeze(1)
        ctx.save_for_backward(weight, x)
        return weight * (x > 0).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        weight, x = ctx.saved_tensors
        ax = x.abs()
        slope = torch.where(
            ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1.0, torch.full_like(ax, 0.4), torch.zeros_like(ax))
        )
        through_mask = grad * weight * slope  # ∂L/∂m ⊙ H'(x)
        grad_weight = grad * (x > 0).to(grad.dtype) + through_mask * weight.sign() if ctx.needs_input_grad[0] else None
        grad_threshold = -through_mask.sum(1) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_threshold


class RowThreshold(MaskRule):
    """Trainable masked layers: one threshold per output neuron, ``m_ij = H(|W_ij| - t_i)``.

    Liu et al. 2020, "Dynamic sparse training: find efficient sparse network from scratch with trainable masked
    layers" (ICLR): a threshold ``t_i`` per row of the layer's matrix (output neuron or filter), starting at 0.

    The step's derivative is the paper's long-tailed estimator ``H'(x) = 2 - 4|x|`` for ``|x| <= 0.4``,
    ``0.4`` for ``0.4 < |x| <= 1``, ``0`` beyond, so ``∂L/∂W = ∂L/∂W' ⊙ m + ∂L/∂W' ⊙ W ⊙ H'(x) ⊙ sign(W)`` and
    ``∂L/∂t_i = -Σ_j ∂L/∂W'_ij W_ij H'(x_ij)`` (the official ``BinaryStep``); a layer whose density falls to
    1 % or below has its thresholds reset to 0 (the official ``MaskedMLP``).
    """

    name = "row_threshold"
    counted = False

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        return torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        matrix = param.detach().reshape(param.shape[0], -1)
        mask = matrix.abs() > scores.unsqueeze(1)
        if mask.float().mean() <= 0.01:
            scores.zero_()  # the reference's reset: every threshold of the layer back to 0
            mask = matrix.abs() > 0
        return mask.view(param.shape)

    def effective(self, weight: Tensor, scores: Tensor, mask: Tensor, level: float = 0.0) -> Tensor:
        return _ThresholdStep.apply(weight.reshape(weight.shape[0], -1), scores).view(weight.shape)


@dataclass(frozen=True)
class SoftSigmoid(MaskRule):
    """Continuous sparsification (Savarese et al. 2020): the soft mask ``σ(β s) / σ(s_0)``, differentiated exactly.

    ``level`` is the temperature ``β``; scores start at ``s_0`` (``start``), where the mask is 1. The published
    (hard) mask is ``1[s > 0]``; with ``β = inf`` (the ticket) the forward pass uses it too and no gradient
    reaches the scores.
    """

    #: The scores' initial value ``s_0`` (the reference's ``mask_initial_value``).
    start: float = 0.0
    name = "sigmoid"
    counted = False

    def init(self, param: Tensor, generator: torch.Generator) -> Tensor:
        return torch.full(param.shape, self.start, dtype=torch.float32, device=param.device)

    def binarize(self, scores, param, density, nm, layout, gen):  # noqa: D102
        return scores > 0

    def soft(self, scores: Tensor, beta: float) -> Tensor:
        """``σ(β s) / σ(s_0)``."""
        return torch.sigmoid(beta * scores) / torch.sigmoid(torch.tensor(self.start)).item()

    def effective(self, weight: Tensor, scores: Tensor, mask: Tensor, level: float = 0.0) -> Tensor:
        if math.isinf(level):
            return weight * mask.to(weight.dtype)
        return weight * self.soft(scores, level).to(weight.dtype)


register_mask_rule("topk_abs", TopKAbs())
register_mask_rule("topk", TopK())
register_mask_rule("bernoulli", Bernoulli())
register_mask_rule("sigmoid_threshold", SigmoidThreshold())
register_mask_rule("row_threshold", RowThreshold())
register_mask_rule("sigmoid", SoftSigmoid())


def _hook_site(module: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    """Where the swap of parameter ``name`` must happen: ``(module whose forward reads it, path to its owner, attr)``.

    The owner itself, except for ``nn.MultiheadAttention.out_proj``, whose weight the attention module passes
    to ``F.multi_head_attention_forward`` without calling ``out_proj``.
    """
    owner_name, _, attr = name.rpartition(".")
    parent_name, _, child = owner_name.rpartition(".")
    if owner_name and child == "out_proj":
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(parent, nn.MultiheadAttention):
            return parent, child, attr
    return (module.get_submodule(owner_name) if owner_name else module), "", attr


def signed_kaiming_constant(weight: Tensor) -> Tensor:
    """``sign(w) · sqrt(2 / fan_in)``: the signed Kaiming constant of edge-popup (Ramanujan et al. 2020)."""
    fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
    return weight.sign() * math.sqrt(2.0 / fan_in)


def signed_constant(weight: Tensor) -> Tensor:
    """``sign(w) · std(w)`` per layer: the signed constant of Zhou et al. 2019 (``make_signed_consts``)."""
    return weight.sign() * weight.std()


# ------------------------------------------------------------------------------------------------- session
Level = Callable[[int, int], float]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]
Penalty = Callable[[dict[str, Tensor], int, int], Tensor | None]


class LearnedMaskSession(Session):
    """A learned mask over the targets: scores trained by their own optimizer, the mask drawn from them.

    Per optimizer step ``t`` of ``T``: the forward pass of every target sees ``w ⊙ m(s)`` (a sampled ``m`` for
    sampled rules, else the mask drawn after the previous step); the backward pass gives the scores their
    straight-through gradient; before the step the score gradients are averaged across processes and a
    ``penalty(scores, t, T)`` (e.g. an L1 term on the mask) is differentiated into them; after the step the
    score optimizer steps (its learning-rate schedule too) and the mask is drawn again at ``level(t, T)``
    (the fraction kept for counted rules, a threshold for the others). Weights are trained by the user's
    optimizer, or frozen (``train_weights=False``: ``requires_grad`` off, so they stay bit-identical).

    Args:
        name: The method's name, for messages.
        rule: A :class:`MaskRule` or a registered rule's name.
        level: ``level(step, total)`` (see above); ``step`` 0 gives the initial mask.
        optimizer: Builds the scores' optimizer from the list of score tensors.
        scheduler: Builds its learning-rate scheduler from ``(optimizer, total_steps)`` (stepped every step),
            or None.
        train_weights: Whether the targeted weights train (False: frozen when the session is prepared).
        penalty: Extra differentiable term on the scores, or None.
        weight_init: None (keep the weights) or ``f(weight) -> new weight``, applied to each targeted weight
            when prepared (e.g. :func:`signed_kaiming_constant`).
        sample_eval: Sampled rules only: draw a new mask at every forward pass outside training too (the
            Supermask paper's evaluation) instead of the deterministic mask.
        nm: N:M layers (counted rules: top-N per group of M).
        nm_incompatible: Layers N:M groups cannot fit: ``"error"``, ``"dense"`` (left out) or
            ``"unstructured"`` (top-k at the pattern's density).
        seed: Seed of the score initialisation and of sampled masks (the same on every process).
        **options: ``include``, ``exclude``, ``verbose``, ``frozen`` (see :class:`Session`); the targets are
            chosen when the session is prepared, before it freezes any of them.
    """

    def __init__(
        self,
        name: str,
        rule: str | MaskRule,
        *,
        level: Level,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        train_weights: bool = True,
        penalty: Penalty | None = None,
        weight_init: Callable[[Tensor], Tensor] | None = None,
        sample_eval: bool = False,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(name, **options)
        self.rule = get_mask_rule(rule)
        self.level, self.make_optimizer, self.make_scheduler = level, optimizer, scheduler
        self.train_weights, self.penalty, self.weight_init = train_weights, penalty, weight_init
        self._nm, self._nm_incompatible, self.seed, self.sample_eval = nm, nm_incompatible, seed, sample_eval
        self._target_names: list[str] | None = None
        self.scores: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.step = 0
        self._params: dict[str, nn.Parameter] = {}
        self._hosts: dict[str, tuple[nn.Module, str, str]] = {}
        self._mask: dict[str, Tensor] = {}  # the mask the forward passes use (as the weight's dtype)
        self._handles: list[RemovableHandle] = []
        self._generator: torch.Generator | None = None
        self._learning = False
        self._saved: dict[str, Any] | None = None
        self._prepared = False
        self._layouts: dict[str, Layout] = {}
        self._drawn_level = 0.0  # the level the current mask was drawn at
        self._nm_groups: dict[str, tuple[int, int]] = {}

    @property
    def nm_spec(self) -> NMSpec:
        return self._nm

    @property
    def nm_incompatible(self) -> str:
        return self._nm_incompatible

    # ------------------------------------------------------------------ protocol
    def select(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The targets chosen when the session was prepared (it may have frozen them since), else as usual."""
        if self._target_names is None:
            return super().select(module)
        found = dict(module.named_parameters())
        return {n: found[n] for n in self._target_names}

    def prepare(self, module: nn.Module) -> None:
        """Freeze the targeted weights (``train_weights=False``) and apply ``weight_init``, before any wrapping.

        Called by the adapters before the loop wraps the model (DDP records which parameters train when it is
        built); idempotent, and a no-op on a resumed run's second call.
        """
        if self._prepared:
            return
        targets = self.select(module)
        self._note_targets(module, targets)
        self._target_names = list(targets)
        with torch.no_grad():
            for param in targets.values():
                if self.weight_init is not None and self._saved is None:
                    param.copy_(self.weight_init(param))
                if not self.train_weights:
                    param.requires_grad_(False)
        self._prepared = True

    def start(self, module: nn.Module, host: Host | None = None) -> None:
        if self._saved is None and self.optimizer is not None:  # a later fit continues from the scores it has
            self._saved = {k: v for k, v in self.state_dict().items() if k != "masks"}
        self.prepare(module)
        self.module, self.host = module, host if host is not None else Host()
        targets = self.select(module)
        sharded = [n for n, p in targets.items() if is_sharded(p)]
        if sharded:
            raise ValueError(
                f"`{self.name}` learns its mask from per-weight scores, which are not sharded yet: it does not run "
                f"on FSDP2-sharded parameters ({', '.join(sharded[:3])}). Use DDP, or a method of another family."
            )
        self._layouts = target_layouts(module, list(targets))
        shapes = {n: p.shape for n, p in targets.items()}
        self._nm_groups = {}
        if self._nm is not None:
            unfit = set(self.nm_unfit)
            resolved = resolve_nm(self._nm, shapes, self._layouts, self._nm_incompatible)
            self._nm_groups = {n: nm for n, nm in resolved.items() if n not in unfit}
        self._params = dict(targets)
        self._hosts = {name: _hook_site(module, name) for name in targets}
        device = next(iter(targets.values())).device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        if self._saved is not None:
            scores = {n: s.to(device) for n, s in self._saved["scores"].items()}
        else:
            init = torch.Generator().manual_seed(self.seed)
            scores = self._from_rank_zero({n: self.rule.init(p, init).cpu() for n, p in targets.items()})
        self.scores = {n: scores[n].to(targets[n].device).requires_grad_(True) for n in targets}
        self.optimizer = self.make_optimizer(list(self.scores.values()))
        total = self.host.total_steps
        if self.make_scheduler is not None:
            if total is None:
                raise ValueError(f"`{self.name}` schedules its scores' learning rate: {self.host.length_hint}.")
            self.scheduler = self.make_scheduler(self.optimizer, total)
        if self._saved is not None:
            self.optimizer.load_state_dict(self._saved["optimizer"])
            if self.scheduler is not None and self._saved.get("scheduler") is not None:
                self.scheduler.load_state_dict(self._saved["scheduler"])
            self.step = self._saved["step"]
            self._generator.set_state(self._saved["generator"])
            self._saved = None
        self._restored = None
        self.masks = MaskSet(targets, layouts=self._layouts)
        self._draw()
        self._hook()
        self._learning = True
        self._announce()

    def train_start(self) -> None:
        """Nothing to clean: pruned weights keep their values and the user's optimizer state."""

    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """Average the score gradients across processes and add the penalty's."""
        scores = list(self.scores.values())
        if self.penalty is not None:
            total = self.host.total_steps or step
            with torch.enable_grad():
                term = self.penalty(self.scores, step, total)
            if term is not None:
                grads = torch.autograd.grad(term, scores, allow_unused=True)
                for s, g in zip(scores, grads, strict=True):
                    if g is not None:
                        s.grad = g if s.grad is None else s.grad.add_(g)
        grads = [s.grad if s.grad is not None else torch.zeros_like(s) for s in scores]
        self.host.all_reduce_mean(grads)
        for s, g in zip(scores, grads, strict=True):
            s.grad = g

    def after_step(self, step: int) -> None:
        """Step the scores' optimizer (and schedule), then draw the mask for the next step.

        A step whose score gradients are not finite (a 16-bit ``GradScaler`` skipping it, a diverging loss) leaves
        the scores alone, as it leaves the weights alone: one NaN would otherwise spread to every later mask.
        """
        grads = [s.grad for s in self.scores.values() if s.grad is not None]
        if grads and not bool(torch.stack([g.float().sum() for g in grads]).isfinite().all()):
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step = step
        self._draw()

    def stop(self) -> None:
        """Training is over: the forward passes keep the final mask (no more gradient to the scores)."""
        self._learning = False

    def remove(self) -> None:
        """Remove the forward hooks (the module computes with its full weights again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ masks
    def _level(self) -> float:
        return self.level(self.step, self.host.total_steps or max(1, self.step))

    def _draw(self) -> None:
        """Draw the deterministic mask from the scores at the current level; publish it as ``masks``."""
        level = self._drawn_level = self._level()
        gen = torch.Generator(device=self._generator.device).manual_seed(self.seed * 1_000_003 + self.step)
        with torch.no_grad():
            drawn = {
                n: self.rule.eval_mask(s, self._params[n], level, self._nm_groups.get(n), self._layouts[n], gen)
                for n, s in self.scores.items()
            }
        self._mask = {n: m.to(self._params[n].dtype) for n, m in drawn.items()}
        self.masks.load_state_dict(drawn)

    def _hook(self) -> None:
        self.remove()
        by_site: dict[nn.Module, list[str]] = {}
        for name, (site, _, _) in self._hosts.items():
            by_site.setdefault(site, []).append(name)
        for site, names in by_site.items():
            self._handles.append(site.register_forward_pre_hook(self._swap_in(names)))
            self._handles.append(site.register_forward_hook(self._swap_out(names), always_call=True))

    def _swap_in(self, names: list[str]) -> Callable:
        # The hooks act on the module they are called on, with its own parameters (a deep copy of the model
        # carries them too and computes with the same masks, without touching the original's parameters).
        def hook(site: nn.Module, args: Any) -> None:
            stash = site.__dict__.setdefault("_lightning_pai_weights", {})
            level = self._drawn_level  # set with the mask, after each step: no schedule lookup per forward
            for name in names:
                _, path, attr = self._hosts[name]
                owner = site.get_submodule(path) if path else site
                param = stash[name] = owner._parameters[attr]
                learning = self._learning and owner.training and torch.is_grad_enabled()
                mask = self._mask[name]
                if self.rule.sampled and (learning or self.sample_eval):
                    with torch.no_grad():
                        drawn = self.rule.binarize(
                            self.scores[name], param, level, self._nm_groups.get(name),
                            self._layouts[name], self._generator,
                        )  # fmt: skip
                    mask = drawn.to(param.dtype)
                if learning:
                    owner._parameters[attr] = self.rule.effective(param, self.scores[name], mask, level)
                else:
                    owner._parameters[attr] = param * mask
                if isinstance(owner, nn.RNNBase):  # recurrent layers compute from a cached weight list
                    owner._init_flat_weights()

        hook.lightning_pai_hook = True  # type: ignore[attr-defined]  # stripped by make_permanent's copy
        return hook

    def _swap_out(self, names: list[str]) -> Callable:
        def hook(site: nn.Module, args: Any, output: Any) -> None:
            stash = site.__dict__.get("_lightning_pai_weights", {})
            for name in names:
                if name in stash:
                    _, path, attr = self._hosts[name]
                    owner = site.get_submodule(path) if path else site
                    owner._parameters[attr] = stash.pop(name)
                    if isinstance(owner, nn.RNNBase):
                        owner._init_flat_weights()

        hook.lightning_pai_hook = True  # type: ignore[attr-defined]
        return hook

    def _from_rank_zero(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.host.world_size <= 1:
            return tensors
        return self.host.broadcast(tensors, src=0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The mask, the scores, their optimizer and schedule, the step and the sampling generator's state."""
        if self.optimizer is None:
            saved = self._saved or {}
            return {"masks": self.current_masks(), **saved}
        return {
            "masks": self.current_masks(),
            "scores": {n: s.detach().cpu().clone() for n, s in self.scores.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (at :meth:`start` if not started yet)."""
        if "scores" not in state:
            return
        self._saved = {k: v for k, v in state.items() if k != "masks"}
        self._restored = dict(state["masks"])
        if self.optimizer is not None:  # started: restore in place
            with torch.no_grad():
                for n, s in self.scores.items():
                    s.copy_(self._saved["scores"][n])
            self.optimizer.load_state_dict(self._saved["optimizer"])
            if self.scheduler is not None and self._saved.get("scheduler") is not None:
                self.scheduler.load_state_dict(self._saved["scheduler"])
            self.step = self._saved["step"]
            self._generator.set_state(self._saved["generator"])
            self._saved = self._restored = None
            self._draw()


class ContinuousSparsificationSession(LearnedMaskSession):
    """Continuous sparsification's rounds, temperature schedule and ticket (Savarese et al. 2020, NeurIPS).

    Epochs come in rounds of ``E = epochs_per_round``. In search round ``r < rounds``, epoch ``e`` of the round
    trains with the soft mask ``σ(β s) / σ(s_0)``, ``β = final_temperature^(e / (E - 1))`` (1 at the round's
    start, ``final_temperature`` at its last epoch), the penalty ``penalty_weight · Σ σ(β s) / σ(s_0)`` on the
    scores, and the weights training as the user's optimizer says. Between search rounds the scores are reset
    to ``s ← min(β_T s, s_0)`` (the paper's Algorithm 1; the official code's ``min(s, s_0)`` keeps the same signs).
    After the last search round the ticket is drawn, ``m = 1[s > 0]``, the weights (and optimizer, scheduler
    and RNG state) are rewound to their values at the start of epoch ``rewind_epoch`` of round 0, and the
    remaining epochs train the ticket with that fixed mask. The published mask is ``1[s > 0]`` throughout.

    Args:
        name: The method's name.
        rounds: Search rounds.
        epochs_per_round: ``E`` (also the ticket's epochs in the reference).
        final_temperature: ``β`` at the end of each round.
        penalty_weight: ``λ`` of the L1 penalty on the soft mask.
        start: ``s_0``, the scores' initial value.
        rewind_epoch: Epoch of round 0 whose start the ticket's weights are rewound to.
        optimizer: Builds the scores' optimizer.
        **options: As for :class:`LearnedMaskSession` (``seed``, ``include``, ``exclude``, ...).
    """

    def __init__(
        self,
        name: str,
        *,
        rounds: int,
        epochs_per_round: int | None,
        final_temperature: float,
        penalty_weight: float,
        start: float,
        rewind_epoch: int,
        optimizer: OptimizerFactory,
        **options: Any,
    ) -> None:
        super().__init__(
            name, SoftSigmoid(start), level=lambda step, total: self._temperature(), optimizer=optimizer,
            penalty=self._l1, **options,
        )  # fmt: skip
        self.rounds, self.epochs_per_round = rounds, epochs_per_round
        self.final_temperature, self.penalty_weight, self.start_value = final_temperature, penalty_weight, start
        self.rewind_epoch = rewind_epoch
        self.beta, self.round, self.ticket = 1.0, 0, False
        self.rewind_point: dict[str, Any] | None = None
        self.epochs_done = 0  # epochs whose last step ran (counted from the steps, so a resumed run knows too)
        self._applied = -1  # the epoch whose temperature / round / ticket settings are in force
        self._ending = False

    def _temperature(self) -> float:
        return math.inf if self.ticket else self.beta

    def _l1(self, scores: dict[str, Tensor], step: int, total: int) -> Tensor | None:
        if self.ticket or self.penalty_weight == 0:
            return None
        return self.penalty_weight * sum(self.rule.soft(s, self.beta).sum() for s in scores.values())

    def epoch_start(self, epoch: int) -> None:
        """Enter epoch ``epoch`` (see :meth:`_enter`)."""
        self._enter(epoch)

    def step_start(self, step: int) -> None:
        """Enter the epoch the steps have reached: a run resumed after an epoch's last step gets no epoch start."""
        self._enter(self.epochs_done)
        super().step_start(step)

    def _enter(self, epoch: int) -> None:
        """Set ``β``; reset the scores at a new round; capture the rewind point; draw the ticket after the search."""
        if epoch == self._applied:
            return
        self._applied = epoch
        if self.epochs_per_round is None:
            raise ValueError(f"`{self.name}`: `epochs_per_round` (each round's length in epochs) is not set.")
        size = self.epochs_per_round
        round_index, within = divmod(epoch, size)
        if round_index < self.rounds:
            if round_index > self.round:
                with torch.no_grad():
                    for s in self.scores.values():
                        s.copy_(torch.clamp(self.beta * s, max=self.start_value))
                self.round = round_index
            self.beta = self.final_temperature ** (within / (size - 1)) if size > 1 else self.final_temperature
            if round_index == 0 and within == self.rewind_epoch and self.rewind_point is None:
                self.rewind_point = capture_point(self.module, self.host, True, epoch, self.step)
        elif not self.ticket:
            self.ticket, self.round = True, self.rounds
            if self.rewind_point is not None:
                restore_point(self.module, self.host, self.rewind_point)
            self.masks_changed(self.step)
        self._draw()

    def before_step(self, step: int, epoch_end: bool = False) -> None:
        self._ending = epoch_end
        if not self.ticket:
            super().before_step(step, epoch_end)

    def after_step(self, step: int) -> None:
        if self._ending:
            self.epochs_done += 1
            self._ending = False
        if self.ticket:  # the ticket's mask is fixed
            self.step = step
            return
        super().after_step(step)

    def _draw(self) -> None:
        super()._draw()  # publishes 1[s > 0]
        if not self.ticket:  # outside training the search computes with the soft mask, as the reference evaluates
            with torch.no_grad():
                self._mask = {n: self.rule.soft(s, self.beta).to(self._params[n].dtype) for n, s in self.scores.items()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(beta=self.beta, round=self.round, ticket=self.ticket, rewind_point=self.rewind_point)
        state.update(epochs_done=self.epochs_done, applied=self._applied)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.round = state.get("beta", 1.0), state.get("round", 0)
        self.ticket, self.rewind_point = state.get("ticket", False), state.get("rewind_point")
        self.epochs_done, self._applied = state.get("epochs_done", 0), state.get("applied", -1)
        super().load_state_dict(state)


__all__ = [
    "ContinuousSparsificationSession",
    "LearnedMaskSession",
    "MaskRule",
    "get_mask_rule",
    "list_mask_rules",
    "masked_weight",
    "signed_constant",
    "signed_kaiming_constant",
    "register_mask_rule",
    "top_k",
]
