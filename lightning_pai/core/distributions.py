"""Layer-wise sparsity distributions: how many weights each layer keeps.

Every distribution has the same signature::

    fn(scores: Mapping[str, Tensor], density: float, **context) -> dict[str, int]

``scores`` holds one score tensor per prunable parameter (shaped like it, in the targets' order; ``-inf``
marks entries that may not be kept), ``density`` is the fraction of all targeted weights to keep
(``1 - sparsity``). The result is the exact number of weights each layer keeps; their sum is
``round(density * total)`` and each layer's count is within one weight of its real-valued budget
(:func:`counts_from_densities` turns per-layer densities into such counts).

Each entry carries metadata (:func:`distribution_info`) that callers read instead of testing names:

- ``layouts``: called with ``layouts=`` (parameter name -> :class:`~lightning_pai.core.targets.Layout`) to
  read each target's matrix shape (ERK/ER: an ``in_proj_weight`` is three ``E x E`` matrices, a ``Conv1D``
  weight is transposed);
- ``options``: called with the method's ``distribution_options`` as keyword arguments;
- ``iterative``: it can shrink masks that earlier rounds pruned, ranking the survivors by their scores
  (iterative magnitude pruning, gradual pruning): ``"global"``, ``"uniform"``, ``"lamp"``; shape-only
  budgets (``"erk"``, ``"er"``) are not;
- ``rejects_signed``: it ranks non-negative magnitudes and refuses signed scores (``"lamp"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_pai.core.registry import Registry
from lightning_pai.core.select import active_counts, apportion, topk_masks
from lightning_pai.core.targets import Layout, matrix_shapes

Distribution = Callable[[Mapping[str, Tensor], float], dict[str, int]]

_DISTRIBUTIONS: Registry[Distribution] = Registry(
    "distribution",
    "distribution",
    "lightning_pai.register_distribution",
    defaults={"layouts": False, "options": False, "iterative": False, "rejects_signed": False},
)


def register_distribution(
    name: str,
    fn: Distribution | None = None,
    *,
    overwrite: bool = False,
    layouts: bool = False,
    options: bool = False,
    iterative: bool = False,
    rejects_signed: bool = False,
):
    """Register a distribution ``fn(scores, density, **context) -> counts`` (decorator if ``fn`` is None).

    Args:
        name: Registry name (case-insensitive).
        fn: The distribution.
        overwrite: Replace an existing entry of that name.
        layouts: Call ``fn`` with ``layouts=`` (None when unknown).
        options: Call ``fn`` with the method's ``distribution_options`` as keyword arguments.
        iterative: ``fn`` can shrink existing masks by ranking their survivors (usable by iterative and
            gradual pruning).
        rejects_signed: ``fn`` ranks magnitudes: signed scorers (GraSP) are refused before training.
    """
    info = {"layouts": layouts, "options": options, "iterative": iterative, "rejects_signed": rejects_signed}
    return _DISTRIBUTIONS.register(name, fn, overwrite=overwrite, **info)


def distribution_info(name: str | Distribution) -> Mapping[str, Any]:
    """Metadata of a distribution (see the module docstring); defaults for an unregistered callable."""
    return _DISTRIBUTIONS.info(name)


def iterative_distributions() -> list[str]:
    """Names of the distributions that can shrink existing masks (``iterative=True``)."""
    return [n for n in _DISTRIBUTIONS.list() if _DISTRIBUTIONS.info(n)["iterative"]]


def signed_distributions() -> list[str]:
    """Names of the distributions that accept signed scores (``rejects_signed=False``)."""
    return [n for n in _DISTRIBUTIONS.list() if not _DISTRIBUTIONS.info(n)["rejects_signed"]]


def check_iterative(distribution: str | Distribution, argument: str = "distribution") -> None:
    """Raise unless ``distribution`` can shrink existing masks by their scores (``iterative`` metadata).

    Raises:
        ValueError: Naming ``argument`` and the distributions that can.
    """
    get_distribution(distribution)
    if not distribution_info(distribution)["iterative"]:
        allowed = iterative_distributions()
        raise ValueError(
            f"`{argument}` must be one of {allowed} here (distributions that rank the survivors of earlier "
            f"pruning; register one with `iterative=True`); got {distribution!r}."
        )


def distribute(
    distribution: str | Distribution,
    scores: Mapping[str, Tensor],
    density: float,
    layouts: Mapping[str, Layout] | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Call ``distribution`` (a name or callable) with the context its metadata asks for."""
    fn = get_distribution(distribution)
    info = _DISTRIBUTIONS.info(distribution)
    context: dict[str, Any] = {}
    if info["layouts"]:
        context["layouts"] = layouts
    if info["options"]:
        context.update(options or {})
    elif options:
        raise ValueError(f"`distribution_options` given, but distribution {distribution!r} takes no options.")
    return fn(scores, density, **context)


