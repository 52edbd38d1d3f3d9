"""Masks learned by gradient: edge-popup, supermasks and movement pruning as their authors run them."""

from __future__ import annotations

import math
from typing import Any

import torch
from typing_extensions import Unpack

from lightning_pai.callbacks.base import MethodOptions, SparseCallback
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.learned import (
    Bernoulli,
    ContinuousSparsificationSession,
    LearnedMaskSession,
    signed_constant,
    signed_kaiming_constant,
)
from lightning_pai.core.nm import NMSpec, check_nm, check_nm_incompatible, nm_sparsity
from lightning_pai.core.schedules import resolve_point
from lightning_pai.core.session import Session
from lightning_pai.core.validation import check_choice, check_fraction, check_number, check_point, check_sparsity

WEIGHT_INITS = ("keep", "signed_constant")


def cosine(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_t = lr_0 (1 + cos(π t / T)) / 2``, stepped every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))


def linear_warmup_decay(warmup: float) -> Any:
    """``lr_t``: linear from 0 to ``lr_0`` over the first ``warmup`` fraction of the run, then linear to 0."""

    def make(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
        ramp = max(1, int(warmup * total)) if warmup > 0 else 0

        def factor(t: int) -> float:
            if t < ramp:
                return t / ramp
            return max(0.0, (total - t) / max(1, total - ramp))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return make


class LearnedMask(SparseCallback):
    """Base of the learned-mask methods: the session is a :class:`~lightning_pai.core.learned.LearnedMaskSession`.

    ``setup`` prepares the session (chooses the targets, freezes the weights of methods that do not train them,
    sets their initial values) before Lightning wraps the model, so DDP never waits for gradients of frozen
    weights. After training the model keeps computing with the final mask (its weights are never zeroed, so
    edge-popup's stay bit-identical): :meth:`make_permanent` gives a plain copy with the zeros baked in.
    """

    def __init__(self, *, seed: int = 0, **options: Unpack[MethodOptions]) -> None:
        super().__init__(**options)
        self.seed = seed

    def session_kwargs(self) -> dict[str, Any]:
        """The method's :class:`~lightning_pai.core.learned.LearnedMaskSession` arguments (rule, level, ...)."""
        raise NotImplementedError

    def build_session(self) -> Session:
        return LearnedMaskSession(
            type(self).__name__, seed=self.seed, **self.session_kwargs(), **self.session_options()
        )


class EdgePopup(LearnedMask):
    """Edge-popup (Ramanujan et al. 2020, "What's hidden in a randomly weighted neural network?", CVPR).

    Every targeted weight is frozen; a score ``s`` per weight is trained instead, and each layer computes with
    ``w ⊙ m``, ``m = 1[|s| among the top k of the layer]``, keeping ``n - floor((1 - k) n)`` of its ``n`` weights
    at density ``k = 1 - sparsity`` (the official ``GetSubnet``). The gradient reaches the scores straight
    through: ``∂L/∂s = ∂L/∂(w ⊙ m) ⊙ w ⊙ sign(s)``. Scores start as Kaiming uniform (``a = sqrt(5)``), and are
    trained by SGD (lr 0.1, momentum 0.9, weight decay 1e-4 on the scores, cosine decay over the run): the
    official configuration. ``weight_init="signed_constant"`` replaces each targeted weight by
    ``sign(w) · sqrt(2 / fan_in)`` (the paper's signed Kaiming constant, its best setting). The paper masks
    every layer, first and last included, and its networks have no biases; here biases and other parameters
    train as the user's optimizer says (freeze them in the model to match the paper exactly).

    Args:
        sparsity: Fraction of each layer's weights removed (constant; N:M: implied by ``nm``).
        lr: Learning rate of the scores.
        momentum: SGD momentum of the scores.
        weight_decay: Weight decay of the scores.
        weight_init: ``"keep"`` the model's weights, or ``"signed_constant"``.
        train_weights: Train the targeted weights too (the paper freezes them).
        nm: N:M layers: the top ``N`` of ``|s|`` in every group of ``M`` inputs.
        nm_incompatible: Layers N:M groups cannot fit: ``"error"``, ``"dense"`` or ``"unstructured"``.
        **common: ``include``, ``exclude``, ``seed``, ``verbose``, ``resume``, ``frozen``.
    """

    card = MethodCard("learned", example={"lr": 5.0})  # visible mask changes within 16 steps

    def __init__(
        self,
        sparsity: float | None = 0.5,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        weight_init: str = "keep",
        train_weights: bool = False,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        **common: Unpack[MethodOptions],
    ) -> None:
        check_nm(nm)
        check_nm_incompatible(nm_incompatible)
        self.sparsity = nm_sparsity(sparsity, nm)
        check_sparsity(self.sparsity, "sparsity")
        check_number(lr, "lr", low=0.0, low_open=True)
        check_fraction(momentum, "momentum")
        check_number(weight_decay, "weight_decay", low=0.0)
        check_choice(weight_init, WEIGHT_INITS, "weight_init")
        super().__init__(**common)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.weight_init, self.train_weights, self.nm, self.nm_incompatible = (
            weight_init,
            train_weights,
            nm,
            nm_incompatible,
        )

    def session_kwargs(self) -> dict[str, Any]:
        density = 1.0 - self.sparsity
        lr, momentum, weight_decay = self.lr, self.momentum, self.weight_decay
        return {
            "rule": "topk_abs",
            "level": lambda step, total: density,
            "optimizer": lambda scores: torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay),
            "scheduler": cosine,
            "train_weights": self.train_weights,
            "weight_init": signed_kaiming_constant if self.weight_init == "signed_constant" else None,
            "nm": self.nm,
            "nm_incompatible": self.nm_incompatible,
        }


