"""N:M structured sparsity: exactly ``n`` kept weights in every group of ``m`` consecutive inputs.

The groups run along each layer's *input-channel* axis — the reduction axis of the layer's matrix product,
which is what semi-structured kernels (NVIDIA's 2:4 sparse tensor cores, ``torch.sparse.to_sparse_semi_structured``)
compress: ``W[o, i]`` of an ``nn.Linear`` in groups ``i = 4g .. 4g+3``; a convolution's input channels at
every kernel position (NVIDIA's ASP layout, ``W[o, c, kh, kw]`` grouped over ``c``); a transposed HF
``Conv1D`` along its first axis; an attention ``in_proj_weight`` along its columns. The axis comes from the
target's :class:`~lightning_pai.core.targets.Layout` (``in_dims[0]``).

Within a group the ``n`` highest scores are kept (ties broken by position, so every rank agrees); entries
scored ``-inf`` (already pruned) are kept only when a group has fewer than ``n`` others. A budget ``k``
between ``n`` and ``m`` gives the intermediate steps of gradual methods (``k = m`` keeps everything).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_pai.core.targets import Layout
from lightning_pai.core.validation import check_choice

NMSpec = str | Mapping[str, str] | None

#: What becomes of a layer N:M groups cannot fit (input channels not a multiple of ``M``: a 3-channel stem, a
#: depthwise convolution): ``"error"`` refuses before training (the default), ``"dense"`` leaves it dense (out
#: of the targets), ``"unstructured"`` prunes it unstructured to the pattern's sparsity ``1 - N/M`` (NVIDIA
#: ASP leaves such layers dense). Either way the layers are named in a warning and in the report.
NM_INCOMPATIBLE = ("error", "dense", "unstructured")


def parse_nm(value: str, argument: str = "nm") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``.

    Raises:
        ValueError: Unless ``value`` is ``"N:M"`` with integers ``0 < N < M``.
    """
    try:
        n, m = (int(v) for v in str(value).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"`{argument}` patterns are 'N:M' with integers 0 < N < M (e.g. '2:4'); got {value!r}.")
    return n, m


def check_nm(nm: NMSpec) -> None:
    """Validate an ``nm`` argument without a model: ``"N:M"``, ``{glob: "N:M"}`` or None.

    Raises:
        ValueError: On any other value.
    """
    if nm is None:
        return
    if isinstance(nm, str):
        parse_nm(nm)
        return
    if not isinstance(nm, Mapping) or not all(isinstance(k, str) for k in nm):
        raise ValueError(f"`nm` must be 'N:M', a mapping of parameter-name globs to 'N:M', or None; got {nm!r}.")
    for pattern in nm.values():
        parse_nm(pattern)


def check_nm_incompatible(value: object) -> str:
    """``value`` if it is one of :data:`NM_INCOMPATIBLE`.

    Raises:
        ValueError: Otherwise, naming ``nm_incompatible`` and the allowed values.
    """
    check_choice(value, NM_INCOMPATIBLE, "nm_incompatible")
    return value


def nm_fits(shape: Sequence[int], layout: Layout, m: int) -> bool:
    """Whether a layer of ``shape`` splits into groups of ``m`` along its input-channel axis."""
    return bool(layout.in_dims) and shape[layout.in_dims[0]] % m == 0


def nm_sparsity(sparsity: float | None, nm: NMSpec) -> float:
    """The ``sparsity`` a callback prunes its unstructured layers to, checked against ``nm``.

    With one pattern for every layer (``nm="2:4"``) the density is fixed at N/M: ``sparsity`` must be None
    or ``1 - N/M``. With a mapping, ``sparsity`` is that of the layers not kept N:M and must be given.

    Raises:
        ValueError: On a conflicting or missing ``sparsity``.
    """
    check_nm(nm)
    if isinstance(nm, str):
        n, m = parse_nm(nm)
        implied = 1.0 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"`sparsity`={sparsity} conflicts with `nm`={nm!r}, which keeps {n} of every {m} weights in every "
                f"layer (sparsity {implied:g}): pass `sparsity={implied:g}` or None, or give `nm` as a mapping "
                "of parameter-name globs for some layers only."
            )
        return implied
    if sparsity is None:
        raise ValueError("`sparsity` is None: it may only be left out when `nm` ('N:M') covers every layer.")
    return sparsity


