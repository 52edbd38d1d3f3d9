"""Exact, deterministic top-k selection and integer budget apportioning."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def active_counts(masks: Mapping[str, Tensor]) -> dict[str, int]:
    """Kept weights per layer (``count_nonzero``: 3.5x faster than a bool sum), one host synchronisation."""
    if not masks:
        return {}
    first = next(iter(masks.values()))
    sums = torch.stack([torch.count_nonzero(m).to(first.device) for m in masks.values()]).tolist()
    return dict(zip(masks, (int(s) for s in sums)))


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask keeping exactly the ``k`` highest scores.

    Ties at the threshold are broken by position: the earliest (row-major) entries are kept, so the
    result is deterministic and identical on every device and rank. Runs in O(n) (``kthvalue``), not a sort.

    Args:
        scores: Any shape; ``-inf`` marks entries that must not be kept unless ``k`` forces it.
        k: Number of entries to keep, ``0 <= k <= scores.numel()``.

    Returns:
        Bool tensor of the shape of ``scores`` with exactly ``k`` True entries.

    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"Cannot keep {k} of {n} entries.")
    if torch.isnan(flat).any():
        raise ValueError("Scores contain NaN; the scorer produced invalid values.")
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k == 0:
        return mask.view_as(scores)
    if k == n:
        return mask.fill_(True).view_as(scores)
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    threshold = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, n - k + 1).values.to(flat.device)
    torch.gt(flat, threshold, out=mask)
    missing = k - int(torch.count_nonzero(mask))
    if missing:
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def apportion(ideal: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Round per-layer real budgets to integers that sum to ``total`` (largest-remainder method).

    Each result is ``floor`` or ``ceil`` of its ideal value (so within one weight of it) and never above
    its cap. Ties in the remainder go to the earlier layer.

    Args:
        ideal: Real-valued number of weights to keep per layer.
        caps: Size of each layer.
        total: Required sum of the result.

    Returns:
        Integer budget per layer.

    """
    counts = {n: min(caps[n], max(0, math.floor(v + 1e-9))) for n, v in ideal.items()}
    short = total - sum(counts.values())
    order = sorted(ideal, key=lambda n: -(ideal[n] - counts[n]))
    for name in order:
        if short <= 0:
            break
        if counts[name] < caps[name]:
            counts[name] += 1
            short -= 1
    return counts


def masks_from_counts(scores: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Per layer, keep the ``counts[name]`` highest scores (see :func:`topk_mask`)."""
    return {name: topk_mask(s, counts[name]) for name, s in scores.items()}


def raise_to_floors(counts: Mapping[str, int], floors: Mapping[str, int]) -> dict[str, int]:
    """Lift each count to its floor, taking the extra weights from layers above their floor.

    The donors give in proportion to their margin above the floor (largest-remainder rounding), so the
    total is unchanged.

    Raises:
        ValueError: If the floors alone need more weights than the total.

    """
    total = sum(counts.values())
    if sum(floors.values()) > total:
        raise ValueError(
            f"`min_density` asks for {sum(floors.values())} kept weights, more than the {total} the sparsity allows."
        )
    lifted = {n: max(c, floors[n]) for n, c in counts.items()}
    excess = sum(lifted.values()) - total
    if excess == 0:
        return lifted
    margin = {n: lifted[n] - floors[n] for n in lifted}
    spare = sum(margin.values())
    ideal = {n: floors[n] + margin[n] * (1 - excess / spare) for n in lifted}
    return apportion(ideal, lifted, total)
