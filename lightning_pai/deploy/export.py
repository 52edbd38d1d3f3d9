"""Sparse checkpoints that deploy: a compressed state-dict format, and masks made permanent.

**File format** (``format = "lightning_pai.sparse_state_dict"``, ``version = 2``), one :func:`torch.save`
of a dict of plain containers, tensors and strings (so :func:`torch.load` reads it with
``weights_only=True``)::

    {
        "header": {"format": "lightning_pai.sparse_state_dict", "version": 2},
        "tensors": {                        # every state-dict entry, in the state dict's order
            "<name>": <Tensor>,             # dense entries (biases, norms, buffers, unmasked weights), as is
            "<name>": {                     # each compressed (masked) weight
                "values": <1-D Tensor>,     # kept values in mask order (row-major positions where mask is True)
                "mask": <1-D uint8 Tensor>, # lightning_pai.core.packing.pack_mask(mask): 1 bit per weight
                "shape": [int, ...],        # the weight's shape
                "dtype": "float32",         # the weight's dtype (``values`` may be stored in another one)
            },
        },
        "metadata": {...} or None,          # the state dict's ``_metadata`` (module versions), if it had one
        "checksums": {"<name>": "<sha256>"},  # per tensor entry: of its bytes (compressed: values, then mask)
    }

Every record's sha256 is checked when the file is read (:func:`dense_state_dict`): a flipped value, mask or
tensor byte is an error naming the entry, never a silently different model. Version-1 files (no checksums)
are still read.

A masked weight of ``n`` entries and density ``d`` (fraction kept, ``1 - sparsity``) costs
``d * n * itemsize + ceil(n / 8)`` bytes instead of ``n * itemsize``: about ``4 d + 0.125`` bytes per
float32 weight (0.525 at 90 % sparsity, 13 % of the dense 4 bytes).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.packing import pack_mask, packed_size, unpack_mask
from lightning_pai.core.targets import select_targets

#: Name written in (and required from) every sparse file's header.
FORMAT_NAME = "lightning_pai.sparse_state_dict"
#: Newest format version this code writes and reads (2: per-record sha256 checksums).
FORMAT_VERSION = 2

MaskLike = Mapping[str, Tensor] | Any  # a dict of bool tensors, or anything with ``.items()`` (a MaskSet)


def _mask_dict(masks: MaskLike | None) -> dict[str, Tensor] | None:
    if masks is None:
        return None
    if not hasattr(masks, "items"):
        raise TypeError(f"`masks` must map parameter names to bool tensors (a dict or a MaskSet), got {type(masks)}.")
    return {name: m for name, m in masks.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r} in a sparse state dict.")
    return dtype


def _default_names(model_or_state_dict: nn.Module | Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    if isinstance(model_or_state_dict, nn.Module):
        try:
            targets = select_targets(model_or_state_dict)
        except ValueError:  # no default target (no linear-like layer): nothing to compress
            return []
        return [name for name in targets if name in state]
    return [
        name
        for name, t in state.items()
        if isinstance(t, Tensor) and name.rsplit(".", 1)[-1] == "weight" and t.dim() >= 2 and t.is_floating_point()
    ]


def sparse_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    masks: MaskLike | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Compress a state dict: each masked weight becomes its kept values plus a bit-packed mask.

    The in-memory form of :func:`save_sparse` (see the module docstring for the layout); pass it to your own
    IO and back through :func:`dense_state_dict`.

    Which weights are compressed:

    - ``masks`` given: exactly the named tensors, whatever their density (a :class:`~lightning_pai.MaskSet`
      or a ``{name: bool tensor}`` dict keyed like the state dict).
    - ``masks=None``: masks are inferred as ``w != 0`` for the default targets when a module is given, i.e.
      what :func:`~lightning_pai.core.targets.select_targets` picks without ``include`` (the ``weight`` of
      every ``nn.Linear`` / ``nn.Conv*`` layer and the other linear-like weights it lists), or every
      floating-point tensor named ``*weight`` with at least 2 dimensions when a plain state dict is given.
      An inferred weight is compressed only if that makes it smaller, i.e. if its density is below
      ``1 - 1 / (8 * itemsize)`` (0.969 for float32).

    Positions outside a mask come back as ``+0.0`` (a ``-0.0`` there compares equal but loses its sign bit);
    every kept value and every other tensor comes back bit for bit.

    Args:
        model_or_state_dict: A module (its ``state_dict()`` is used, buffers included) or a state dict.
        masks: Bool keep-masks by name (``True`` = kept), or ``None`` to infer them from exact zeros.
        dtype: Store the kept values of compressed weights in this floating dtype (e.g. ``torch.float16``
            halves their size; lossy). :func:`dense_state_dict` casts them back to the weight's own dtype.
            ``None`` (default) stores them exactly.

    Returns:
        ``{"header": {...}, "tensors": {...}, "metadata": ...}``, plain containers and tensors only.

    Raises:
        KeyError: If a mask names no tensor of the state dict.
        ValueError: If a mask's shape differs from its tensor's, or the tensor has nonzero values outside its
            mask (they would be lost: apply the masks first, e.g. with :func:`make_permanent`).
        TypeError: If ``dtype`` is not a floating dtype, or a mask is not a bool tensor.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"`dtype` must be None or a floating torch.dtype such as torch.float16, got {dtype!r}.")
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(f"Expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")
    given = _mask_dict(masks)
    if given is not None:
        missing = [n for n in given if n not in state]
        if missing:
            example = ", ".join(list(state)[:5])
            raise KeyError(f"Masks name tensors the state dict does not have: {missing[:5]}. Keys look like: {example}")
        chosen = given
    else:
        chosen = {}
        for name in _default_names(model_or_state_dict, state):
            t = state[name]
            if packed_size(t.numel()) + int(torch.count_nonzero(t)) * t.element_size() < t.numel() * t.element_size():
                chosen[name] = t != 0
    tensors: dict[str, Any] = OrderedDict()
    for name, t in state.items():
        if name not in chosen:
            tensors[name] = t
            continue
        mask = chosen[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"Mask {name!r} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}.")
        if mask.shape != t.shape:
            raise ValueError(f"Mask {name!r} has shape {tuple(mask.shape)}, its tensor {tuple(t.shape)}.")
        weight = t.detach()
        mask = mask.to(weight.device)
        outside = int(torch.count_nonzero(weight.masked_fill(mask, 0)))
        if outside:
            raise ValueError(
                f"{name!r} has {outside} nonzero values where its mask is False; they would be lost. Apply the masks "
                "first (`make_permanent(model, masks)` or `MaskSet.apply_()`)."
            )
        values = weight.reshape(-1)[mask.reshape(-1)]
        tensors[name] = {
            "values": values if dtype is None else values.to(dtype),
            "mask": pack_mask(mask),
            "shape": list(weight.shape),
            "dtype": _dtype_name(weight.dtype),
        }
    metadata = getattr(state, "_metadata", None)
    return {
        "header": {"format": FORMAT_NAME, "version": FORMAT_VERSION},
        "tensors": tensors,
        "metadata": copy.deepcopy(dict(metadata)) if metadata is not None else None,
        "checksums": {name: digest for name, entry in tensors.items() if (digest := _record_digest(entry))},
    }


def _record_digest(entry: Any) -> str | None:
    """sha256 of a record's bytes: a tensor's, or a compressed entry's values then mask; None for other objects."""
    if isinstance(entry, Mapping):
        parts = [entry.get("values"), entry.get("mask")]
    elif isinstance(entry, Tensor):
        parts = [entry]
    else:
        return None
    h = hashlib.sha256()
    for t in parts:
        if not isinstance(t, Tensor):
            return None
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def _check_header(payload: Any, source: str) -> None:
    header = payload.get("header") if isinstance(payload, Mapping) else None
    if not isinstance(header, Mapping) or header.get("format") != FORMAT_NAME:
        looks_dense = isinstance(payload, Mapping) and payload and all(isinstance(v, Tensor) for v in payload.values())
        hint = " It looks like a plain state dict: read it with `torch.load`." if looks_dense else ""
        found = dict(header) if isinstance(header, Mapping) else None
        raise ValueError(
            f"{source} is not a lightning_pai sparse state dict: expected a header "
            f"{{'format': {FORMAT_NAME!r}, 'version': <= {FORMAT_VERSION}}}, found header {found!r}.{hint}"
        )
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{source} has sparse-state-dict format version {version!r}; this lightning_pai reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade lightning_pai to read newer files."
        )
    if not isinstance(payload.get("tensors"), Mapping):
        raise ValueError(f"{source} has a valid header but no 'tensors' mapping; the file is damaged.")


