"""Channel groups found from a model's traced forward, channel masks as element masks, and what removing them saves.

A *channel* is one output channel of a convolution (``nn.Conv1d/2d/3d``) or one output feature of an
``nn.Linear``. Removing it is exact only when its output is exactly zero wherever it flows, and when every layer
that reads it loses the matching input. :func:`channel_groups` traces the forward with ``torch.fx`` and follows
each layer's output channels:

- through per-channel norms (``BatchNorm``, ``InstanceNorm`` with affine ``γ``/``β``), activations with
  ``f(0) = 0`` (ReLU, GELU, SiLU, tanh, ...), pooling, dropout, upsampling and multiplication by constants;
- through ``flatten`` / ``view(B, -1)`` / global means into a linear layer (channel ``c`` becomes its input
  features ``c k .. c k + k - 1``, channel-major, ``k = in_features / channels``);
- ``torch.cat`` along the channel axis maps channel ranges (DenseNet, Inception);
- an addition of two tensors (a residual connection) *couples* the channels of every layer feeding it: channel
  ``c`` of the sum is zero only when it is zero in every addend, so those layers form one group whose channels
  are removed jointly.

The result is a list of :class:`ChannelGroup` — the layers whose output channels are one set (one layer, or all
the layers feeding a chain of residual additions), the norms that normalise them and the layers that read them
(their *consumers*) — and, for each group that cannot be removed, why (it reaches the model's output, it meets
an operation the analysis does not know, a grouped/depthwise convolution ties its input channels to its output
channels, a LayerNorm/GroupNorm normalises across channels, an activation maps 0 to a nonzero value, ...).

**The contract with physical removal** (:mod:`lightning_pai.deploy`'s ``shrink``): a pruned channel ``c`` of a
group is represented by ordinary element masks of a :class:`~lightning_pai.core.masks.MaskSet`
(:func:`element_masks`): every member's ``weight[c]`` (the whole row or filter) and ``bias[c]``, and the ``γ[c]``
and ``β[c]`` of every norm on the channel, are masked — so the channel's output is exactly zero after the norm
and any zero-preserving activation — and the consumers' input columns of ``c`` are masked too (they only ever
multiply zeros), so the masks count exactly the weights the removal deletes. :func:`channel_keep` reads any masks
back as per-layer channel keep vectors (a channel of a coupled group is removable only when every member has it
masked), and :func:`predicted_shrunk_params` / :func:`predicted_shrunk_macs` say what the removal saves.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from lightning_pai.core.report import LayerSparsity, SparsityReport, sparsity_report

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "ChannelReport",
    "channel_report",
    "channel_groups",
    "channel_keep",
    "element_masks",
    "group_keep",
    "predicted_shrunk_macs",
    "predicted_shrunk_params",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layers whose output channels are pruned (and whose inputs lose the pruned channels of the layers before).
PRODUCERS: tuple[type[nn.Module], ...] = (*_CONVS, nn.Linear)
#: Norms with per-channel statistics: a channel's output depends on that channel only.
CHANNEL_NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, _InstanceNorm)
#: Norms whose statistics mix channels: removing one channel changes the others' outputs.
CROSS_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
#: Modules that keep each channel in place and map a zero channel to a zero channel.
ZERO_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, nn.Upsample,
)  # fmt: skip
#: Modules that keep channels in place but map 0 to a nonzero value (a removed channel would leave a constant).
NONZERO_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid, nn.Threshold, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_ZERO_CALLS = frozenset(
    "relu relu_ relu6 gelu silu elu elu_ selu celu leaky_relu leaky_relu_ hardtanh hardtanh_ hardswish mish tanh "
    "tanh_ softsign tanhshrink softshrink hardshrink dropout dropout1d dropout2d dropout3d max_pool1d max_pool2d "
    "max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d interpolate upsample contiguous clone detach float "
    "half bfloat16 double to neg".split()
)
_NONZERO_CALLS = frozenset("sigmoid sigmoid_ softplus hardsigmoid logsigmoid exp cos threshold".split())
_META_CALLS = frozenset({"size", "dim", "numel", "getattr", "type", "device", "ndimension"})
_ADD_CALLS = frozenset({"add", "iadd", "add_", "sub", "isub", "sub_"})
_MUL_CALLS = frozenset({"mul", "imul", "mul_", "truediv", "itruediv", "div", "div_"})
_SCALE_CALLS = frozenset({"mul", "imul", "mul_"})
_FLATTEN_CALLS = frozenset({"flatten", "view", "reshape", "squeeze"})
_MEAN_CALLS = frozenset({"mean", "sum", "amax", "max"})


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of one layer, or of every layer feeding the same residual additions, removed jointly.

    Channel ``c`` of the group is channel ``c`` of every member.

    Attributes:
        members: The layers (module names) whose output channels these are, in forward order.
        width: Number of channels.
        norms: ``(norm, first)``: channel ``c`` is channel ``first + c`` of that per-channel norm.
        consumers: ``(layer, first, per_channel)``: channel ``c`` is read by that layer's input channels
            (convolutions, ``per_channel = 1``) or input features (a linear layer after a flatten)
            ``(first + c) * per_channel`` to ``(first + c + 1) * per_channel - 1``.
        reason: Why the channels cannot be removed (None: they can).
    """

    members: tuple[str, ...]
    width: int
    norms: tuple[tuple[str, int], ...] = ()
    consumers: tuple[tuple[str, int, int], ...] = ()
    reason: str | None = None

    @property
    def key(self) -> str:
        """The group's name: its first member."""
        return self.members[0]

    @property
    def coupled(self) -> bool:
        """Whether several layers share these channels (through residual additions)."""
        return len(self.members) > 1

    @property
    def label(self) -> str:
        """``conv1`` or, for a coupled group, ``layer1.0.conv2 (+3 coupled)``."""
        return self.key + (f" (+{len(self.members) - 1} coupled)" if self.coupled else "")