def resolve_nm(
    nm: NMSpec, shapes: Mapping[str, Sequence[int]], layouts: Mapping[str, Layout], incompatible: str = "error"
) -> dict[str, tuple[int, int]]:
    """Per target name, its ``(n, m)``: every target for a plain ``"N:M"``, the first matching glob otherwise.

    Args:
        nm: ``"N:M"``, ``{glob: "N:M"}`` or None.
        shapes: The targets' shapes, by name.
        layouts: Their layouts (the input-channel axis the groups run along).
        incompatible: Layers whose input channels are not a multiple of ``M`` (see :data:`NM_INCOMPATIBLE`):
            ``"error"`` raises; otherwise they are returned too (test them with :func:`nm_fits`). With
            ``"dense"`` a glob may match nothing: its layers may already have been left out of the targets.

    Raises:
        ValueError: If a glob matches no target, or (``incompatible="error"``) a layer's input channels are
            not a multiple of ``m``; the message names every such layer.
    """
    check_nm_incompatible(incompatible)
    if nm is None:
        return {}
    rules = {"*": nm} if isinstance(nm, str) else dict(nm)
    out: dict[str, tuple[int, int]] = {}
    for pattern, value in rules.items():
        hits = [name for name in shapes if fnmatch.fnmatchcase(name, pattern)]
        if not hits and incompatible != "dense":
            raise ValueError(f"`nm` pattern {pattern!r} matches no pruned parameter; they are {list(shapes)[:6]}.")
        for name in hits:
            out.setdefault(name, parse_nm(value))
    bad = [
        f"{name} ({shapes[name][layouts[name].in_dims[0]] if layouts[name].in_dims else 0} input channels)"
        for name, (_, m) in out.items()
        if not nm_fits(shapes[name], layouts[name], m)
    ]
    if bad and incompatible == "error":
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(
            f"N:M groups need input channels in multiples of M: {', '.join(bad[:8])}{more} "
            f"({len(bad)} targeted layer{'s' if len(bad) > 1 else ''}). Pass `nm_incompatible='dense'` to leave such "
            "layers dense or `nm_incompatible='unstructured'` to prune them unstructured to the same sparsity (each "
            "is then named in a warning and in the report), leave them out of `nm` (a mapping of globs), or "
            "`exclude` them."
        )
    return out


def _groups(tensor: Tensor, layout: Layout, m: int) -> Tensor:
    """``tensor`` with its input-channel axis last, split into groups of ``m``: ``(..., channels / m, m)``.

    Raises:
        ValueError: If the layout has no input axis or its channels are not a multiple of ``m``.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"N:M groups have M >= 1 weights; got M={m!r}.")
    if not layout.in_dims or tensor.shape[layout.in_dims[0]] % m:
        channels = tensor.shape[layout.in_dims[0]] if layout.in_dims else 0
        raise ValueError(
            f"N:M groups need input channels in multiples of M={m}; this layer has {channels} (`nm_incompatible` "
            "'dense' or 'unstructured' handles such layers)."
        )
    moved = tensor.movedim(layout.in_dims[0], -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _ungroup(groups: Tensor, layout: Layout, shape: Sequence[int]) -> Tensor:
    moved = groups.reshape(*groups.shape[:-2], groups.shape[-2] * groups.shape[-1])
    out = moved.movedim(-1, layout.in_dims[0])
    assert tuple(out.shape) == tuple(shape)
    return out


def nm_keep(scores: Tensor, k: int, m: int, layout: Layout) -> Tensor:
    """Bool mask keeping the ``k`` highest scores of every group of ``m`` (``-inf``: kept only if forced).

    Raises:
        ValueError: Unless ``0 < k <= m`` and the layer's input channels are a multiple of ``m``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= m:
        raise ValueError(f"N:M keeps 0 < N <= M weights of every group; got N={k!r}, M={m!r}.")
    groups = _groups(scores.detach().float(), layout, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], True)
    return _ungroup(mask, layout, scores.shape).contiguous()


def nm_mask(scores: Tensor, k: int, m: int, layout: Layout, incompatible: str = "error") -> Tensor:
    """:func:`nm_keep` where the layer's input channels split into groups of ``m``; otherwise per ``incompatible``.

    A layer the groups cannot fit keeps every weight with ``"dense"``, and with ``"unstructured"`` the
    ``round(size * k / m)`` highest scores of the whole layer (the same density ``k / m``; ties broken by
    position, ``-inf`` kept only if forced); ``"error"`` raises as :func:`nm_keep` does.

    Raises:
        ValueError: Unless ``0 < k <= m``, or (``"error"``) if the groups cannot fit the layer.
    """
    check_nm_incompatible(incompatible)
    if incompatible == "error" or nm_fits(scores.shape, layout, m):
        return nm_keep(scores, k, m, layout)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= m:
        raise ValueError(f"N:M keeps 0 < N <= M weights of every group; got N={k!r}, M={m!r}.")
    if incompatible == "dense":
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    flat = scores.detach().float().reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[: round(flat.numel() * k / m)]] = True
    return mask.view(scores.shape)


def group_counts(mask: Tensor, m: int, layout: Layout) -> Tensor:
    """Kept weights per group of ``m`` (one entry per group)."""
    return _groups(mask, layout, m).sum(-1)


def refill_groups(scores: Tensor, mask: Tensor, k: int, m: int, layout: Layout) -> Tensor:
    """``mask`` with every group filled back to ``k`` kept weights by the highest ``scores`` of its inactive ones.

    The N:M form of a topology update's growth: the weights a group lost in the drop regrow inside it.
    """
    grow = scores.detach().float().masked_fill(mask, -math.inf)
    groups, grow_g = _groups(mask, layout, m), _groups(grow, layout, m)
    missing = k - groups.sum(-1, keepdim=True)
    order = torch.argsort(grow_g, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
    new = groups | (rank < missing)
    return _ungroup(new, layout, mask.shape).contiguous()


def is_nm(mask: Tensor, n: int, m: int, layout: Layout) -> bool:
    """Whether every group of ``m`` has exactly ``n`` kept weights."""
    return bool((group_counts(mask, m, layout) == n).all())


def group_budget(n: int, m: int, progress: float) -> int:
    """Per-group budget ``m - floor((m - n) * progress)`` of a gradual N:M schedule (``progress`` 0 -> m, 1 -> n)."""
    progress = min(max(progress, 0.0), 1.0)
    return m - math.floor((m - n) * progress + 1e-9)
