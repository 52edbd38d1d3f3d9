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

from lightning_pai.core.masks import MaskSet
from lightning_pai.core.packing import pack_mask, packed_size, unpack_mask
from lightning_pai.core.targets import select_targets

#: Name written in (and required from) every sparse file's header.
FORMAT_NAME = "lightning_pai.sparse_state_dict"
#: Newest format version this code writes and reads (2: per-record sha256 checksums).
FORMAT_VERSION = 2

MaskLike = Mapping[str, Tensor] | Any  # a dict of bool tensors, or anything with ``.items()`` (a MaskSet)


def check_pruning_masks(masks: Any, user: str) -> None:
    """Refuse gradient-only masks (FISH's :class:`~lightning_pai.core.fish.TrainableMasks`) where pruning masks go.

    Their False entries are frozen weights, not pruned ones: baking, compressing or dropping them would zero the
    pretrained values.

    Raises:
        TypeError: If ``masks`` says it does not prune (``masks.prunes is False``).
    """
    if getattr(masks, "prunes", True) is False:
        raise TypeError(
            f"`{user}` takes pruning masks, but these are gradient-only masks (FISH): their False entries are frozen "
            "at their pretrained values, not pruned, and would be zeroed. The fine-tuned model is complete as it is "
            "(save its `state_dict`), or store only its trained entries with `save_diff(model, masks, path)`."
        )


def _mask_dict(masks: MaskLike | None, user: str = "masks") -> dict[str, Tensor] | None:
    if masks is None:
        return None
    check_pruning_masks(masks, user)
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
    given = _mask_dict(masks, "sparse_state_dict")
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
    given = _mask_dict(masks, "make_permanent")
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


# ------------------------------------------------------------------------------------------------ diffs
#: Name written in (and required from) every diff file's header.
DIFF_FORMAT = "lightning_pai.trainable_diff"
#: Newest diff format version this code writes and reads.
DIFF_VERSION = 1


def _trained_masks(masks_or_method: Any) -> dict[str, Tensor]:
    """The gradient-only masks of a FISH callback, ``Sparsifier``, HF ``SparsityCallback``, session or dict."""
    obj = masks_or_method
    session = getattr(obj, "session", None)
    if session is not None and hasattr(session, "current_masks"):
        obj = session
    if hasattr(obj, "current_masks"):  # a Session
        if getattr(obj, "prunes", True):
            raise TypeError(
                f"`save_diff` stores the entries a gradient-only method (FISH) trained; `{obj.name}` prunes weights: "
                "save its model with `save_sparse(model, path, masks)`."
            )
        masks = obj.current_masks()
        if masks is None:
            raise RuntimeError(f"`{obj.name}` has no masks yet: they are set when training starts.")
        return masks
    if isinstance(obj, MaskSet) and getattr(obj, "prunes", True):
        raise TypeError(
            "`save_diff` takes gradient-only masks (FISH: True = trained, False = frozen at the pretrained value); "
            "these are pruning masks (a MaskSet): save the pruned model with `save_sparse(model, path, masks)`."
        )
    if not hasattr(obj, "items"):
        raise TypeError(
            "`masks` must be a FISH callback (or its Sparsifier / HF SparsityCallback / session) or a "
            f"{{name: bool tensor}} dict of the entries that trained; got {type(masks_or_method).__name__}."
        )
    return {n: m for n, m in obj.items()}


def _tensor_bytes(t: Tensor) -> Any:
    return t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()


def _frozen(t: Tensor, index: Tensor | None) -> Tensor:
    """The entries of ``t`` outside ``index`` (flat positions), flattened; all of ``t`` without an index."""
    flat = t.detach().reshape(-1)
    if index is None:
        return flat
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[index.to(flat.device, torch.long)] = False
    return flat[keep]


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    kind = _BITS.get(a.element_size())
    return torch.equal(a.view(kind), b.view(kind)) if kind is not None else torch.equal(a, b)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _own_tensors(model: nn.Module) -> tuple[dict[str, Tensor], set[str]]:
    """The model's state-dict tensors without the aliases of tied parameters, and its (unique) parameter names."""
    state = model.state_dict()
    unique = {n for n, _ in model.named_parameters()}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {n: t for n, t in state.items() if isinstance(t, Tensor) and n not in aliases}, unique