@dataclass
class ChannelGraph:
    """Every channel group of a traced model (see :func:`channel_groups`).

    Attributes:
        groups: The groups, in the forward order of their first member.
        modules: The producers, norms and consumers the groups name, by module name.
    """

    groups: list[ChannelGroup]
    modules: dict[str, nn.Module]

    def group_of(self, layer: str) -> ChannelGroup | None:
        """The group whose members include ``layer`` (None if the layer produces no tracked channels)."""
        return next((g for g in self.groups if layer in g.members), None)


# ------------------------------------------------------------------------------------------------ tracing
class _Spaces:
    """Union-find over channel spaces (one per producer), with what each space's channels meet."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []
        self.members: list[list[str]] = []
        self.norms: list[list[tuple[str, int]]] = []
        self.consumers: list[list[tuple[str, int, int]]] = []
        self.reason: list[str | None] = []

    def new(self, member: str, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.members.append([member])
        self.norms.append([])
        self.consumers.append([])
        self.reason.append(None)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.members[a] += self.members[b]
        self.norms[a] += self.norms[b]
        self.consumers[a] += self.consumers[b]
        self.reason[a] = self.reason[a] or self.reason[b]

    def block(self, s: int, reason: str) -> None:
        root = self.find(s)
        if self.reason[root] is None:
            self.reason[root] = reason


@dataclass(frozen=True)
class _Value:
    """A traced tensor carrying tracked channels: its layout and its channel segments ``(space, width)``."""

    layout: str  # "dim1": channels on axis 1 (conv outputs); "last": on the last axis (linear); "flat": flattened
    segments: tuple[tuple[int, int], ...]
    ndim: int | None = None  # the tensor's axes, for "dim1" (3, 4, 5 after a Conv1d, 2d, 3d)

    @property
    def width(self) -> int:
        return sum(w for _, w in self.segments)


_EXTERNAL = "external"  # data not produced by a tracked layer (the model's input, an unknown operation's output)


def _call_name(node: Any) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return ""


def _leaf_types() -> tuple[type[nn.Module], ...]:
    return (*PRODUCERS, *CHANNEL_NORMS, *CROSS_NORMS, *ZERO_MODULES, *NONZERO_MODULES, nn.Flatten, nn.PReLU)


def _trace(module: nn.Module, opaque: frozenset[str]) -> Any:
    import torch.fx

    leaves = _leaf_types()

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or qualname in opaque or super().is_leaf_module(m, qualname)

    params = inspect.signature(module.forward).parameters.values()
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return _Tracer().trace(module, concrete_args=concrete or None)


def _opaque_containers(module: nn.Module, layers: set[str] | None) -> frozenset[str]:
    """Submodules holding none of ``layers`` (traced as opaque calls when the full trace fails)."""
    names = [n for n, m in module.named_modules() if isinstance(m, PRODUCERS)] if layers is None else list(layers)
    out = set()
    for prefix, _ in module.named_modules():
        if prefix and not any(n == prefix or n.startswith(prefix + ".") for n in names):
            out.add(prefix)
    return frozenset(out)


def channel_groups(module: nn.Module, layers: Sequence[str] | None = None) -> ChannelGraph:
    """Trace ``module``'s forward with ``torch.fx`` and find its channel groups (see the module docstring).

    If the whole forward cannot be traced, it is traced again with every submodule that holds none of ``layers``
    (default: every convolution and linear layer) as an opaque call, whose inputs are then not removable: naming
    the layers to prune (``include=``) lets a model with untraceable parts outside them be analysed.

    Args:
        module: The model.
        layers: The layers (module names) meant to be pruned; only used to trace around untraceable code.

    Returns:
        The groups and the modules they name.

    Raises:
        ValueError: When the forward cannot be traced either way; the message names the fix.
    """
    try:
        graph = _trace(module, frozenset())
    except Exception as error:  # any tracing failure: retry around the layers to prune
        try:
            graph = _trace(module, _opaque_containers(module, None if layers is None else set(layers)))
        except Exception:
            raise ValueError(
                f"Channel pruning finds which layers share channels from the traced forward, and torch.fx cannot "
                f"trace `{type(module).__name__}.forward` ({type(error).__name__}: {error}). Make the forward "
                "traceable (no Python control flow on tensor values; `torch.fx.wrap` helper functions), or name the "
                "layers to prune with `include=` (e.g. `include='backbone.*'`): submodules holding none of them are "
                "then treated as opaque calls and not traced."
            ) from error
    return _analyse(module, graph)


def _analyse(module: nn.Module, graph: Any) -> ChannelGraph:
    spaces = _Spaces()
    values: dict[Any, Any] = {}
    own: dict[str, int] = {}  # producer -> its space
    consumed: dict[str, dict[int, int]] = {}  # consumer -> first input channel -> space
    modules: dict[str, nn.Module] = {}
    named = dict(module.named_modules())

    def data_inputs(node: Any) -> list[Any]:
        return [values.get(i) for i in node.all_input_nodes if values.get(i) is not None]

    def block_all(items: Sequence[Any], reason: str) -> None:
        for v in items:
            if isinstance(v, _Value):
                for s, _ in v.segments:
                    spaces.block(s, reason)

    def unknown(node: Any, what: str) -> Any:
        block_all(data_inputs(node), f"flows into {what}, which the analysis does not follow")
        return _EXTERNAL

    def consume(name: str, value: Any, layer: nn.Module) -> None:
        if not isinstance(value, _Value):
            return
        if isinstance(layer, _CONVS):
            if value.layout != "dim1":
                block_all([value], f"reaches `{name}` ({type(layer).__name__}) on an axis other than its channels")
                return
            if layer.groups != 1:
                block_all(
                    [value],
                    f"feeds `{name}`, a grouped or depthwise convolution (groups={layer.groups}), which ties its input "
                    "channels to its output channels; such layers are excluded",
                )
                return
            expected, per = layer.in_channels, 1
        else:
            if value.layout == "dim1":
                block_all([value], f"reaches the linear layer `{name}` on an axis other than its features")
                return
            expected = layer.in_features
            if value.layout == "last" and expected != value.width:
                block_all([value], f"reaches `{name}` with {value.width} channels for {expected} input features")
                return
            if expected % value.width:
                block_all([value], f"is flattened into `{name}`, whose {expected} inputs are not a multiple of it")
                return
            per = expected // value.width
        if isinstance(layer, _CONVS) and expected != value.width:
            block_all([value], f"reaches `{name}` with {value.width} channels for {expected} input channels")
            return
        modules[name] = layer
        seen = consumed.setdefault(name, {})
        offset = 0
        for s, w in value.segments:
            if offset in seen:  # the layer is called again on another tensor: its inputs are shared
                spaces.union(seen[offset], s)
            else:
                seen[offset] = s
                spaces.consumers[spaces.find(s)].append((name, offset, per))
            offset += w

    def norm(name: str, value: Any, layer: nn.Module) -> Any:
        if not isinstance(value, _Value):
            return value
        kind = type(layer).__name__
        if value.layout == "flat" or layer.num_features != value.width:
            block_all([value], f"reaches `{name}` ({kind}) with {value.width} channels for {layer.num_features}")
            return _EXTERNAL
        if not layer.affine:
            block_all([value], f"is normalised by `{name}` ({kind}), which has no affine γ/β to mask")
            return value
        modules[name] = layer
        offset = 0
        for s, w in value.segments:
            spaces.norms[spaces.find(s)].append((name, offset))
            offset += w
        return value

    def add(node: Any, a: Any, b: Any) -> Any:
        if isinstance(a, _Value) and isinstance(b, _Value):
            if a.layout != b.layout or [w for _, w in a.segments] != [w for _, w in b.segments]:
                block_all([a, b], f"is added (`{node.name}`) to a tensor whose channels are split otherwise")
                return _EXTERNAL
            for (sa, _), (sb, _) in zip(a.segments, b.segments):
                spaces.union(sa, sb)
            return a
        tracked = a if isinstance(a, _Value) else b
        other = b if tracked is a else a
        source = "data from outside the traced layers" if other == _EXTERNAL else "a constant"
        block_all([tracked], f"is added (`{node.name}`) to {source}, so a removed channel would not be zero")
        return _EXTERNAL if other == _EXTERNAL else tracked

    def arg_value(node: Any, index: int) -> Any:
        arg = node.args[index] if len(node.args) > index else None
        return values.get(arg) if hasattr(arg, "op") else None

    def spatial(dims: Any, value: _Value) -> list[int] | None:
        """``dims`` as non-negative spatial axes of ``value`` (None if one is not, or the axes are unknown)."""
        dims = dims if isinstance(dims, (tuple, list)) else [dims]
        if value.layout != "dim1" or value.ndim is None or not all(isinstance(d, int) for d in dims):
            return None
        out = sorted({d + value.ndim if d < 0 else d for d in dims})
        return out if all(2 <= d < value.ndim for d in out) else None

    def dropped(value: _Value, axes: int) -> _Value:
        """``value`` with ``axes`` spatial axes removed: flat once only (batch, channels) is left."""
        left = value.ndim - axes
        return _Value("flat", value.segments) if left <= 2 else _Value("dim1", value.segments, left)

    def flatten(node: Any, value: _Value, name: str) -> Any:
        args = list(node.args[1:])
        if name == "squeeze":
            axes = spatial(args[0] if args else node.kwargs.get("dim"), value)
            if axes is not None:  # (size-1 axes, as after a global pool)
                return dropped(value, len(axes))
            ok = False
        elif name == "flatten":
            ok = (args[0] if args else node.kwargs.get("start_dim", 0)) == 1
        else:  # view / reshape: to two axes, (batch, features)
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            ok = len(shape) == 2
        if not ok or value.layout == "last":
            return unknown(node, f"`{name}` (a reshape the analysis cannot read as a flatten to (batch, features))")
        return _Value("flat", value.segments)

    def reduce(node: Any, value: _Value, name: str) -> Any:
        args = list(node.args[1:])
        axes = spatial(args[0] if args else node.kwargs.get("dim"), value)
        keep = (args[1] if len(args) > 1 else node.kwargs.get("keepdim", False)) is True
        if axes is None:
            return unknown(node, f"`{name}` over the channel axis")
        return value if keep else dropped(value, len(axes))

    for node in graph.nodes:
        name = _call_name(node)
        if node.op == "placeholder":
            values[node] = _EXTERNAL
        elif node.op == "get_attr" or name in _META_CALLS:
            values[node] = None
        elif node.op == "output":
            block_all(data_inputs(node), "reaches the model's output")
        elif node.op == "call_module":
            target = str(node.target)
            layer = named[target]
            inputs = data_inputs(node)
            value = inputs[0] if len(inputs) == 1 else None
            if len(inputs) > 1:
                values[node] = unknown(node, f"`{target}` ({type(layer).__name__}, several tensor inputs)")
            elif isinstance(layer, PRODUCERS):
                consume(target, value, layer)
                width = layer.out_channels if isinstance(layer, _CONVS) else layer.out_features
                if target not in own:
                    own[target] = spaces.new(target, width)
                    modules[target] = layer
                    if isinstance(layer, _CONVS) and layer.groups != 1:
                        spaces.block(
                            own[target],
                            f"`{target}` is a grouped or depthwise convolution (groups={layer.groups}), which ties its "
                            "output channels to its input channels; such layers are excluded",
                        )
                if isinstance(layer, _CONVS):
                    values[node] = _Value("dim1", ((own[target], width),), 2 + len(layer.kernel_size))
                else:
                    values[node] = _Value("last", ((own[target], width),))
            elif isinstance(layer, CHANNEL_NORMS):
                values[node] = norm(target, value, layer)
            elif isinstance(layer, CROSS_NORMS):
                block_all(
                    inputs,
                    f"is normalised by `{target}` ({type(layer).__name__}), whose statistics mix channels: removing "
                    "one would change the others' outputs",
                )
                values[node] = _EXTERNAL if inputs else None
            elif isinstance(layer, NONZERO_MODULES):
                block_all(inputs, f"goes through `{target}` ({type(layer).__name__}), which maps 0 to a nonzero value")
                values[node] = value
            elif isinstance(layer, nn.PReLU) and layer.num_parameters != 1:
                values[node] = unknown(node, f"`{target}` (a PReLU with a parameter per channel)")
            elif isinstance(layer, (*ZERO_MODULES, nn.PReLU)):
                values[node] = value
            elif isinstance(layer, nn.Flatten):
                if isinstance(value, _Value):
                    ok = layer.start_dim == 1 and value.layout != "last"
                    values[node] = _Value("flat", value.segments) if ok else unknown(node, f"`{target}` (Flatten)")
                else:
                    values[node] = value
            else:
                values[node] = unknown(node, f"`{target}` ({type(layer).__name__})") if inputs else None
        else:  # call_function / call_method
            inputs = data_inputs(node)
            tracked = [v for v in inputs if isinstance(v, _Value)]
            first = arg_value(node, 0)
            if not inputs:
                values[node] = None
            elif not tracked:
                values[node] = _EXTERNAL
            elif name in _ADD_CALLS:
                values[node] = add(node, arg_value(node, 0), arg_value(node, 1))
            elif name in _MUL_CALLS:
                scaled = first if isinstance(first, _Value) else arg_value(node, 1) if name in _SCALE_CALLS else None
                if len(inputs) == 1 and isinstance(scaled, _Value):  # by a constant (a constant divided by it is not)
                    values[node] = scaled
                else:
                    values[node] = unknown(node, f"`{name}` of two tensors (e.g. a gate)")
            elif name in ("cat", "concat", "concatenate"):
                values[node] = _cat(node, values, unknown)
            elif name in _ZERO_CALLS and len(inputs) == 1 and isinstance(first, _Value):
                values[node] = first
            elif name in _NONZERO_CALLS and len(inputs) == 1:
                block_all(inputs, f"goes through `{name}`, which maps 0 to a nonzero value")
                values[node] = first
            elif name in _FLATTEN_CALLS and len(inputs) == 1 and isinstance(first, _Value):
                values[node] = flatten(node, first, name)
            elif name in _MEAN_CALLS and len(inputs) == 1 and isinstance(first, _Value):
                values[node] = reduce(node, first, name)
            else:
                values[node] = unknown(node, f"`{name or node.op}`")
    return _finish(spaces, own, modules)


def _cat(node: Any, values: dict[Any, Any], unknown: Callable[[Any, str], Any]) -> Any:
    items = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = [values.get(t) if hasattr(t, "op") else None for t in items]
    if not all(isinstance(p, _Value) for p in parts):
        return unknown(node, "`cat` of tensors not all produced by tracked layers")
    layouts, ndims = {p.layout for p in parts}, {p.ndim for p in parts}
    ndim = ndims.pop() if len(ndims) == 1 else None
    channels = (layouts == {"dim1"} and ndim is not None and dim in (1, 1 - ndim)) or (
        layouts == {"last"} and dim == -1
    )
    if not channels:
        return unknown(node, f"`cat` along axis {dim}")
    return _Value(layouts.pop(), tuple(seg for p in parts for seg in p.segments), ndim)


def _finish(spaces: _Spaces, own: dict[str, int], modules: dict[str, nn.Module]) -> ChannelGraph:
    order = list(own)
    roots: dict[int, list[str]] = {}
    for layer in order:
        roots.setdefault(spaces.find(own[layer]), []).append(layer)
    groups = []
    for root, members in roots.items():
        norms = tuple(dict.fromkeys(spaces.norms[root]))
        consumers = tuple(dict.fromkeys(spaces.consumers[root]))
        groups.append(ChannelGroup(tuple(members), spaces.width[root], norms, consumers, spaces.reason[root]))
    groups.sort(key=lambda g: order.index(g.key))
    return ChannelGraph(groups, modules)


# -------------------------------------------------------------------------------------- masks and keeps
def _param(graph: ChannelGraph, module: str, attr: str) -> Tensor | None:
    value = getattr(graph.modules[module], attr, None)
    return value if isinstance(value, Tensor) else None


def group_params(graph: ChannelGraph, group: ChannelGroup) -> list[str]:
    """The parameters a pruned channel of ``group`` masks entries of.

    Its members' weights and biases, its norms' ``γ``/``β`` and its consumers' weights.
    """
    names = []
    for m in group.members:
        names += [f"{m}.{a}" for a in ("weight", "bias") if _param(graph, m, a) is not None]
    for n, _ in group.norms:
        names += [f"{n}.{a}" for a in ("weight", "bias") if _param(graph, n, a) is not None]
    names += [f"{c}.weight" for c, _, _ in group.consumers]
    return list(dict.fromkeys(names))


def element_masks(
    graph: ChannelGraph, keeps: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """Element masks (for :class:`~lightning_pai.core.masks.MaskSet` parameters of ``shapes``) of channel keeps.

    Every entry is kept unless a pruned channel (False in ``keeps[group.key]``) masks it: its members' rows and
    bias entries, its norms' ``γ``/``β`` entries and its consumers' input columns (see the module docstring).

    Args:
        graph: The model's channel groups.
        keeps: Bool keep vector per group key (groups not named keep everything).
        shapes: The masked parameters' shapes by name (the masks' keys; every parameter a pruned group names
            must be among them).

    Returns:
        Bool masks on the CPU, by parameter name.

    Raises:
        KeyError: If a parameter a pruned channel must mask is not in ``shapes``.
    """
    out = {n: torch.ones(tuple(s), dtype=torch.bool) for n, s in shapes.items()}

    def cut(name: str) -> Tensor:
        if name not in out:
            raise KeyError(f"A pruned channel must mask `{name}`, which is not among the masked parameters.")
        return out[name]

    for group in graph.groups:
        keep = keeps.get(group.key)
        if keep is None or bool(keep.all()):
            continue
        drop = ~keep.detach().to("cpu", torch.bool)
        for m in group.members:
            cut(f"{m}.weight")[drop] = False
            if _param(graph, m, "bias") is not None:
                cut(f"{m}.bias")[drop] = False
        for n, first in group.norms:
            for a in ("weight", "bias"):
                if _param(graph, n, a) is not None:
                    cut(f"{n}.{a}")[first : first + group.width][drop] = False
        for c, first, per in group.consumers:
            columns = drop.repeat_interleave(per)
            cut(f"{c}.weight")[:, first * per : (first + group.width) * per][:, columns] = False
    return out


def group_keep(graph: ChannelGraph, group: ChannelGroup, masks: Mapping[str, Tensor]) -> Tensor:
    """Which channels of ``group`` the element ``masks`` keep (a bool vector, True = kept).

    A channel is removable (False) only when every member's row and bias entry and every norm's ``γ``/``β`` entry
    is masked; a group that cannot be removed keeps everything.
    """
    keep = torch.ones(group.width, dtype=torch.bool)
    if group.reason is not None:
        return keep
    masks = _as_dict(masks)
    pruned = torch.ones(group.width, dtype=torch.bool)

    def masked(name: str, rows: slice | None = None) -> Tensor:
        m = masks.get(name)
        if m is None:
            return torch.zeros(group.width, dtype=torch.bool)
        m = m.detach().to("cpu", torch.bool)
        m = m[rows] if rows is not None else m
        return ~m.reshape(group.width, -1).any(1)

    for m in group.members:
        pruned &= masked(f"{m}.weight")
        if _param(graph, m, "bias") is not None:
            pruned &= masked(f"{m}.bias")
    for n, first in group.norms:
        for a in ("weight", "bias"):
            if _param(graph, n, a) is not None:
                pruned &= masked(f"{n}.{a}", slice(first, first + group.width))
    return keep & ~pruned


def channel_keep(
    module: nn.Module, masks: Mapping[str, Tensor], graph: ChannelGraph | None = None
) -> dict[str, Tensor]:
    """Per convolution / linear layer, which output channels the element ``masks`` keep (True = kept).

    A channel can be removed (False) only when every layer of its group has its row and bias entry masked and
    every norm on it has its ``γ`` and ``β`` entries masked, so its output is exactly zero; layers whose
    channels cannot be removed (they reach the output, meet an operation the analysis does not follow, ...)
    keep every channel. Layers sharing channels through residual additions get the same vector.

    Args:
        module: The model the masks belong to.
        masks: Bool masks by parameter name (e.g. ``callback.masks`` or ``session.current_masks()``).
        graph: The model's channel groups (default: :func:`channel_groups` of ``module``).

    Returns:
        Bool keep vector (CPU) per layer name, in forward order.
    """
    graph = graph if graph is not None else channel_groups(module)
    masks = _as_dict(masks)
    out: dict[str, Tensor] = {}
    for group in graph.groups:
        keep = group_keep(graph, group, masks)
        for m in group.members:
            out[m] = keep.clone()
    return out


def _input_keeps(graph: ChannelGraph, keeps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per consumer, which of its input channels / features survive (only consumers that lose some)."""
    out: dict[str, Tensor] = {}
    for group in graph.groups:
        keep = keeps.get(group.key)
        if keep is None or bool(keep.all()):
            continue
        for c, first, per in group.consumers:
            layer = graph.modules[c]
            width = layer.in_channels if isinstance(layer, _CONVS) else layer.in_features
            cols = out.setdefault(c, torch.ones(width, dtype=torch.bool))
            cols[first * per : (first + group.width) * per] &= keep.repeat_interleave(per)
    return out


