"""Channel scorers (one score per channel of each group; higher = kept first) and exact channel selection.

Every channel scorer has the same signature::

    fn(ctx: ChannelContext) -> dict[str, Tensor]

returning, for each group in ``ctx.groups`` (by :attr:`~lightning_pai.core.channels.ChannelGroup.key`), a float
vector of its ``width`` channel scores. A group of several layers (coupled by residual additions) scores the
sum over its members. Each entry carries metadata (:func:`channel_scorer_info`) that callers read instead of
testing names:

- ``needs_norm``: the scorer reads the ``γ`` of the norm on each channel; groups without one are left alone and
  a model without any is refused before training;
- ``observe``: ``fn(ctx) -> dict[str, Tensor]`` run after every backward pass on the current gradients; the mean
  of its values since the last pruning is ``ctx.observed`` (first-order Taylor).

:func:`select_channels` turns scores into exact per-group keep vectors under a ``"global"`` or ``"uniform"``
budget, every group keeping at least one channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.channels import ChannelGraph, ChannelGroup
from lightning_pai.core.distributions import counts_from_densities, global_keep
from lightning_pai.core.registry import Registry
from lightning_pai.core.select import active_counts, masks_from_counts, raise_to_floors
from lightning_pai.core.validation import check_choice, check_sparsity

#: How a channel budget is split across groups: one ranking over every group's channels (``"global"``, network
#: slimming's single threshold) or the same fraction of each group (``"uniform"``, Li et al. 2017's per-layer rate).
CHANNEL_DISTRIBUTIONS = ("global", "uniform")


@dataclass
class ChannelContext:
    """Everything a channel scorer may read.

    Attributes:
        module: The model.
        graph: Its channel groups (the modules they name are ``graph.modules``).
        groups: The groups to score.
        observed: Per group, the mean of the scorer's ``observe`` values since the last pruning (None if none).
    """

    module: nn.Module
    graph: ChannelGraph
    groups: Sequence[ChannelGroup]
    observed: Mapping[str, Tensor] | None = None

    def param(self, layer: str, attr: str) -> Tensor | None:
        """``layer``'s parameter ``attr`` (None if it has none)."""
        value = getattr(self.graph.modules[layer], attr, None)
        return value if isinstance(value, Tensor) else None

    def norm_slices(self, group: ChannelGroup, attr: str = "weight") -> list[Tensor]:
        """Each norm's ``attr`` (``"weight"``: ``γ``) entries on ``group``'s channels."""
        out = []
        for norm, first in group.norms:
            p = self.param(norm, attr)
            if p is not None:
                out.append(p[first : first + group.width])
        return out


ChannelScorer = Callable[[ChannelContext], dict[str, Tensor]]

_CHANNEL_SCORERS: Registry[ChannelScorer] = Registry(
    "channel scorer",
    "scorer",
    "lightning_pai.core.channel_scorers.register_channel_scorer",
    defaults={"needs_norm": False, "observe": None},
)


def register_channel_scorer(
    name: str,
    fn: ChannelScorer | None = None,
    *,
    overwrite: bool = False,
    needs_norm: bool = False,
    observe: ChannelScorer | None = None,
):
    """Register a channel scorer ``fn(ctx) -> {group key: scores}`` (decorator if ``fn`` is None).

    Args:
        name: Registry name (case-insensitive).
        fn: The scorer.
        overwrite: Replace an existing entry of that name.
        needs_norm: It reads the norms' ``γ`` (groups without a norm are left alone).
        observe: Run after every backward pass; the mean of its values since the last pruning is ``ctx.observed``.
    """
    return _CHANNEL_SCORERS.register(name, fn, overwrite=overwrite, needs_norm=needs_norm, observe=observe)


def get_channel_scorer(name: str | ChannelScorer) -> ChannelScorer:
    """The channel scorer registered as ``name`` (a callable passes through).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.
    """
    return _CHANNEL_SCORERS.get(name)


def channel_scorer_info(name: str | ChannelScorer) -> Mapping[str, Any]:
    """Metadata of a channel scorer: ``needs_norm``, ``observe``."""
    return _CHANNEL_SCORERS.info(name)


def list_channel_scorers() -> list[str]:
    """Names of the registered channel scorers."""
    return _CHANNEL_SCORERS.list()


