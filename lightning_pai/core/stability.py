"""Linear mode connectivity and instability: the error barrier between two copies trained on from one point.

Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis" (ICML). A network is *stable* to
SGD noise at a point of training if two copies trained on from there with different data orders (the only
difference) end in one linearly connected region: the error along the straight line ``w(α) = (1 - α) w_1 + α w_2``
between them never rises much above the endpoints'. The paper's measure is the **error barrier**, ``max_α E(w(α)) -
(E(w_1) + E(w_2)) / 2``, on ≥ 30 evenly spaced values of ``α``; IMP finds matching subnetworks exactly where the
rewind point is stable (barrier ≈ 0).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Instability:
    """The error along the linear path between two trained copies.

    Attributes:
        alphas: The interpolation coefficients, from 0 (first copy) to 1 (second copy).
        errors: The error ``evaluate`` returned at each.
        barrier: ``max(errors) - (errors[0] + errors[-1]) / 2`` (the paper's instability).
    """

    alphas: tuple[float, ...]
    errors: tuple[float, ...]
    barrier: float


def interpolate(first: nn.Module, second: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``first`` with every floating-point parameter and buffer at ``(1 - alpha) a + alpha b``.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are the first copy's. Pruned weights that are zero in
    both copies stay zero.
    """
    out = copy.deepcopy(first)
    theirs = second.state_dict()
    state = {}
    for name, value in first.state_dict().items():
        other = theirs[name]
        state[name] = torch.lerp(value, other.to(value), alpha) if value.is_floating_point() else value
    out.load_state_dict(state)
    return out


def error_barrier(
    first: nn.Module, second: nn.Module, evaluate: Callable[[nn.Module], float], points: int = 30
) -> Instability:
    """The error along the line from ``first`` to ``second`` and its barrier (see the module docstring).

    Args:
        first: One trained copy.
        second: The other, of the same architecture.
        evaluate: The error of a model (e.g. the test error in %, or a fraction), computed in eval mode.
        points: Evenly spaced values of ``α`` in ``[0, 1]``, both ends included (the paper uses 30).

    Raises:
        ValueError: If ``points`` is below 2.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"`points` must be an int >= 2 (the paper uses 30); got {points!r}.")
    alphas = tuple(i / (points - 1) for i in range(points))
    errors = []
    for alpha in alphas:
        model = interpolate(first, second, alpha)
        model.eval()
        with torch.no_grad():
            errors.append(float(evaluate(model)))
    return Instability(alphas, tuple(errors), max(errors) - (errors[0] + errors[-1]) / 2)


def instability(
    model: nn.Module,
    train: Callable[[nn.Module, int], None],
    evaluate: Callable[[nn.Module], float],
    seeds: tuple[int, int] = (0, 1),
    points: int = 30,
) -> Instability:
    """Fork ``model`` (at its current point of training), train the two copies, and measure the error barrier.

    Args:
        model: The network at the fork point (e.g. a lottery ticket rewound to step ``k``, zeros included).
        train: ``train(copy, seed)`` trains a copy in place; ``seed`` must set its data order (and any other
            SGD noise), the copies differing in nothing else.
        evaluate: The error of a model, as for :func:`error_barrier`.
        seeds: The two copies' seeds (equal seeds give identical copies and a barrier of 0).
        points: Interpolation points.

    Returns:
        The :class:`Instability` between the two trained copies.
    """
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    train(first, seeds[0])
    train(second, seeds[1])
    return error_barrier(first, second, evaluate, points)


def masked_instability(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    train: Callable[[nn.Module, int], None],
    evaluate: Callable[[nn.Module], float],
    seeds: tuple[int, int] = (0, 1),
    points: int = 30,
) -> Instability:
    """:func:`instability` of the sparse network ``model ⊙ masks``: both copies train with the masks held.

    Each copy's masked weights are zeroed before training and their gradients zeroed during it (a tensor hook),
    so SGD or Adam, with momentum and weight decay, leaves them at zero; ``train`` needs no mask of its own.
    """

    def train_sparse(copy_: nn.Module, seed: int) -> None:
        params = dict(copy_.named_parameters())
        handles = []
        with torch.no_grad():
            for name, mask in masks.items():
                keep = mask.to(device=params[name].device, dtype=torch.bool)
                params[name].masked_fill_(~keep, 0.0)
                handles.append(params[name].register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0.0)))
        try:
            train(copy_, seed)
        finally:
            for handle in handles:
                handle.remove()

    return instability(model, train_sparse, evaluate, seeds, points)


__all__ = ["Instability", "error_barrier", "instability", "interpolate", "masked_instability"]