def get_distribution(name: str | Distribution) -> Distribution:
    """Return the distribution registered as ``name`` (a callable passes through).

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.

    """
    return _DISTRIBUTIONS.get(name)


def list_distributions() -> list[str]:
    """Names of the registered distributions."""
    return _DISTRIBUTIONS.list()


def _target_total(scores: Mapping[str, Tensor], density: float) -> int:
    return round(density * sum(s.numel() for s in scores.values()))


def counts_from_densities(
    densities: Mapping[str, float], sizes: Mapping[str, int], density: float | None = None
) -> dict[str, int]:
    """Exact per-layer kept counts from real-valued per-layer densities.

    Each layer's count is within one weight of ``densities[name] * sizes[name]`` (never above its size) and the
    counts sum to ``round(density * total)`` (default: the rounded sum of the budgets), by largest remainders
    (:func:`~lightning_pai.core.select.apportion`).
    """
    ideal = {n: densities[n] * sizes[n] for n in sizes}
    total = round(sum(ideal.values())) if density is None else round(density * sum(sizes.values()))
    return apportion(ideal, dict(sizes), total)


def _sizes(scores: Mapping[str, Tensor]) -> dict[str, int]:
    return {n: s.numel() for n, s in scores.items()}


def global_keep(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Masks keeping the ``k`` highest scores over all layers (ties by position in layer order).

    Per layer this is exactly ``topk_mask(scores[name], count)`` for the layer's count, so callers that
    only need the masks of the ``"global"`` distribution take them from here without a second selection.
    The layers are never concatenated (:func:`~lightning_pai.core.select.topk_masks`): beside the scores,
    the selection needs the masks and one bool tensor of the largest layer.
    """
    return dict(zip(scores, topk_masks(list(scores.values()), k)))


def _global_counts(scores: Mapping[str, Tensor], k: int) -> dict[str, int]:
    """Counts per layer when the ``k`` highest scores over all layers are kept."""
    return active_counts(global_keep(scores, k))


@register_distribution("uniform", iterative=True)
def uniform(scores: Mapping[str, Tensor], density: float) -> dict[str, int]:
    """Every layer keeps the same fraction ``density`` of its weights (up to rounding)."""
    return counts_from_densities({n: density for n in scores}, _sizes(scores), density)


@register_distribution("global", iterative=True)
def global_(scores: Mapping[str, Tensor], density: float) -> dict[str, int]:
    """One threshold across all layers: the ``round(density * N)`` highest scores of the network are kept."""
    return _global_counts(scores, _target_total(scores, density))


def global_masks(scores: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """The masks of :func:`global_` in one selection (see :func:`global_keep`)."""
    return global_keep(scores, _target_total(scores, density))


def erdos_renyi_densities(
    shapes: Mapping[str, torch.Size], density: float, kernel: bool = True, layouts: Mapping[str, Layout] | None = None
) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi(-Kernel) distribution.

    Evci et al. 2020, "Rigging the Lottery" (arXiv:1911.11134), after Mocanu et al. 2018. Layer l keeps
    density ``d_l = eps * raw_l`` with ``raw_l = sum(shape_l) / prod(shape_l)`` (ERK: all dimensions,
    ``(n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)`` for a conv) or ``raw_l = (n_in + n_out) / (n_in n_out)``
    (ER: only the two channel dimensions). ``eps`` is solved so that ``sum_l d_l n_l = density * N``.
    A layer whose ``d_l`` would exceed 1 is made dense, and ``eps`` is solved again for the others
    with the remaining budget (repeated until no layer exceeds 1), as in the RigL reference code.

    With ``layouts``, each parameter's dimensions are those of one of its matrices (``(n_out, n_in, *k)`` of
    :meth:`~lightning_pai.core.targets.Layout.block_shape`): a transposed HF ``Conv1D`` or
    ``ConvTranspose`` weight gets the same density as the equivalent ``nn.Linear`` / ``Conv``, and an
    attention ``in_proj_weight`` (or an LSTM's stacked gates) that of its ``E x E`` (``H x n_in``) blocks.

    Args:
        shapes: Parameter shapes by name.
        density: Overall fraction of weights kept.
        kernel: ERK (True) or ER (False).
        layouts: How each parameter maps to weight matrices (default: the shape as it is, output first).

    Returns:
        Density per layer, in ``[0, 1]``.

    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {}
    for n, s in matrix_shapes(shapes, layouts).items():
        dims = list(s) if kernel or len(s) < 2 else list(s[:2])
        raw[n] = sum(dims) / math.prod(dims)
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            break
        remaining = budget - sum(sizes[n] for n in dense)
        eps = remaining / sum(raw[n] * sizes[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top <= 1:
            break
        dense.update(n for n in free if raw[n] == top)
    return {n: 1.0 if n in dense else max(0.0, eps * raw[n]) for n in shapes}


def _erdos_renyi_counts(
    scores: Mapping[str, Tensor], density: float, kernel: bool, layouts: Mapping[str, Layout] | None
) -> dict[str, int]:
    dens = erdos_renyi_densities({n: s.shape for n, s in scores.items()}, density, kernel, layouts)
    return counts_from_densities(dens, _sizes(scores), density)


@register_distribution("erk", layouts=True)
def erk(scores: Mapping[str, Tensor], density: float, layouts: Mapping[str, Layout] | None = None) -> dict[str, int]:
    """Erdős–Rényi-Kernel (Evci et al. 2020): density ∝ ``sum(shape)/prod(shape)``.

    See :func:`erdos_renyi_densities`.
    """
    return _erdos_renyi_counts(scores, density, True, layouts)


@register_distribution("er", layouts=True)
def er(scores: Mapping[str, Tensor], density: float, layouts: Mapping[str, Layout] | None = None) -> dict[str, int]:
    """Erdős–Rényi (Mocanu et al. 2018): density ∝ ``(n_out + n_in)/(n_out n_in)``.

    See :func:`erdos_renyi_densities`.
    """
    return _erdos_renyi_counts(scores, density, False, layouts)


def smart_ratio_densities(
    sizes: Mapping[str, int], density: float, linear: Mapping[str, bool], linear_keep: float = 0.3
) -> dict[str, float]:
    """Per-layer densities of smart-ratio random tickets (Su et al. 2020, "Sanity-checking pruning methods").

    Layers are taken in the model's order ``l = 1..L``: layer ``l`` keeps ``k ((L - l + 1)^2 + (L - l + 1))`` of
    its weights, the linear (classifier) layers a fixed ``linear_keep`` (the reference's 30 %), ``k`` set so the
    whole network keeps ``density``; a layer whose density would exceed 1 keeps everything and its excess goes
    to the next layers in order (the reference's ``ExtraNum``). With only linear targets (an MLP) every layer
    follows the formula.

    Args:
        sizes: Weights per target, in the model's order.
        density: Fraction of all targeted weights kept.
        linear: Whether each target is a linear layer.
        linear_keep: Density of the linear layers.

    Returns:
        Density per target.

    Raises:
        ValueError: If the linear layers at ``linear_keep`` already exceed the budget.
    """
    names = list(sizes)
    count = len(names)
    fixed = {n for n in names if linear[n]} if not all(linear[n] for n in names) else set()
    depth = {n: count - index for index, n in enumerate(names)}  # L - l + 1 for l = 1..L
    raw = {n: float(depth[n] ** 2 + depth[n]) for n in names}
    goal = density * sum(sizes.values()) - linear_keep * sum(sizes[n] for n in fixed)
    if fixed and goal <= 0:
        raise ValueError(
            f"smart_ratio: the linear layers alone keep {linear_keep:g} of their weights, more than the whole "
            f"budget at density {density:g}; lower `distribution_options={{'linear_keep': ...}}` or the sparsity."
        )
    free = [n for n in names if n not in fixed]
    scale = goal / sum(raw[n] * sizes[n] for n in free)
    out = {n: linear_keep if n in fixed else raw[n] * scale for n in names}
    extra = 0.0
    for n in free:  # densities above 1 are capped, the excess weights go to the next layers in order
        if out[n] >= 1:
            extra += (out[n] - 1) * sizes[n]
            out[n] = 1.0
        elif extra > 0:
            room = (1 - out[n]) * sizes[n]
            used = min(room, extra)
            out[n] += used / sizes[n]
            extra -= used
    return out


@register_distribution("smart_ratio", layouts=True, options=True)
def smart_ratio(
    scores: Mapping[str, Tensor],
    density: float,
    layouts: Mapping[str, Layout] | None = None,
    linear_keep: float = 0.3,
) -> dict[str, int]:
    """Smart-ratio budgets (Su et al. 2020), see :func:`smart_ratio_densities`.

    Linear layers are the targets whose layout is ``"linear"``; their density is the option ``linear_keep``
    (``distribution_options={"linear_keep": ...}``, default 0.3).
    """
    linear = {n: layouts is not None and n in layouts and layouts[n].kind == "linear" for n in scores}
    densities = smart_ratio_densities(_sizes(scores), density, linear, linear_keep)
    return counts_from_densities(densities, _sizes(scores), density)


def lamp_scores(scores: Tensor) -> Tensor:
    """Layer-adaptive magnitude-based pruning scores of one layer.

    Lee et al. 2021, "Layer-adaptive sparsity for the magnitude-based pruning" (arXiv:2010.07611), eq. 2:
    with the layer's entries sorted so that ``s_1^2 <= ... <= s_n^2``,
    ``lamp(u) = s_u^2 / sum_{v >= u} s_v^2``. For the magnitude scorer ``s = |w|``, exactly the paper.
    Entries at ``-inf`` (not keepable) stay ``-inf``.

    LAMP ranks magnitudes: squaring a signed score (GraSP's ``θ ⊙ Hg``) would rank a strongly negative
    score — one GraSP wants to prune first — like a strongly positive one. Signed scores are therefore
    rejected rather than silently reordered.

    Raises:
        ValueError: If a keepable score is negative.
    """
    flat = scores.detach().reshape(-1).double()
    keepable = torch.isfinite(flat)
    if bool((flat[keepable] < 0).any()):
        raise ValueError(
            "`distribution='lamp'` normalises non-negative magnitudes (Lee et al. 2021), but the scores have "
            "negative values (a signed scorer such as 'grasp'); use 'global', 'uniform', 'erk' or 'er'."
        )
    sq = torch.where(keepable, flat, torch.zeros_like(flat)).square()
    order = torch.sort(sq, stable=True).indices
    sorted_sq = sq[order]
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(flat)
    out[order] = sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny)
    out[~keepable] = -math.inf
    return out.view_as(scores)


@register_distribution("lamp", iterative=True, rejects_signed=True)
def lamp(scores: Mapping[str, Tensor], density: float) -> dict[str, int]:
    """LAMP (Lee et al. 2021): one global threshold on the layer-normalised scores of :func:`lamp_scores`."""
    return _global_counts({n: lamp_scores(s) for n, s in scores.items()}, _target_total(scores, density))
