"""Physical removal of pruned channels: a smaller dense model with the same outputs (:func:`shrink`).

A channel (an output channel of a convolution, an output feature of a linear layer) whose every producer is
exactly zero contributes nothing: removing it, together with the matching input channels of the layers that
read it, the entries of the norms between them and the channels coupled to it by residual additions, gives a
smaller ordinary ``nn.Module`` that computes the same function. The coupling analysis (which layers must lose
which channels together, through additions, concatenations, splits, depthwise convolutions and attention
heads) is `torch-pruning`'s dependency graph (Fang et al. CVPR 2023, "DepGraph: Towards any structural
pruning"; the ``structured`` extra: ``pip install lightning-pai[structured]``).

A channel is *dead* when every **terminal producer** of its coupled group outputs exactly zero on it:

- a normalisation layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) whose scale ``γ_c`` and shift
  ``β_c`` are both zero (its output is 0 whatever its input; a channel mask over norms masks both);
- a convolution or linear layer not followed by such a norm, whose filter ``W[c]`` and bias ``b[c]`` are zero.

Only channels that are dead in every producer of their group are removed, so the result's outputs equal the
input model's; :func:`shrink` checks this on ``example_inputs`` (``ShrinkReport.max_abs_diff``) and refuses a
result that differs by more than ``atol`` (e.g. a zero channel that passes through a non-linearity with
``f(0) != 0`` before it is read). Layers whose outputs are the model's outputs keep all their channels.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from lightning_pai.deploy.export import _record_digest

FORMAT = "lightning_pai.shrunk"
VERSION = 1

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "`lightning_pai.shrink` needs torch-pruning for the coupling analysis: "
            "pip install 'lightning-pai[structured]' (or torch-pruning)"
        ) from err
    return torch_pruning


@dataclass
class ShrinkReport:
    """What :func:`shrink` removed, and what it cost and saved.

    Attributes:
        removed: Output channels removed per layer (qualified name -> count), for every layer that lost some.
        params_before: Parameters of the input model.
        params_after: Parameters of the shrunk model.
        flops_before: Multiply-accumulates per sample of the convolutions and linear layers (a forward pass on
            ``example_inputs``, whose first dimension is the batch).
        flops_after: The same for the shrunk model.
        max_abs_diff: Largest difference between the two models' outputs on ``example_inputs`` (eval mode).
        history: The removals, replayable on a fresh copy of the architecture (see :func:`load_shrunk`).
        skipped: Layers with zero output channels that were kept, and why (e.g. a LayerNorm normalises across
            them, so removing them would change the other channels' statistics).
    """

    removed: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    max_abs_diff: float = 0.0
    history: list[tuple[str, bool, list[int]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def param_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / max(self.params_before, 1)

    @property
    def flop_ratio(self) -> float:
        """``flops_after / flops_before``."""
        return self.flops_after / max(self.flops_before, 1)

    def __str__(self) -> str:
        channels = sum(self.removed.values())
        return (
            f"shrink: {channels} channels removed from {len(self.removed)} layers; parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.param_ratio:.3f}x), MACs "
            f"{self.flops_before:,} -> {self.flops_after:,} ({self.flop_ratio:.3f}x); max |output difference| "
            f"{self.max_abs_diff:.2e}"
            + (f"; {len(self.skipped)} layers with zero channels kept (see `skipped`)" if self.skipped else "")
        )


def _zero_channels(module: nn.Module, idxs: list[int], out: bool = True) -> Tensor:
    """Per index of ``idxs``: whether ``module``'s output channel is exactly zero (filter and bias, or γ and β)."""
    if isinstance(module, _NORMS):
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is None:  # affine=False: normalises whatever comes in, never zero by itself
            return torch.zeros(len(idxs), dtype=torch.bool)
        w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() == 1 else weight.detach().reshape(-1, 1)
        dead = (w == 0).all(1)
        if bias is not None:
            dead &= bias.detach().reshape(-1) == 0
        return dead[idxs].cpu()
    weight = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        per = weight.shape[1]
        w = weight.reshape(groups, weight.shape[0] // groups, per, -1).permute(0, 2, 1, 3).reshape(groups * per, -1)
    else:
        w = weight.reshape(weight.shape[0], -1)
    dead = (w == 0).all(1)
    bias = getattr(module, "bias", None)
    if bias is not None:
        dead &= bias.detach() == 0
    return dead[idxs].cpu()


def _keeps_channels(node: Any, width: int) -> bool:
    """Whether a traced reshape keeps a ``width``-channel dimension whole: channels-last or channels-first in and out.

    A flatten ``(B, C, H, W) -> (B, C H W)`` (into a linear layer), ``(B, C, 1, 1) -> (B, C)`` or
    ``(B, N, C) -> (B * N, C)`` does; a split into attention heads ``(B, N, 3C) -> (B, N, 3, H, D)`` does not
    (removing channels there would mix heads).
    """
    grad_fn = node.grad_fn
    try:
        before = list(grad_fn._saved_self_sym_sizes)
        after = list(grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, TypeError):
        return False
    if before and after and before[-1] == after[-1] == width:
        return True
    flat = math.prod(before[1:])
    if len(before) >= 2 and width in (before[1], flat) and after == [before[0], flat]:
        return True  # a flatten into a linear layer: each channel is a block of its inputs
    return len(before) >= 2 and len(after) >= 2 and before[1] == after[1] == width


def _group_dead(dg: Any, group: Any) -> list[int] | str:
    """Root indices of ``group`` dead in every terminal producer (see the module docstring), or why none can go."""
    tp = _torch_pruning()
    producers: list[tuple[nn.Module, list[int], list[int]]] = []
    members = {id(item.dep.target.module) for item in group}
    for item in group:
        module = item.dep.target.module
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return "a LayerNorm/GroupNorm normalises across these channels (their statistics would change)"
        if isinstance(module, (tp.ops._UnbindOp, tp.ops._ExpandOp)) or (
            isinstance(module, tp.ops._ReshapeOp) and not _keeps_channels(dg.module2node[module], len(item.idxs))
        ):
            return "the channels are reshaped (e.g. into attention heads)"
        if not dg.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(module, nn.Module):
            continue
        if isinstance(module, _NORMS):
            producers.append((module, list(item.idxs), list(item.root_idxs)))
        elif isinstance(module, _LAYERS):
            nxt = [n.module for n in dg.module2node[module].outputs]
            if len(nxt) == 1 and isinstance(nxt[0], _NORMS) and id(nxt[0]) in members:
                continue  # its norm decides: a norm with γ = β = 0 outputs 0 whatever the filter
            producers.append((module, list(item.idxs), list(item.root_idxs)))
        elif any(p.numel() for p in module.parameters(recurse=False)):  # an unknown parametrised producer
            return f"{type(module).__name__} produces them and is not a layer or norm this knows"
    if not producers:
        return []
    alive: set[int] = set()
    seen: set[int] = set()
    for module, idxs, roots in producers:
        dead = _zero_channels(module, idxs)
        for root, is_dead in zip(roots, dead.tolist()):
            seen.add(root)
            if not is_dead:
                alive.add(root)
    return sorted(seen - alive)


def _output_layers(dg: Any) -> list[nn.Module]:
    """Layers whose output leaves the model (their channels are the model's outputs)."""
    return [m for m, node in dg.module2node.items() if isinstance(m, nn.Module) and not node.outputs]


def _outputs(model: nn.Module, example_inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> list[Tensor]:
    with torch.no_grad():
        out = forward_fn(model, example_inputs) if forward_fn is not None else _call(model, example_inputs)
    flat: list[Tensor] = []

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            flat.append(x.detach())
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "to_tuple"):  # HF ModelOutput
            walk(x.to_tuple())

    walk(out)
    return flat


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def _run_counted(model: nn.Module, inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> tuple[Any, ...]:
    """One forward pass: its outputs, the parameters, and the multiply-accumulates of convolutions and linears."""
    macs = [0]

    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        batch = max(1, out.shape[0]) if out.dim() > 1 else 1  # per sample
        if isinstance(module, nn.Linear):
            macs[0] += out.numel() // batch * module.in_features
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input element feeds out/groups x kernel
            per = module.out_channels // module.groups * math.prod(module.kernel_size)
            macs[0] += args[0].numel() // batch * per
        else:  # a convolution: every output element reads in/groups channels times the kernel
            macs[0] += out.numel() // batch * (module.in_channels // module.groups * math.prod(module.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    try:
        outputs = _outputs(model, inputs, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return outputs, sum(p.numel() for p in model.parameters()), macs[0]


@overload
def shrink(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = ...,
    ignored: list[nn.Module] | None = ...,
    inplace: bool = ...,
    atol: float = ...,
    report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def shrink(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = ...,
    ignored: list[nn.Module] | None = ...,
    inplace: bool = ...,
    atol: float = ...,
    report: Literal[True],
) -> tuple[nn.Module, ShrinkReport]: ...


def shrink(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ignored: list[nn.Module] | None = None,
    inplace: bool = False,
    atol: float = 1e-5,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ShrinkReport]:
    """Remove every dead channel of ``model``: a smaller ordinary ``nn.Module`` with the same outputs.

    Works on any channel-pruned model whose pruned channels are exactly zero in every producer — the masks of
    :class:`~lightning_pai.ChannelPruning` / :class:`~lightning_pai.EarlyBird` (filter, bias, and the γ and β of
    the following norm), or any weights you zeroed yourself. Unstructured masks remove only the channels they
    happen to empty. The model's training flag and the input model itself are left as they are (``inplace=False``).

    Args:
        model: The (masked) model. Its parameters are read, not changed, unless ``inplace=True``.
        example_inputs: Inputs for one forward pass (a tensor, a tuple of positional inputs or a dict of keyword
            inputs): the coupling analysis traces it, and the shrunk model's outputs are checked against the
            input model's on it.
        forward_fn: ``fn(model, example_inputs) -> outputs`` when calling the model needs more than that.
        ignored: Layers whose output channels must stay (their inputs may still shrink). Layers producing the
            model's outputs are always kept.
        inplace: Shrink ``model`` itself instead of a deep copy (saves memory; on an error the model is left
            half-shrunk).
        atol: Largest output difference accepted on ``example_inputs``.
        report: Also return a :class:`ShrinkReport` (parameters, MACs, removed channels, output difference).

    Returns:
        The shrunk model, or ``(model, report)`` with ``report=True``.

    Raises:
        ValueError: When the shrunk model's outputs differ from the input model's by more than ``atol`` (the
            input model is left untouched).
        ImportError: Without torch-pruning installed.
    """
    tp = _torch_pruning()
    if atol < 0:
        raise ValueError(f"`atol` must be >= 0, got {atol}")
    original_names = {id(m): n for n, m in model.named_modules()}
    unknown = [type(m).__name__ for m in ignored or () if id(m) not in original_names]
    if unknown:
        raise ValueError(f"`ignored` must hold submodules of `model`; these are not: {unknown}")
    target = model if inplace else copy.deepcopy(model)
    was_training = {m: m.training for m in target.modules()}
    target.eval()
    before, params_before, flops_before = _run_counted(target, example_inputs, forward_fn)
    dg = tp.DependencyGraph().build_dependency(target, example_inputs, forward_fn=forward_fn, verbose=False)
    names = {m: n for n, m in target.named_modules()}
    keep_layers = _output_layers(dg) + [target.get_submodule(original_names[id(m)]) for m in ignored or ()]
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    plans = []
    for group in dg.get_all_groups(ignored_layers=keep_layers, root_module_types=_LAYERS):
        dead = _group_dead(dg, group)
        root = group[0].dep.target.module
        if isinstance(dead, str):
            if isinstance(root, _LAYERS) and bool(_zero_channels(root, list(group[0].idxs)).any()):
                skipped[names.get(root, type(root).__name__)] = dead
            continue
        if not dead:
            continue
        width = len(group[0].idxs)
        if len(dead) >= width:  # a layer keeps one channel: the dead one it keeps outputs zero, as before
            dead = dead[1:]
        if dead:
            plans.append((root, dead))
    for root, dead in plans:
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, dead)
        if not dg.check_pruning_group(group):
            continue
        for item in group:
            module = item.dep.target.module
            if dg.is_out_channel_pruning_fn(item.dep.handler) and isinstance(module, _LAYERS) and module in names:
                removed[names[module]] = removed.get(names[module], 0) + len(item.idxs)
        group.prune()
    try:
        after, params_after, flops_after = _run_counted(target, example_inputs, forward_fn)
    except RuntimeError as err:
        raise ValueError(
            f"shrink: the shrunk model does not run ({err}). Pass the layers whose channel count its code relies "
            "on in `ignored=`." + ("" if inplace else " The input model is unchanged.")
        ) from err
    finally:
        for m, flag in was_training.items():  # each module's own flag (``train()`` would recurse into children)
            m.training = flag
    diff = _max_diff(before, after)
    if not diff <= atol:
        raise ValueError(
            f"shrink: the shrunk model's outputs differ from the input model's by {diff:.3g} (> `atol`={atol}). "
            "A zero channel probably passes through an operation with f(0) != 0 (e.g. a sigmoid) before it is "
            "read; pass that layer in `ignored=`." + ("" if inplace else " The input model is unchanged.")
        )
    if not report:
        return target
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in dg.pruning_history()]
    info = ShrinkReport(removed, params_before, params_after, flops_before, flops_after, diff, history, skipped)
    return target, info


def save_shrunk(model: nn.Module, report: ShrinkReport, path: str | Path) -> None:
    """Write a shrunk model: its removals (:attr:`ShrinkReport.history`) and its state dict, checksummed.

    The file holds tensors and JSON only (loaded with ``weights_only=True``), no pickled classes: rebuild the
    architecture in code and call :func:`load_shrunk`.
    """
    history = json.dumps(report.history)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checksums = {k: _record_digest(v) for k, v in state.items()}
    payload = {"format": FORMAT, "version": VERSION, "history": history, "checksums": checksums, "state": state}
    torch.save(payload, path)


def load_shrunk(model: nn.Module, path: str | Path, example_inputs: Any, **kwargs: Any) -> nn.Module:
    """Rebuild a shrunk model from a fresh copy of its original architecture and a :func:`save_shrunk` file.

    Replays the removals on ``model`` (changed in place), then loads the weights strictly.

    Args:
        model: A freshly built instance of the *unshrunk* architecture (any weights).
        path: A file written by :func:`save_shrunk`.
        example_inputs: Inputs for one forward pass (for the coupling analysis, as in :func:`shrink`).
        **kwargs: ``forward_fn`` as in :func:`shrink`.

    Returns:
        ``model``, shrunk and loaded.

    Raises:
        ValueError: When the file is not a shrunk model, fails its checksum, or does not fit ``model``.
    """
    tp = _torch_pruning()
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file written by `lightning_pai.save_shrunk`")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: format version {payload.get('version')} is not supported (this is {VERSION})")
    state, checksums = payload.get("state"), payload.get("checksums")
    if not isinstance(state, Mapping) or not isinstance(checksums, Mapping) or set(state) != set(checksums):
        raise ValueError(f"{path}: the state dict or its checksums are missing; the file is damaged")
    changed = [k for k, v in state.items() if _record_digest(v) != checksums[k]]
    if changed:
        raise ValueError(f"{path}: {changed[:3]} do not match their checksums; the file is damaged or was changed")
    history = [(str(n), bool(o), [int(i) for i in idx]) for n, o, idx in json.loads(payload["history"])]
    forward_fn = kwargs.get("forward_fn")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward_fn, verbose=False)
    try:
        dg.load_pruning_history(history)
    except (AttributeError, IndexError) as err:
        raise ValueError(f"{path}: its removals do not fit this architecture ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the model after replaying its removals: {err}") from err
    return model
