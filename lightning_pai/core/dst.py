"""Dynamic sparse training as combinations of registered rules, driven by one :class:`TopologyUpdater`.

A topology update has up to two stages, both optional (a :class:`Plan`):

1. **pruning** (:class:`Pruning`): raise the sparsity to a value schedule's target (Zhu & Gupta's cubic one)
   by keeping the highest *scores* of the still-active weights under a layer-wise distribution (GMP,
   GraNet's pruning phase);
2. **rewiring** (:class:`Rewire`): a *drop rule* removes active weights (``fraction`` from a value
   schedule), a *redistribution rule* decides how many weights each layer grows back, and a *growth rule*
   scores the inactive weights (the highest grow).

*When* updates happen is an update schedule (:mod:`lightning_pai.core.schedules`). Each family is a
registry with one signature, and rules declare what they read (``needs``) in their metadata, so the
updater and the Lightning adapter never test for a method's name:

- drop rule: ``fn(ctx: UpdateContext, fraction: float | dict[str, float]) -> dict[str, Tensor]`` (masks
  after the drop; :func:`register_drop_rule`);
- growth rule: ``fn(ctx: UpdateContext) -> dict[str, Tensor]`` (one score per weight, higher = grown first;
  pruning keeps the highest; :func:`register_growth_rule`);
- redistribution rule: ``fn(ctx: UpdateContext, dropped: dict[str, Tensor]) -> dict[str, int]`` (weights
  each layer grows; :func:`register_redistribution`).

Weights that become active start at exactly zero (they were masked) and the caller zeroes their optimizer
state. Everything is deterministic given its inputs (ties are broken by position), so every DDP rank
computes the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_pai.core.masks import compute_masks
from lightning_pai.core.nm import group_budget, nm_fits, refill_groups, resolve_nm
from lightning_pai.core.registry import Registry
from lightning_pai.core.schedules import Schedule, UpdateSchedule
from lightning_pai.core.select import active_counts, apportion, topk_mask
from lightning_pai.core.sharding import full, local, local_slice
from lightning_pai.core.validation import check_choice


@dataclass
class UpdateContext:
    """Everything a rule may read during one topology update.

    Attributes:
        weights: Current weights by name.
        masks: Current keep-masks (for the rewiring stage: after the pruning stage).
        kept: Active weights per layer of ``masks``.
        step: Optimizer step of the update (1-based).
        seed: Base seed of the run (random rules combine it with ``step``).
        grads: Dense gradients of the update step (before masking), when a rule needs them.
        momentum: Dense momentum (the optimizer's, or the updater's own buffer), when a rule needs it.
        memory: Persistent state of stateful rules (e.g. DSR's threshold); saved in checkpoints.
        options: Method options for the rules (e.g. ``rounding``, DSR's ``tolerance``).
        nm: Layers kept N:M (name -> ``(n, m)``): their growth refills every group of ``m`` to ``n``.
        layouts: The targets' layouts (the N:M groups' axis).
        dropped: The masks after the rewiring stage's drop, before its growth (set by :func:`drop_and_grow`).
    """

    weights: Mapping[str, Tensor]
    masks: dict[str, Tensor]
    kept: dict[str, int]
    step: int = 0
    seed: int = 0
    grads: Mapping[str, Tensor] | None = None
    momentum: Mapping[str, Tensor] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    nm: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    layouts: Mapping[str, Any] | None = None
    dropped: dict[str, Tensor] | None = None

    def need(self, what: str, rule: str) -> Mapping[str, Tensor]:
        """``self.<what>``, or a clear error when the rule's input was not provided."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"The `{rule}` rule needs `{what}`, which this update did not provide.")
        return value


DropRule = Callable[[UpdateContext, "float | Mapping[str, float]"], dict[str, Tensor]]
GrowthRule = Callable[[UpdateContext], dict[str, Tensor]]
Redistribution = Callable[[UpdateContext, dict[str, Tensor]], dict[str, int]]

#: ``needs``: inputs read from the context (``"grads"``, ``"momentum"``). ``observe``: called every optimizer
#: step with ``(memory, weights, grads, finite)`` (``finite`` a 0-d bool tensor) to accumulate state.
_RULE_INFO = {"needs": (), "observe": None, "rates": None, "spares_dropped": False}
_DROP: Registry[DropRule] = Registry("drop rule", "drop", "lightning_pai.core.dst.register_drop_rule", _RULE_INFO)
_GROWTH: Registry[GrowthRule] = Registry(
    "growth rule", "growth", "lightning_pai.core.dst.register_growth_rule", _RULE_INFO
)
_REDISTRIBUTION: Registry[Redistribution] = Registry(
    "redistribution rule", "redistribution", "lightning_pai.core.dst.register_redistribution", _RULE_INFO
)


@dataclass
class StepContext:
    """What a step rule may read and change after every optimizer step (before that step's topology update).

    Attributes:
        weights: The targets' weights by name: the parameters themselves, which a rule changes in place (under
            FSDP2 they are ``DTensor`` shards: change ``sharding.local(w)`` by ``sharding.local_slice`` of a
            full-shape update, and read them whole with ``sharding.full``, a collective every rank calls).
        masks: Current keep-masks.
        step: The optimizer step just taken (1-based).
        seed: Base seed of the run (random rules combine it with ``step``, so every rank draws the same).
        lr: The optimizer's learning rate per target (its parameter group's ``lr`` at this step).
        memory: Persistent state of the method's rules (shared with the drop/growth rules; checkpointed).
        options: Method options (e.g. DeepR's ``temperature`` and ``l1``).
    """

    weights: Mapping[str, Tensor]
    masks: Mapping[str, Tensor]
    step: int
    seed: int
    lr: Mapping[str, float]
    memory: dict[str, Any]
    options: Mapping[str, Any]


StepRule = Callable[[StepContext], None]
_STEP: Registry[StepRule] = Registry("step rule", "step_rule", "lightning_pai.core.dst.register_step_rule", {})


def register_step_rule(name: str, fn: StepRule | None = None, *, overwrite: bool = False):
    """Register a step rule ``fn(ctx: StepContext) -> None`` (decorator if ``fn`` is None).

    A step rule runs after *every* optimizer step and changes the active weights in place (e.g. Deep
    Rewiring's L1 shrinkage and random walk), before the step's topology update decides the masks.
    """
    return _STEP.register(name, fn, overwrite=overwrite)


def list_step_rules() -> list[str]:
    """Names of the registered step rules."""
    return _STEP.list()


def register_drop_rule(name: str, fn: DropRule | None = None, *, overwrite: bool = False, **info: Any):
    """Register a drop rule ``fn(ctx, fraction) -> masks`` (decorator if ``fn`` is None); ``info``: ``needs``."""
    return _DROP.register(name, fn, overwrite=overwrite, **info)


def register_growth_rule(name: str, fn: GrowthRule | None = None, *, overwrite: bool = False, **info: Any):
    """Register a growth rule ``fn(ctx) -> scores`` (decorator if ``fn`` is None); ``info``: ``needs``, ``observe``."""
    return _GROWTH.register(name, fn, overwrite=overwrite, **info)


def register_redistribution(name: str, fn: Redistribution | None = None, *, overwrite: bool = False, **info: Any):
    """Register a redistribution rule ``fn(ctx, dropped) -> counts``; ``info``: ``needs``, ``rates``.

    ``rates(ctx, fraction) -> {name: fraction}`` (optional) adjusts the per-layer drop fractions first.
    """
    return _REDISTRIBUTION.register(name, fn, overwrite=overwrite, **info)


def list_drop_rules() -> list[str]:
    """Names of the registered drop rules."""
    return _DROP.list()


def list_growth_rules() -> list[str]:
    """Names of the registered growth rules (also the scores gradual pruning can keep by)."""
    return _GROWTH.list()


def list_redistributions() -> list[str]:
    """Names of the registered redistribution rules."""
    return _REDISTRIBUTION.list()


# ------------------------------------------------------------------------------------------ drop rules
def drop_counts(
    kept: Mapping[str, int], fraction: float | Mapping[str, float], rounding: str = "floor"
) -> dict[str, int]:
    """Per layer, how many of its ``kept[name]`` active weights one update drops.

    ``fraction * active`` (``fraction`` may be per layer) rounded down (RigL: ``int(n_ones * drop_fraction)``)
    or up (``"ceil"``: SNFS's and GraNet's ``ceil(rate * nonzeros)``).

    Raises:
        ValueError: If ``rounding`` is not ``"floor"`` or ``"ceil"``.
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"`rounding` must be 'floor' or 'ceil'; got {rounding!r}.")
    out = {}
    for n, active in kept.items():
        exact = (fraction[n] if isinstance(fraction, Mapping) else fraction) * active
        out[n] = min(active, math.floor(exact + 1e-9) if rounding == "floor" else math.ceil(exact - 1e-9))
    return out


def drop_magnitude(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    counts: Mapping[str, int],
    kept: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Masks with the ``counts[name]`` smallest-magnitude *active* weights of each layer removed."""
    kept = active_counts(masks) if kept is None else kept
    out = {}
    for n, m in masks.items():
        score = weights[n].detach().abs().float().masked_fill(~m, -math.inf)
        out[n] = topk_mask(score, kept[n] - counts[n])
    return out


@register_drop_rule("magnitude")
def magnitude_drop(ctx: UpdateContext, fraction: float | Mapping[str, float]) -> dict[str, Tensor]:
    """Drop ``r(f * active)`` smallest ``|w|`` per layer (RigL, SNFS, GraNet); ``r``: ``options["rounding"]``."""
    counts = drop_counts(ctx.kept, fraction, ctx.options.get("rounding", "floor"))
    return drop_magnitude(ctx.weights, ctx.masks, counts, ctx.kept)


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
            k = math.floor(zeta * int(torch.count_nonzero(active)) + 1e-9)
            if k:
                closeness = (-w.abs()).masked_fill(~active, -math.inf)  # highest = closest to zero
                new &= ~topk_mask(closeness, k)
        out[n] = new
    return out


@register_drop_rule("set")
def set_drop(ctx: UpdateContext, fraction: float | Mapping[str, float]) -> dict[str, Tensor]:
    """SET's sign-wise rule, see :func:`drop_set` (``fraction`` is ``zeta``)."""
    return drop_set(ctx.weights, ctx.masks, float(fraction))


# ---------------------------------------------------------------------------------------- growth rules
def grow(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Masks with the ``counts[name]`` highest-scored *inactive* weights of each layer added.

    Raises:
        ValueError: If a layer has fewer inactive weights than it must grow.
    """
    out = {}
    kept = active_counts(masks)
    for n, m in masks.items():
        free = m.numel() - kept[n]
        if counts[n] > free:
            raise ValueError(f"Layer {n!r} cannot grow {counts[n]} weights: only {free} are inactive.")
        score = scores[n].detach().float().masked_fill(m, -math.inf)
        out[n] = m | topk_mask(score, counts[n])
    return out


def random_scores(masks: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Uniform growth scores from a CPU generator seeded with ``seed`` (the same on every rank and device)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=gen).to(m.device) for n, m in masks.items()}


@register_growth_rule("random")
def random_growth(ctx: UpdateContext) -> dict[str, Tensor]:
    """Uniform scores seeded with ``seed * 1_000_003 + step`` (SET, DSR)."""
    return random_scores(ctx.masks, ctx.seed * 1_000_003 + ctx.step)


@register_growth_rule("gradient", needs=("grads",))
def gradient_growth(ctx: UpdateContext) -> dict[str, Tensor]:
    """``|dense gradient|`` of the update step (RigL, GraNet)."""
    return {n: g.detach().abs() for n, g in ctx.need("grads", "gradient").items()}


@register_growth_rule("momentum", needs=("momentum",))
def momentum_growth(ctx: UpdateContext) -> dict[str, Tensor]:
    """``|dense momentum|`` (SNFS)."""
    return {n: b.detach().abs() for n, b in ctx.need("momentum", "momentum").items()}


@register_growth_rule("magnitude")
def magnitude_score(ctx: UpdateContext) -> dict[str, Tensor]:
    """``|w|``: the score gradual magnitude pruning keeps by (inactive weights are zero)."""
    return {n: w.detach().abs() for n, w in ctx.weights.items()}


# ---------------------------------------------------------------------------------- redistribution rules
def proportional_counts(shares: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over layers in proportion to ``shares``, never above ``caps``; the excess is re-split.

    Largest-remainder rounding, so the counts sum to ``total`` whenever the caps allow it (equal shares
    when all shares are zero).
    """
    counts = {n: 0 for n in caps}
    left, open_layers = total, [n for n in caps if caps[n] > 0]
    while left > 0 and open_layers:
        weight = sum(shares[n] for n in open_layers)
        if weight <= 0:
            ideal = {n: left / len(open_layers) for n in open_layers}
        else:
            ideal = {n: left * shares[n] / weight for n in open_layers}
        room = {n: caps[n] - counts[n] for n in open_layers}
        add = apportion({n: min(ideal[n], room[n]) for n in open_layers}, room, min(left, sum(room.values())))
        for n, a in add.items():
            counts[n] += a
        left = total - sum(counts.values())
        open_layers = [n for n in open_layers if counts[n] < caps[n]]
    return counts


def _dropped_and_caps(ctx: UpdateContext, dropped: Mapping[str, Tensor]) -> tuple[int, dict[str, int], dict[str, int]]:
    after = active_counts(dropped)
    caps = {n: m.numel() - after[n] for n, m in dropped.items()}
    return sum(ctx.kept.values()) - sum(after.values()), after, caps


@register_redistribution("none")
def no_redistribution(ctx: UpdateContext, dropped: dict[str, Tensor]) -> dict[str, int]:
    """Each layer grows back what it dropped: per-layer counts stay constant."""
    after = active_counts(dropped)
    return {n: ctx.kept[n] - after[n] for n in dropped}


def layer_momentum(momentum: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, float]:
    """SNFS's redistribution statistic: the mean ``|momentum|`` of each layer's active weights (0 if none)."""
    sums = torch.stack([torch.where(m, momentum[n].detach().abs().float(), 0.0).sum() for n, m in masks.items()])
    sums = sums.tolist()
    kept = active_counts(masks)
    return {n: s / kept[n] if kept[n] else 0.0 for n, s in zip(masks, sums)}


def snfs_rates(kept: Mapping[str, int], sizes: Mapping[str, int], rate: float, means: Mapping[str, float]) -> dict:
    """SNFS's per-layer prune rates: ``rate``, except ``min(sparsity, rate)`` for a nearly dense layer.

    A layer with sparsity below 0.2 whose share of the total mean momentum exceeds ``1 / layers`` prunes
    at most its sparsity (``adjust_prune_rate`` in the official code), so it can grow towards dense.
    """
    total = sum(means.values())
    out = {}
    for n in kept:
        sparsity = 1.0 - kept[n] / sizes[n]
        share = means[n] / total if total > 0 else 0.0
        out[n] = min(sparsity, rate) if sparsity < 0.2 and share > 1.0 / len(kept) else rate
    return out


def _momentum_rates(ctx: UpdateContext, fraction: float) -> dict[str, float]:
    means = layer_momentum(ctx.need("momentum", "momentum"), ctx.masks)
    return snfs_rates(ctx.kept, {n: m.numel() for n, m in ctx.masks.items()}, fraction, means)


def momentum_growth_counts(
    momentum: Mapping[str, Tensor], masks: Mapping[str, Tensor], dropped: Mapping[str, Tensor], total: int
) -> dict[str, int]:
    """SNFS's momentum redistribution (Dettmers & Zettlemoyer 2019): per-layer regrowth counts.

    Splits ``total`` regrown weights over layers in proportion to the mean ``|momentum|`` of each layer's
    active weights (``masks``, before the drop), never more than a layer has free after the drop
    (``dropped``), see :func:`proportional_counts`.
    """
    after = active_counts(dropped)
    caps = {n: d.numel() - after[n] for n, d in dropped.items()}
    return proportional_counts(layer_momentum(momentum, masks), caps, total)


@register_redistribution("momentum", needs=("momentum",), rates=_momentum_rates)
def momentum_redistribution(ctx: UpdateContext, dropped: dict[str, Tensor]) -> dict[str, int]:
    """SNFS: the dropped total regrows in proportion to each layer's mean ``|momentum|`` (capped per layer)."""
    total, _, _ = _dropped_and_caps(ctx, dropped)
    return momentum_growth_counts(ctx.need("momentum", "momentum"), ctx.masks, dropped, total)


# ------------------------------------------------------------------------------ DSR (Mostafa & Wang 2019)
@register_drop_rule("threshold", spares_dropped=True)
def threshold_drop(ctx: UpdateContext, fraction: float | Mapping[str, float]) -> dict[str, Tensor]:
    """DSR's adaptive global threshold: drop every active ``|w| < H``, then adapt ``H`` for the next update.

    As the reference (``parameterized_tensors.py``): a layer whose every active weight is below ``H`` keeps one,
    its first active weight in flat order, as the reference does ("removing all, keeping one"), and the weights
    dropped now do not regrow in the same update (``spares_dropped``).

    ``H`` starts at ``options["threshold"]`` (1e-3) and is doubled when fewer than ``(1 - d) * K`` weights
    were dropped, halved when more than ``(1 + d) * K`` (``K = fraction * active``, ``d = options["tolerance"]``).
    """
    h = ctx.memory.get("threshold", ctx.options.get("threshold", 1e-3))
    out = {}
    for n, m in ctx.masks.items():
        magnitude = ctx.weights[n].detach().abs()
        kept = m & (magnitude >= h)
        if not kept.any() and m.any():  # "removing all, keeping one": the first active weight (flat index) stays
            kept = torch.zeros_like(m).view(-1)
            kept[m.reshape(-1).nonzero()[0]] = True
            kept = kept.view(m.shape)
        out[n] = kept
    dropped = sum(ctx.kept.values()) - sum(active_counts(out).values())
    target, tolerance = float(fraction) * sum(ctx.kept.values()), ctx.options.get("tolerance", 0.1)
    if dropped < (1 - tolerance) * target:
        h *= 2
    elif dropped > (1 + tolerance) * target:
        h /= 2
    ctx.memory["threshold"] = h
    return out


@register_redistribution("survivors")
def survivor_redistribution(ctx: UpdateContext, dropped: dict[str, Tensor]) -> dict[str, int]:
    """DSR: the dropped total regrows in proportion to each layer's surviving weights ``R_l`` (capped per layer)."""
    total, after, caps = _dropped_and_caps(ctx, dropped)
    return proportional_counts({n: float(r) for n, r in after.items()}, caps, total)


# ---------------------------------------------------------------------- Deep Rewiring (Bellec et al. 2018)
def connection_signs(memory: dict[str, Any], weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], seed: int):
    """DEEP R's fixed sign ``s_k`` of every connection (int8, kept in the rules' ``memory`` and checkpointed).

    Drawn once: the sign of the weight where a connection is active (``w = s theta``, ``theta > 0``), a seeded
    random +-1 where it is dormant (the same on every rank).
    """
    if "signs" not in memory:
        gen = torch.Generator().manual_seed(seed + 1_000_033)
        signs = {}
        for n, w in weights.items():
            whole = full(w.detach())  # sharded: gathered (every rank calls this, in the same order)
            drawn = torch.where(torch.rand(whole.shape, generator=gen) < 0.5, -1, 1).to(torch.int8).to(whole.device)
            active = masks[n].to(whole.device) & (whole != 0)
            signs[n] = torch.where(active, torch.sign(whole).to(torch.int8), drawn)
        memory["signs"] = signs
    return memory["signs"]


@register_step_rule("deepr")
def deepr_step(ctx: StepContext) -> None:
    """DEEP R's parameter update beyond the gradient step, on active connections (Bellec et al. 2018, Alg. 1).

    ``theta <- theta - eta * alpha + eta * sigma * nu`` (``nu ~ N(0, 1)``), i.e. in weight space
    ``w <- w + s * eta * (sigma * nu - alpha)``, ``alpha = options["l1"]``, ``sigma = options["noise"]``,
    ``eta`` the step's learning rate: the paper's ``sqrt(2 eta T) nu`` with temperature ``T = eta sigma^2 / 2``,
    as the official code's ``gdnoise``. A connection whose ``theta`` is now ``<= 0`` is dormant: its weight is
    set to 0 here (the next topology update drops it; if it is drawn for regrowth it restarts at ``theta = 0``).
    The noise is seeded by ``(seed, step)``, identical on every rank.
    """
    signs = connection_signs(ctx.memory, ctx.weights, ctx.masks, ctx.seed)
    l1, noise = float(ctx.options.get("l1", 0.0)), float(ctx.options.get("noise", 0.0))
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step + 500_009)
    for n, w in ctx.weights.items():
        delta = torch.full(w.shape, -l1, dtype=torch.float32)  # full shape: the same draws on every rank
        if noise > 0:
            delta += noise * torch.randn(w.shape, generator=gen)
        update = (ctx.lr[n] * delta.to(signs[n].device) * signs[n] * ctx.masks[n]).to(w.dtype)
        mine = local(w)  # sharded: this rank's part
        mine.add_(local_slice(update, w))
        mine.masked_fill_(~(mine * local_slice(signs[n], w) > 0), 0)  # theta <= 0: dormant, w = 0 (regrown: from 0)


