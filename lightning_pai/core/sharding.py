"""Sharded parameters (FSDP2 / ``DTensor``): full views for selection, local views for enforcement.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every prunable
parameter is a ``DTensor`` whose rank holds one shard. The engine keeps each mask in the parameter's
*global* shape on every rank (1 byte per weight), so selection — top-k across all shards, ERK, LAMP,
global thresholds — runs on gathered full tensors and gives exactly the single-process result; the masks
are *applied* to the local shards of weights, gradients and optimizer state through :func:`local_slice`,
a view of the rank's part of the full mask with the parameter's placement. Plain tensors pass through
every function unchanged, so the same code serves single-device, DDP and FSDP2 training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch or no distributed build
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter, gradient or state of an FSDP2 / TP module)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The rank's local tensor of a ``DTensor`` (shares its storage), or ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: ``DTensor.full_tensor()`` (a collective: every rank must call it), or ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`full` of every value (collective for sharded values; in the mapping's order on every rank)."""
    return {n: full(t) for n, t in tensors.items()}


def local_slice(whole: Tensor, like: Tensor) -> Tensor:
    """The part of ``whole`` (a tensor of ``like``'s global shape) that this rank holds of ``like``.

    For a ``DTensor`` ``like`` with ``Shard(d)`` / ``Replicate()`` placements on any device mesh, the slice
    follows ``torch.chunk`` along each sharded dimension, as ``DTensor`` does; it is a view of ``whole``.
    A plain ``like`` gives ``whole`` itself.

    Raises:
        ValueError: On a placement other than ``Shard`` or ``Replicate``, or if the slice's shape differs
            from the local shard's.
    """
    if not is_sharded(like):
        return whole
    mesh, out = like.device_mesh, whole
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise ValueError(f"Masks support `Shard` and `Replicate` placements; got {placement} for a parameter.")
        chunks = torch.chunk(torch.arange(out.shape[placement.dim]), mesh.size(mesh_dim))
        index = coordinate[mesh_dim]
        rows = chunks[index] if index < len(chunks) else torch.arange(0)
        start = int(rows[0]) if len(rows) else 0
        out = out.narrow(placement.dim, start, len(rows))
    if out.shape != like.to_local().shape:
        raise ValueError(f"Mask shard {tuple(out.shape)} does not match the parameter's local shard.")
    return out


def as_sharded(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` as a ``DTensor`` placed like ``like`` (from this rank's :func:`local_slice`), or ``whole``."""
    if not is_sharded(like):
        return whole
    return DTensor.from_local(local_slice(whole, like), like.device_mesh, like.placements, run_check=False)


def gather_tree(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every ``DTensor`` replaced by its full tensor (collective)."""
    if is_sharded(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: gather_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_tree(v) for v in obj)
    return obj


@torch.no_grad()
def load_full_state_(module: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy a *full* state dict into ``module`` in place; each sharded parameter or buffer takes its shard.

    Raises:
        KeyError: If ``state`` misses one of the module's parameters or buffers.
    """
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"The state misses {missing[:5]}.")
    for name, tensor in own.items():
        local(tensor).copy_(local_slice(state[name].to(tensor.device), tensor))


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer ``state_dict`` of full tensors with every parameter-shaped state placed like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in state_dict.get("state", {}).items():
        p = params[index]
        state[index] = {
            k: as_sharded(v.to(local(p).device), p) if isinstance(v, Tensor) and v.shape == p.shape else v
            for k, v in values.items()
        }
    return {**state_dict, "state": state}
