"""Dynamic sparse training from any registered drop, growth and redistribution rules.

The named methods (RigL, SET, SNFS, GraNet, DSR) are presets of :class:`DynamicSparseTraining`, one file each.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from lightning_pai.callbacks.topology import TopologyCallback
from lightning_pai.core.dst import Plan, Rewire
from lightning_pai.core.nm import NMSpec
from lightning_pai.core.schedules import Constant, Cosine, EpochEnds, Every
from lightning_pai.core.targets import Selectors
from lightning_pai.core.validation import check_choice, check_number, check_positive_int

DECAYS = ("cosine", "constant")
UPDATE_ON = ("step", "epoch")
ROUNDING = ("floor", "ceil")


class DynamicSparseTraining(TopologyCallback):
    """Drop-and-grow dynamic sparse training at a constant number of weights, from any registered rules.

    The network starts sparse (``init``: random masks with the ``distribution``'s per-layer budgets, or any
    pruning-at-initialization scorer) and, every ``delta_t`` optimizer steps (``update_on="step"``) or at the
    end of every epoch but the last (``update_on="epoch"``), until ``t_end`` (a fraction of the optimizer
    steps), each update drops active weights with the ``drop`` rule (fraction
    ``f_t = m + (alpha - m) / 2 * (1 + cos(pi * t / T_end))`` with ``decay="cosine"``, ``m = min_fraction``,
    or ``alpha``; per-layer counts rounded by ``rounding``), lets the ``redistribution`` rule decide how many
    weights each layer grows back, and grows the inactive weights with the highest ``growth`` scores.
    Rules are registries (:func:`~lightning_pai.core.dst.list_drop_rules`, ``list_growth_rules``,
    ``list_redistributions``): ``drop`` ``"magnitude"`` / ``"set"`` / ``"threshold"``, ``growth``
    ``"random"`` / ``"gradient"`` (``|dense gradient|``) / ``"momentum"``, ``redistribution`` ``"none"``
    (constant per-layer counts) / ``"momentum"`` (SNFS) / ``"survivors"`` (DSR), and any registered one.

    Momentum rules read the optimizer's own momentum (SGD ``momentum_buffer``, Adam ``m / (sqrt(v) + eps)``)
    as the SNFS reference code does; the masked weights' gradients then reach the optimizer (their weights
    are re-masked after every step) and after every update the inactive entries of the optimizer state are
    set to the mean of the active ones (the reference ``reset_momentum``). With an optimizer without
    momentum, the callback keeps ``m <- beta m + grad`` itself, from the dense gradients.

    Grown weights start at exactly zero (with zero optimizer state unless momentum rules keep the
    optimizer's); a weight dropped and regrown in the same update keeps its value, as in RigL. Random growth
    is seeded by ``(seed, step)``, so every DDP rank grows the same weights; masks are broadcast from rank
    zero. Logged per update: ``sparsity/itop`` (weights ever active, Liu et al. 2021), ``dst/dropped``,
    ``dst/grown``, ``dst/fraction``.

    Targets: by default the weights of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (the papers' own
    set-ups differ: RigL's ImageNet runs keep the first layer dense, ``exclude="stem"``; SET's keep the
    output layer dense, ``exclude="head"``).

    Args:
        sparsity: Fraction of the targeted weights removed, constant during training.
        distribution: Per-layer budgets of the initial masks (``"erk"``, ``"er"``, ``"uniform"``, ...).
        init: ``"random"`` or the name of a registered scorer (e.g. ``"snip"``) for the initial masks.
        growth: Growth rule.
        drop: Drop rule.
        alpha: Initial drop fraction.
        decay: ``"cosine"`` or ``"constant"``.
        update_on: ``"step"`` or ``"epoch"``.
        delta_t: Optimizer steps between updates (``update_on="step"``).
        t_end: Fraction of the total optimizer steps after which the topology is frozen.
        min_fraction: Floor ``m`` of the cosine decay.
        rounding: ``"floor"`` (RigL, SET) or ``"ceil"`` (SNFS, GraNet) of the per-layer drop count.
        redistribution: Redistribution rule.
        beta: Decay of the callback's own momentum (optimizers without momentum only).
        include: Prunable parameters (default: weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: Parameters left dense (``"stem"``, ``"head"``, name globs, module types).
        seed: Seed of the initial masks and of random growth.
        verbose: Print the sparsity table at fit start (rank zero).
        nm: N:M layers (``"2:4"`` or ``{glob: "N:M"}``): initial masks N:M, and every update drops inside
            each group of ``M`` and regrows the same group back to ``N`` (the N:M case of SRigL, Lasby et al.
            2023); needs ``redistribution="none"``.
        nm_incompatible: Layers the ``nm`` groups cannot fit (input channels not a multiple of ``M``, e.g. a
            3-channel stem or a depthwise convolution): ``"error"`` (default) refuses before training, ``"dense"``
            leaves them dense, ``"unstructured"`` updates them as unstructured layers at the pattern's sparsity;
            they are named in a warning and in the report.
        options: Options the rules read (``UpdateContext.options``), for registered rules of your own.
        resume: Checkpoint state saved under other arguments: None refuses, ``"checkpoint"`` uses it, ``"recompute"``
            ignores it (see :class:`~lightning_pai.TargetOptions`).
        frozen: Frozen (``requires_grad=False``) targets: ``"skip"`` (default) leaves them dense, ``"prune"``
            prunes them, ``"error"`` refuses (see :class:`~lightning_pai.TargetOptions`).
        backend: ``"masked"`` (default) or ``"sparse"``: truly sparse ``nn.Linear`` layers (CSR values only;
            Liu, Mocanu et al. 2020), for rules that read no per-step dense state (see
            :mod:`lightning_pai.core.sparse_train`).

    Example::

        DynamicSparseTraining(0.9, drop="set", growth="gradient", delta_t=50, options={"my_rule_beta": 0.5})
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str = "erk",
        init: str = "random",
        growth: str = "gradient",
        drop: str = "magnitude",
        alpha: float = 0.3,
        decay: str = "cosine",
        update_on: str = "step",
        delta_t: int = 100,
        t_end: float = 0.75,
        min_fraction: float = 0.0,
        rounding: str = "floor",
        redistribution: str = "none",
        beta: float = 0.9,
        include: Selectors = None,
        exclude: Selectors = None,
        seed: int = 0,
        verbose: bool = True,
        nm: NMSpec = None,
        nm_incompatible: str = "error",
        options: Mapping[str, Any] | None = None,
        resume: str | None = None,
        frozen: str = "skip",
        weight_init: str | None = None,
        backend: str = "masked",
    ) -> None:
        super().__init__(
            sparsity,
            distribution=distribution,
            init=init,
            weight_init=weight_init,
            seed=seed,
            beta=beta,
            include=include,
            exclude=exclude,
            verbose=verbose,
            nm=nm,
            resume=resume,
            frozen=frozen,
            nm_incompatible=nm_incompatible,
            backend=backend,
        )
        check_choice(decay, DECAYS, "decay")
        check_choice(update_on, UPDATE_ON, "update_on")
        check_choice(rounding, ROUNDING, "rounding")
        self.alpha = check_number(alpha, "alpha", 0, 1, low_open=True, high_open=True, what="the drop fraction")
        self.min_fraction = check_number(min_fraction, "min_fraction", 0, alpha, what="the cosine's floor")
        self.delta_t = check_positive_int(delta_t, "delta_t", "optimizer steps between updates")
        self.t_end = check_number(t_end, "t_end", 0, 1, low_open=True, what="a fraction of the training steps")
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"`options` must map rule option names to values; got {options!r}.")
        self.growth, self.drop, self.redistribution = growth, drop, redistribution
        self.decay, self.update_on, self.rounding = decay, update_on, rounding
        self.options = dict(options or {})
        self._check()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, growth=self.growth, drop=self.drop)

    def plan(self) -> Plan:
        """Every ``delta_t`` steps (or epoch end) until ``t_end``: ``drop``, ``redistribution``, ``growth``."""
        if self.update_on == "epoch":
            when = EpochEnds(end=self.t_end)
        else:
            when = Every(self.delta_t, end=self.t_end)
        fraction = (
            Constant(self.alpha) if self.decay == "constant" else Cosine(self.alpha, self.min_fraction, self.t_end)
        )
        rewire = Rewire(fraction, self.drop, self.growth, self.redistribution)
        return Plan(when=when, rewire=rewire, options={"rounding": self.rounding, "nm": self.nm, **self.options})


_BASE_PARAMS = frozenset(inspect.signature(DynamicSparseTraining.__init__).parameters) - {"self", "sparsity"}


def base_kwargs(local: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    """:class:`DynamicSparseTraining` keyword arguments: a preset's same-named ``locals()`` plus ``fixed``."""
    return {**{k: v for k, v in local.items() if k in _BASE_PARAMS}, **fixed}


def check_rates(initial: object, initial_name: str, final: object = 0.0, final_name: str | None = None) -> None:
    """Check a preset's own drop-rate arguments under their own names (before they become ``alpha``, ...).

    Raises:
        ValueError: Unless ``initial`` is in ``(0, 1)`` and ``final`` (if named) in ``[0, initial]``.
    """
    first = check_number(initial, initial_name, 0, 1, low_open=True, high_open=True, what="a fraction of the weights")
    if final_name is not None:
        check_number(final, final_name, 0, first, what=f"the final value of `{initial_name}`'s decay")
