"""Channel pruning as a :class:`~lightning_pai.core.session.Session`: one-shot or gradual, and Early-Bird tickets.

Both sessions prune whole output channels of the groups :func:`~lightning_pai.core.channels.channel_groups`
finds, and represent them by ordinary element masks (:func:`~lightning_pai.core.channels.element_masks`: the
channel's rows, bias and norm ``γ``/``β`` entries and its consumers' input columns), so enforcement around every
optimizer step, DDP broadcasting, checkpoints and export are the engine's. Their masks only shrink.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_pai.core.channel_scorers import (
    ChannelContext,
    channel_scorer_info,
    check_channel_budget,
    check_distribution,
    get_channel_scorer,
    select_channels,
)
from lightning_pai.core.channels import (
    PRODUCERS,
    ChannelGraph,
    ChannelGroup,
    ChannelReport,
    _position_hook,
    channel_groups,
    channel_report,
    element_masks,
    group_keep,
    group_params,
    prunable_groups,
)
from lightning_pai.core.lottery import to_cpu
from lightning_pai.core.pruning import preserved_state
from lightning_pai.core.schedules import Cubic, Every, resolve_point
from lightning_pai.core.scorers import default_forward
from lightning_pai.core.session import Host, Session
from lightning_pai.core.targets import select_targets
from lightning_pai.core.validation import check_choice, check_number, check_point, check_positive_int, check_sparsity


class ChannelSession(Session):
    """Prune output channels once or gradually (the engine of :class:`lightning_pai.ChannelPruning`).

    Schedule: with ``end=None`` the channels are pruned once, to ``sparsity``, at optimizer step ``start`` (``0``:
    at fit start, before the first step); otherwise every ``frequency`` steps from ``start`` to ``end`` (and at
    ``end``) the channel sparsity is raised to Zhu & Gupta's cubic ``s_t = s_f + (s_i - s_f)(1 - (t - t_0) /
    (t_1 - t_0))³`` (:class:`~lightning_pai.core.schedules.Cubic`), pruning the lowest-scored surviving channels.
    ``start``/``end`` are optimizer steps (``int``) or fractions of the run (``float``).

    ``l1 > 0`` adds network slimming's sparsity penalty ``l1 Σ|γ|`` on the norms of the pruned groups (their
    gradients get ``l1 sign(γ)`` before every optimizer step, as the reference's ``--sr --s``) until the last
    pruning.

    Every argument is required: the defaults live in the method class.

    Args:
        name: The method's name, used in messages.
        sparsity: Fraction of the prunable channels removed at the end, in ``[0, 1)``.
        scorer: A registered channel scorer (:func:`~lightning_pai.core.channel_scorers.list_channel_scorers`).
        distribution: ``"global"`` or ``"uniform"``.
        start: Pruning step (one-shot) or first gradual step.
        end: Last gradual step, or None for one-shot pruning.
        frequency: Optimizer steps between gradual updates.
        initial_sparsity: Channel sparsity at fit start (gradual).
        couple: Also prune groups of layers coupled by residual additions, jointly.
        l1: Weight of the L1 penalty on the norms' ``γ``.
        batches: Training batches a gradient scorer averages over when pruning at fit start.
        loss_fn: ``loss_fn(logits, targets)`` for that scoring pass (default: the loop's own loss).
        include, exclude, verbose, frozen: As for :class:`~lightning_pai.core.session.Session`; ``include`` and
            ``exclude`` select the layers whose output channels may be pruned (their weights' names or globs,
            module types, presets).
    """

    def __init__(
        self,
        name: str,
        *,
        sparsity: float,
        scorer: str | Callable[[ChannelContext], dict[str, Tensor]],
        distribution: str,
        start: int | float,
        end: int | float | None,
        frequency: int,
        initial_sparsity: float,
        couple: bool,
        l1: float,
        batches: int,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.sparsity = check_sparsity(sparsity, "sparsity")
        get_channel_scorer(scorer)
        self.scorer = scorer
        self.distribution = check_distribution(distribution)
        check_point(start, "start")
        if end is not None:
            check_point(end, "end")
            if isinstance(start, int) and isinstance(end, int) and end <= start:
                raise ValueError(f"`end` (step {end}) must come after `start` (step {start}).")
        self.start_point, self.end_point = start, end
        self.frequency = check_positive_int(frequency, "frequency", "optimizer steps between pruning updates")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"`initial_sparsity` ({initial_sparsity}) must not exceed `sparsity` ({sparsity}).")
        if end is None and self.initial_sparsity > 0:
            raise ValueError("`initial_sparsity` is the start of a gradual schedule: pass `end=` with it.")
        self.couple = bool(couple)
        self.l1 = check_number(l1, "l1", 0.0, what="the L1 penalty on the norms' γ")
        self.batches = check_positive_int(batches, "batches", "training batches a gradient scorer averages over")
        self.loss_fn = loss_fn
        self.graph: ChannelGraph | None = None
        self.groups: list[ChannelGroup] = []
        self.excluded: list[tuple[ChannelGroup, str]] = []
        self.total_steps = 0
        self.updates = 0
        self.positions: dict[str, int] = {}
        self._analysed: int | None = None
        self._observed: dict[str, Tensor] | None = None
        self._observations = 0
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ the graph
    @property
    def needs_norm(self) -> bool:
        """Whether the scorer reads the norms' ``γ``."""
        return bool(channel_scorer_info(self.scorer)["needs_norm"])

    def analyse(self, module: nn.Module) -> None:
        """Find the channel groups of ``module`` and split them into pruned and left-alone ones (once per model)."""
        if self._analysed == id(module) and self.graph is not None:
            return
        self.graph, self.groups, self.excluded = self.analysis(module)
        self._analysed = id(module)

    def analysis(self, module: nn.Module) -> tuple[ChannelGraph, list[ChannelGroup], list[tuple[ChannelGroup, str]]]:
        """``module``'s channel groups, the ones this method prunes, and ``(group, why)`` for those it leaves alone."""
        selected = select_targets(module, self.include, self.exclude, self.frozen)
        owners = {n for n, m in module.named_modules() if isinstance(m, PRODUCERS)}
        layers = [n.rpartition(".")[0] for n in selected if n.endswith(".weight") and n.rpartition(".")[0] in owners]
        graph = channel_groups(module, layers)
        return (graph, *prunable_groups(graph, layers, self.couple, self.needs_norm))

    def select(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the pruned groups' channels mask entries of (rows, biases, ``γ``/``β``, consumer columns)."""
        self.analyse(module)
        wanted = {n for g in self.groups for n in group_params(self.graph, g)}
        return {n: p for n, p in module.named_parameters() if n in wanted}

    def check(self, module: nn.Module) -> None:
        """Refuse before training: no prunable channels, no norm for a ``γ`` scorer, a budget emptying a layer."""
        self.analyse(module)
        if self.needs_norm and not any(g.norms for g in self.graph.groups if g.reason is None):
            raise ValueError(
                f"`{self.name}` scores channels by the BatchNorm γ on them (`scorer={_name(self.scorer)!r}`), and "
                f"`{type(module).__name__}` has no BatchNorm on the channels of any prunable layer. Use "
                "`scorer='l1'`, 'l2' or 'taylor', or a model with BatchNorm after its convolutions."
            )
        if not self.groups:
            why = "; ".join(f"`{g.label}`: {reason}" for g, reason in self.excluded[:5]) or "no layer is selected"
            raise ValueError(
                f"`{self.name}` finds no output channels it can prune in `{type(module).__name__}`: {why}. Select "
                "the layers to prune with `include=`, or pass `couple=True` to prune layers joined by residual "
                "additions together."
            )
        check_channel_budget(self.groups, self.sparsity, self.distribution)
        super().check(module)

    # ------------------------------------------------------------------ schedule
    @property
    def gradual(self) -> bool:
        """Whether the channels are pruned gradually (``end`` given)."""
        return self.end_point is not None

    def is_update(self, step: int) -> bool:
        """Whether the channels are pruned after optimizer step ``step``."""
        if not self.gradual:
            first = resolve_point(self.start_point, self.total_steps)
            return first > 0 and step == first
        when = Every(self.frequency, self.start_point, self.end_point, also=(self.end_point,))
        return when.is_update(step, self.total_steps, False)

    def target(self, step: int) -> float:
        """The channel sparsity after pruning at ``step``."""
        if not self.gradual:
            return self.sparsity
        return Cubic(self.initial_sparsity, self.sparsity, self.start_point, self.end_point)(step, self.total_steps)

    def last_update(self) -> int:
        """The optimizer step of the last pruning (0: at fit start)."""
        return resolve_point(self.end_point if self.gradual else self.start_point, self.total_steps)

    def _prunes_at_start(self) -> bool:
        if self.gradual:
            return self.initial_sparsity > 0
        return resolve_point(self.start_point, self.total_steps) == 0

    def _l1_active(self, step: int) -> bool:
        return self.l1 > 0 and step <= self.last_update()

    # ------------------------------------------------------------------ protocol
    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Resolve the schedule against the run's length, then set the masks (see :meth:`Session.start`)."""
        host = host if host is not None else Host()
        self.analyse(module)
        fractions = any(isinstance(p, float) and p > 0 for p in (self.start_point, self.end_point))
        total = host.total_steps
        if fractions and (total is None or total == float("inf")):
            raise ValueError(f"`{self.name}` places `start`/`end` as fractions of the run: {host.length_hint}.")
        self.total_steps = int(total) if total is not None and total != float("inf") else 0
        if self.gradual:
            first, last = resolve_point(self.start_point, self.total_steps), self.last_update()
            if last <= first:
                raise ValueError(
                    f"`end` (step {last}) must come after `start` (step {first}); training has {self.total_steps} "
                    "optimizer steps."
                )
        if not self.positions:
            layers = [(n, m) for n, m in self.graph.modules.items() if isinstance(m, PRODUCERS)]
            self._hooks = [m.register_forward_hook(_position_hook(self.positions, n)) for n, m in layers]
        super().start(module, host)
        if self.masks._sharded:
            raise ValueError(f"`{self.name}` does not support sharded (FSDP2) parameters; use DDP.")

    def initial_masks(self, masks: Any) -> dict[str, Tensor]:
        """All kept, or the channels pruned at fit start (one-shot at step 0, or a gradual ``initial_sparsity``)."""
        if not self._prunes_at_start():
            return super().initial_masks(masks)
        if self._observe_fn() is not None:
            self._observe_batches()
        keeps = self.channel_masks(self.target(0))
        self._reset_observed()
        return element_masks(self.graph, keeps, {n: p.shape for n, p in masks.params.items()})

    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """Record the scorer's gradient observations, add the L1 penalty's gradient, then mask the gradients."""
        observe = self._observe_fn()
        if observe is not None and step <= self.last_update():
            self._add_observation(observe)
        if self._l1_active(step):
            self.l1_gradients()
        super().before_step(step, epoch_end)

    def after_step(self, step: int) -> None:
        """Prune when ``step`` is an update step; stop recording layer sizes after the first step."""
        self._remove_hooks()
        if self.is_update(step):
            self.apply(self.channel_masks(self.target(step)), step)
            self._reset_observed()

    def stop(self) -> None:
        """Remove the hooks."""
        self._remove_hooks()
        super().stop()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ pruning
    def context(self) -> ChannelContext:
        """What the scorer reads: the model, its groups and the mean observations since the last pruning."""
        observed = None
        if self._observed is not None and self._observations:
            observed = {k: v / self._observations for k, v in self._observed.items()}
        return ChannelContext(self.module, self.graph, self.groups, observed)

    def current_keeps(self) -> dict[str, Tensor] | None:
        """The pruned groups' keep vectors under the current masks (None before the masks exist)."""
        masks = self.current_masks()
        return None if masks is None else {g.key: group_keep(self.graph, g, masks) for g in self.groups}

    def channel_masks(self, sparsity: float, current: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Keep vectors at channel ``sparsity`` from the scorer's scores (channels pruned so far stay pruned)."""
        scores = get_channel_scorer(self.scorer)(self.context())
        current = current if current is not None else self.current_keeps()
        return select_channels(scores, sparsity, self.distribution, current)

    def apply(self, keeps: Mapping[str, Tensor], step: int | None = None) -> None:
        """Mask the channels ``keeps`` prunes (rank zero's decision on every rank) and report."""
        masks = self.masks
        new = element_masks(self.graph, keeps, {n: m.shape for n, m in masks.items()})
        new = self.from_rank_zero(new)
        masks.update_({n: m.to(masks[n].device) for n, m in new.items()}, self.host.optimizers)
        self.updates += 1
        self.masks_changed(step)

    @torch.no_grad()
    def l1_gradients(self) -> None:
        """Add ``l1 * sign(γ)`` to the gradient of every norm weight on a pruned group's channels."""
        seen: set[str] = set()
        for g in self.groups:
            for norm, _ in g.norms:
                gamma = getattr(self.graph.modules[norm], "weight", None)
                if norm in seen or gamma is None or gamma.grad is None:
                    continue
                seen.add(norm)
                gamma.grad.add_(torch.sign(gamma.detach()), alpha=self.l1)

    def _observe_fn(self) -> Callable[[ChannelContext], dict[str, Tensor]] | None:
        return channel_scorer_info(self.scorer)["observe"]

    def _add_observation(self, observe: Callable[[ChannelContext], dict[str, Tensor]]) -> None:
        values = observe(ChannelContext(self.module, self.graph, self.groups))
        if self._observed is None:
            self._observed = {k: torch.zeros_like(v) for k, v in values.items()}
        for k, v in values.items():
            self._observed[k] += v.cpu()
        self._observations += 1

    def _reset_observed(self) -> None:
        self._observed, self._observations = None, 0

    def _observe_batches(self) -> None:
        """Observe the scorer on the first ``batches`` training batches (a gradient scorer pruning at fit start)."""
        module = self.module
        loss_fn = self.host.default_loss(f"{self.name}(scorer={_name(self.scorer)!r})")
        if self.loss_fn is not None:
            user = self.loss_fn
            loss_fn = lambda m, batch: user(*default_forward(m, batch))  # noqa: E731
        if loss_fn is None:
            loss_fn = lambda m, batch: F.cross_entropy(*default_forward(m, batch))  # noqa: E731
        batches = self.host.batches(self.batches)
        if not batches:
            raise ValueError("The training data is empty: nothing to score on.")
        params = list(module.parameters())
        saved = [p.grad for p in params]
        observe = self._observe_fn()
        with preserved_state(module):
            for batch in batches:
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    loss_fn(module, batch).backward()
                self._add_observation(observe)
        for p, g in zip(params, saved):
            p.grad = g

    # ------------------------------------------------------------------ report and state
    def report(self, module: nn.Module | None = None) -> ChannelReport:
        """Channels kept per pruned layer, and the parameters and MACs left after removing the pruned ones.

        Raises:
            RuntimeError: Before the session has masks or a model.
        """
        module = module if module is not None else self.module
        masks = self.current_masks()
        if masks is None or module is None:
            raise RuntimeError(f"`{self.name}` has no masks yet: they are set when training starts.")
        if module is self.module or self.module is None:
            self.analyse(module)
            graph, groups, excluded = self.graph, self.groups, self.excluded
        else:  # another copy of the model (e.g. after a ddp_spawn fit): its own analysis, the session's left alone
            graph, groups, excluded = self.analysis(module)
        report = channel_report(module, masks, graph, groups, excluded, self.positions)
        if self.skipped:
            report = replace(report, skipped=tuple(self.skipped))
        return report

    def _warn_coverage(self) -> None:
        """Channel masks cover the pruned layers by construction: no coverage warning."""

    def state_dict(self) -> dict[str, Any]:
        """Masks, updates, layer output sizes and the gradient observations since the last pruning."""
        state = super().state_dict()
        state.update(
            updates=self.updates,
            positions=dict(self.positions),
            observed=None if self._observed is None else {k: v.clone() for k, v in self._observed.items()},
            observations=self._observations,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))
        self.positions = dict(state.get("positions") or {})
        self._observed = state.get("observed")
        self._observations = int(state.get("observations", 0))


def mask_distance(a: Tensor, b: Tensor) -> float:
    """Normalised Hamming distance of two masks: the fraction of entries in which they differ."""
    a, b = a.reshape(-1).bool(), b.reshape(-1).bool()
    if a.numel() != b.numel():
        raise ValueError(f"Masks of {a.numel()} and {b.numel()} entries cannot be compared.")
    return float((a != b).sum()) / max(1, a.numel())


class EarlyBirdWindow:
    """The last ``size`` channel masks and You et al. 2020's stopping rule on them.

    After each :meth:`push`, once ``size`` masks are held, the distances from the newest mask to each older one
    (:func:`mask_distance`) are computed; the ticket has *emerged* when none exceeds ``epsilon`` — the reference's
    ``early_bird_emerge`` (GATECH-EIC/Early-Bird-Tickets ``main.py``: ``if dist > 0.1: return False``), i.e.
    ``max distance <= epsilon``.

    Args:
        size: Masks kept (the reference's ``epoch_keep=5``), at least 2.
        epsilon: Largest distance that counts as stable (the reference's 0.1).
    """

    def __init__(self, size: int = 5, epsilon: float = 0.1) -> None:
        self.size = check_number(size, "window", 2, integer=True, what="masks compared")
        self.epsilon = check_number(epsilon, "epsilon", 0.0, 1.0, what="the largest mask distance counted as stable")
        self.masks: list[Tensor] = []
        self.distances: list[float] | None = None

    def push(self, mask: Tensor) -> list[float] | None:
        """Add the newest mask (the oldest leaves a full window); the distances to the older ones, once full."""
        self.masks = [*self.masks, mask.detach().reshape(-1).cpu().bool().clone()][-self.size :]
        if len(self.masks) < self.size:
            self.distances = None
        else:
            self.distances = [mask_distance(self.masks[-1], m) for m in self.masks[:-1]]
        return self.distances

    @property
    def emerged(self) -> bool:
        """Whether the window is full and no distance in it exceeds ``epsilon``."""
        return self.distances is not None and max(self.distances) <= self.epsilon

    def state_dict(self) -> dict[str, Any]:
        """The masks held and the last distances."""
        return {"masks": [m.clone() for m in self.masks], "distances": self.distances}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.masks = [m.clone().bool() for m in state.get("masks", [])]
        self.distances = state.get("distances")


#: What happens to the weights when an Early-Bird ticket is drawn: None keeps the trained ones; ``"init"`` rewinds.
EARLYBIRD_REWINDS = ("init",)


class EarlyBirdSession(ChannelSession):
    """Early-Bird tickets (You et al. 2020, "Drawing early-bird tickets", ICLR, arXiv:1909.11957).

    The network trains densely with network slimming's penalty ``l1 Σ|γ|`` on the BatchNorm scales (their
    gradients get ``l1 sign(γ)``, the reference's ``--sr --s 1e-4``). Before training and at the end of every
    epoch, the *ticket mask* prunes ``sparsity`` of the channels by one global ranking of ``|γ|`` over every
    BatchNorm on a prunable layer's channels (:func:`~lightning_pai.core.channel_scorers.select_channels`, exact
    count, each layer keeping one channel); the last ``window`` masks are kept first in, first out, and the ticket
    is drawn when the largest normalised Hamming distance between the newest mask and the others is at most
    ``epsilon`` (:class:`EarlyBirdWindow`). The ticket's channels are then masked (rows, biases, ``γ``/``β``,
    consumers' inputs), the penalty stops, and the slim network trains on in the same run — with its trained
    weights, or, ``rewind_to="init"``, rewound to their values at fit start with the optimizer state cleared
    (the reference retrains the pruned network with a new optimizer; the learning-rate schedule continues).

    :attr:`drawn_epoch` is the number of training epochs before the ticket was drawn (the reference's loop
    ``epoch`` when it prints "Find EB"). Rank zero's masks are broadcast, so every process holds the same window.

    Differences from the reference: its mask thresholds at ``sorted(|γ|)[int(total * p)]`` (pruning one channel
    more than ``int(total p)``, ties included) where this keeps exactly ``round((1 - p) total)``; its ResNets rank
    every BatchNorm, here only those on the channels the ticket can prune (coupled groups with ``couple=True``
    rank the sum of their norms' ``|γ|``).

    Args:
        name: The method's name, used in messages.
        sparsity: Fraction of the channels the ticket prunes (the paper's ``p``).
        l1: Weight of the L1 penalty on ``γ`` during the search.
        window: Masks compared (the reference's 5).
        epsilon: Largest distance counted as stable (the reference's 0.1).
        rewind_to: None or ``"init"``.
        couple: Let the ticket prune layers coupled by residual additions, jointly.
        include, exclude, verbose, frozen: As for :class:`ChannelSession`.
    """

    def __init__(
        self,
        name: str,
        *,
        sparsity: float,
        l1: float,
        window: int,
        epsilon: float,
        rewind_to: str | None,
        couple: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name,
            sparsity=sparsity,
            scorer="bn_gamma",
            distribution="global",
            start=0,
            end=None,
            frequency=1,
            initial_sparsity=0.0,
            couple=couple,
            l1=l1,
            batches=1,
            loss_fn=None,
            **kwargs,
        )
        self.window = EarlyBirdWindow(window, epsilon)
        check_choice(rewind_to, EARLYBIRD_REWINDS, "rewind_to", optional=True)
        self.rewind_to = rewind_to
        self.drawn_epoch: int | None = None
        self.distances: list[float | None] = []
        self._initial: dict[str, Tensor] | None = None
        self._fresh = True

    def _prunes_at_start(self) -> bool:
        return False

    def is_update(self, step: int) -> bool:
        """Early-Bird prunes at an epoch's end, never after a step."""
        return False

    def _l1_active(self, step: int) -> bool:
        return self.l1 > 0 and self.drawn_epoch is None

    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Set the masks; in a fresh run, record the ticket mask of the untrained network (and the rewind point)."""
        super().start(module, host)
        if self._fresh and self.drawn_epoch is None and not self.window.masks:
            if self.rewind_to == "init":
                self._initial = to_cpu(module.state_dict())
            self._check_ticket(None)
        self._fresh = False

    def ticket(self) -> dict[str, Tensor]:
        """The ticket mask now: ``sparsity`` of the channels pruned by one global ranking of ``|γ|``."""
        dense = {g.key: torch.ones(g.width, dtype=torch.bool) for g in self.groups}
        keeps = self.channel_masks(self.sparsity, current=dense)
        return self.from_rank_zero(keeps)

    def _check_ticket(self, epoch: int | None) -> None:
        keeps = self.ticket()
        distances = self.window.push(torch.cat([keeps[g.key] for g in self.groups]))
        self.distances.append(None if distances is None else max(distances))
        if distances is not None:
            self.host.log({"earlybird/distance": max(distances)})
        if epoch is not None and self.window.emerged:
            self.drawn_epoch = epoch + 1
            self.host.log({"earlybird/drawn_epoch": float(self.drawn_epoch)})
            if self.rewind_to == "init" and self._initial is not None:
                self.module.load_state_dict(self._initial)
                for opt in self.host.optimizers:
                    opt.state.clear()
            if self.verbose:
                self.host.echo(
                    f"{self.name}: Early-Bird ticket drawn after {self.drawn_epoch} epochs (mask distances "
                    f"{', '.join(f'{d:.3f}' for d in distances)} <= {self.window.epsilon:g})."
                )
            self.apply(keeps)

    def epoch_end(self, epoch: int, step: int) -> None:
        """Compute the epoch's ticket mask, update the window and draw the ticket once it is stable."""
        if self.drawn_epoch is None:
            self._check_ticket(epoch)

    def stop(self) -> None:
        """Remove the hooks; warn when the run ended without a ticket."""
        if self.drawn_epoch is None and self.masks is not None and self.distances:
            last = [d for d in self.distances if d is not None]
            self.host.warn(
                f"`{self.name}` drew no ticket in {len(self.distances) - 1} epochs (largest mask distance in the last "
                f"window: {last[-1] if last else float('nan'):.3f}, `epsilon={self.window.epsilon:g}`): the network "
                "trained dense. Train longer, raise `epsilon` or `l1`."
            )
        super().stop()

    def state_dict(self) -> dict[str, Any]:
        """Masks, the mask window, the distances, the drawn epoch and the rewind point."""
        state = super().state_dict()
        state.update(
            window=self.window.state_dict(),
            distances=list(self.distances),
            drawn_epoch=self.drawn_epoch,
            initial=self._initial,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.window.load_state_dict(state.get("window") or {})
        self.distances = list(state.get("distances", []))
        self.drawn_epoch = state.get("drawn_epoch")
        self._initial = state.get("initial")
        self._fresh = False


def _name(x: object) -> str:
    return x if isinstance(x, str) else getattr(x, "__name__", type(x).__name__)


__all__ = ["EARLYBIRD_REWINDS", "ChannelSession", "EarlyBirdSession", "EarlyBirdWindow", "mask_distance"]