def _rows(weight: Tensor) -> Tensor:
    """A convolution's or linear layer's weight as ``[out, fan-in]``."""
    return weight.detach().float().reshape(weight.shape[0], -1)


@register_channel_scorer("l1")
@torch.no_grad()
def l1_norm(ctx: ChannelContext) -> dict[str, Tensor]:
    """Filter L1 norm (Li et al. 2017, "Pruning filters for efficient ConvNets", arXiv:1608.08710): ``Σ|W_c|``.

    ``W_c`` is output channel ``c``'s filter (all its input channels and kernel positions; a linear layer's row),
    summed over a group's members.
    """
    return {g.key: sum(_rows(ctx.param(m, "weight")).abs().sum(1) for m in g.members) for g in ctx.groups}


@register_channel_scorer("l2")
@torch.no_grad()
def l2_norm(ctx: ChannelContext) -> dict[str, Tensor]:
    """Filter L2 norm ``‖W_c‖₂`` (the L2 variant Li et al. 2017 compare), summed over a group's members."""
    return {g.key: sum(_rows(ctx.param(m, "weight")).norm(dim=1) for m in g.members) for g in ctx.groups}


@register_channel_scorer("bn_gamma", needs_norm=True)
@torch.no_grad()
def bn_gamma(ctx: ChannelContext) -> dict[str, Tensor]:
    """BatchNorm scale magnitude (network slimming, Liu et al. 2017, arXiv:1708.06519): ``|γ_c|``.

    Summed over the norms on a group's channels (one per member of a coupled group, plus any norm after the
    addition). Train with the L1 penalty ``s Σ|γ|`` (``l1=`` of the methods, the reference's ``--s 1e-4``) so that
    unimportant channels' ``γ`` shrink towards zero.
    """
    return {g.key: sum(p.detach().float().abs() for p in ctx.norm_slices(g)) for g in ctx.groups}


@torch.no_grad()
def gate_gradients(ctx: ChannelContext) -> dict[str, Tensor]:
    """Per channel, the squared gradient of the loss for a gate ``z = 1`` on the channel: ``(∂L/∂z)²``.

    On a channel normalised by BatchNorm the gate sits after the norm: ``∂L/∂z = γ ∂L/∂γ + β ∂L/∂β`` (Molchanov
    et al. 2019's Taylor-FO-BN); without a norm it sits on the layer's output: ``∂L/∂z = Σ_{w ∈ W_c} w ∂L/∂w +
    b_c ∂L/∂b_c`` (the filter's first-order Taylor term, their eq. 8, squared after summing). A group sums the
    squares over its norms (or members). Parameters without a gradient contribute 0.
    """
    out = {}
    for g in ctx.groups:
        total = torch.zeros(g.width)
        if g.norms:
            for norm, first in g.norms:
                term = torch.zeros(g.width)
                for attr in ("weight", "bias"):
                    p = ctx.param(norm, attr)
                    if p is not None and p.grad is not None:
                        sl = slice(first, first + g.width)
                        term += (p.detach()[sl].float() * p.grad[sl].float()).cpu()
                total += term.square()
        else:
            for m in g.members:
                term = torch.zeros(g.width)
                w, b = ctx.param(m, "weight"), ctx.param(m, "bias")
                if w.grad is not None:
                    term += (_rows(w) * _rows(w.grad)).sum(1).cpu()
                if b is not None and b.grad is not None:
                    term += (b.detach().float() * b.grad.float()).cpu()
                total += term.square()
        out[g.key] = total
    return out


@register_channel_scorer("taylor", observe=gate_gradients)
def taylor(ctx: ChannelContext) -> dict[str, Tensor]:
    """First-order Taylor importance: the mean over training steps of the squared gate gradient ``(∂L/∂z)²``.

    Molchanov et al. 2019, "Importance estimation for neural network pruning" (CVPR, arXiv:1906.10771). See
    :func:`gate_gradients` for ``∂L/∂z`` (``γ ∂L/∂γ + β ∂L/∂β`` after a BatchNorm, ``Σ w ∂L/∂w + b ∂L/∂b`` over the
    filter otherwise). The mean runs over the optimizer steps since the previous pruning (their averaging
    over the pruning interval); pruning at fit start averages over the first ``batches`` training batches.

    Raises:
        ValueError: If no gradient was observed.
    """
    if ctx.observed is None:
        raise ValueError("The `taylor` channel scorer needs observed gradients; none were recorded.")
    return {g.key: ctx.observed[g.key].float() for g in ctx.groups}


