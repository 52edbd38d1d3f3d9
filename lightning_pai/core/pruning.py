"""One-shot and iterative pruning driver, sanity-check ablations and layer-collapse floors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.distributions import Distribution, distribution_info, get_distribution, signed_distributions
from lightning_pai.core.effective import effective_masks_by_flow, prune_to_effective
from lightning_pai.core.masks import compute_masks, zero_masked_
from lightning_pai.core.nm import NMSpec, check_nm_incompatible, nm_fits, nm_keep, nm_sparsity, resolve_nm
from lightning_pai.core.saliency import _ones_like_inputs
from lightning_pai.core.schedules import round_sparsities
from lightning_pai.core.scorers import Scorer, ScoringContext, default_forward, get_scorer, scorer_info, split_batch
from lightning_pai.core.sharding import full, full_dict, local, local_slice
from lightning_pai.core.targets import Layout
from lightning_pai.core.validation import check_choice, check_min_density, check_positive_int, check_sparsity

ABLATIONS = ("shuffle", "reinit", "invert")


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
        zero_masked_([local(p)], [local_slice(masks[n].to(p.device), p)])


def shuffle_masks(masks: Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Randomly permute each layer's mask (Frankle et al. 2021 "layerwise shuffling"): same per-layer density."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=gen).to(m.device)
        out[n] = m.reshape(-1)[perm].view_as(m)
    return out


#: Initialisations for a network once its masks are known (``PruneAtInit(weight_init=...)``).
SPARSE_INITS = ("sparse_fan_in", "isometry")


@torch.no_grad()
def sparse_init_(
    params: Mapping[str, nn.Parameter],
    masks: Mapping[str, Tensor],
    layouts: Mapping[str, Layout],
    mode: str,
    seed: int = 0,
    steps: int = 300,
) -> None:
    """Re-initialise the kept weights of a pruned network for its sparsity (pruned ones become 0), in place.

    - ``"sparse_fan_in"`` — sparsity-aware Kaiming (Evci et al. 2022, "Gradient flow in sparse neural networks and
      how lottery tickets win", AAAI): a kept weight of output unit ``i`` is drawn from ``N(0, 2 / k_i)``, ``k_i``
      the number of ``i``'s kept inputs (its sparse fan-in), so every unit's pre-activation keeps the dense
      network's variance.
    - ``"isometry"`` — approximate dynamical isometry (Lee et al. 2020, "A signal propagation perspective for
      pruning neural networks at initialization", ICLR): each layer's ``[out, in]`` matrix ``M = C ⊙ W``, from the
      sparse fan-in draw, is optimised by gradient descent (Adam, ``steps`` steps, lr 1e-2) on
      ``‖MᵀM - I‖²`` (``‖MMᵀ - I‖²`` when the layer has fewer outputs than inputs), over the kept weights only.

    Draws come from a CPU generator seeded with ``seed``, so every process gets the same weights.

    Args:
        params: The targets by name.
        masks: Their keep-masks.
        layouts: Their layouts (the output axis and fan-in of each).
        mode: One of :data:`SPARSE_INITS`.
        seed: Seed of the draws.
        steps: Gradient steps of ``"isometry"``.

    Raises:
        ValueError: If ``mode`` is unknown.
    """
    check_choice(mode, SPARSE_INITS, "weight_init")
    gen = torch.Generator().manual_seed(seed)
    for name, param in params.items():
        layout, mask = layouts[name], masks[name].detach().to("cpu", torch.bool)
        kept = layout.as_matrix(mask)
        fan_in = kept.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
        matrix = torch.randn(kept.shape, generator=gen) * (2.0 / fan_in).sqrt() * kept
        if mode == "isometry":
            matrix = _isometric(matrix, kept, steps)
        value = layout.from_matrix(matrix, mask.shape).to(dtype=param.dtype)
        local(param).copy_(local_slice(value, param).to(local(param).device))


def _isometric(matrix: Tensor, kept: Tensor, steps: int) -> Tensor:
    """``matrix`` (zeros outside ``kept``) optimised towards ``MᵀM = I`` (or ``MMᵀ = I``) over its kept entries."""
    weights = matrix.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=1e-2)
    rows, cols = matrix.shape
    eye = torch.eye(min(rows, cols))
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            masked = weights * kept
            gram = masked.t() @ masked if rows >= cols else masked @ masked.t()
            ((gram - eye) ** 2).sum().backward()
            optimizer.step()
    return (weights.detach() * kept).contiguous()


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
    nm_incompatible: str = "error",
    effective: bool = False,
) -> dict[str, Tensor]:
    """Score and prune, in one shot or over ``iterations`` rounds; return the final keep-masks.

    In every round the weights pruned so far are zero during scoring (so they are "masked in the
    forward") and stay pruned — except for scorers registered with ``revives=True`` (FORCE), which select
    among all weights every round; the round's sparsity comes from :func:`round_sparsities`. Afterwards the
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
        nm_incompatible: An ``nm`` layer whose input channels are not a multiple of ``M``: ``"error"``,
            ``"dense"`` or ``"unstructured"`` (see :func:`~lightning_pai.core.masks.compute_masks`).
        effective: ``sparsity`` is the *effective* sparsity (Vysogorets & Kempe 2021, arXiv:2107.02306): the
            method prunes to ``sparsity`` directly, then :func:`~lightning_pai.core.effective.prune_to_effective`
            searches for the largest number ``n`` of weights pruned in the method's order whose masks have
            effective sparsity at most ``sparsity`` (weights cut off from the input or the output count as pruned,
            see :func:`~lightning_pai.core.effective.effective_masks_by_flow`). One round (or a scorer that
            revives weights): the masks of ``compute_masks(scores, n / N, distribution)`` — the ``n`` lowest scores
            for ``"global"`` (the reference's ``effective_correction_from_global_scores``), the distribution's
            budgets at overall direct sparsity ``n / N`` for layer-wise ones. Several rounds: the weights in the
            order the rounds removed them (lowest score first within a round), the reference's iterative scores.
            The model's input comes from ``ctx.input_shape`` or the first batch, as for SynFlow. Not with ``nm``.

    Returns:
        Bool masks by parameter name.

    Raises:
        ValueError: With ``effective``, if there is no input to follow the paths with, ``nm`` is given, or the
            unpruned network's effective sparsity already exceeds ``sparsity``.
    """
    scorer = get_scorer(method)
    revives = scorer_info(method)["revives"]
    check_choice(ablation, ABLATIONS, "ablation", optional=True)
    if effective and nm:
        raise ValueError("`effective=True` cannot be combined with `nm`: N:M layers have a fixed density.")
    flow = effective_flow(ctx) if effective else None  # before scoring: a missing input fails at once
    ctx = replace(ctx)  # the rounds update `masks` on a copy, not on the caller's context
    masks = ctx.masks
    params = dict(ctx.params)
    module = ctx.module if ctx.module is not None else nn.ParameterList(params.values())
    rounds = round_sparsities(sparsity, iterations, schedule)
    order = {} if effective and len(rounds) > 1 and not revives else None  # removal order of the rounds
    with preserved_state(module, params):
        for p in params.values():
            p.requires_grad_(True)
        initial = {n: p.detach().clone() for n, p in params.items()} if revives else None
        if revives:
            ctx.extras = {**ctx.extras, "initial_weights": initial}
        for index, round_sparsity in enumerate(rounds):
            if masks is not None:
                if revives:  # weights pruned in earlier rounds may come back: start from the initial values
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(initial[n])
                _zero_pruned(params, masks)
            ctx.masks = masks
            scores = full_dict(scorer(ctx))  # sharded scores are gathered: selection sees the whole model
            last = index == len(rounds) - 1
            before = masks
            masks = compute_masks(
                scores,
                round_sparsity,
                distribution,
                masks=None if revives else masks,
                min_density=min_density,
                invert=ablation == "invert",
                layouts=ctx.layouts,
                nm={n: (k if last else m, m) for n, (k, m) in (nm or {}).items()},
                nm_incompatible=nm_incompatible,
            )
            if order is not None:
                _record_removals(order, before, masks, scores, index, ablation == "invert")
    if flow is not None:
        if order is not None:  # the removal order, globally; the survivors last, by their final scores
            _record_removals(order, masks, {n: torch.zeros_like(m) for n, m in masks.items()}, scores, len(rounds))
            keys, rank, invert = order, "global", False
        else:
            keys, rank, invert = scores, distribution, ablation == "invert"
        total = sum(k.numel() for k in keys.values())

        def masks_at(n: int) -> dict[str, Tensor]:
            found = compute_masks(keys, n / total, rank, min_density=min_density, invert=invert, layouts=ctx.layouts)
            return shuffle_masks(found, ctx.seed) if ablation == "shuffle" else found

        masks = prune_to_effective(masks_at, flow, total, sparsity)
    elif ablation == "shuffle":
        masks = shuffle_masks(masks, ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        for n, (k, m) in (nm or {}).items():  # N:M layers: shuffled within their groups, still N:M
            if not nm_fits(masks[n].shape, ctx.layouts[n], m):
                continue  # pruned unstructured (or left dense): the layer-wide shuffle keeps its count
            masks[n] = nm_keep(torch.rand(masks[n].shape, generator=gen), k, m, ctx.layouts[n]).to(masks[n].device)
    elif ablation == "reinit":
        if ctx.module is None:
            raise ValueError("`ablation='reinit'` needs the model in the scoring context.")
        reinitialize_(ctx.module, list(params), ctx.seed)
    return masks


def _record_removals(
    order: dict[str, Tensor],
    before: Mapping[str, Tensor] | None,
    after: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    index: int,
    invert: bool = False,
) -> None:
    """Give the weights round ``index`` removed the keys ``index + [0, 0.5]``, in the order of their scores.

    Over all rounds, lower keys were removed earlier (within a round: lower scores first, higher with ``invert``),
    as the reference's iterative pruners order weights for the effective-sparsity correction.
    """
    removed = {n: (before[n].to(m.device) if before is not None else True) & ~m for n, m in after.items()}
    values = [(-scores[n] if invert else scores[n])[r].double() for n, r in removed.items()]
    found = torch.cat([v.reshape(-1).cpu() for v in values])
    if found.numel() == 0:
        return
    low, span = found.min(), (found.max() - found.min()).clamp_min(torch.finfo(torch.float64).tiny)
    for (n, r), v in zip(removed.items(), values):
        if n not in order:
            order[n] = torch.zeros(after[n].shape, dtype=torch.float64, device=after[n].device)
        order[n][r] = index + 0.5 * (v - low.to(v.device)) / span.to(v.device)


def flow_inputs(ctx: ScoringContext) -> tuple[Any, bool]:
    """The input effective sparsity follows the model's paths from, and whether it goes through ``ctx.forward_fn``.

    SynFlow's input: ones of ``(1, *ctx.input_shape)`` (called as ``module(x)``), else one all-ones sample of the
    first batch (token ids kept) — its inputs, or the whole batch for a custom ``forward_fn``.

    Raises:
        ValueError: Without the model, or without ``input_shape`` and batches.
    """
    if ctx.module is None:
        raise ValueError("`effective=True` needs the model in the scoring context.")
    if ctx.input_shape is not None:
        return torch.ones((1, *ctx.input_shape)), False
    if not ctx.batches:
        raise ValueError(
            "`effective=True` follows the model's paths from one input: pass `input_shape=` (one sample's shape) "
            "or training batches."
        )
    batch = ctx.batches[0]
    if ctx.forward_fn is not default_forward:
        return _ones_like_inputs(batch), True
    return _ones_like_inputs(split_batch(ctx.module, batch)[0]), False


def effective_flow(ctx: ScoringContext) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """A function from masks to their effective masks on ``ctx.module``, fed :func:`flow_inputs`.

    See :func:`~lightning_pai.core.effective.effective_masks_by_flow`.

    Raises:
        ValueError: Without the model, or without ``input_shape`` and batches.
    """
    inputs, custom = flow_inputs(ctx)
    module, user = ctx.module, ctx.forward_fn
    forward = (lambda m, b: user(m, b)[0]) if custom else None
    return lambda masks: effective_masks_by_flow(module, masks, inputs, forward)


@dataclass
class Pruner:
    """Pruning at initialization, configured once: which scorer, how much, how the budget is split, how often.

    :meth:`masks` scores the targets with ``method`` (iteratively if asked, see :func:`prune`) and keeps the
    top ones; the arguments are those of :class:`lightning_pai.PruneAtInit` and are checked on creation.

    Attributes:
        method: Scorer name or callable ``fn(ScoringContext) -> scores``.
        sparsity: Fraction of the targeted weights removed, in ``[0, 1)``.
        distribution: How the kept count is split across layers.
        iterations: Scoring rounds (None: the scorer's registered default).
        schedule: ``"exponential"`` or ``"linear"`` sparsity growth over the rounds.
        batches: Training batches the data-driven scorers use.
        ablation: Sanity-check control (``"shuffle"``, ``"reinit"``, ``"invert"``) or None.
        min_density: Every layer keeps at least this fraction of its weights.
        loss_fn: ``loss_fn(logits, targets)`` replacing the loop's own loss for scorers that need one.
        forward_fn: ``forward_fn(module, batch) -> (logits, targets)`` (default: :func:`default_forward`).
        input_shape: One sample's input shape for SynFlow and ``effective`` (default: from the first batch).
        temperature: GraSP's softmax temperature.
        seed: Seed of stochastic scorers and ablations.
        nm: N:M structured sparsity (``"2:4"`` or ``{glob: "N:M"}``), see :mod:`lightning_pai.core.nm`.
        nm_incompatible: Layers the N:M groups cannot fit: ``"error"``, ``"dense"`` or ``"unstructured"``
            (see :data:`~lightning_pai.core.nm.NM_INCOMPATIBLE`).
        weight_init: Initialisation for the pruned network (see :func:`sparse_init_`), or None.
        effective: ``sparsity`` is the effective sparsity (Vysogorets & Kempe 2021), see :func:`prune`; the
            model's input is taken as SynFlow's (``input_shape`` or the first batch).
    """

    method: str | Scorer = "magnitude"
    sparsity: float = 0.9
    distribution: str | Distribution = "global"
    iterations: int | None = None
    schedule: str = "exponential"
    batches: int = 1
    ablation: str | None = None
    min_density: float = 0.0
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    forward_fn: Callable[[Any, Any], tuple[Tensor, Tensor]] | None = None
    input_shape: tuple[int, ...] | None = None
    temperature: float = 200.0
    seed: int = 0
    nm: NMSpec = None
    nm_incompatible: str = "error"
    weight_init: str | None = None
    effective: bool = False

    def __post_init__(self) -> None:
        check_choice(self.weight_init, SPARSE_INITS, "weight_init", optional=True)
        self.sparsity = nm_sparsity(self.sparsity, self.nm)
        check_nm_incompatible(self.nm_incompatible)
        get_scorer(self.method)
        info = scorer_info(self.method)
        if self.iterations is None:
            self.iterations = info["iterations"]
        round_sparsities(check_sparsity(self.sparsity), self.iterations, self.schedule)  # validates all three
        get_distribution(self.distribution)
        if info["signed"] and distribution_info(self.distribution)["rejects_signed"]:
            raise ValueError(
                f"`distribution={_name(self.distribution)!r}` ranks non-negative magnitudes; "
                f"`method={_name(self.method)!r}` gives signed scores (squaring them would keep the weights the "
                f"method wants to remove first). Use one of {', '.join(map(repr, signed_distributions()))}."
            )
        check_choice(self.ablation, ABLATIONS, "ablation", optional=True)
        self.batches = check_positive_int(self.batches, "batches", "training batches the scorer uses")
        self.min_density = check_min_density(self.min_density, self.sparsity)
        self.input_shape = None if self.input_shape is None else tuple(self.input_shape)
        self.temperature = float(self.temperature)
        self.seed = int(self.seed)
        self.effective = bool(self.effective)
        if self.effective and self.nm is not None:
            raise ValueError(
                "`effective=True` prunes to an effective sparsity, `nm` to a fixed N:M density per layer: use one."
            )
        self._example: tuple[Any, bool] | None = None  # the input effective sparsity was followed from

    @property
    def needs(self) -> str:
        """What the scorer reads: ``"nothing"``, ``"shape"`` (one batch's structure) or ``"data"``.

        With ``effective=True`` at least ``"shape"``: the model's paths are followed from one input.
        """
        needs = scorer_info(self.method)["needs"]
        return "shape" if self.effective and needs == "nothing" else needs

    def scoring_batches(self, host: Any) -> list[Any]:
        """The batches the scorer needs, drawn from ``host`` (none for data-free scorers).

        Raises:
            ValueError: If the host has none (for ``effective=True`` with a data-free scorer: naming
                ``input_shape``), or the data is empty.
        """
        if self.needs == "nothing" or (self.needs == "shape" and self.input_shape is not None):
            return []
        try:
            batches = host.batches(1 if self.needs == "shape" else self.batches)
        except ValueError as error:
            if not self.effective or scorer_info(self.method)["needs"] == "data":
                raise
            raise ValueError(
                f"`effective=True` follows the model's paths from one input, and the training loop offers none "
                f"({error}): pass `input_shape=` (one sample's shape, e.g. `(3, 32, 32)`)."
            ) from error
        if not batches:
            raise ValueError("The training data is empty: nothing to score on.")
        return batches

    def effective_masks(self, module: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """``masks``' effective masks on the input :meth:`masks` pruned with (None before it, or if not effective)."""
        if self._example is None:
            return None
        inputs, custom = self._example
        user = self.forward_fn
        forward = (lambda m, b: user(m, b)[0]) if custom and user is not None else None
        return effective_masks_by_flow(module, masks, inputs, forward)

    def masks(self, module: nn.Module, masks: Any, host: Any, name: str = "PruneAtInit") -> dict[str, Tensor]:
        """Score ``masks``' targets (a :class:`~lightning_pai.core.masks.MaskSet`) on ``module``; the kept masks.

        Args:
            module: The model.
            masks: The targets' (all-kept) mask set: their parameters and layouts.
            host: The training loop (:class:`~lightning_pai.core.session.Host`): batches and its own loss.
            name: The method's name for messages.
        """
        forward = self.forward_fn or default_forward
        loss_fn = None
        if self.loss_fn is not None:
            user_loss = self.loss_fn
            loss_fn = lambda m, batch: user_loss(*forward(m, batch))  # noqa: E731
        batches = self.scoring_batches(host)
        if self.loss_fn is None and self.needs == "data":
            loss_fn = host.default_loss(f"{name}(method={_name(self.method)!r})")
        ctx = ScoringContext(
            params=masks.params,
            module=module,
            seed=self.seed,
            batches=batches,
            loss_fn=loss_fn,
            forward_fn=forward,
            input_shape=self.input_shape,
            extras={"temperature": self.temperature},
            layouts=masks.layouts,
        )
        if self.effective:
            self._example = flow_inputs(ctx)
        return prune(
            ctx,
            self.method,
            self.sparsity,
            self.distribution,
            iterations=self.iterations,
            schedule=self.schedule,
            ablation=self.ablation,
            min_density=self.min_density,
            nm=resolve_nm(self.nm, {n: p.shape for n, p in masks.params.items()}, masks.layouts, self.nm_incompatible),
            nm_incompatible=self.nm_incompatible,
            effective=self.effective,
        )


def _name(x: object) -> str:
    """A scorer's or distribution's name, or the name of the callable passed instead."""
    return x if isinstance(x, str) else getattr(x, "__name__", type(x).__name__)