def dense_state_dict(payload: Mapping[str, Any]) -> dict[str, Tensor]:
    """Expand a :func:`sparse_state_dict` payload into an ordinary state dict for ``load_state_dict``.

    Each compressed weight is rebuilt as ``w = zeros(shape, dtype); w.flatten()[unpack_mask(mask)] = values``
    (values cast back to the recorded dtype); every other entry is returned as stored.

    Args:
        payload: What :func:`sparse_state_dict` returned (or :func:`torch.load` read from a :func:`save_sparse`
            file).

    Returns:
        An ``OrderedDict`` of tensors in the original order, with the original ``_metadata`` attached, so
        ``model.load_state_dict(dense_state_dict(payload))`` restores the model.

    Raises:
        ValueError: If the header is missing, names another format or a newer version, or an entry is damaged
            (its bytes differ from the checksum written with it, or its fields do not fit together).
    """
    _check_header(payload, "The payload")
    checksums = payload.get("checksums") or {}
    out: OrderedDict[str, Tensor] = OrderedDict()
    for name, entry in payload["tensors"].items():
        if name in checksums and _record_digest(entry) != checksums[name]:
            raise ValueError(
                f"Entry {name!r} does not match the checksum written with it: its bytes changed after saving "
                "(a damaged or altered file). Nothing was loaded."
            )
        if not isinstance(entry, Mapping):
            out[name] = entry
            continue
        try:
            values, packed, shape, dtype = entry["values"], entry["mask"], entry["shape"], entry["dtype"]
        except KeyError as err:
            raise ValueError(
                f"Compressed entry {name!r} lacks the field {err.args[0]!r}; the file is damaged."
            ) from err
        mask = unpack_mask(packed, shape).reshape(-1)
        if int(mask.sum()) != values.numel():
            raise ValueError(f"Entry {name!r} has {values.numel()} values for a mask keeping {int(mask.sum())}.")
        dense = torch.zeros(mask.numel(), dtype=_dtype_from_name(dtype), device=values.device)
        dense[mask.to(values.device)] = values.to(dense.dtype)
        out[name] = dense.reshape(shape)
    metadata = payload.get("metadata")
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def save_sparse(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    path: str | os.PathLike | Any,
    masks: MaskLike | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a compressed sparse checkpoint: kept values plus 1 bit of mask per masked weight.

    ``torch.save(sparse_state_dict(model_or_state_dict, masks, dtype=dtype), path)``; see
    :func:`sparse_state_dict` for which weights are compressed (with ``masks=None``: the exact zeros of the
    default targets, e.g. every ``nn.Linear`` / ``nn.Conv*`` weight) and the module docstring for the format.
    A float32 weight at sparsity ``s`` costs about ``4 (1 - s) + 0.125`` bytes instead of 4.

    Args:
        model_or_state_dict: A module or a state dict.
        path: File path or writable binary file object (anything :func:`torch.save` accepts).
        masks: Bool keep-masks by parameter name (dict or :class:`~lightning_pai.MaskSet`); ``None`` infers
            them from exact zeros.
        dtype: Optional floating dtype for the stored kept values (lossy; ``None`` keeps them exact).

    Raises:
        KeyError: If a mask names no tensor of the state dict.
        ValueError: If a masked tensor has nonzero values outside its mask, or a mask's shape is wrong.
    """
    torch.save(sparse_state_dict(model_or_state_dict, masks, dtype=dtype), path)


def load_sparse(
    path: str | os.PathLike | Any,
    map_location: str | torch.device | Mapping[str, str] | None = None,
    *,
    weights_only: bool = True,
) -> dict[str, Tensor]:
    """Read a :func:`save_sparse` file back as an ordinary dense state dict.

    ``model.load_state_dict(load_sparse(path))`` restores the saved model bit for bit (masked-out positions
    are exact zeros); the header is checked first.

    Args:
        path: File path or readable binary file object.
        map_location: Passed to :func:`torch.load` (e.g. ``"cpu"``).
        weights_only: Passed to :func:`torch.load`; the format itself needs only tensors and plain containers.
            Set ``False`` only for trusted files whose state dicts hold other objects (``_extra_state``).

    Returns:
        Dense state dict (``OrderedDict`` of tensors, with the original ``_metadata``).

    Raises:
        ValueError: If the file is not a lightning_pai sparse state dict, or was written by a newer version.
    """
    payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    _check_header(payload, f"File {os.fspath(path)!r}" if isinstance(path, (str, os.PathLike)) else "The file")
    return dense_state_dict(payload)


def _plain_copy(model: nn.Module) -> nn.Module:
    """``deepcopy(model)`` with ``torch.nn.utils.prune`` re-parametrizations baked in (``prune.remove``).

    The copy also drops the forward hooks learned-mask methods attach (the zeros are baked in instead).
    """
    from torch.nn.utils import prune

    pruned = [
        (mod, hook._tensor_name)
        for mod in model.modules()
        for hook in mod._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)  # PruningContainer included
    ]
    # their ``weight`` is a computed non-leaf tensor that deepcopy refuses; detach it for the copy, then restore
    saved = [(mod, name, getattr(mod, name)) for mod, name in pruned]
    try:
        for mod, name, value in saved:
            setattr(mod, name, value.detach())
        out = copy.deepcopy(model)
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    for mod in out.modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(mod, hook._tensor_name)
        # the forward hooks of learned-mask methods (lightning_pai.core.learned), which the copy does not need
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "lightning_pai_hook", False)]:
                del hooks[key]
                mod._forward_hooks_always_called.pop(key, None)
    return out


def make_permanent(model: nn.Module, masks: MaskLike) -> nn.Module:
    """A plain copy of ``model`` with the masks' zeros baked into its weights and nothing attached.

    Returns ``deepcopy(model)`` with ``param[~mask] = 0`` for every masked parameter: weights stay ordinary
    dense ``nn.Parameter`` s with exact zeros at pruned positions, no hooks, no mask buffers, no
    ``weight_orig``; the state-dict keys are the model's own. ``torch.nn.utils.prune`` re-parametrizations
    found in the copy are removed the same way (``prune.remove``), so a model pruned with it comes out
    plain too. The original model is not modified.

    Args:
        model: The (pruned) model.
        masks: Bool keep-masks by parameter name: a :class:`~lightning_pai.MaskSet` or a ``{name: tensor}``
            dict.

    Returns:
        The new model.

    Raises:
        KeyError: If a mask names no parameter of ``model``.
        ValueError: If a mask's shape differs from its parameter's.
    """
    given = _mask_dict(masks)
    if given is None:
        raise TypeError("`masks` is required: pass the MaskSet or {name: bool tensor} dict of the pruned model.")
    out = _plain_copy(model)
    params = dict(out.named_parameters())
    missing = [n for n in given if n not in params]
    if missing:
        raise KeyError(f"The model has no parameter named {missing[:5]}; the masks were made for another model.")
    with torch.no_grad():
        for name, mask in given.items():
            p = params[name]
            if mask.shape != p.shape:
                raise ValueError(f"Mask {name!r} has shape {tuple(mask.shape)}, its parameter {tuple(p.shape)}.")
            p.masked_fill_(~mask.to(device=p.device, dtype=torch.bool), 0.0)
    return out


__all__ = ["dense_state_dict", "load_sparse", "make_permanent", "save_sparse", "sparse_state_dict"]