@register_drop_rule("sign_flip")
def sign_flip_drop(ctx: UpdateContext, fraction: float | Mapping[str, float]) -> dict[str, Tensor]:
    """DEEP R: every active connection whose ``theta = s * w`` is no longer positive becomes dormant.

    ``fraction`` is not used: the number dropped is what the training step flipped.
    """
    signs = connection_signs(ctx.memory, ctx.weights, ctx.masks, ctx.seed)  # (the weights here are gathered)
    return {n: m & (ctx.weights[n].detach() * signs[n] > 0) for n, m in ctx.masks.items()}


# ------------------------------------------------------------------------------------------------ plans
#: What becomes of a weight dropped and regrown by the same update (:attr:`Rewire.regrown`).
REGROWN = ("keep", "zero")


@dataclass(frozen=True)
class Pruning:
    """Gradual pruning stage: keep ``round((1 - s_t) N)`` weights, ``s_t = sparsity(step, total)``.

    Attributes:
        sparsity: Value schedule of the target sparsity (e.g. :class:`~lightning_pai.core.schedules.Cubic`).
        score: Growth-rule name whose scores rank the active weights (e.g. ``"magnitude"``).
        distribution: How the kept count is split over layers (``"global"``, ``"uniform"``, ``"lamp"``).
    """

    sparsity: Schedule
    score: str = "magnitude"
    distribution: str = "global"


