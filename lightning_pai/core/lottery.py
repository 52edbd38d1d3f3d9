"""Iterative magnitude pruning (lottery tickets): per-round masks, rewind points, RNG snapshots.

Frankle & Carbin 2019 (arXiv:1803.03635) find a "winning ticket" by repeating: train, remove a fraction
``p`` of the *remaining* weights with the smallest magnitude, reset the survivors to their values at the
rewind point, train again. This module holds the framework-free parts; the Lightning adapter is
:class:`lightning_pai.LotteryTicket`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_pai.core.distributions import get_distribution
from lightning_pai.core.select import masks_from_counts

#: Distributions that can rank the survivors of an earlier round (ERK/ER fix budgets from shapes alone
#: and ignore magnitudes, so they do not describe iterative magnitude pruning).
IMP_DISTRIBUTIONS = ("global", "uniform", "lamp")
REWIND_KINDS = ("init", "step", "epoch", "lr", "none")


@dataclass(frozen=True)
class RewindSpec:
    """A parsed ``rewind_to`` value.

    Attributes:
        kind: ``"init"``, ``"step"``, ``"epoch"``, ``"lr"`` or ``"none"``.
        at: The step or epoch index for ``"step"``/``"epoch"``, else 0.
    """

    kind: str
    at: int = 0

    @property
    def rewinds_weights(self) -> bool:
        """Whether weights go back to the rewind point (``init``, ``step:N``, ``epoch:N``)."""
        return self.kind in ("init", "step", "epoch")


def parse_rewind(rewind_to: str) -> RewindSpec:
    """Parse ``"init"``, ``"step:N"``, ``"epoch:N"``, ``"lr"`` or ``"none"``.

    Raises:
        ValueError: On anything else (the message lists the accepted forms).
    """
    error = ValueError(f"`rewind_to` must be 'init', 'step:N', 'epoch:N' (N >= 0), 'lr' or 'none'; got {rewind_to!r}.")
    if not isinstance(rewind_to, str):
        raise error
    kind, sep, value = rewind_to.partition(":")
    if kind in ("init", "lr", "none") and not sep:
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
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"`layer_fractions[{pattern!r}]` must be a fraction in [0, 1); got {fraction!r}.")


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
    if distribution not in IMP_DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {list(IMP_DISTRIBUTIONS)} here; got {distribution!r}.")
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
        counts.update(get_distribution(distribution)({n: masked[n] for n in rest}, target / size))
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