class Supermask(LearnedMask):
    """Supermasks (Zhou et al. 2019, "Deconstructing lottery tickets: zeros, signs, and the supermask", NeurIPS).

    Every targeted weight is frozen; each layer computes with ``w ⊙ m``, ``m ~ Bernoulli(σ(s))`` drawn anew at
    every training forward pass, and the gradient reaches the scores straight through the sampling:
    ``∂L/∂s = ∂L/∂(w ⊙ m) ⊙ w ⊙ σ(s)(1 - σ(s))``. Scores start at ``logit(1 - sparsity)`` (the reference's
    ``sigmoid_bias``, 0 by default: ``p = 0.5``) and are trained by SGD with momentum 0.9 at lr 100, constant
    (the reference's command). The density is not prescribed: it is what training makes of ``σ(s)`` (its
    natural density). Outside training, and in reports and exports: with ``eval_mask="fixed"`` (default) one
    sample, drawn after every step from the scores with the session's seed (the same on every process, and
    again on resume): each sample is a network as good as those the scores were trained with, and the one
    evaluated is the one exported; ``"sample"`` draws a new sample at every evaluation forward pass, as the
    reference's default evaluation does (it reports the mean accuracy over 10 samples; reports and exports
    still use the fixed sample); ``"round"`` keeps ``σ(s) > 0.5`` (the reference's ``round_mask`` evaluation,
    much worse for masks trained by sampling: 71 % against 95 % on LeNet-300-100 after 3 epochs here).
    ``weight_init="signed_constant"``: ``sign(w) · std(w)`` per layer (the reference's signed constant).

    Args:
        sparsity: Initial expected fraction of weights removed, ``1 - σ(s_0)`` (None: 0.5).
        lr: Learning rate of the scores.
        momentum: SGD momentum of the scores.
        weight_init: ``"keep"`` or ``"signed_constant"``.
        eval_mask: ``"fixed"``, ``"sample"`` or ``"round"`` (see above).
        train_weights: Train the targeted weights too (the paper freezes them).
        **common: ``include``, ``exclude``, ``seed``, ``verbose``, ``resume``, ``frozen``.
    """

    card = MethodCard("learned", example={"lr": 0.5}, exact_sparsity=False)

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        lr: float = 100.0,
        momentum: float = 0.9,
        weight_init: str = "keep",
        eval_mask: str = "fixed",
        train_weights: bool = False,
        **common: Unpack[MethodOptions],
    ) -> None:
        if sparsity is not None:
            check_number(sparsity, "sparsity", low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(lr, "lr", low=0.0, low_open=True)
        check_fraction(momentum, "momentum")
        check_choice(weight_init, WEIGHT_INITS, "weight_init")
        check_choice(eval_mask, ("fixed", "sample", "round"), "eval_mask")
        super().__init__(**common)
        self.sparsity, self.lr, self.momentum = sparsity, lr, momentum
        self.weight_init, self.eval_mask, self.train_weights = weight_init, eval_mask, train_weights

    def session_kwargs(self) -> dict[str, Any]:
        density = 0.5 if self.sparsity is None else 1.0 - self.sparsity
        start = math.log(density / (1.0 - density))
        lr, momentum = self.lr, self.momentum
        return {
            "rule": Bernoulli(start, "round" if self.eval_mask == "round" else "fixed"),
            "level": lambda step, total: 0.0,
            "optimizer": lambda scores: torch.optim.SGD(scores, lr=lr, momentum=momentum),
            "train_weights": self.train_weights,
            "weight_init": signed_constant if self.weight_init == "signed_constant" else None,
            "sample_eval": self.eval_mask == "sample",
        }


class MovementPruning(LearnedMask):
    """Movement pruning (Sanh et al. 2020, "Movement pruning: adaptive sparsity by fine-tuning", NeurIPS).

    As the authors' code runs it (HF ``examples/research_projects/movement-pruning``): the weights train with
    the user's optimizer, a score ``S`` per weight (starting at 0) trains with its own AdamW (lr 1e-2, no
    weight decay, the weights' linear warmup-then-decay schedule), and each layer computes with ``w ⊙ m``
    where, recomputed after every step,

    - ``variant="hard"`` (movement pruning, ``TopKBinarizer``): ``m`` keeps the ``floor(k_t n)`` highest scores
      of each layer; ``k_t`` falls from 1 to ``1 - sparsity`` on the cubic schedule
      ``k_t = k_f + (1 - k_f)(1 - (t - t_i) / (T - t_i - t_f))^3`` after ``t_i`` steps at 1 and before ``t_f``
      steps at ``k_f``;
    - ``variant="soft"`` (soft movement, ``ThresholdBinarizer``): ``m = 1[σ(S) > τ_t]`` (at least
      ``floor(0.005 n) + 1`` kept per layer), ``τ_t`` rising from 0 to ``threshold`` on the same schedule, and
      the penalty ``λ_t · mean over layers of mean(σ(S))`` with ``λ_t = final_lambda · τ_t / threshold``: the
      density is what the penalty makes of it.

    Both pass the gradient straight through, ``∂L/∂S = ∂L/∂(w ⊙ m) ⊙ w``, so pruned weights keep receiving
    score gradients and come back when their scores rise. The reference leaves BERT's pooler and the task
    head dense: ``exclude=["*pooler*", "classifier.*"]`` does the same here.

    Args:
        sparsity: Hard: fraction of each layer's weights removed at the end (N:M: implied by ``nm``). Soft: None.
        variant: ``"hard"`` or ``"soft"``.
        lr: Learning rate of the scores.
        warmup: Fraction of the run over which the scores' learning rate rises linearly from 0.
        initial_warmup: Steps (``int``) or fraction of the run (``float``) before pruning starts (``t_i``).
        final_warmup: Steps or fraction at the end with the final level (``t_f``).
        threshold: Soft: the final threshold ``τ`` on ``σ(S)``.
        final_lambda: Soft: the penalty's final weight.
        nm: N:M layers (hard only): the top ``N`` scores of every group of ``M``.
        nm_incompatible: Layers N:M groups cannot fit: ``"error"``, ``"dense"`` or ``"unstructured"``.
        **common: ``include``, ``exclude``, ``seed``, ``verbose``, ``resume``, ``frozen``.
    """

    card = MethodCard("learned", example={"initial_warmup": 0, "final_warmup": 0})

    def __init__(
        self,
        sparsity: float | None = 0.9,
        *,
        variant: str = "hard",
        lr: float = 1e-2,
        warmup: float = 0.0,
        initial_warmup: int | float = 0.1,
        final_warmup: int | float = 0.2,
        threshold: float = 0.1,
        final_lambda: float = 400.0,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        **common: Unpack[MethodOptions],
    ) -> None:
        check_choice(variant, ("hard", "soft"), "variant")
        check_nm(nm)
        check_nm_incompatible(nm_incompatible)
        if variant == "soft":
            if sparsity is not None or nm is not None:
                raise ValueError(
                    "`MovementPruning(variant='soft')` sets no sparsity: the density is what the penalty "
                    "(`final_lambda`) makes of it; pass `sparsity=None` and no `nm`."
                )
            check_fraction(threshold, "threshold")
            check_number(final_lambda, "final_lambda", low=0.0)
        else:
            sparsity = nm_sparsity(sparsity, nm)
            check_sparsity(sparsity, "sparsity")
        check_number(lr, "lr", low=0.0, low_open=True)
        check_fraction(warmup, "warmup")
        check_point(initial_warmup, "initial_warmup")
        check_point(final_warmup, "final_warmup")
        super().__init__(**common)
        self.sparsity, self.variant, self.lr, self.warmup = sparsity, variant, lr, warmup
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        self.threshold, self.final_lambda = threshold, final_lambda
        self.nm, self.nm_incompatible = nm, nm_incompatible

    @property
    def final_sparsity(self) -> float | None:
        return self.sparsity

    def level(self, step: int, total: int) -> float:
        """``k_t`` (hard: fraction kept) or ``τ_t`` (soft) at optimizer step ``step`` of ``total``."""
        start, final = (1.0, 1.0 - self.sparsity) if self.variant == "hard" else (0.0, self.threshold)
        t_i, t_f = resolve_point(self.initial_warmup, total), resolve_point(self.final_warmup, total)
        if step <= t_i:
            return start
        if step > total - t_f:
            return final
        span = max(1, total - t_i - t_f)
        return final + (start - final) * (1 - (step - t_i) / span) ** 3

    def penalty(self, scores: dict[str, torch.Tensor], step: int, total: int) -> torch.Tensor | None:
        """Soft: ``λ_t · mean over layers of mean(σ(S))``; hard: none."""
        weight = self.final_lambda * self.level(step, total) / self.threshold
        if weight == 0:
            return None
        return weight * torch.stack([torch.sigmoid(s).mean() for s in scores.values()]).mean()

    def session_kwargs(self) -> dict[str, Any]:
        lr = self.lr
        return {
            "rule": "topk" if self.variant == "hard" else "sigmoid_threshold",
            "level": self.level,
            "optimizer": lambda scores: torch.optim.AdamW(scores, lr=lr, eps=1e-8, weight_decay=0.0),
            "scheduler": linear_warmup_decay(self.warmup),
            "penalty": self.penalty if self.variant == "soft" else None,
            "nm": self.nm,
            "nm_incompatible": self.nm_incompatible,
        }


class TrainableThresholds(LearnedMask):
    """Trainable masked layers: a trained threshold per output neuron, pruning the weights below it.

    Liu et al. 2020, "Dynamic sparse training: find efficient sparse network from scratch with trainable masked
    layers" (ICLR; official code junjieliu2910/DynamicSparseTraining).

    Each targeted layer gets one threshold ``t_i`` per output neuron (filter), starting at 0, and computes with
    ``W ⊙ m``, ``m_ij = H(|W_ij| - t_i)``: weights whose magnitude falls below their row's threshold are
    pruned, and come back when it rises above it again. The weights train with the user's optimizer; the
    thresholds with SGD (lr 0.01, momentum 0.9: the official MNIST setting, which trains both with one SGD)
    on the task loss plus the sparse regulariser ``α Σ_layers Σ_i exp(-t_i)``. Gradients pass the step
    through the paper's long-tailed estimator (``2 - 4|x|`` for ``|x| <= 0.4``, ``0.4`` up to 1, then 0, with
    ``x = |W| - t``), to the weights too; a layer whose density falls to 1 % or below has its thresholds reset
    to 0. The density is not prescribed: it is what ``alpha`` makes of it (the official MNIST runs use
    ``alpha=5e-4``, CIFAR ``5e-6``).

    Args:
        alpha: Weight of the sparse regulariser.
        lr: Learning rate of the thresholds.
        momentum: SGD momentum of the thresholds.
        **common: ``include``, ``exclude``, ``seed``, ``verbose``, ``resume``, ``frozen``.
    """

    card = MethodCard("learned", example={"alpha": 5e-2, "lr": 0.05}, sparsity_argument=None, exact_sparsity=False)

    def __init__(
        self, alpha: float = 5e-4, *, lr: float = 0.01, momentum: float = 0.9, **common: Unpack[MethodOptions]
    ) -> None:
        check_number(alpha, "alpha", low=0.0)
        check_number(lr, "lr", low=0.0, low_open=True)
        check_fraction(momentum, "momentum")
        super().__init__(**common)
        self.alpha, self.lr, self.momentum = alpha, lr, momentum

    @property
    def final_sparsity(self) -> float | None:
        """Not prescribed: learned (see ``alpha``)."""
        return None

    def session_kwargs(self) -> dict[str, Any]:
        lr, momentum, alpha = self.lr, self.momentum, self.alpha

        def penalty(scores: dict[str, torch.Tensor], step: int, total: int) -> torch.Tensor:
            return alpha * sum(torch.exp(-s).sum() for s in scores.values())

        return {
            "rule": "row_threshold",
            "level": lambda step, total: 0.0,
            "optimizer": lambda scores: torch.optim.SGD(scores, lr=lr, momentum=momentum),
            "penalty": penalty,
        }


class ContinuousSparsification(LearnedMask):
    """Continuous sparsification: soft masks annealed to a ticket over rounds, then the ticket trained.

    Savarese et al. 2020, "Winning the lottery with continuous sparsification" (NeurIPS; official code
    lolemacs/continuous-sparsification).

    Each targeted weight gets a mask score ``s`` (starting at ``mask_init``), and the search trains weights and
    scores together with the soft mask ``σ(β s) / σ(s_0)`` and the penalty ``λ Σ σ(β s) / σ(s_0)`` (``λ =
    penalty``) added to the loss, ``β`` rising within each round from 1 to ``final_temperature`` (geometric, once
    per epoch). Between rounds the scores are reset to ``min(β s, s_0)``: weights pruned so far stay pruned
    (their scores are negative), the others restart. After ``rounds`` rounds the ticket ``m = 1[s > 0]`` is
    fixed, the weights are rewound to the start of epoch ``rewind_epoch`` of round 0, and the remaining epochs
    train the ticket. Scores train with SGD (lr 0.1, momentum 0.9, Nesterov, no weight decay: the reference).
    The run needs ``(rounds + 1) * epochs_per_round`` epochs (the ticket trains one round's epochs; a shorter
    run ends before it); ``epochs_per_round`` defaults to ``max_epochs // (rounds + 1)``. The density is
    learned (``penalty`` and ``mask_init`` steer it: the reference suggests ``mask_init=-0.1`` for more
    sparsity, ``0.1`` for less). Differences from the reference, on purpose: the ticket's mask is ``1[s > 0]``
    without the code's extra ``1 / σ(s_0)`` scale (the paper's ticket), scores are reset with the paper's
    ``min(β s, s_0)``, and the weights' own learning-rate schedule is the user's.

    Args:
        rounds: Search rounds.
        epochs_per_round: Epochs per round (None: from the trainer's ``max_epochs``).
        final_temperature: ``β`` at the end of each round (reference: 200).
        penalty: ``λ`` (reference: 1e-8, for a loss summed over ~270k CIFAR ResNet weights).
        mask_init: ``s_0``.
        rewind_epoch: Round 0's epoch whose start the ticket rewinds to (reference: 2).
        lr: Learning rate of the scores.
        momentum: Their (Nesterov) momentum.
        **common: ``include``, ``exclude``, ``seed``, ``verbose``, ``resume``, ``frozen``.
    """

    card = MethodCard(
        "learned",
        example={"rounds": 1, "epochs_per_round": 1, "rewind_epoch": 0, "penalty": 1e-4, "lr": 0.5},
        sparsity_argument=None,
        exact_sparsity=False,
    )  # fmt: skip

    def __init__(
        self,
        rounds: int = 3,
        epochs_per_round: int | None = None,
        *,
        final_temperature: float = 200.0,
        penalty: float = 1e-8,
        mask_init: float = 0.0,
        rewind_epoch: int = 2,
        lr: float = 0.1,
        momentum: float = 0.9,
        **common: Unpack[MethodOptions],
    ) -> None:
        check_number(rounds, "rounds", 1, integer=True, what="search rounds")
        if epochs_per_round is not None:
            check_number(epochs_per_round, "epochs_per_round", 1, integer=True, what="epochs per round")
        check_number(final_temperature, "final_temperature", low=1.0)
        check_number(penalty, "penalty", low=0.0)
        check_number(mask_init, "mask_init")
        check_number(rewind_epoch, "rewind_epoch", 0, integer=True, what="an epoch of round 0")
        if epochs_per_round is not None and rewind_epoch >= epochs_per_round:
            raise ValueError(
                f"`rewind_epoch`={rewind_epoch} is not an epoch of round 0 (`epochs_per_round`={epochs_per_round})."
            )
        check_number(lr, "lr", low=0.0, low_open=True)
        check_fraction(momentum, "momentum")
        super().__init__(**common)
        self.rounds, self.epochs_per_round, self.final_temperature = rounds, epochs_per_round, final_temperature
        self.penalty, self.mask_init, self.rewind_epoch = penalty, mask_init, rewind_epoch
        self.lr, self.momentum = lr, momentum

    @property
    def final_sparsity(self) -> float | None:
        """Not prescribed: learned."""
        return None

    def build_session(self) -> Session:
        lr, momentum = self.lr, self.momentum
        return ContinuousSparsificationSession(
            type(self).__name__, rounds=self.rounds, epochs_per_round=self.epochs_per_round,
            final_temperature=self.final_temperature, penalty_weight=self.penalty, start=self.mask_init,
            rewind_epoch=self.rewind_epoch,
            optimizer=lambda scores: torch.optim.SGD(scores, lr=lr, momentum=momentum, nesterov=True),
            seed=self.seed, **self.session_options(),
        )  # fmt: skip

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.epochs_per_round is None:
            epochs = trainer.max_epochs
            if epochs is None or epochs < self.rounds + 1:
                raise ValueError(
                    f"`ContinuousSparsification(rounds={self.rounds})` needs `epochs_per_round`, or a Trainer with "
                    f"`max_epochs` >= rounds + 1 to derive it from (got max_epochs={epochs})."
                )
            self.session.epochs_per_round = epochs // (self.rounds + 1)
            if self.rewind_epoch >= self.session.epochs_per_round:
                raise ValueError(
                    f"`rewind_epoch`={self.rewind_epoch} is not an epoch of round 0 ({self.session.epochs_per_round} "
                    f"epochs per round from max_epochs={epochs})."
                )
        super().setup(trainer, pl_module, stage)


__all__ = [
    "ContinuousSparsification",
    "EdgePopup",
    "LearnedMask",
    "MovementPruning",
    "Supermask",
    "TrainableThresholds",
]
