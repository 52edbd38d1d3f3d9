"""Dynamic sparse training: the topology-update core shared by SET, RigL, SNFS, GraNet and GMP.

One update drops active weights and grows inactive ones, per layer:

- drop: the ``n`` active weights with the smallest magnitude (or SET's sign-wise rule, see
  :func:`drop_set`);
- grow: the ``n`` highest growth scores among the weights inactive *after* the drop (so a weight just
  dropped may come straight back; it then keeps its value, as in RigL's default ``reinit_when_same=False``).
  Growth scores: ``random`` (SET), ``|dense gradient|`` (RigL, GraNet), ``|momentum|`` (SNFS).

Weights that become active start at exactly zero (they were masked, so they are zero) and the caller
zeroes their optimizer state (:meth:`~lightning_pai.core.masks.MaskSet.update_` does). Everything here is
deterministic given its inputs (ties are broken by position) so every DDP rank computes the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_pai.core.masks import compute_masks
from lightning_pai.core.select import apportion, topk_mask


def cosine_fraction(alpha: float, step: int, t_end: int, minimum: float = 0.0) -> float:
    """Cosine-decayed drop fraction ``m + (alpha - m) / 2 * (1 + cos(pi * step / t_end))``, ``m = minimum``.

    With ``minimum=0`` this is RigL's ``alpha / 2 * (1 + cos(pi * t / T_end))``; SNFS and GraNet decay their
    prune rate per iteration to ``minimum=0.005`` (``CosineAnnealingLR``'s ``eta_min`` in their code).
    ``minimum`` from ``t_end`` on.
    """
    if t_end <= 0 or step >= t_end:
        return minimum
    return minimum + (alpha - minimum) / 2 * (1 + math.cos(math.pi * step / t_end))


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta 2017's gradual schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3``.

    ``initial`` before ``start``, ``final`` from ``end`` on.
    """
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - start) / (end - start)) ** 3


def drop_counts(
    masks: Mapping[str, Tensor], fraction: float | Mapping[str, float], rounding: str = "floor"
) -> dict[str, int]:
    """Per layer, how many active weights one update drops.

    ``fraction * active`` (``fraction`` may be per layer) rounded down (RigL: ``int(n_ones * drop_fraction)``)
    or up (``"ceil"``: SNFS's and GraNet's ``ceil(rate * nonzeros)``).
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"`rounding` must be 'floor' or 'ceil'; got {rounding!r}.")
    out = {}
    for n, m in masks.items():
        active = int(m.sum())
        exact = (fraction[n] if isinstance(fraction, Mapping) else fraction) * active
        out[n] = min(active, math.floor(exact + 1e-9) if rounding == "floor" else math.ceil(exact - 1e-9))
    return out


def drop_magnitude(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]
) -> dict[str, Tensor]:
    """Masks with the ``counts[name]`` smallest-magnitude *active* weights of each layer removed."""
    out = {}
    for n, m in masks.items():
        keep = int(m.sum()) - counts[n]
        score = weights[n].detach().abs().float().masked_fill(~m, -math.inf)
        out[n] = topk_mask(score, keep)
    return out


def drop_set(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], zeta: float) -> dict[str, Tensor]:
    """SET's drop rule (Mocanu et al. 2018), applied per layer.

    Removes the fraction ``zeta`` of the *positive* active weights closest to zero and, separately,
    ``zeta`` of the *negative* active weights closest to zero.

    Counts per sign are ``floor(zeta * n_positive)`` and ``floor(zeta * n_negative)`` (the official code
    truncates its indices). Active weights that are exactly zero are closer to zero than either side and are
    always dropped, as in the official Keras implementation (its kept set is ``w > smallest positive kept``
    or ``w < largest negative kept``). Keeping them instead would let grown weights whose gradient is
    always zero (e.g. into dead units) pile up: they would never be dropped, and each update would remove
    ``zeta`` of the remaining useful weights.
    """
    out = {}
    for n, m in masks.items():
        w = weights[n].detach().float()
        new = m & (w != 0)
        for side in (w > 0, w < 0):
            active = m & side
            k = math.floor(zeta * int(active.sum()) + 1e-9)
            if k:
                closeness = (-w.abs()).masked_fill(~active, -math.inf)  # highest = closest to zero
                new &= ~topk_mask(closeness, k)
        out[n] = new
    return out


def grow(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Masks with the ``counts[name]`` highest-scored *inactive* weights of each layer added.

    Raises:
        ValueError: If a layer has fewer inactive weights than it must grow.
    """
    out = {}
    for n, m in masks.items():
        free = m.numel() - int(m.sum())
        if counts[n] > free:
            raise ValueError(f"Layer {n!r} cannot grow {counts[n]} weights: only {free} are inactive.")
        score = scores[n].detach().float().masked_fill(m, -math.inf)
        out[n] = m | topk_mask(score, counts[n])
    return out


def random_scores(masks: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Uniform growth scores from a CPU generator seeded with ``seed`` (the same on every rank and device)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=gen).to(m.device) for n, m in masks.items()}