@dataclass(frozen=True)
class Rewire:
    """Drop-and-grow stage at a constant total count.

    Attributes:
        fraction: Value schedule of the drop fraction ``f_t`` (RigL's cosine, SET's constant ``zeta``).
        drop: Drop-rule name.
        growth: Growth-rule name.
        redistribution: Redistribution-rule name.
        regrown: A weight dropped and regrown by the same update: ``"keep"`` (its value and optimizer state stay,
            as in RigL) or ``"zero"`` (it restarts at zero with zero optimizer state, like any grown weight: the
            sparselearning code applies the masks between the drop and the growth; FreeTickets).
    """

    fraction: Schedule
    drop: str = "magnitude"
    growth: str = "gradient"
    redistribution: str = "none"
    regrown: str = "keep"


@dataclass(frozen=True)
class Plan:
    """A dynamic-sparse-training method: when updates happen, and what each one does.

    Attributes:
        when: Update schedule.
        prune: Optional gradual-pruning stage (runs first).
        rewire: Optional drop-and-grow stage.
        options: Options the rules read (``rounding``, ...).
        step_rule: Optional step rule applied to the active weights after every optimizer step.
    """

    when: UpdateSchedule
    prune: Pruning | None = None
    rewire: Rewire | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    step_rule: str | None = None

    def rules(self) -> list[tuple[Registry, str]]:
        """The (registry, name) pairs this plan uses."""
        out = []
        if self.prune is not None:
            out.append((_GROWTH, self.prune.score))
        if self.rewire is not None:
            r = self.rewire
            out += [(_DROP, r.drop), (_GROWTH, r.growth), (_REDISTRIBUTION, r.redistribution)]
        return out

    def validate(self) -> None:
        """Check every rule name (errors list the registered names)."""
        for registry, name in self.rules():
            registry.get(name)
        if self.rewire is not None:
            check_choice(self.rewire.regrown, REGROWN, "regrown")
        if self.step_rule is not None:
            _STEP.get(self.step_rule)

    def needs(self) -> set[str]:
        """Inputs the rules read: subsets of ``{"grads", "momentum"}``."""
        return {need for registry, name in self.rules() for need in registry.info(name)["needs"]}

    def observers(self) -> list[Callable]:
        """Per-step accumulators of the rules."""
        return [obs for registry, name in self.rules() if (obs := registry.info(name)["observe"]) is not None]


