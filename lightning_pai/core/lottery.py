"""Iterative magnitude pruning (lottery tickets): per-round masks, rewind points, RNG snapshots.

Frankle & Carbin 2019 (arXiv:1803.03635) find a "winning ticket" by repeating: train, remove a fraction
``p`` of the *remaining* weights with the smallest magnitude, reset the survivors to their values at the
rewind point, train again. This module holds the algorithm (:class:`LotterySession`: round arithmetic, mask
decisions including N:M layers and the controls, rewind points); the Lightning adapter is
:class:`lightning_pai.LotteryTicket`, and :class:`lightning_pai.Sparsifier` drives it from a plain loop.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.distributions import check_iterative, distribute, distribution_info
from lightning_pai.core.nm import NMSpec, check_nm, check_nm_incompatible, group_budget, nm_mask, resolve_nm
from lightning_pai.core.packing import pack_mask, unpack_mask
from lightning_pai.core.pruning import reinitialize_
from lightning_pai.core.select import masks_from_counts
from lightning_pai.core.session import Host, Session
from lightning_pai.core.sharding import full, gather_tree, load_full_state_, local, local_slice, shard_optimizer_state
from lightning_pai.core.validation import (
    check_choice,
    check_fraction,
    check_number,
    check_positive_int,
)

REWIND_KINDS = ("init", "step", "epoch", "lr", "none", "signed_constant")


def _percentile_rank(values: Tensor) -> Tensor:
    """Each entry's rank among its tensor's entries, in ``[0, 1]`` (ties get distinct ranks by position)."""
    flat = values.flatten()
    ranks = torch.empty_like(flat, dtype=torch.float64)
    ranks[flat.argsort(stable=True)] = torch.arange(flat.numel(), dtype=torch.float64)
    return (ranks / max(1, flat.numel() - 1)).view(values.shape)


def _same_sign(final: Tensor, initial: Tensor) -> Tensor:
    return torch.sign(final) == torch.sign(initial)


#: Zhou et al. 2019 ("Deconstructing lottery tickets"), ``get_weight_init.py``: the score of each weight from
#: its initial value ``w_i`` and its trained value ``w_f``; the lowest scores are pruned.
CRITERIA: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "large_final": lambda wf, wi: wf.abs(),
    "small_final": lambda wf, wi: -wf.abs(),
    "large_init": lambda wf, wi: wi.abs(),
    "small_init": lambda wf, wi: -wi.abs(),
    "magnitude_increase": lambda wf, wi: wf.abs() - wi.abs(),
    "movement": lambda wf, wi: (wf - wi).abs(),
    "large_final_same_sign": lambda wf, wi: torch.where(_same_sign(wf, wi), wf.abs(), 0.0),
    "large_final_diff_sign": lambda wf, wi: torch.where(_same_sign(wf, wi), 0.0, wf.abs()),
    "magnitude_increase_same_sign": lambda wf, wi: torch.where(_same_sign(wf, wi), wf.abs() - wi.abs(), 0.0),
    "magnitude_increase_diff_sign": lambda wf, wi: torch.where(_same_sign(wf, wi), 0.0, wf.abs() - wi.abs()),
    # kept iff above a common percentile p of both |w_i| and |w_f| (the reference's two-threshold search):
    # keeping the highest min(P_i, P_f) is that rule, p set by the count
    "large_init_large_final": lambda wf, wi: torch.minimum(_percentile_rank(wi.abs()), _percentile_rank(wf.abs())),
    "small_init_small_final": lambda wf, wi: torch.minimum(_percentile_rank(-wi.abs()), _percentile_rank(-wf.abs())),
}
#: Criteria whose scores can be negative (a distribution that ranks magnitudes, e.g. LAMP, refuses them).
SIGNED_CRITERIA = ("small_final", "small_init", "magnitude_increase", "magnitude_increase_same_sign",
                   "magnitude_increase_diff_sign")  # fmt: skip


@dataclass(frozen=True)
class RewindSpec:
    """A parsed ``rewind_to`` value.

    Attributes:
        kind: ``"init"``, ``"step"``, ``"epoch"``, ``"lr"``, ``"none"`` or ``"signed_constant"``.
        at: The step or epoch index for ``"step"``/``"epoch"``, else 0.
    """

    kind: str
    at: int = 0

    @property
    def rewinds_weights(self) -> bool:
        """Whether weights go back to the rewind point (``init``, ``step:N``, ``epoch:N``)."""
        return self.kind in ("init", "step", "epoch", "signed_constant")


def parse_rewind(rewind_to: str) -> RewindSpec:
    """Parse ``"init"``, ``"step:N"``, ``"epoch:N"``, ``"lr"``, ``"none"`` or ``"signed_constant"``.

    Raises:
        ValueError: On anything else (the message lists the accepted forms).
    """
    error = ValueError(
        "`rewind_to` must be 'init', 'step:N', 'epoch:N' (N >= 0), 'lr', 'none' or 'signed_constant'; "
        f"got {rewind_to!r}."
    )
    if not isinstance(rewind_to, str):
        raise error
    kind, sep, value = rewind_to.partition(":")
    if kind in ("init", "lr", "none", "signed_constant") and not sep:
        return RewindSpec(kind)
    if kind in ("step", "epoch") and sep and value.isdigit():
        return RewindSpec(kind, int(value))
    raise error


def check_fractions(layer_fractions: Mapping[str, float] | None) -> None:
    """Validate a ``{glob: fraction}`` mapping: string keys, fractions in ``[0, 1)``.

    Raises:
        ValueError: On a non-mapping, a non-string key or a fraction outside ``[0, 1)``.
    """
    if layer_fractions is None:
        return
    if not isinstance(layer_fractions, Mapping):
        raise ValueError(f"`layer_fractions` must map parameter-name globs to fractions; got {layer_fractions!r}.")
    for pattern, fraction in layer_fractions.items():
        if not isinstance(pattern, str):
            raise ValueError(f"`layer_fractions` keys are parameter-name globs (str); got {pattern!r}.")
        check_fraction(fraction, f"layer_fractions[{pattern!r}]", "a fraction of the survivors removed per round")


def match_fractions(names: list[str], layer_fractions: Mapping[str, float] | None) -> dict[str, float]:
    """Resolve ``{glob: fraction}`` to ``{parameter name: fraction}`` (the first matching glob wins).

    Raises:
        ValueError: If a fraction is outside ``[0, 1)`` or a glob matches no parameter.
    """
    check_fractions(layer_fractions)
    out: dict[str, float] = {}
    for pattern, fraction in (layer_fractions or {}).items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"`layer_fractions` pattern {pattern!r} matches no pruned parameter; the pruned parameters are {names}."
            )
        for name in hits:
            out.setdefault(name, float(fraction))
    return out


def prune_remaining(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    fraction: float,
    distribution: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """One round of iterative pruning: remove ``fraction`` of the weights that are still kept.

    Let ``K`` be the number of weights kept by ``masks``. The round keeps ``K - round(fraction * K)``
    of them (ranked by ``scores``, already-pruned weights stay pruned):

    - ``"global"``: one ranking across layers (Frankle & Carbin's conv experiments, Frankle et al. 2020);
    - ``"uniform"``: each layer removes ``fraction`` of *its own* survivors (layer-wise, the LTH paper's
      LeNet set-up);
    - ``"lamp"``: global ranking of LAMP scores (Lee et al. 2021, arXiv:2010.07611).

    Layers named in ``layer_fractions`` (parameter name -> fraction, see :func:`match_fractions`) always
    prune layer-wise at their own fraction (e.g. the LTH paper's 10 % for the output layer); the
    distribution ranks the remaining layers.

    Returns:
        New bool masks; every new mask is a subset of the old one.
    """
    check_iterative(distribution)
    fixed = dict(layer_fractions or {})
    kept = {n: int(m.sum()) for n, m in masks.items()}
    masked = {n: s.float().masked_fill(~masks[n].to(s.device), -math.inf) for n, s in scores.items()}
    counts = {n: kept[n] - round(f * kept[n]) for n, f in fixed.items()}
    rest = [n for n in scores if n not in fixed]
    if distribution == "uniform":
        counts.update({n: kept[n] - round(fraction * kept[n]) for n in rest})
    elif rest:
        remaining = sum(kept[n] for n in rest)
        size = sum(scores[n].numel() for n in rest)
        target = remaining - round(fraction * remaining)
        counts.update(distribute(distribution, {n: masked[n] for n in rest}, target / size))
    return masks_from_counts(masked, counts)


def random_within(masks: Mapping[str, Tensor], counts: Mapping[str, int], seed: int) -> dict[str, Tensor]:
    """Random masks that keep ``counts[name]`` of the weights ``masks`` keeps (the random-pruning control).

    Uses a CPU generator seeded with ``seed``, so every rank and device draws the same masks.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(m.shape, generator=gen).to(m.device) for n, m in masks.items()}
    scores = {n: s.masked_fill(~masks[n], -math.inf) for n, s in scores.items()}
    return masks_from_counts(scores, counts)


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor detached and copied to the CPU (for rewind points)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state() -> dict[str, Any]:
    """The global RNG states that decide data order and dropout: torch (CPU and CUDA), ``random``, numpy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover - numpy ships with torchvision
        pass
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


CONTROLS = ("random_reinit", "random_prune")
MODES = ("max", "min")


def capture_point(module: nn.Module, host: Host, weights: bool, sampler_epoch: int, step: int) -> dict[str, Any]:
    """A rewind point: optimizer, LR-scheduler and RNG state, and the model's state dict when ``weights``.

    Sharded (FSDP2) tensors are gathered: a rewind point is full and the same on every rank, so that a
    checkpoint written by rank zero restores every rank's shards. Everything is copied to the CPU.
    """
    point = {
        "optimizers": [to_cpu(gather_tree(opt.state_dict())) for opt in host.optimizers],
        "schedulers": [to_cpu(s.state_dict()) for s in host.schedulers],
        "rng": to_cpu(rng_state()),
        "sampler_epoch": sampler_epoch,
        "step": step,
    }
    if weights:
        point["model"] = to_cpu(gather_tree(module.state_dict()))
    return point


def restore_point(module: nn.Module, host: Host, point: dict[str, Any], sharded: bool = False) -> None:
    """Load a :func:`capture_point` rewind point into the model, the optimizers, the schedulers and the RNG."""
    if "model" in point:
        if sharded:
            load_full_state_(module, point["model"])
        else:
            module.load_state_dict(point["model"])
    for opt, state in zip(host.optimizers, point["optimizers"]):
        state = to_cpu(state)  # a copy: the optimizer must not alias the rewind point
        opt.load_state_dict(shard_optimizer_state(state, opt) if sharded else state)
    for scheduler, state in zip(host.schedulers, point["schedulers"]):
        scheduler.load_state_dict(to_cpu(state))
    set_rng_state(point["rng"])


class LotterySession(Session):
    """Iterative magnitude pruning with rewinding, all rounds in one run (the engine of ``LotteryTicket``).

    Round 0 trains the dense network for ``epochs_per_round`` epochs (``T`` optimizer steps). At the start of
    every later round the session

    1. removes ``prune_fraction`` of the weights that are still kept, by magnitude ``|w|`` of the trained
       weights (see :func:`~lightning_pai.core.lottery.prune_remaining`; masks only ever shrink), so
       round ``r`` keeps about ``(1 - prune_fraction) ** r`` of the weights; ``criterion`` picks another of
       Zhou et al. 2019's mask criteria (:data:`CRITERIA`: scores from the initial weights ``w_i`` and the
       trained ones ``w_f``, e.g. ``magnitude_increase = |w_f| - |w_i|``; ``large_final`` is ``|w_f|``);
    2. rewinds, according to ``rewind_to``:

       - ``"init"`` — weights (all parameters and buffers), optimizer state and LR-scheduler state go
         back to their values at fit start (Frankle & Carbin 2019, arXiv:1803.03635);
       - ``"step:k"`` / ``"epoch:k"`` — the same, to their values after ``k`` optimizer steps / at the
         start of epoch ``k`` of round 0 ("late rewinding", Frankle et al. 2020, arXiv:1912.05671); the
         round then trains ``T - k`` steps, from the rewind point to where round 0 ended, as open_lth does,
         so the LR schedule continues from ``k`` and ends where it ended in round 0;
       - ``"lr"`` — the trained weights are kept and the optimizer and LR schedule restart from fit
         start ("learning-rate rewinding", Renda et al. 2020, arXiv:2003.02389);
       - ``"none"`` — fine-tuning: weights and optimizer state are kept, and the learning rate stays at
         the last value round 0 used (set before every step, overriding the schedule);
       - ``"signed_constant"`` — as ``"init"``, then every targeted weight becomes ``sign(w_0) · σ_l``, ``σ_l``
         the standard deviation of its layer's initial weights (Zhou et al. 2019's "signed constant" rewind);
    3. re-applies the masks (pruned weights and their optimizer state are zero).

    Rewind points are kept on the CPU. Each round replays the data order of the rewind point (the global
    RNG state and the samplers' epoch are restored with the weights), so every round sees the same
    batches in the same order. **Configure the LR schedule for round 0** (``epochs_per_round`` epochs):
    later rounds replay it from the rewind point.

    Controls (from the same command): ``control="random_prune"`` removes, in every layer, as many
    weights as IMP would, chosen at random among the survivors (Frankle & Carbin's random-pruning
    control); ``control="random_reinit"`` prunes like IMP but, at every rewind, re-draws the kept weights
    from the original initial distribution: a seeded random permutation of each layer's own initial
    values, recorded at fit start (so the per-layer scale of a custom initialiser is kept exactly, see
    :func:`~lightning_pai.core.pruning.reinitialize_`). The LTH paper's control — the *ticket's* masks with
    a fresh initialization — is ``LotteryTicket(..., control="random_reinit", ticket=finished_ticket)``:
    round ``r`` then uses the finished ticket's round-``r`` masks (``ticket.mask_history``) instead of
    pruning its own weights.

    Rounds are whole epochs, except with ``step:k`` (``k > 0``), whose pruned rounds are ``T - k`` steps long
    (:meth:`round_due` says when the loop must end one mid-epoch). Rank zero decides the masks. The loop's
    protocol calls drive the rounds; :meth:`record` takes the monitored metric's values. Everything — round,
    masks, rewind point, results, history — is in :meth:`state_dict`.

    Every argument is required: the defaults live in the method class (:class:`lightning_pai.LotteryTicket`).

    Args:
        name: The method's name, used in messages.
        rounds: Training rounds including the dense round 0.
        prune_fraction: Fraction of the surviving weights removed per round, in ``(0, 1)``.
        epochs_per_round: Epochs of round 0 (None: set later by the loop, e.g. from its epoch count).
        rewind_to: ``"init"``, ``"step:N"``, ``"epoch:N"``, ``"lr"``, ``"none"`` or ``"signed_constant"``.
        criterion: A key of :data:`CRITERIA` (``"large_final"``: magnitude pruning).
        distribution: An iterative distribution (``"global"``, ``"uniform"``, ``"lamp"``).
        layer_fractions: Per-layer fractions (glob -> fraction), pruned layer-wise.
        control: None, ``"random_reinit"`` or ``"random_prune"``.
        ticket: With ``random_reinit``: a finished ticket (an object with ``mask_history``) or its per-round masks.
        mode: ``"max"`` or ``"min"``: which recorded value is a round's best.
        seed: Seed of the controls' random draws.
        nm: N:M layers (``"2:4"`` or ``{glob: "N:M"}``).
        nm_incompatible: Layers the N:M groups cannot fit: ``"error"``, ``"dense"`` or ``"unstructured"`` (see
            :data:`~lightning_pai.core.nm.NM_INCOMPATIBLE`).
        include, exclude, verbose, frozen: As for :class:`~lightning_pai.core.session.Session`.
    """

    def __init__(
        self,
        name: str,
        *,
        rounds: int,
        prune_fraction: float,
        epochs_per_round: int | None,
        rewind_to: str,
        distribution: str,
        layer_fractions: Mapping[str, float] | None,
        control: str | None,
        ticket: Any,
        mode: str,
        seed: int,
        nm: NMSpec,
        nm_incompatible: str = "error",
        criterion: str = "large_final",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        check_choice(criterion, CRITERIA, "criterion")
        if criterion in SIGNED_CRITERIA and distribution_info(distribution)["rejects_signed"]:
            raise ValueError(
                f"`criterion={criterion!r}` gives signed scores, which `distribution={distribution!r}` cannot rank "
                "(it ranks magnitudes); use 'global' or 'uniform'."
            )
        self.criterion = criterion
        self._nm_incompatible = check_nm_incompatible(nm_incompatible)
        self.rounds = check_positive_int(rounds, "rounds", "training rounds, the dense one included")
        self.prune_fraction = check_number(
            prune_fraction, "prune_fraction", 0, 1, low_open=True, high_open=True, what="removed per round"
        )
        if epochs_per_round is not None:
            check_positive_int(epochs_per_round, "epochs_per_round", "round 0's epochs")
        self.rewind = parse_rewind(rewind_to)
        check_iterative(distribution)
        check_choice(control, CONTROLS, "control", optional=True)
        check_choice(mode, MODES, "mode")
        if control == "random_reinit" and not self.rewind.rewinds_weights:
            raise ValueError(
                f"`control='random_reinit'` re-draws the weights at each rewind; it needs `rewind_to` 'init', "
                f"'step:N' or 'epoch:N', got {rewind_to!r}."
            )
        if ticket is not None and control != "random_reinit":
            raise ValueError(
                "`ticket` hands a finished ticket's masks to the random-reinitialization control: pass "
                f"`control='random_reinit'` with it (got control={control!r})."
            )
        if ticket is not None and not (hasattr(ticket, "mask_history") or isinstance(ticket, Sequence)):
            raise ValueError(f"`ticket` must be a LotteryTicket or a list of per-round masks; got {ticket!r}.")
        check_fractions(layer_fractions)  # the patterns are matched against the model at `check`
        check_nm(nm)
        self.epochs_per_round = epochs_per_round
        self.rewind_to, self.distribution, self.layer_fractions = rewind_to, distribution, dict(layer_fractions or {})
        self.control, self.ticket, self.mode, self.seed, self.nm = control, ticket, mode, int(seed), nm
        self.steps_per_epoch: int | None = None
        self.epoch = 0
        self.step = 0
        # Progress, all of it in `state_dict`.
        self.round = 0
        self.rewind_point: dict[str, Any] | None = None
        self._results: list[dict[str, Any]] = []
        self._values: list[float] = []
        self._last_lrs: list[list[float]] | None = None
        self._frozen_lrs: list[list[float]] | None = None
        self._history: list[dict[str, Any]] = []  # bit-packed masks of every round
        self._initial: dict[str, Tensor] | None = None  # initial target values (random_reinit)

    # ------------------------------------------------------------------ round arithmetic
    @property
    def step_rounds(self) -> bool:
        """``step:k`` with ``k > 0``: pruned rounds are ``T - k`` optimizer steps and start mid-epoch."""
        return self.rewind.kind == "step" and self.rewind.at > 0

    @property
    def late_epochs(self) -> int:
        """``k`` of ``epoch:k`` (the epochs later rounds skip), else 0."""
        return self.rewind.at if self.rewind.kind == "epoch" else 0

    def epochs_needed(self) -> int:
        """Epochs of the whole run: round 0's plus ``rounds - 1`` later rounds of ``epochs_per_round - k``."""
        return self.epochs_per_round + (self.rounds - 1) * (self.epochs_per_round - self.late_epochs)

    def round_start_step(self, round_index: int) -> int:
        """Optimizer step at which round ``round_index`` begins with ``step:k``: ``T + (round - 1) (T - k)``."""
        steps = self.epochs_per_round * self.steps_per_epoch
        return 0 if round_index == 0 else steps + (round_index - 1) * (steps - self.rewind.at)

    def round_of_epoch(self, epoch: int) -> tuple[int, int]:
        """(round, epoch within the round) of training epoch ``epoch`` (rounds of whole epochs)."""
        if epoch < self.epochs_per_round:
            return 0, epoch
        index, within = divmod(epoch - self.epochs_per_round, self.epochs_per_round - self.late_epochs)
        return index + 1, within

    def round_due(self, step: int) -> bool:
        """With ``step:k`` rounds: whether the next round starts now, ``step`` optimizer steps into the run."""
        return self.step_rounds and self.round + 1 < self.rounds and step >= self.round_start_step(self.round + 1)

    def data_epoch(self, epoch: int) -> int | None:
        """The epoch whose data order training epoch ``epoch`` replays (a sampler's ``set_epoch``), or None."""
        if self.step_rounds or self.round == 0 or self.rewind.kind == "none" or self.rewind_point is None:
            return None
        return self.rewind_point["sampler_epoch"] + self.round_of_epoch(epoch)[1]

    @property
    def at_init(self) -> bool:
        """Whether the rewind point is the start of training (``init``, ``lr``, ``step:0``, ``epoch:0``)."""
        kind = self.rewind.kind
        return kind in ("init", "lr", "signed_constant") or (kind in ("step", "epoch") and self.rewind.at == 0)

    # ------------------------------------------------------------------ results
    @property
    def mask_history(self) -> list[dict[str, Tensor]]:
        """The masks of every round started so far (round 0: all kept), as bool CPU tensors by name."""
        return [{n: unpack_mask(p, shape) for n, (p, shape) in r.items()} for r in self._history]

    @property
    def results(self) -> list[dict[str, Any]]:
        """One dict per finished round: ``round``, ``density``, ``best`` and ``last`` recorded value."""
        return [dict(r) for r in self._results]

    def results_table(self, metric: str | None = None) -> str:
        """The per-round results as a text table."""
        metric = metric or "metric"
        lines = [f"{'round':>5}  {'density':>8}  {'best ' + metric:>16}  {'last ' + metric:>16}"]
        for r in self._results:
            best = "-" if r["best"] is None else f"{r['best']:.4f}"
            last = "-" if r["last"] is None else f"{r['last']:.4f}"
            lines.append(f"{r['round']:>5}  {r['density']:>8.4f}  {best:>16}  {last:>16}")
        return "\n".join(lines)

    def record(self, value: float) -> None:
        """One value of the monitored metric (e.g. after each validation) for the running round."""
        self._values.append(float(value))

    @property
    def needs_epoch_length(self) -> bool:
        """``step:k`` rewind points are taken at a step count: the epoch's length must be known."""
        return self.rewind.kind == "step"

    # ------------------------------------------------------------------ protocol
    @property
    def nm_spec(self) -> NMSpec:
        """The N:M layers, pruned on per-group budgets."""
        return self.nm

    @property
    def nm_incompatible(self) -> str:
        """What becomes of the layers the N:M groups cannot fit."""
        return self._nm_incompatible

    def check(self, module: nn.Module) -> None:
        """Also resolve ``layer_fractions`` against the targets (a pattern matching nothing is an error)."""
        super().check(module)
        match_fractions(list(self.select(module)), self.layer_fractions)

    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Round 0's (dense) masks, the history, the initial values for ``random_reinit``, the init rewind point."""
        if self.epochs_per_round is None:
            raise ValueError(f"`{self.name}`: `epochs_per_round` (round 0's length in epochs) is not set.")
        super().start(module, host)
        if not self._history:
            self._record_history()
        if self._needs_initial and self._initial is None:
            self._initial = {n: full(p.detach()).to("cpu", copy=True) for n, p in self.masks.params.items()}
        if self.rewind_point is None and self.round == 0 and self.at_init:
            self.rewind_point = self.capture(sampler_epoch=0)

    @property
    def _needs_initial(self) -> bool:
        """Whether the initial target values are kept (random re-init, a criterion or rewind that reads them)."""
        uses_init = self.criterion != "large_final" or self.rewind.kind == "signed_constant"
        return self.control == "random_reinit" or uses_init

    def fit_epochs(self, epochs: int | None, setting: str = "epochs={}") -> int:
        """Check a run of ``epochs`` epochs against the rounds (deriving ``epochs_per_round`` when unset).

        The run has round 0's ``E`` epochs and ``rounds - 1`` later rounds of ``E - k`` (``epoch:k``). With
        ``step:k`` only ``epochs_per_round`` is needed here (the steps are checked by :meth:`check_steps`).

        Args:
            epochs: The run's epochs (e.g. ``Trainer(max_epochs=...)``).
            setting: How the loop's setting is written, ``{}`` standing for the number (for messages).

        Returns:
            ``epochs_per_round``.

        Raises:
            ValueError: With the setting to use, when the lengths do not fit.
        """
        name, late = f"`{self.name}(rounds={self.rounds}, rewind_to={self.rewind_to!r}`", self.late_epochs
        if self.epochs_per_round is None:
            if self.step_rounds:
                raise ValueError(
                    f"{name})`: pass `epochs_per_round` (round 0's length); the later rounds' length then follows."
                )
            # epochs = E + (rounds - 1) * (E - k)  =>  E = (epochs + (rounds - 1) * k) / rounds
            total = None if epochs is None else epochs + (self.rounds - 1) * late
            if total is None or epochs < self.rounds or total % self.rounds:
                rule = (
                    f"must be a positive multiple of {self.rounds}"
                    if late == 0
                    else f"must equal E + {self.rounds - 1} * (E - {late}) for a round-0 length of E epochs"
                )
                raise ValueError(
                    f"{name})` derives `epochs_per_round` from `{setting.format('...')}`, which {rule}; got "
                    f"{setting.format(epochs)}. Or pass `epochs_per_round`."
                )
            self.epochs_per_round = total // self.rounds
        if self.rewind.kind == "epoch" and self.rewind.at >= self.epochs_per_round:
            raise ValueError(
                f"`rewind_to={self.rewind_to!r}` must rewind to an epoch of round 0 (< epochs_per_round="
                f"{self.epochs_per_round})."
            )
        needed = self.epochs_needed()
        if not self.step_rounds and epochs != needed:
            raise ValueError(
                f"{name}, epochs_per_round={self.epochs_per_round})` trains {needed} epochs (round 0: "
                f"{self.epochs_per_round}, each later round: {self.epochs_per_round - late}): set "
                f"`{setting.format(needed)}` (got {setting.format(epochs)})."
            )
        return self.epochs_per_round

    def check_steps(self, steps_per_epoch: int, steps: int | None = None, setting: str = "steps={}") -> None:
        """Set the epoch length; with ``step:k`` rounds check that the run has ``steps`` optimizer steps.

        Raises:
            ValueError: If the rewind step lies beyond round 0, or ``steps`` is not the rounds' total.
        """
        self.steps_per_epoch = steps_per_epoch
        if self.rewind.kind != "step":
            return
        per_round = self.epochs_per_round * steps_per_epoch
        if self.rewind.at > per_round:
            raise ValueError(
                f"`rewind_to={self.rewind_to!r}` lies beyond round 0, which has {per_round} optimizer steps."
            )
        needed = self.round_start_step(self.rounds)
        if self.step_rounds and steps is not None and steps != needed:
            raise ValueError(
                f"`{self.name}(rounds={self.rounds}, epochs_per_round={self.epochs_per_round}, rewind_to="
                f"{self.rewind_to!r})` trains {needed} optimizer steps (round 0: {per_round}, each later round: "
                f"{per_round} - {self.rewind.at}): set `{setting.format(needed)}` (got {setting.format(steps)})."
            )

    def epoch_start(self, epoch: int) -> None:
        """Start the next round if ``epoch`` begins one; capture an ``epoch:k`` rewind point."""
        self.epoch = epoch
        if self.step_rounds:
            return
        round_index, _ = self.round_of_epoch(epoch)
        if self.round < round_index < self.rounds:  # (a plain loop announces the epoch after the last one too)
            self.next_round(round_index)
        if self.round == 0 and self.rewind.kind == "epoch" and epoch == self.rewind.at > 0 and not self.rewind_point:
            self.rewind_point = self.capture(sampler_epoch=epoch)

    def step_start(self, step: int) -> None:
        """Later rounds of ``rewind_to="none"`` hold the last learning rate (also what LR monitors see)."""
        super().step_start(step)
        self._hold_learning_rate()

    def before_step(self, step: int, epoch_end: bool = False) -> None:
        """With ``rewind_to="none"``: remember round 0's learning rates, hold later rounds at the last one.

        (Set again right before the step: a plain loop's scheduler steps after :meth:`step_start` ran.)
        """
        if self.rewind.kind == "none" and self.round == 0:
            self._last_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.host.optimizers]
        self._hold_learning_rate()
        super().before_step(step, epoch_end)

    def _hold_learning_rate(self) -> None:
        if self.rewind.kind == "none" and self.round > 0 and self._frozen_lrs is not None:
            for opt, lrs in zip(self.host.optimizers, self._frozen_lrs):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr

    def after_step(self, step: int) -> None:
        """Capture a ``step:k`` rewind point once round 0 reaches step ``k``."""
        self.step = step
        if self.rewind.kind == "step" and self.rewind.at > 0 and self.round == 0 and self.rewind_point is None:
            if step >= self.rewind.at:
                self.rewind_point = self.capture(sampler_epoch=self.epoch + 1)

    def epoch_end(self, epoch: int, step: int) -> None:
        """Finish the round when ``epoch`` is its last (rounds of whole epochs)."""
        if self.step_rounds:
            return
        round_index, within = self.round_of_epoch(epoch)
        length = self.epochs_per_round - (self.late_epochs if round_index else 0)
        if within + 1 == length:
            self.finish_round()

    def finish_round(self) -> None:
        """Record the round's best and last value (once per round) and log them."""
        if len(self._results) > self.round:
            return
        best = (max if self.mode == "max" else min)(self._values) if self._values else None
        last = self._values[-1] if self._values else None
        self._results.append({"round": self.round, "density": self.masks.density, "best": best, "last": last})
        self._values = []
        if best is not None:
            self.host.log({"lottery/best": best, "lottery/last": last})

    def next_round(self, round_index: int) -> None:
        """Prune the trained weights, rewind, re-apply the masks (rank zero decides, all ranks apply)."""
        masks = self.masks
        current = masks.state_dict()
        new = self._ticket_masks(round_index) if self.ticket is not None else self._prune(round_index, current)
        new = self.from_rank_zero(new)
        if self.rewind.kind == "none":
            self._frozen_lrs = self._frozen_lrs or self._last_lrs
        elif self.rewind_point is not None:
            self.restore(self.rewind_point)
            if self.control == "random_reinit":
                reinitialize_(self.module, masks.names, seed=self.seed + 7919 * round_index, initial=self._initial)
            if self.rewind.kind == "signed_constant":
                self._signed_constants()
        masks.update_(new, self.host.optimizers)
        self.round = round_index
        self._record_history()
        self.host.log({"lottery/round": float(round_index), "lottery/density": masks.density})
        self.masks_changed()

    def _signed_constants(self) -> None:
        """Every target weight becomes ``sign(w_i) · std(layer's w_i)`` (its initial value's sign)."""
        with torch.no_grad():
            for n, param in self.masks.params.items():
                initial = self._initial[n]
                value = (torch.sign(initial) * initial.float().std()).to(dtype=param.dtype)
                local(param).copy_(local_slice(value, param).to(local(param).device))

    def _prune(self, round_index: int, current: dict[str, Tensor]) -> dict[str, Tensor]:
        masks = self.masks
        criterion = CRITERIA[self.criterion]
        scores = {  # sharded: gathered
            n: criterion(full(p.detach()).cpu(), self._initial[n] if self._initial else None).float()
            for n, p in masks.params.items()
        }
        nm = resolve_nm(self.nm, {n: m.shape for n, m in current.items()}, masks.layouts, self.nm_incompatible)
        rest = [n for n in masks.names if n not in nm]
        fractions = {n: f for n, f in match_fractions(masks.names, self.layer_fractions).items() if n not in nm}
        new = {}
        if rest:
            new = prune_remaining(
                {n: scores[n] for n in rest},
                {n: current[n] for n in rest},
                self.prune_fraction,
                self.distribution,
                fractions,
            )
        progress = round_index / (self.rounds - 1)
        for n, (k, m) in nm.items():  # per-group budgets shrinking from M to N over the rounds
            survivors = scores[n].masked_fill(~current[n], -math.inf)
            new[n] = nm_mask(survivors, group_budget(k, m, progress), m, masks.layouts[n], self.nm_incompatible)
            new[n] &= current[n].to(new[n].device)  # a layer left dense keeps what it has (N:M ones: a no-op)
        new = {n: new[n] for n in masks.names}
        if self.control == "random_prune":
            counts = {n: int(m.sum()) for n, m in new.items()}
            new = random_within(current, counts, self.seed + round_index)
            gen = torch.Generator().manual_seed(self.seed + round_index)
            for n, (k, m) in nm.items():  # random, but still within the groups' budgets
                drawn = torch.rand(current[n].shape, generator=gen).masked_fill(~current[n], -math.inf)
                new[n] = nm_mask(drawn, group_budget(k, m, progress), m, masks.layouts[n], self.nm_incompatible)
                new[n] &= current[n].to(new[n].device)
        return new

    def _ticket_masks(self, round_index: int) -> dict[str, Tensor]:
        history = self.ticket.mask_history if hasattr(self.ticket, "mask_history") else list(self.ticket)
        if round_index >= len(history):
            raise ValueError(
                f"`ticket` has masks for {len(history)} rounds; this control needs round {round_index} "
                f"(rounds={self.rounds})."
            )
        masks = {n: m.detach().cpu().bool() for n, m in history[round_index].items()}
        if set(masks) != set(self.masks.names):
            raise ValueError("`ticket`'s masks were made for other parameters than this model's targets.")
        return masks

    def _record_history(self) -> None:
        self._history.append({n: (pack_mask(m.cpu()), tuple(m.shape)) for n, m in self.masks.items()})

    # ------------------------------------------------------------------ rewind points
    def capture(self, sampler_epoch: int) -> dict[str, Any]:
        """A rewind point (see :func:`capture_point`): the weights too when they are rewound."""
        return capture_point(self.module, self.host, self.rewind.rewinds_weights, sampler_epoch, self.step)

    def restore(self, point: dict[str, Any]) -> None:
        """Load a rewind point (see :func:`restore_point`)."""
        restore_point(self.module, self.host, point, self.masks._sharded)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, round, round length, rewind point, results, learning rates, history, initial values."""
        state = super().state_dict()
        state.update(
            round=self.round,
            epochs_per_round=self.epochs_per_round,
            rewind_point=self.rewind_point,
            results=[dict(r) for r in self._results],
            values=list(self._values),
            last_lrs=self._last_lrs,
            frozen_lrs=self._frozen_lrs,
            history=[{n: (p, list(shape)) for n, (p, shape) in r.items()} for r in self._history],
            initial=self._initial,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.round = int(state.get("round", 0))
        self.epochs_per_round = state.get("epochs_per_round", self.epochs_per_round)
        self.rewind_point = state.get("rewind_point")
        self._results = [dict(r) for r in state.get("results", [])]
        self._values = list(state.get("values", []))
        self._last_lrs = state.get("last_lrs")
        self._frozen_lrs = state.get("frozen_lrs")
        self._history = [{n: (p, tuple(shape)) for n, (p, shape) in r.items()} for r in state.get("history", [])]
        self._initial = state.get("initial")