def layer_momentum(momentum: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, float]:
    """SNFS's redistribution statistic: the mean ``|momentum|`` of each layer's active weights (0 if none)."""
    out = {}
    for n, m in masks.items():
        active = int(m.sum())
        out[n] = float(momentum[n].detach().abs().float()[m].sum()) / active if active else 0.0
    return out


def snfs_rates(masks: Mapping[str, Tensor], rate: float, means: Mapping[str, float]) -> dict[str, float]:
    """SNFS's per-layer prune rates: ``rate``, except ``min(sparsity, rate)`` for a nearly dense layer.

    A layer with sparsity below 0.2 whose share of the total mean momentum exceeds ``1 / layers`` prunes
    at most its sparsity (``adjust_prune_rate`` in the official code), so it can grow towards dense.
    """
    total = sum(means.values())
    out = {}
    for n, m in masks.items():
        sparsity = 1.0 - int(m.sum()) / m.numel()
        share = means[n] / total if total > 0 else 0.0
        out[n] = min(sparsity, rate) if sparsity < 0.2 and share > 1.0 / len(masks) else rate
    return out


def momentum_growth_counts(
    momentum: Mapping[str, Tensor], masks: Mapping[str, Tensor], dropped: Mapping[str, Tensor], total: int
) -> dict[str, int]:
    """SNFS's momentum redistribution (Dettmers & Zettlemoyer 2019): per-layer regrowth counts.

    Splits ``total`` regrown weights over layers in proportion to the mean ``|momentum|`` of each layer's
    active weights (``masks``, before the drop), never more than a layer has free after the drop
    (``dropped``); the remainder goes to the layers with room, by the same proportions (largest-remainder
    rounding, so the counts sum to ``total`` whenever there is room).
    """
    means = layer_momentum(momentum, masks)
    caps = {n: d.numel() - int(d.sum()) for n, d in dropped.items()}
    counts = {n: 0 for n in masks}
    left, open_layers = total, [n for n in masks if caps[n] > 0]
    while left > 0 and open_layers:
        weight = sum(means[n] for n in open_layers)
        if weight <= 0:
            ideal = {n: left / len(open_layers) for n in open_layers}
        else:
            ideal = {n: left * means[n] / weight for n in open_layers}
        room = {n: caps[n] - counts[n] for n in open_layers}
        add = apportion({n: min(ideal[n], room[n]) for n in open_layers}, room, min(left, sum(room.values())))
        for n, a in add.items():
            counts[n] += a
        left = total - sum(counts.values())
        open_layers = [n for n in open_layers if counts[n] < caps[n]]
    return counts


def drop_and_grow(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    fraction: float,
    scores: Mapping[str, Tensor],
    *,
    drop: str = "magnitude",
    rounding: str = "floor",
    momentum: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One topology update: drop, then grow as many weights as were dropped.

    Args:
        weights: Current weights by name.
        masks: Current bool masks.
        fraction: Drop fraction ``f_t`` (SET's ``zeta``, RigL's ``alpha_t``, SNFS's prune rate).
        scores: Growth scores (``|gradient|``, ``|momentum|`` or random); the highest inactive ones grow.
        drop: ``"magnitude"`` (``rounding(f_t * active)`` smallest ``|w|`` per layer) or ``"set"``
            (:func:`drop_set`).
        rounding: ``"floor"`` or ``"ceil"`` of the per-layer drop count.
        momentum: When given, SNFS's redistribution: prune rates from :func:`snfs_rates` and regrowth
            counts from :func:`momentum_growth_counts`. Otherwise each layer regrows what it dropped.

    Returns:
        New bool masks with exactly as many active weights in total as ``masks``.
    """
    if drop == "set":
        after = drop_set(weights, masks, fraction)
    else:
        rates: float | dict[str, float] = fraction
        if momentum is not None:
            rates = snfs_rates(masks, fraction, layer_momentum(momentum, masks))
        after = drop_magnitude(weights, masks, drop_counts(masks, rates, rounding))
    counts = {n: int(masks[n].sum()) - int(after[n].sum()) for n in masks}
    if momentum is not None:
        counts = momentum_growth_counts(momentum, masks, after, sum(counts.values()))
    return grow(scores, after, counts)


def prune_by_magnitude(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], sparsity: float, distribution: str
) -> dict[str, Tensor]:
    """``masks`` shrunk to ``sparsity`` by removing the smallest-magnitude remaining ``params`` (GMP, GraNet)."""
    return compute_masks({n: p.detach().abs() for n, p in params.items()}, sparsity, distribution, masks=masks)


@dataclass
class TopologyUpdate:
    """Result of one drop/grow update.

    Attributes:
        masks: New bool masks by name.
        dropped: Per layer, weights that were active and are not any more.
        grown: Per layer, weights that were inactive and are active now.
    """

    masks: dict[str, Tensor]
    dropped: dict[str, int]
    grown: dict[str, int]


def diff(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> TopologyUpdate:
    """Summarise the change from ``old`` to ``new`` masks."""
    return TopologyUpdate(
        masks=dict(new),
        dropped={n: int((old[n] & ~new[n]).sum()) for n in old},
        grown={n: int((new[n] & ~old[n]).sum()) for n in old},
    )