@dataclass
class TopologyUpdate:
    """Result of one update.

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
    dropped = active_counts({n: old[n] & ~new[n] for n in old})
    grown = active_counts({n: new[n] & ~old[n] for n in old})
    return TopologyUpdate(masks=dict(new), dropped=dropped, grown=grown)


def optimizer_momentum(optimizer: torch.optim.Optimizer | None, params: Mapping[str, Tensor]) -> dict | None:
    """The optimizer's own momentum per parameter, as the SNFS reference code reads it; None if it has none.

    SGD: ``momentum_buffer``; Adam/AdamW: ``exp_avg / (sqrt(exp_avg_sq) + eps)``. Parameters without state
    yet (before the first step) get zeros.
    """
    if not has_momentum(optimizer):
        return None
    out = {}
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        if "exp_avg" in state:
            eps = next(g.get("eps", 1e-8) for g in optimizer.param_groups if any(q is p for q in g["params"]))
            out[n] = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps)
        elif "momentum_buffer" in state and state["momentum_buffer"] is not None:
            out[n] = state["momentum_buffer"]
        else:
            out[n] = torch.zeros_like(p)
    return out


def has_momentum(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether :func:`optimizer_momentum` can read a momentum: Adam/AdamW, or SGD with ``momentum > 0``."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    return isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) > 0 for g in optimizer.param_groups)


class TopologyUpdater:
    """Runs a :class:`Plan`: decides update steps, computes new masks, owns the method's state.

    The state (``updates``, the ITOP set ``fired`` — every weight ever active, Liu et al. 2021 —, the dense
    momentum buffer when the optimizer has none, and the rules' ``memory``) round-trips through
    :meth:`state_dict`. Framework-free: the Lightning adapter calls :meth:`observe` with the dense gradients
    every step, :meth:`compute` at update steps, and :meth:`record` with the masks it finally applies.

    Momentum: rules that need it read the optimizer's own momentum (:func:`optimizer_momentum`) when
    :meth:`bind` found one; then the masked weights' gradients must reach the optimizer (``dense_gradients``
    is True) so that the momentum of inactive weights is built from their dense gradients, as in the SNFS
    reference code. Otherwise the updater keeps ``m <- beta * m + grad`` itself from the dense gradients.

    Args:
        plan: The method.
        seed: Seed of random rules.
        beta: Decay of the updater's own momentum buffer.
    """

    def __init__(self, plan: Plan, *, seed: int = 0, beta: float = 0.9) -> None:
        plan.validate()
        self.plan, self.seed, self.beta = plan, int(seed), float(beta)
        self._needs = plan.needs()
        self._observers = plan.observers()
        self.updates = 0
        self.fired: dict[str, Tensor] | None = None
        self.momentum: dict[str, Tensor] | None = None
        self.memory: dict[str, Any] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self.nm: dict[str, tuple[int, int]] = {}
        self.nm_unfit: dict[str, tuple[int, int]] = {}  # N:M layers the groups cannot fit (`nm_incompatible`)
        self.layouts: dict[str, Any] = {}
        #: The masks between the last update's drop and its growth when the plan restarts regrown weights at zero
        #: (``Rewire.regrown == "zero"``): the caller applies them first, then the new masks; else None.
        self.dropped: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ set-up
    def use_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer whose momentum rules may read (see :attr:`dense_gradients`)."""
        self._optimizer = optimizer

    def bind(self, masks: Mapping[str, Tensor], layouts: Mapping[str, Any] | None = None) -> None:
        """Start (or continue, after :meth:`load_state_dict`) on ``masks``' devices (after :meth:`use_optimizer`).

        ``layouts`` (the targets' :class:`~lightning_pai.core.targets.Layout`) resolve ``options["nm"]``; layers
        the groups cannot fit are refused, or (``options["nm_incompatible"]``) updated as unstructured layers.

        Raises:
            ValueError: If N:M layers are asked for with a redistribution rule that moves weights between layers.
        """
        optimizer = self._optimizer
        self.layouts = dict(layouts or {})
        spec = self.plan.options.get("nm")
        shapes = {n: m.shape for n, m in masks.items()}
        resolved = resolve_nm(spec, shapes, self.layouts, self.plan.options.get("nm_incompatible", "error"))
        self.nm = {n: km for n, km in resolved.items() if nm_fits(shapes[n], self.layouts[n], km[1])}
        self.nm_unfit = {n: km for n, km in resolved.items() if n not in self.nm}
        rewire = self.plan.rewire
        if self.nm and rewire is not None and rewire.redistribution != "none":
            raise ValueError(
                f"N:M layers keep N of every M weights, so `redistribution={rewire.redistribution!r}` (which moves "
                "weights between layers) cannot apply to them; use redistribution 'none' or leave them out of `nm`."
            )
        if self.fired is None:
            self.fired = {n: m.clone() for n, m in masks.items()}
        else:
            self.fired = {n: f.to(masks[n].device) for n, f in self.fired.items()}
        if "momentum" in self._needs and not has_momentum(optimizer):
            if self.momentum is None:
                self.momentum = {n: torch.zeros(m.shape, device=m.device) for n, m in masks.items()}
            else:
                self.momentum = {n: b.to(masks[n].device) for n, b in self.momentum.items()}
        self.memory = _to_device(self.memory, next(iter(masks.values())).device)

    @property
    def dense_gradients(self) -> bool:
        """Whether the optimizer must see dense gradients (its own momentum is read for inactive weights)."""
        return "momentum" in self._needs and has_momentum(self._optimizer)

    @property
    def reads_every_step(self) -> bool:
        """Whether every step's dense gradients are read (per-step accumulators, or the own momentum buffer)."""
        return bool(self._observers) or ("momentum" in self._needs and not has_momentum(self._optimizer))

    @property
    def observes_every_step(self) -> bool:
        """Whether :meth:`observe` has work at every step (own momentum or a per-step accumulator)."""
        return bool(self._observers) or self.momentum is not None

    @property
    def needs_grads(self) -> bool:
        """Whether an update reads the dense gradients of its step."""
        return "grads" in self._needs

    def is_update(self, step: int, total: int, epoch_end: bool = False) -> bool:
        """Whether optimizer step ``step`` of ``total`` ends with an update (a growing method never at the last)."""
        if self.plan.rewire is not None and step >= total:
            return False
        return self.plan.when.is_update(step, total, epoch_end)

    # ------------------------------------------------------------------- steps
    @torch.no_grad()
    def observe(self, weights: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        """Accumulate per-step state from the dense gradients (no host synchronisation).

        A step whose gradients are not all finite (e.g. skipped by a ``GradScaler``) adds nothing.
        """
        if not self.observes_every_step:
            return
        finite = torch.stack([g.isfinite().all() for g in grads.values()]).all()
        if self.momentum is not None:
            bufs = [self.momentum[n] for n in grads]
            torch._foreach_mul_(bufs, torch.where(finite, self.beta, 1.0))
            torch._foreach_add_(bufs, [torch.where(finite, g.float(), 0.0) for g in grads.values()])
        for obs in self._observers:
            obs(self.memory, weights, grads, finite)

    def current_momentum(self, params: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """The momentum the rules read: the optimizer's, or the updater's own buffer."""
        if "momentum" not in self._needs:
            return None
        return self.momentum if self.momentum is not None else optimizer_momentum(self._optimizer, params)

    @torch.no_grad()
    def compute(
        self,
        step: int,
        total: int,
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        grads: Mapping[str, Tensor] | None = None,
        momentum: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The masks after the update at ``step``: pruning stage, then rewiring stage (pure but for ``memory``).

        With ``Rewire.regrown == "zero"`` the masks after the drop are left in :attr:`dropped`.
        ``momentum`` overrides :meth:`current_momentum` (e.g. gathered from sharded optimizer state).
        """
        plan, masks = self.plan, {n: m.clone() for n, m in masks.items()}
        ctx = UpdateContext(
            weights=weights,
            masks=masks,
            kept=active_counts(masks),
            step=step,
            seed=self.seed,
            grads=grads,
            momentum=momentum if momentum is not None else self.current_momentum(weights),
            memory=self.memory,
            options=plan.options,
        )
        ctx.nm, ctx.layouts = self.nm, self.layouts
        if plan.prune is not None:
            target = plan.prune.sparsity(step, total)
            size = sum(m.numel() for m in masks.values())
            if self.nm or self.nm_unfit or sum(ctx.kept.values()) > size - round(target * size):
                scores = _GROWTH.get(plan.prune.score)(ctx)
                first, last = plan.prune.sparsity(0, total), plan.prune.sparsity(total, total)
                progress = 1.0 if last == first else (target - first) / (last - first)
                nm = {**self.nm, **self.nm_unfit}
                budgets = {n: (group_budget(k, m, progress), m) for n, (k, m) in nm.items()}
                ctx.masks = compute_masks(
                    scores,
                    target,
                    plan.prune.distribution,
                    masks=masks,
                    layouts=self.layouts,
                    nm=budgets,
                    nm_incompatible=plan.options.get("nm_incompatible", "error"),
                )
                ctx.kept = active_counts(ctx.masks)
        self.dropped = None
        if plan.rewire is not None:
            ctx.masks = drop_and_grow(ctx, plan.rewire.fraction(step, total), plan.rewire)
            if plan.rewire.regrown == "zero":
                self.dropped = ctx.dropped
        return ctx.masks

    def step_rule_due(self, step: int) -> bool:
        """Whether :meth:`apply_step_rule` has work after optimizer step ``step`` (a rule, not yet run for it)."""
        return self.plan.step_rule is not None and step >= 1 and self.memory.get("step_rule_step", 0) < step

    @torch.no_grad()
    def apply_step_rule(
        self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], step: int, lr: Mapping[str, float]
    ) -> None:
        """Run the plan's step rule on ``weights`` (in place) once after optimizer step ``step`` (``step >= 1``).

        A no-op without a step rule, before the first step, and for a step it already ran on (a loop reports the
        same step again after micro-batches without an optimizer step, or after resuming from a checkpoint).
        """
        if not self.step_rule_due(step):
            return
        ctx = StepContext(weights, masks, step, self.seed, lr, self.memory, self.plan.options)
        _STEP.get(self.plan.step_rule)(ctx)
        self.memory["step_rule_step"] = step

    def record(self, old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> TopologyUpdate:
        """Count the applied update ``old -> new`` and add the new masks to the ITOP set."""
        update = diff(old, new)
        for n, m in new.items():
            self.fired[n] |= m.to(self.fired[n].device)
        if self.momentum is not None:  # as the optimizer state: inactive entries <- mean of the active ones
            for n, m in new.items():
                buf = self.momentum[n]
                buf.copy_(torch.where(m, buf, torch.where(m, buf, 0.0).sum() / m.sum().clamp_min(1)))
        self.updates += 1
        return update

    @property
    def itop(self) -> float:
        """Fraction of the targeted weights that have been active at some point (Liu et al. 2021)."""
        if self.fired is None:
            return 0.0
        return sum(active_counts(self.fired).values()) / sum(f.numel() for f in self.fired.values())

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters, ITOP set, own momentum and rule memory (CPU tensors)."""
        return {
            "updates": self.updates,
            "fired": _to_device(self.fired, "cpu"),
            "momentum": _to_device(self.momentum, "cpu"),
            "memory": _to_device(self.memory, "cpu"),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; call :meth:`bind` afterwards to move it to the masks' devices."""
        self.updates = int(state.get("updates", 0))
        for key in ("fired", "momentum"):
            if state.get(key) is not None:
                setattr(self, key, _to_device(state[key], "cpu"))
        self.memory = _to_device(dict(state.get("memory") or {}), "cpu")


def drop_and_grow(ctx: UpdateContext, fraction: float, rewire: Rewire) -> dict[str, Tensor]:
    """One rewiring: per-layer drop fractions (the redistribution rule may adjust them), drop, count, grow.

    Returns:
        New bool masks; the total kept count is unchanged whenever the layers have room.
    """
    redistribution = _REDISTRIBUTION.get(rewire.redistribution)
    rates_fn = _REDISTRIBUTION.info(rewire.redistribution)["rates"]
    rates = rates_fn(ctx, fraction) if rates_fn is not None else fraction
    dropped = ctx.dropped = _DROP.get(rewire.drop)(ctx, rates)
    counts = redistribution(ctx, dropped)
    scores = _GROWTH.get(rewire.growth)(ctx)
    if _DROP.info(rewire.drop)["spares_dropped"]:  # the weights just dropped cannot regrow now (DSR's setdiff1d)
        scores = {n: s.detach().float().masked_fill(ctx.masks[n].to(s.device) & ~dropped[n], -math.inf)
                  for n, s in scores.items()}  # fmt: skip
        counts = {n: min(c, int((~ctx.masks[n]).sum())) for n, c in counts.items()}
    free = [n for n in dropped if n not in ctx.nm]
    out = grow({n: scores[n] for n in free}, {n: dropped[n] for n in free}, {n: counts[n] for n in free})
    for n, (k, m) in ctx.nm.items():  # N:M (Lasby et al. 2023's SRigL form): regrow inside each group
        out[n] = refill_groups(scores[n], dropped[n], k, m, ctx.layouts[n])
    return {n: out[n] for n in dropped}


def prune_by_magnitude(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], sparsity: float, distribution: str
) -> dict[str, Tensor]:
    """``masks`` shrunk to ``sparsity`` by removing the smallest-magnitude remaining ``params``."""
    return compute_masks({n: p.detach().abs() for n, p in params.items()}, sparsity, distribution, masks=masks)


def _to_device(obj: Any, device: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to(device).clone() if str(device) == "cpu" else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
