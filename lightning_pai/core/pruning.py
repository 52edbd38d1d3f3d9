"""One-shot and iterative pruning driver, sanity-check ablations and layer-collapse floors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from lightning_pai.core.distributions import Distribution
from lightning_pai.core.masks import compute_masks
from lightning_pai.core.nm import nm_keep
from lightning_pai.core.schedules import round_sparsities
from lightning_pai.core.scorers import Scorer, ScoringContext, get_scorer
from lightning_pai.core.sharding import full, full_dict, local, local_slice

ABLATIONS = ("shuffle", "reinit", "invert")


def check_choice(value: object, allowed: tuple, argument: str, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``argument`` unless ``value`` is one of ``allowed`` (or None if ``optional``)."""
    if (optional and value is None) or value in allowed:
        return
    choices = ", ".join(repr(a) for a in allowed) + (" or None" if optional else "")
    raise ValueError(f"`{argument}` must be one of {choices}; got {value!r}.")


def is_number(value: object, integer: bool = False) -> bool:
    """Whether ``value`` is an ``int`` (or, unless ``integer``, a ``float``), ``bool`` excluded."""
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


def check_range(value: object, argument: str, low: float, high: float, what: str = "", open_low: bool = False) -> float:
    """``float(value)`` if it is a number in ``[low, high)`` (``(low, high)`` with ``open_low``), else a ``ValueError``.

    The message names ``argument`` (and ``what`` it is) and the allowed interval.
    """
    inside = is_number(value) and (low < value if open_low else low <= value) and value < high
    if not inside:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g})"
        raise ValueError(f"`{argument}`{f' ({what})' if what else ''} must be a number in {interval}; got {value!r}.")
    return float(value)