def check_distribution(distribution: str) -> str:
    """``distribution`` if it is one of :data:`CHANNEL_DISTRIBUTIONS`.

    Raises:
        ValueError: Otherwise, naming the allowed values.
    """
    check_choice(distribution, CHANNEL_DISTRIBUTIONS, "distribution")
    return distribution


def channel_counts(widths: Mapping[str, int], sparsity: float, distribution: str) -> dict[str, int] | None:
    """Channels each group keeps under ``"uniform"`` (None for ``"global"``, decided by the scores).

    Exactly ``round((1 - sparsity) * total)`` channels in all, each group within one channel of
    ``(1 - sparsity) * width`` (largest remainders).
    """
    if distribution != "uniform":
        return None
    density = 1.0 - sparsity
    return counts_from_densities({n: density for n in widths}, dict(widths), density)


def check_channel_budget(groups: Sequence[ChannelGroup], sparsity: float, distribution: str) -> None:
    """Raise before training when ``sparsity`` would leave a group without channels.

    Every layer keeps at least one channel. Under ``"uniform"`` the counts are known from the widths, so the
    message names the layers; under ``"global"`` the total must cover one channel per group (the scores then
    decide, and a group the ranking would empty keeps its best channel, taken from the others).

    Raises:
        ValueError: Naming the layers (``uniform``) or the numbers (``global``).
    """
    check_sparsity(sparsity)
    widths = {g.key: g.width for g in groups}
    counts = channel_counts(widths, sparsity, distribution)
    if counts is not None:
        empty = [g for g in groups if counts[g.key] == 0]
        if empty:
            names = ", ".join(f"`{g.label}` ({g.width} channels)" for g in empty[:5])
            raise ValueError(
                f"`sparsity={sparsity:g}` with `distribution='uniform'` would remove every channel of {names}; every "
                "layer keeps at least one channel. Lower `sparsity`, exclude the layer (`exclude=`), or use "
                "`distribution='global'`."
            )
        return
    total = sum(widths.values())
    kept = round((1.0 - sparsity) * total)
    if kept < len(groups):
        raise ValueError(
            f"`sparsity={sparsity:g}` keeps {kept} of the {total} channels, fewer than one per layer ({len(groups)} "
            "layers); every layer keeps at least one channel. Lower `sparsity` or exclude layers (`exclude=`)."
        )


def select_channels(
    scores: Mapping[str, Tensor],
    sparsity: float,
    distribution: str = "global",
    current: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep vectors removing ``sparsity`` of the channels: the highest scores are kept, every group keeps one.

    ``round((1 - sparsity) * total)`` channels are kept over all groups (exactly; fewer only when the current
    masks have fewer left). Under ``"global"`` the highest scores over every group are kept, and a group left
    empty gets back its best channel from the groups with the most to spare; under ``"uniform"`` each group keeps
    ``(1 - sparsity)`` of its width (:func:`channel_counts`). Channels already pruned (``current``) stay pruned.
    Ties are broken by position, so every process selects the same channels.

    Args:
        scores: Per group key, one score per channel.
        sparsity: Fraction of the channels removed, in ``[0, 1)``.
        distribution: ``"global"`` or ``"uniform"``.
        current: Current keep vectors (channels they prune stay pruned).

    Returns:
        Bool keep vectors (CPU) by group key.
    """
    check_distribution(distribution)
    density = 1.0 - check_sparsity(sparsity)
    scores = {n: s.detach().float().cpu() for n, s in scores.items()}
    if current is not None:
        scores = {n: s.masked_fill(~current[n].cpu().bool(), -math.inf) for n, s in scores.items()}
    available = {n: int(current[n].sum()) if current is not None else s.numel() for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    keep = min(round(density * total), sum(available.values()))
    counts = channel_counts({n: s.numel() for n, s in scores.items()}, sparsity, distribution)
    if counts is None:
        counts = active_counts(global_keep(scores, keep))
    counts = {n: min(c, available[n]) for n, c in counts.items()}
    floors = {n: min(1, available[n]) for n in scores}
    counts = raise_to_floors(counts, floors) if sum(counts.values()) >= sum(floors.values()) else floors
    return masks_from_counts(scores, counts)