def _base_digest(tensors: Mapping[str, Tensor], plan: Mapping[str, tuple[str, Tensor | None]]) -> str:
    """sha256 of what a diff leaves to the base: the untrained entries of sparse entries, all of unstored ones."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        kind, index = plan.get(name, ("base", None))
        if kind == "dense":
            continue
        h.update(name.encode())
        h.update(_tensor_bytes(_frozen(t, index if kind == "sparse" else None)))
    return h.hexdigest()


def save_diff(
    model: nn.Module, masks: Any, path: str | os.PathLike | Any, base: nn.Module | Mapping[str, Tensor] | None = None
) -> None:
    """Write only what fine-tuning with gradient-only masks (FISH) changed: the trained entries.

    The file holds, for each parameter under ``masks``, the flat positions (``int32``; ``int64`` beyond 2^31
    entries) and values of its trained entries, or the whole tensor when every entry trained (the task head);
    every other tensor that may have changed in full (buffers such as BatchNorm statistics, and parameters without
    a mask that require grad); and a sha256 of everything it leaves to the base (the frozen entries, the frozen
    parameters), so :func:`load_diff` can tell the pretrained model it is applied onto is the right one. Values
    and positions are concatenated into one tensor per dtype; each entry has its own checksum. A float32 entry
    costs 8 bytes (4 with the head's full tensors), against 4 per entry of the full state dict: at the paper's
    0.5 % about 1 % of its size.

    Format (``torch.save`` of plain containers, read with ``weights_only=True``)::

        {
            "header": {"format": "lightning_pai.trainable_diff", "version": 1, "trained": int, "total": int},
            "entries": [{"name": str, "kind": "sparse" | "dense", "shape": [int], "dtype": str, "count": int}],
            "index": <1-D int32 Tensor>,            # flat positions of the sparse entries, in entry order
            "values": {"<dtype>": <1-D Tensor>},    # their values (whole tensors for dense entries), in order
            "model": {"<name>": {"shape": [int], "dtype": str}},  # every state tensor of the model (strict load)
            "base": str,                            # sha256 of the entries left to the base
            "checksums": [str],                     # per entry: sha256 of its positions then its values
        }

    Args:
        model: The fine-tuned model.
        masks: What trained: a FISH callback (or the ``Sparsifier`` / HF ``SparsityCallback`` running it, or its
            session), or ``{name: bool tensor}`` (True: trained). Pruning masks are refused.
        path: File path or writable binary file object.
        base: The pretrained model (or its state dict), optional: its frozen entries and frozen parameters must
            equal the model's bit for bit (else the diff would not rebuild the model, and nothing is written), and
            buffers equal to its own are left out.

    Raises:
        TypeError: For pruning masks, or ``masks`` of another kind.
        KeyError: If a mask names no parameter of ``model``.
        ValueError: If a mask's shape differs from its parameter's, or ``model`` differs from ``base`` outside the
            trained entries (naming the tensors).
    """
    given = _trained_masks(masks)
    tensors, params = _own_tensors(model)
    missing = [n for n in given if n not in params]
    if missing:
        raise KeyError(f"The model has no parameter named {missing[:5]}; the masks were made for another model.")
    base_state = None
    if base is not None:
        base_state = base.state_dict() if isinstance(base, nn.Module) else dict(base)
        wrong = [n for n, t in tensors.items() if n in base_state and base_state[n].shape != t.shape]
        absent = [n for n in tensors if n in params and n not in base_state]
        if wrong or absent:
            raise ValueError(
                f"`base` is not the model's pretrained form: shapes differ for {wrong[:5]}, missing {absent[:5]}."
            )
    plan: dict[str, tuple[str, Tensor | None]] = {}
    for name, t in tensors.items():
        mask = given.get(name)
        if mask is not None:
            if tuple(mask.shape) != tuple(t.shape):
                raise ValueError(f"Mask {name!r} has shape {tuple(mask.shape)}, its parameter {tuple(t.shape)}.")
            mask = mask.to(torch.bool).reshape(-1)
            count = int(torch.count_nonzero(mask))
            if count == t.numel():
                plan[name] = ("dense", None)
            elif count:
                plan[name] = ("sparse", mask.nonzero().reshape(-1).cpu())
        elif name in params:
            if model.get_parameter(name).requires_grad:
                plan[name] = ("dense", None)
        elif base_state is None or name not in base_state or not _same_bits(t, base_state[name]):
            plan[name] = ("dense", None)
    if base_state is not None:
        changed = []
        for name, t in tensors.items():
            kind, index = plan.get(name, ("base", None))
            if kind != "dense" and name in base_state:
                ours = _frozen(t, index if kind == "sparse" else None)
                if not _same_bits(ours, _frozen(base_state[name], index if kind == "sparse" else None)):
                    changed.append(name)
        if changed:
            raise ValueError(
                f"The model differs from `base` outside its trained entries, in {', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}: a diff would not rebuild it. Were the frozen entries moved "
                "(e.g. by an optimizer step outside FISH), or are these the masks training used?"
            )
    wide = any(t.numel() > torch.iinfo(torch.int32).max for t in tensors.values())
    index_dtype = torch.int64 if wide else torch.int32
    entries, checksums, indices, values = [], [], [], {}
    trained = 0
    for name, (kind, index) in plan.items():
        t = tensors[name].detach()
        flat = t.reshape(-1)
        idx = index.to(index_dtype) if kind == "sparse" else None
        vals = (flat[index.to(flat.device)] if kind == "sparse" else flat).cpu()
        dtype = _dtype_name(t.dtype)
        entries.append({"name": name, "kind": kind, "shape": list(t.shape), "dtype": dtype, "count": vals.numel()})
        h = hashlib.sha256()
        if idx is not None:
            indices.append(idx)
            h.update(_tensor_bytes(idx))
        h.update(_tensor_bytes(vals))
        checksums.append(h.hexdigest())
        values.setdefault(dtype, []).append(vals)
        trained += vals.numel() if name in given else 0
    payload = {
        "header": {
            "format": DIFF_FORMAT,
            "version": DIFF_VERSION,
            "trained": trained,
            "total": sum(t.numel() for n, t in tensors.items() if n in given),
        },
        "entries": entries,
        "index": torch.cat(indices) if indices else torch.zeros(0, dtype=index_dtype),
        "values": {d: torch.cat(v) for d, v in values.items()},
        "model": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in tensors.items()},
        "base": _base_digest(base_state if base_state is not None else tensors, plan),
        "checksums": checksums,
    }
    torch.save(payload, path)


def _check_diff(payload: Any, source: str) -> None:
    header = payload.get("header") if isinstance(payload, Mapping) else None
    if not isinstance(header, Mapping) or header.get("format") != DIFF_FORMAT:
        found = dict(header) if isinstance(header, Mapping) else None
        raise ValueError(
            f"{source} is not a lightning_pai diff: expected a header {{'format': {DIFF_FORMAT!r}, 'version': <= "
            f"{DIFF_VERSION}}}, found header {found!r}."
        )
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= DIFF_VERSION:
        raise ValueError(
            f"{source} has diff format version {version!r}; this lightning_pai reads versions 1 to {DIFF_VERSION}. "
            "Upgrade lightning_pai to read newer files."
        )
    for key, kind in (("entries", list), ("index", Tensor), ("values", Mapping), ("model", Mapping),
                      ("base", str), ("checksums", list)):  # fmt: skip
        if not isinstance(payload.get(key), kind):
            raise ValueError(f"{source} has a valid header but no valid {key!r}; the file is damaged.")


def load_diff(model: nn.Module, path: str | os.PathLike | Any, *, check_base: bool = True) -> nn.Module:
    """Apply a :func:`save_diff` file onto ``model``, which holds the pretrained weights: the fine-tuned model.

    Strict: the model must have exactly the state tensors (names, shapes, dtypes) the diff was made from, every
    entry must match the checksum written with it, and (``check_base``) the entries the diff leaves to the base
    must hash to the digest it recorded, i.e. ``model`` must hold the very pretrained weights the diff was made
    against. Nothing is written unless every check passes. The file is read with ``weights_only=True``.

    Args:
        model: The pretrained model (changed in place).
        path: File path or readable binary file object.
        check_base: Check the base's digest (one pass over the frozen weights); False skips it.

    Returns:
        ``model``, now equal to the fine-tuned model bit for bit.

    Raises:
        ValueError: If the file is not a diff, is damaged or altered, was made for another architecture (names,
            shapes, dtypes), or ``model`` is not the pretrained model it was made against.
    """
    source = f"File {os.fspath(path)!r}" if isinstance(path, (str, os.PathLike)) else "The file"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    _check_diff(payload, source)
    index, values, checksums = payload["index"], payload["values"], payload["checksums"]
    entries = payload["entries"]
    if len(checksums) != len(entries):
        raise ValueError(f"{source} has {len(checksums)} checksums for {len(entries)} entries; the file is damaged.")
    at_index, at_values = 0, dict.fromkeys(values, 0)
    slices = []
    for entry, digest in zip(entries, checksums):
        name, kind, count, dtype = entry["name"], entry["kind"], entry["count"], entry["dtype"]
        idx = None
        if kind == "sparse":
            idx = index[at_index : at_index + count]
            at_index += count
        start = at_values.get(dtype, 0)
        vals = values[dtype][start : start + count] if dtype in values else torch.zeros(0)
        at_values[dtype] = start + count
        h = hashlib.sha256()
        if idx is not None:
            h.update(_tensor_bytes(idx))
        h.update(_tensor_bytes(vals))
        if h.hexdigest() != digest or vals.numel() != count or (idx is not None and idx.numel() != count):
            raise ValueError(
                f"Entry {name!r} of {source} does not match the checksum written with it: its bytes changed after "
                "saving (a damaged or altered file). Nothing was loaded."
            )
        slices.append((entry, idx, vals))
    tensors, _ = _own_tensors(model)
    recorded = payload["model"]
    missing, unexpected = sorted(set(recorded) - set(tensors)), sorted(set(tensors) - set(recorded))
    if missing or unexpected:
        raise ValueError(
            f"The diff was made for another model: this one lacks {missing[:5]} and has {unexpected[:5]} besides. "
            "Load the pretrained model the diff was made from."
        )
    for name, t in tensors.items():
        want = recorded[name]
        if list(t.shape) != list(want["shape"]) or _dtype_name(t.dtype) != want["dtype"]:
            raise ValueError(
                f"The diff was made for a model whose {name!r} is {want['dtype']} of shape {tuple(want['shape'])}; "
                f"this model's is {_dtype_name(t.dtype)} of shape {tuple(t.shape)}. Load the pretrained model the "
                "diff was made from."
            )
    plan = {}
    for entry, idx, vals in slices:
        t = tensors[entry["name"]]
        if entry["dtype"] != _dtype_name(t.dtype) or list(entry["shape"]) != list(t.shape):
            raise ValueError(f"Entry {entry['name']!r} does not fit the model's tensor; the file is damaged.")
        if idx is not None:
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.numel() or bool((idx[1:] <= idx[:-1]).any())):
                raise ValueError(f"Entry {entry['name']!r} has positions outside its tensor; the file is damaged.")
        elif vals.numel() != t.numel():
            raise ValueError(f"Entry {entry['name']!r} has {vals.numel()} values for {t.numel()} entries.")
        plan[entry["name"]] = (entry["kind"], idx)
    if check_base and _base_digest(tensors, plan) != payload["base"]:
        raise ValueError(
            f"The model does not hold the weights {source} was made against: the entries it leaves to the base "
            "(frozen entries, frozen parameters, unsaved buffers) hash differently. Load the same pretrained "
            "checkpoint first (or pass `check_base=False` to apply it anyway)."
        )
    with torch.no_grad():
        for entry, idx, vals in slices:
            t = tensors[entry["name"]]
            vals = vals.to(t.device)
            if idx is None:
                t.copy_(vals.view(t.shape))
            elif t.is_contiguous():
                t.view(-1).index_copy_(0, idx.to(t.device, torch.long), vals)
            else:
                flat = t.reshape(-1).clone()
                flat.index_copy_(0, idx.to(t.device, torch.long), vals)
                t.copy_(flat.view(t.shape))
    return model


__all__ = [
    "check_pruning_masks",
    "dense_state_dict",
    "load_diff",
    "load_sparse",
    "make_permanent",
    "save_diff",
    "save_sparse",
    "sparse_state_dict",
]