@contextmanager
def preserved_state(module: nn.Module, params: Mapping[str, nn.Parameter] | None = None) -> Iterator[None]:
    """Restore train/eval flags, ``requires_grad``, buffer values and the values of ``params`` on exit.

    Only ``params`` (the pruning targets, which the driver zeroes between rounds) are copied; scorers must
    not modify other parameters in place.
    """
    flags = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    buffers += [(p, p.detach().clone()) for p in (params or {}).values()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


@torch.no_grad()
def _zero_pruned(params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
    for n, p in params.items():
        local(p).mul_(local_slice(masks[n].to(p.device), p))


def shuffle_masks(masks: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Randomly permute each layer's mask (Frankle et al. 2021 "layerwise shuffling"): same per-layer density."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=gen).to(m.device)
        out[n] = m.reshape(-1)[perm].view_as(m)
    return out


@torch.no_grad()
def reinitialize_(
    module: nn.Module, names: list[str], seed: int = 0, initial: Mapping[str, Tensor] | None = None
) -> None:
    """Re-draw the named parameters from their layer's *original* initial distribution, seeded.

    Each parameter becomes a random permutation of its layer's recorded initial values (``initial[name]``;
    default: the parameter's current values, i.e. its initialisation when called before training). The
    new values therefore follow exactly the per-layer distribution the model was initialised with —
    including a non-default initialiser such as torchvision's ``kaiming_normal_(mode="fan_out")`` — while
    every position gets a new value. Calling the layer's ``reset_parameters()`` instead would draw from
    PyTorch's *default* initialiser (for a torchvision ResNet conv a 2.5x smaller std) and confound "new
    values" with "another scale" in the sanity checks (Frankle et al. 2021; Frankle & Carbin 2019's
    random reinitialisation). Other parameters (e.g. biases) are untouched.

    Args:
        module: The model owning ``names``.
        names: Fully qualified parameter names.
        seed: Seed of the permutations (a CPU generator, so every rank draws the same).
        initial: Recorded initial values by name (CPU or device tensors of the parameters' shapes).

    Raises:
        KeyError: If a name is not a parameter of ``module``.
    """
    params = dict(module.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        if name not in params:
            raise KeyError(f"`reinitialize_`: the model has no parameter {name!r}.")
        p = params[name]
        source = full((initial[name] if initial is not None else p).detach()).to("cpu", copy=True).reshape(-1)
        perm = torch.randperm(source.numel(), generator=gen)
        drawn = source[perm].view(p.shape).to(p.device)
        local(p).copy_(local_slice(drawn, p))  # sharded: this rank's part of the same draw


def prune(
    ctx: ScoringContext,
    method: str | Scorer,
    sparsity: float,
    distribution: str | Distribution = "global",
    iterations: int = 1,
    schedule: str = "exponential",
    ablation: str | None = None,
    min_density: float = 0.0,
    nm: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Tensor]:
    """Score and prune, in one shot or over ``iterations`` rounds; return the final keep-masks.

    In every round the weights pruned so far are zero during scoring (so they are "masked in the
    forward") and stay pruned; the round's sparsity comes from :func:`round_sparsities`. Afterwards the
    model is exactly as before (weights, buffers, train/eval flags, ``requires_grad``) except that, with
    ``ablation="reinit"``, the targeted weights are re-drawn. Apply the returned masks with
    :meth:`~lightning_pai.core.masks.MaskSet.update_`.

    Args:
        ctx: Scoring inputs (parameters, model, batches, ...).
        method: Scorer name or callable.
        sparsity: Final fraction of targeted weights removed.
        distribution: How each round's kept count is split over layers.
        iterations: Number of scoring rounds.
        schedule: ``"exponential"`` or ``"linear"``.
        ablation: Sanity-check control (Frankle et al. 2021, arXiv:2009.08576; Su et al. 2020,
            arXiv:2009.11094): ``"shuffle"`` permutes each layer's final mask, ``"reinit"`` re-draws the
            kept weights from the layer's initial values (see :func:`reinitialize_`), ``"invert"`` keeps
            the *lowest*-scored weights in each round with the per-layer counts the method would have chosen.
        min_density: Every layer keeps at least ``ceil(min_density * size)`` weights (layer-collapse guard).
        nm: Layers pruned N:M (name -> ``(n, m)``, see :mod:`lightning_pai.core.nm`), in the last round, on
            that round's scores (they stay dense in the earlier rounds); ``sparsity`` applies to the others.

    Returns:
        Bool masks by parameter name.

    """
    scorer = get_scorer(method)
    check_choice(ablation, ABLATIONS, "ablation", optional=True)
    ctx = replace(ctx)  # the rounds update `masks` on a copy, not on the caller's context
    masks = ctx.masks
    params = dict(ctx.params)
    module = ctx.module if ctx.module is not None else nn.ParameterList(params.values())
    with preserved_state(module, params):
        for p in params.values():
            p.requires_grad_(True)
        rounds = round_sparsities(sparsity, iterations, schedule)
        for index, round_sparsity in enumerate(rounds):
            if masks is not None:
                _zero_pruned(params, masks)
            ctx.masks = masks
            scores = full_dict(scorer(ctx))  # sharded scores are gathered: selection sees the whole model
            last = index == len(rounds) - 1
            masks = compute_masks(
                scores,
                round_sparsity,
                distribution,
                masks=masks,
                min_density=min_density,
                invert=ablation == "invert",
                layouts=ctx.layouts,
                nm={n: (k if last else m, m) for n, (k, m) in (nm or {}).items()},
            )
    if ablation == "shuffle":
        masks = shuffle_masks(masks, ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        for n, (k, m) in (nm or {}).items():  # N:M layers: shuffled within their groups, still N:M
            masks[n] = nm_keep(torch.rand(masks[n].shape, generator=gen), k, m, ctx.layouts[n]).to(masks[n].device)
    elif ablation == "reinit":
        if ctx.module is None:
            raise ValueError("`ablation='reinit'` needs the model in the scoring context.")
        reinitialize_(ctx.module, list(params), ctx.seed)
    return masks
