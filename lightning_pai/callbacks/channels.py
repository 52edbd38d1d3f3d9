"""Structured pruning of whole output channels, one-shot or gradual: the Lightning adapter of ``ChannelSession``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from lightning_pai.callbacks.base import SparseCallback, TargetOptions
from lightning_pai.core.channel_session import ChannelSession, _name
from lightning_pai.core.channels import ChannelReport


class ChannelPruning(SparseCallback):
    """Prune whole output channels of convolution and linear layers, by a registered channel scorer.

    ``sparsity`` is the fraction of the prunable *channels* removed. Which channels can be removed is found from
    the model's traced forward (:func:`lightning_pai.core.channels.channel_groups`): a layer's channels are
    followed through norms, activations, pooling and flattening to the layers that read them; layers feeding the
    same residual addition share their channels and are only pruned with ``couple=True``, jointly (a ResNet
    BasicBlock's ``conv1``, a Bottleneck's ``conv1``/``conv2`` and every VGG convolution are free; the classifier
    never is). A pruned channel masks its rows, bias and BatchNorm ``γ``/``β`` (its output is exactly zero) and
    the next layers' matching inputs, so :func:`lightning_pai.core.channels.channel_keep` and the ``shrink`` of
    :mod:`lightning_pai.deploy` can remove it with the outputs unchanged. Every layer keeps at least one channel.

    Scorers (:func:`~lightning_pai.core.channel_scorers.list_channel_scorers`): ``"l1"`` — filter norm ``Σ|W_c|``
    (Li et al. 2017, arXiv:1608.08710); ``"l2"`` — ``‖W_c‖₂``; ``"bn_gamma"`` — ``|γ_c|`` of the BatchNorm on the
    channel (network slimming, Liu et al. 2017, arXiv:1708.06519; pair it with ``l1=``); ``"taylor"`` — the mean
    over training steps of the squared gradient of a gate on the channel, ``(γ ∂L/∂γ + β ∂L/∂β)²`` after a
    BatchNorm, ``(Σ_{w ∈ W_c} w ∂L/∂w + b ∂L/∂b)²`` without one (Molchanov et al. 2019, arXiv:1906.10771). A group
    of coupled layers scores the sum over its members.

    Schedule: ``end=None`` prunes once at optimizer step ``start`` (``0``: at fit start; e.g. the last step of
    dense training followed by fine-tuning); with ``end`` the channel sparsity rises on Zhu & Gupta's cubic
    schedule from ``initial_sparsity`` at ``start`` to ``sparsity`` at ``end``, every ``frequency`` steps (as
    :class:`~lightning_pai.GradualMagnitudePruning`). ``start``/``end`` are steps (``int``) or fractions of the
    run (``float``). Masks only shrink; they are decided on rank zero and saved in checkpoints.

    Args:
        sparsity: Fraction of the prunable channels removed, in ``[0, 1)``.
        scorer: ``"l1"``, ``"l2"``, ``"bn_gamma"``, ``"taylor"`` or another registered channel scorer.
        distribution: ``"uniform"`` (each layer removes ``sparsity`` of its own channels, Li et al.'s per-layer
            rate; the default) or ``"global"`` (one ranking over every layer's channels, network slimming's single
            threshold; filter norms of layers with different fan-ins are not comparable, so mind the scorer).
        start: The pruning step (one-shot) or the first gradual step.
        end: The gradual schedule's last step, or None for one-shot pruning.
        frequency: Optimizer steps between gradual updates.
        initial_sparsity: The gradual schedule's channel sparsity at ``start`` (pruned at fit start).
        couple: Also prune layers whose channels meet in residual additions, jointly (group score = sum).
        l1: Network slimming's penalty ``l1 Σ|γ|`` on the BatchNorm scales of the pruned layers until the last
            pruning (the reference's ``--s``, ``1e-4``); 0 turns it off.
        batches: Training batches the ``"taylor"`` scorer averages over when pruning at fit start.
        loss_fn: ``loss_fn(logits, targets)`` for that scoring pass (default: ``training_step``'s loss).
        **common: ``include``/``exclude`` (the layers whose output channels may be pruned: weight names or globs
            such as ``"features.*"``, module types, presets), ``verbose``, ``resume``, ``frozen`` (see
            :class:`~lightning_pai.TargetOptions`).

    Example::

        Trainer(callbacks=[ChannelPruning(0.5, scorer="l1", start=0)])  # half the channels, at fit start
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        scorer: str | Callable[..., dict[str, Tensor]] = "l1",
        distribution: str = "uniform",
        start: int | float = 0,
        end: int | float | None = None,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        couple: bool = False,
        l1: float = 0.0,
        batches: int = 1,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        **common: Unpack[TargetOptions],
    ) -> None:
        super().__init__(**common)
        self.sparsity, self.scorer, self.distribution = sparsity, scorer, distribution
        self.start, self.end, self.frequency, self.initial_sparsity = start, end, frequency, initial_sparsity
        self.couple, self.l1, self.batches, self.loss_fn = couple, l1, batches, loss_fn
        self.sparsity = self.session.sparsity  # builds the session: every argument is checked here

    def build_session(self) -> ChannelSession:
        """The engine session for these arguments."""
        return ChannelSession(
            type(self).__name__,
            sparsity=self.sparsity,
            scorer=self.scorer,
            distribution=self.distribution,
            start=self.start,
            end=self.end,
            frequency=self.frequency,
            initial_sparsity=self.initial_sparsity,
            couple=self.couple,
            l1=self.l1,
            batches=self.batches,
            loss_fn=self.loss_fn,
            **self.session_options(),
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            sparsity=self.sparsity, scorer=_name(self.scorer), distribution=self.distribution, couple=self.couple
        )

    def report(self, module: Any = None) -> ChannelReport:
        """Channels kept per layer, and the parameters and MACs left once the pruned channels are removed."""
        self._collect_handoff()
        return self.session.report(module)