def _as_dict(masks: Any) -> dict[str, Tensor]:
    """Masks by name as a plain dict (a :class:`~lightning_pai.core.masks.MaskSet` has no ``get``)."""
    return masks if isinstance(masks, dict) else dict(masks.items())


def _group_keeps(graph: ChannelGraph, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if masks is None:
        return {}
    masks = _as_dict(masks)
    return {g.key: group_keep(graph, g, masks) for g in graph.groups}


def _shrunk_numels(graph: ChannelGraph, keeps: Mapping[str, Tensor]) -> dict[str, int]:
    """New sizes of the parameters the removal of the pruned channels shrinks."""
    inputs = _input_keeps(graph, keeps)
    outputs = {m: keeps[g.key] for g in graph.groups if g.key in keeps for m in g.members}
    sizes: dict[str, int] = {}
    for name, layer in graph.modules.items():
        if isinstance(layer, PRODUCERS):
            out_keep, in_keep = outputs.get(name), inputs.get(name)
            if out_keep is None and in_keep is None:
                continue
            weight = layer.weight
            rows = int(out_keep.sum()) if out_keep is not None else weight.shape[0]
            cols = int(in_keep.sum()) if in_keep is not None else weight.shape[1]
            sizes[f"{name}.weight"] = rows * cols * math.prod(weight.shape[2:])
            if layer.bias is not None:
                sizes[f"{name}.bias"] = rows
    for group in graph.groups:
        keep = keeps.get(group.key)
        if keep is None:
            continue
        for n, _ in group.norms:
            for a in ("weight", "bias"):
                p = _param(graph, n, a)
                if p is not None:
                    name = f"{n}.{a}"
                    dropped = int((~keep).sum())
                    sizes[name] = sizes.get(name, p.numel()) - dropped
    return sizes


def _unique_params(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def predicted_shrunk_params(
    module: nn.Module, masks: Mapping[str, Tensor] | None, graph: ChannelGraph | None = None
) -> int:
    """Parameters of ``module`` once the channels the masks prune (:func:`channel_keep`) are physically removed.

    Each pruned channel takes its members' rows and bias entries, its norms' ``γ``/``β`` entries and the matching
    input columns of every layer that reads it (the next convolution's input channels, or a flattened linear
    layer's ``k`` input features per channel). Other parameters are counted whole (each shared tensor once);
    element masks that prune no whole channel change nothing here.

    Args:
        module: The model.
        masks: Bool masks by parameter name (None: the dense count).
        graph: The model's channel groups (default: :func:`channel_groups` of ``module``).

    Returns:
        The parameter count after the removal.
    """
    graph = graph if graph is not None else channel_groups(module)
    sizes = _shrunk_numels(graph, _group_keeps(graph, masks))
    return sum(sizes.get(n, p.numel()) for n, p in _unique_params(module))


def layer_positions(module: nn.Module, *inputs: Any) -> dict[str, int]:
    """Output positions per sample of every convolution and linear layer on one forward of ``inputs``.

    A convolution's positions are its output's spatial size; a linear layer's are its tokens (1 for a
    ``(batch, features)`` input), from its first call. The forward runs under
    ``torch.no_grad`` in eval mode (BatchNorm statistics untouched); train/eval flags are restored.
    """
    counts: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(_position_hook(counts, n))
        for n, m in module.named_modules()
        if isinstance(m, PRODUCERS)
    ]
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in flags:
            m.training = training
    return counts


def _position_hook(counts: dict[str, int], name: str) -> Callable[..., None]:
    def hook(layer: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() >= 1:
            width = output.shape[1] if isinstance(layer, _CONVS) else output.shape[-1]
            batch = output.shape[0] if output.dim() > 1 else 1
            counts.setdefault(name, output.numel() // max(1, batch * width))

    return hook


def predicted_shrunk_macs(
    module: nn.Module,
    masks: Mapping[str, Tensor] | None,
    positions: Mapping[str, int],
    graph: ChannelGraph | None = None,
) -> int:
    """Multiply-accumulates per sample of the convolution and linear layers once the pruned channels are removed.

    A layer's MACs are ``positions * out_channels * in_channels / groups * prod(kernel)`` (a linear layer:
    ``positions * out * in``), with the channels and input columns the removal leaves (see
    :func:`predicted_shrunk_params`); one FLOP count convention is twice this. Norms, activations and pooling
    are not counted.

    Args:
        module: The model.
        masks: Bool masks by parameter name (None: the dense count).
        positions: Output positions per sample of each layer (:func:`layer_positions`); layers not listed count 0.
        graph: The model's channel groups (default: :func:`channel_groups` of ``module``).
    """
    graph = graph if graph is not None else channel_groups(module)
    sizes = _shrunk_numels(graph, _group_keeps(graph, masks))
    total = 0
    for name, layer in module.named_modules():
        if isinstance(layer, PRODUCERS) and name in positions:
            total += positions[name] * sizes.get(f"{name}.weight", layer.weight.numel())
    return total


def prunable_groups(
    graph: ChannelGraph,
    layers: Sequence[str],
    couple: bool = False,
    norm_required: bool = False,
) -> tuple[list[ChannelGroup], list[tuple[ChannelGroup, str]]]:
    """Split ``graph``'s groups into those a method prunes and the others, each with why it is left alone.

    Args:
        graph: The model's channel groups.
        layers: The layers selected for pruning (every member of a pruned group must be among them).
        couple: Prune groups of several layers (residual additions) jointly; by default they are left alone.
        norm_required: The scorer reads the norms' ``γ``: groups without a norm are left alone.

    Returns:
        ``(pruned, skipped)``: the groups to prune, and ``(group, reason)`` for the others.
    """
    chosen = set(layers)
    pruned, skipped = [], []
    for group in graph.groups:
        if group.reason is not None:
            reason = group.reason
        elif not all(m in chosen for m in group.members):
            outside = [m for m in group.members if m not in chosen]
            if len(outside) == len(group.members):
                continue  # not selected at all
            reason = f"coupled with layers not selected for pruning ({', '.join(outside[:3])})"
        elif group.coupled and not couple:
            reason = (
                f"its {len(group.members)} layers feed the same residual additions and can only be removed jointly "
                "(pass `couple=True`)"
            )
        elif norm_required and not group.norms:
            reason = "no BatchNorm on its channels for the scorer to read"
        else:
            pruned.append(group)
            continue
        skipped.append((group, reason))
    return pruned, skipped


# ------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class ChannelReport(SparsityReport):
    """Channels kept per layer, and the parameters and MACs left once the pruned channels are removed.

    ``rows`` count *channels* (one row per pruned group: a layer, or the layers sharing channels through
    residual additions), so :attr:`sparsity` is the fraction of the prunable channels removed.

    Attributes:
        params: ``(dense, after removal)`` parameter counts of the whole model (:func:`predicted_shrunk_params`).
        macs: ``(dense, after removal)`` multiply-accumulates per sample of its convolution and linear layers
            (:func:`predicted_shrunk_macs`), None until a forward pass has shown the layers' output sizes.
        excluded: ``(layer, why)`` for the layers whose channels are left alone.
        elements: The element masks' own report (weights, biases, ``γ``/``β`` and consumer columns masked).
    """

    params: tuple[int, int] = (0, 0)
    macs: tuple[int, int] | None = None
    excluded: tuple[tuple[str, str], ...] = ()
    elements: SparsityReport | None = None

    def metrics(self, prefix: str = "channels") -> dict[str, float]:
        """Flat metrics for loggers.

        ``{prefix}/global`` and ``{prefix}/{layer}`` (fraction of channels removed), ``{prefix}/params_kept`` and
        ``{prefix}/macs_kept`` (fractions of the dense counts left after removal).
        """
        out = {f"{prefix}/global": self.sparsity}
        out.update({f"{prefix}/{r.name.split(' ')[0]}": r.sparsity for r in self.rows})
        if self.params[0]:
            out[f"{prefix}/params_kept"] = self.params[1] / self.params[0]
        if self.macs is not None and self.macs[0]:
            out[f"{prefix}/macs_kept"] = self.macs[1] / self.macs[0]
        return out

    def summary(self) -> str:
        """One line: channels removed, and the parameters (and MACs) left after removing them."""
        text = (
            f"{self.total - self.kept:,} of {self.total:,} channels removed in {len(self.rows)} layer groups "
            f"(channel sparsity {self.sparsity:.4f}); {_ratio('parameters', self.params)}"
        )
        return text + (f", {_ratio('MACs per sample', self.macs)}" if self.macs is not None else "")

    def __str__(self) -> str:
        header = ("", "Layer", "Channels kept / total", "Density")
        body = [
            (str(i), r.name, f"{r.kept:,} / {r.total:,}", f"{r.density:.4f}" + ("  COLLAPSED" if r.collapsed else ""))
            for i, r in enumerate(self.rows)
        ]
        body.append(("", "Total", f"{self.kept:,} / {self.total:,}", f"{1 - self.sparsity:.4f}"))
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), "-" * (sum(widths) + 3 * (len(widths) - 1))]
        lines += [fmt.format(*row) for row in body]
        removed = _ratio("parameters", self.params)
        lines.append(f"After removing the pruned channels (and the next layers' matching inputs): {removed}")
        if self.macs is not None:
            lines.append(f"Conv/linear multiply-accumulates per sample: {_ratio('MACs', self.macs)}")
        if self.excluded:
            shown = "; ".join(f"{n}: {why}" for n, why in self.excluded[:5])
            more = f"; ... ({len(self.excluded)} in all)" if len(self.excluded) > 5 else ""
            lines.append(f"Channels left alone: {shown}{more}.")
        lines += list(self.notes)
        return "\n".join(lines)


def _ratio(what: str, pair: tuple[int, int]) -> str:
    dense, after = pair
    share = f" ({after / dense:.1%} of dense)" if dense else ""
    return f"{what} {after:,} of {dense:,}{share}"


def channel_report(
    module: nn.Module,
    masks: Mapping[str, Tensor],
    graph: ChannelGraph,
    groups: Sequence[ChannelGroup],
    excluded: Sequence[tuple[ChannelGroup, str]] = (),
    positions: Mapping[str, int] | None = None,
) -> ChannelReport:
    """The :class:`ChannelReport` of element ``masks`` over the pruned ``groups`` of ``module``.

    Args:
        module: The model.
        masks: Bool masks by parameter name.
        graph: The model's channel groups.
        groups: The groups the method prunes (one row each).
        excluded: ``(group, reason)`` for the groups it leaves alone.
        positions: Output positions per sample of each layer (:func:`layer_positions`), for the MACs.
    """
    masks = _as_dict(masks)
    rows = []
    for g in groups:
        keep = group_keep(graph, g, masks)
        rows.append(LayerSparsity(g.label, (g.width,), int(keep.sum()), g.width))
    params = (predicted_shrunk_params(module, None, graph), predicted_shrunk_params(module, masks, graph))
    macs = None
    if positions:
        macs = (
            predicted_shrunk_macs(module, None, positions, graph),
            predicted_shrunk_macs(module, masks, positions, graph),
        )
    elements = sparsity_report(module, masks)
    skipped = tuple((g.label, why) for g, why in excluded)
    return ChannelReport(rows, elements.coverage, params=params, macs=macs, excluded=skipped, elements=elements)
