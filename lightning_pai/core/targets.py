"""Which parameters of a module are prunable, and how each one maps to a weight matrix (its :class:`Layout`)."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_pai.core.validation import check_choice

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Module types whose weight matrices are pruned when ``include`` is not given (subclasses included), besides
#: HF-style ``Conv1D`` layers (recognised by an integer ``nf`` and a 2-D ``(in, out)`` weight, without
#: importing transformers): ``weight`` of linear and (transposed) convolution layers, every ``in_proj_weight``
#: / ``q|k|v_proj_weight`` of ``nn.MultiheadAttention`` (its ``out_proj`` is an ``nn.Linear``), and every
#: ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*`` (and ``_reverse``) of ``nn.RNN/LSTM/GRU``.
DEFAULT_TARGET_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    *_CONV_TRANSPOSE,
    nn.MultiheadAttention,
    nn.RNNBase,
)

Selector = str | type[nn.Module]
Selectors = Selector | Sequence[Selector] | None

#: Named selections usable in ``include`` / ``exclude``: the input layer (``"stem"``), the classifier
#: (``"head"``) or both (``"stem_and_head"``). See :func:`preset_names`.
PRESETS = ("stem", "head", "stem_and_head")

#: What target selection does with frozen (``requires_grad=False``) parameters: leave them dense (``"skip"``),
#: prune them like the others (``"prune"``; their masks are set once and never need a gradient) or refuse
#: (``"error"``). See :func:`select_targets`.
FROZEN = ("skip", "prune", "error")


@dataclass(frozen=True)
class Layout:
    """How a prunable parameter maps onto weight matrices ``W[out, in]``.

    Attributes:
        kind: ``"linear"``, ``"conv"``, ``"conv_transpose"``, ``"conv1d"`` (HF's transposed ``Conv1D``),
            ``"attention"`` (``in_proj_weight``), ``"recurrent"``, ``"embedding"`` or ``"other"``.
        out_dim: Axis of the output units.
        in_dims: Axes whose product is the fan-in (a convolution's input channels and kernel).
        blocks: Independent matrices stacked along ``out_dim`` (``in_proj_weight``: Q, K, V = 3; an LSTM's
            gates: 4; a GRU's: 3), each a layer of its own for shape-based rules such as ERK.
    """

    kind: str
    out_dim: int = 0
    in_dims: tuple[int, ...] = (1,)
    blocks: int = 1

    def fan_in(self, shape: Sequence[int]) -> int:
        """Inputs per output unit (``in * kernel`` for a convolution)."""
        return math.prod(shape[d] for d in self.in_dims)

    def fan_out(self, shape: Sequence[int]) -> int:
        """Output units of one block."""
        return shape[self.out_dim] // self.blocks

    def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one block, output axis first, then the fan-in axes in order."""
        return (self.fan_out(shape), *(shape[d] for d in self.in_dims))

    def as_matrix(self, tensor: Tensor) -> Tensor:
        """``tensor`` as ``[out, in]`` (all blocks stacked on the rows), a view when the axes allow it."""
        order = (self.out_dim, *self.in_dims)
        rest = [d for d in range(tensor.dim()) if d not in order]
        moved = tensor.permute(*order, *rest) if list(order) + rest != list(range(tensor.dim())) else tensor
        return moved.reshape(tensor.shape[self.out_dim], -1)

    def from_matrix(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of :meth:`as_matrix`: a ``[out, in]`` tensor back to the parameter's ``shape``."""
        order = (self.out_dim, *self.in_dims)
        rest = [d for d in range(len(shape)) if d not in order]
        perm = [*order, *rest]
        moved = matrix.reshape([shape[d] for d in perm])
        inverse = [perm.index(d) for d in range(len(shape))]
        return moved.permute(*inverse) if perm != list(range(len(shape))) else moved


LINEAR = Layout("linear")
_RNN_BLOCKS = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?$")


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF ``transformers``' ``Conv1D`` (GPT-2 style): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        isinstance(nf, int)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[1] == nf
        and not isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd))
    )


def default_layouts(module: nn.Module) -> dict[str, Layout]:
    """The default-targeted parameters directly owned by ``module`` (attribute name -> layout)."""
    params = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.Linear):
        return {"weight": LINEAR} if "weight" in params else {}
    # A convolution's axes come from its `kernel_size`, not from its weight, which a lazy module
    # (`nn.LazyConv2d`) has not shaped yet.
    if isinstance(module, _CONV_TRANSPOSE):  # (in, out / groups, *kernel)
        kernel = range(2, 2 + len(module.kernel_size))
        return {"weight": Layout("conv_transpose", 1, (0, *kernel))} if "weight" in params else {}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # (out, in / groups, *kernel)
        kernel = range(2, 2 + len(module.kernel_size))
        return {"weight": Layout("conv", 0, (1, *kernel))} if "weight" in params else {}
    if isinstance(module, nn.MultiheadAttention):
        out = {}
        if params.get("in_proj_weight") is not None:
            out["in_proj_weight"] = Layout("attention", 0, (1,), blocks=3)
        for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if params.get(attr) is not None:
                out[attr] = LINEAR
        return out
    if isinstance(module, nn.RNNBase):
        blocks = _RNN_BLOCKS.get(module.mode, 1)
        out = {}
        for attr in params:
            match = _RNN_WEIGHT.match(attr)
            if match:
                out[attr] = Layout("recurrent", 0, (1,), blocks=1 if match.group(1) == "hr" else blocks)
        return out
    if is_hf_conv1d(module):
        return {"weight": Layout("conv1d", 1, (0,))}
    return {}


def layout_of(module: nn.Module, attr: str, param: Tensor) -> Layout:
    """The layout of ``module``'s parameter ``attr`` (also for parameters selected by ``include`` only)."""
    known = default_layouts(module).get(attr)
    if known is not None:
        return known
    if isinstance(module, nn.Embedding) and attr == "weight":
        return Layout("embedding")
    return Layout("other", 0, tuple(range(1, param.dim()))) if param.dim() >= 2 else Layout("other", 0, ())


def target_layouts(module: nn.Module, names: Sequence[str]) -> dict[str, Layout]:
    """Layouts of the named parameters of ``module`` (see :class:`Layout`).

    Raises:
        KeyError: If a name is not a parameter of ``module``.
    """
    owners = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(f"{prefix}.{attr}" if prefix else attr, (mod, attr, p))
    missing = [n for n in names if n not in owners]
    if missing:
        raise KeyError(f"The model has no parameter named {missing[:5]}.")
    return {n: layout_of(*owners[n]) for n in names}


def matrix_shapes(shapes: Mapping[str, Sequence[int]], layouts: Mapping[str, Layout] | None) -> dict[str, tuple]:
    """Per target, the shape of one of its matrices for shape-based rules (all of it without a layout)."""
    if layouts is None:
        return {n: tuple(s) for n, s in shapes.items()}
    return {n: layouts[n].block_shape(s) if n in layouts else tuple(s) for n, s in shapes.items()}


def _cfg_names(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def preset_names(module: nn.Module, preset: str) -> list[str]:
    """Parameter names a preset selects.

    timm models (found anywhere inside ``module``, e.g. as a LightningModule's backbone) name their input
    layer and classifier in ``pretrained_cfg["first_conv"]`` and ``pretrained_cfg["classifier"]``
    (``conv1`` / ``fc`` for ResNets, ``patch_embed.proj`` / ``head`` for ViTs, ``stem.0`` / ``head.fc`` for
    ConvNeXt); the preset selects those modules' ``weight``. Without a timm model, ``"stem"`` is the
    first and ``"head"`` the last default-targeted weight matrix in registration order.

    Raises:
        ValueError: If ``preset`` is not one of :data:`PRESETS`.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; presets are {', '.join(map(repr, PRESETS))}.")
    parts = ("stem", "head") if preset == "stem_and_head" else (preset,)
    params = dict(module.named_parameters())
    names: list[str] = []
    for prefix, mod in module.named_modules():
        cfg = getattr(mod, "pretrained_cfg", None)
        if not isinstance(cfg, dict):
            continue
        for part in parts:
            for layer in _cfg_names(cfg.get("first_conv" if part == "stem" else "classifier")):
                name = f"{prefix}.{layer}.weight" if prefix else f"{layer}.weight"
                if name in params and name not in names:
                    names.append(name)
    if names:
        return names
    defaults = [
        f"{prefix}.{attr}" if prefix else attr
        for prefix, mod in module.named_modules()
        for attr in default_layouts(mod)
    ]
    if not defaults:
        return []
    return [defaults[0] if part == "stem" else defaults[-1] for part in parts]


def _as_list(selectors: Selectors, argument: str) -> list[Selector]:
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    if not isinstance(selectors, (list, tuple, set, frozenset)):
        raise TypeError(
            f"`{argument}` takes a glob pattern of parameter names (str), an `nn.Module` subclass, or a list of "
            f"them; got {selectors!r}."
        )
    out = list(selectors)
    for s in out:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(
                f"`{argument}` takes glob patterns of parameter names (str) or `nn.Module` subclasses, got {s!r}."
            )
    return out


def _expand_presets(module: nn.Module, selectors: list[Selector]) -> list[tuple[Selector, str | None]]:
    """Each selector, presets replaced by the names they select: ``(selector, the preset it came from or None)``."""
    out: list[tuple[Selector, str | None]] = []
    for s in selectors:
        if isinstance(s, str) and s in PRESETS:
            out.extend((name, s) for name in preset_names(module, s) or [s])
        else:
            out.append((s, None))
    return out


def validate_selectors(include: Selectors = None, exclude: Selectors = None) -> None:
    """Check the types of ``include``/``exclude`` without a model (for early errors in ``__init__``).

    Raises:
        TypeError: If an entry is neither a string nor an ``nn.Module`` subclass.

    """
    _as_list(include, "include")
    _as_list(exclude, "exclude")


def _matches(selector: Selector, name: str, module: nn.Module, attr: str) -> bool:
    """A glob matches parameter names; a module type its weight matrices (its ``weight`` if it has no default)."""
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    if not isinstance(module, selector):
        return False
    defaults = default_layouts(module)
    return attr in defaults if defaults else attr == "weight"


def select_targets(
    module: nn.Module, include: Selectors = None, exclude: Selectors = None, frozen: str = "prune"
) -> dict[str, nn.Parameter]:
    """Return the prunable parameters of ``module``, keyed by fully qualified name, in registration order.

    Without ``include`` the targets are the weight matrices of every linear-like operation: ``weight`` of
    ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (subclasses included, such as timm's),
    HF-style ``Conv1D``, ``nn.MultiheadAttention``'s ``in_proj_weight`` (or ``q|k|v_proj_weight``) plus its
    ``out_proj``, and ``nn.RNN/LSTM/GRU``'s ``weight_ih_l*`` / ``weight_hh_l*`` (``weight_hr_l*``,
    ``_reverse``). Biases, norms and embeddings are left dense (select them with ``include``). A tensor
    shared by several modules (tied weights, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``)
    is one candidate, named and typed after its first owner.

    Args:
        module: The model.
        include: Replaces the default targets. Each entry is a glob over parameter names
            (``"encoder.*.weight"``, ``"*.bias"``), a module type (selects that type's ``weight``) or a
            preset of :data:`PRESETS` (``"stem"``, ``"head"``, ``"stem_and_head"``, see :func:`preset_names`).
        exclude: Removed from the targets; same forms as ``include`` (e.g. ``exclude="stem_and_head"``
            keeps a timm model's input layer and classifier dense).
        frozen: What to do with selected parameters that do not train (``requires_grad=False``), one of
            :data:`FROZEN`: ``"prune"`` keeps them among the targets (the default here), ``"skip"`` leaves
            them out (see :func:`frozen_targets` for their names), ``"error"`` raises.

    Returns:
        Ordered mapping from parameter name to parameter.

    Raises:
        ValueError: If an ``include`` or ``exclude`` entry matches no parameter (tied weights are named as
            such), a target is an uninitialized lazy parameter (``nn.LazyLinear`` before its first forward),
            a target is frozen under ``frozen="error"``, or nothing is left to prune.

    """
    check_choice(frozen, FROZEN, "frozen")
    inc = _expand_presets(module, _as_list(include, "include"))
    exc = _expand_presets(module, _as_list(exclude, "exclude"))
    owners = [
        (f"{prefix}.{attr}" if prefix else attr, mod, attr, p)
        for prefix, mod in module.named_modules()
        for attr, p in mod.named_parameters(recurse=False)
    ]
    first: dict[int, str] = {}
    candidates, aliases = [], []
    for name, mod, attr, p in owners:  # shared parameters are kept once, under their first name
        if id(p) in first:
            aliases.append((name, mod, attr, p))
        elif p.is_floating_point():
            first[id(p)] = name
            candidates.append((name, mod, attr, p))

    def _pick(selectors: list[tuple[Selector, str | None]], pool: list, argument: str) -> list:
        picked = []
        for s, preset in selectors:
            hits = [c for c in pool if _matches(s, c[0], c[1], c[2])]
            if not hits:
                what = s if isinstance(s, str) else s.__name__
                entry = f"{preset!r} (the preset; here {what!r})" if preset is not None else repr(what)
                among = " among the targets" if argument == "exclude" else ""
                tied = [(c[0], first[id(c[3])]) for c in aliases if _matches(s, c[0], c[1], c[2])]
                if tied:
                    alias, owner = tied[0]
                    kind = _type_name(next(c[1] for c in candidates if c[0] == owner))
                    if argument == "include":
                        hint = f"Include it as {owner!r} (one tensor: pruning it prunes both)"
                    elif any(c[0] == owner for c in pool):
                        hint = f"`{owner}` is a target: exclude it as {owner!r}"
                    else:
                        hint = f"`{owner}` ({kind}) is not a target, so it is dense already: drop {preset or what!r}"
                        hint += " from `exclude`"
                    raise ValueError(
                        f"`{argument}` entry {entry} matches no parameter{among}: `{alias}` is the same tensor as "
                        f"`{owner}` (tied weights), and a shared tensor is selected under its first name. {hint}."
                    )
                example = ", ".join(c[0] for c in pool[:5]) + (", ..." if len(pool) > 5 else "")
                raise ValueError(
                    f"`{argument}` entry {entry} matches no parameter{among}. Parameter names look like: {example}"
                )
            picked.extend(hits)
        return picked

    if inc:
        chosen = {id(c[3]) for c in _pick(inc, candidates, "include")}
        targets = [c for c in candidates if id(c[3]) in chosen]
    else:
        targets = [c for c in candidates if c[2] in default_layouts(c[1])]
    if exc:
        dropped = {id(c[3]) for c in _pick(exc, targets, "exclude")}
        targets = [c for c in targets if id(c[3]) not in dropped]
    lazy = [(name, mod) for name, mod, _, p in targets if is_lazy(p)]
    if lazy:
        names = ", ".join(f"`{n}`" for n, _ in lazy[:5]) + (", ..." if len(lazy) > 5 else "")
        kinds = ", ".join(dict.fromkeys(_type_name(m) for _, m in lazy))
        verb = "is" if len(lazy) == 1 else "are"
        raise ValueError(
            f"Parameter{'s' if len(lazy) > 1 else ''} {names} {verb} uninitialized ({kinds}): run one forward pass "
            "(e.g. `model(example_batch)`) before fitting, so that lazy modules get their shapes, or exclude "
            f"{'it' if len(lazy) == 1 else 'them'} (`exclude={[n for n, _ in lazy[:5]]!r}`)."
        )
    if frozen != "prune":
        still = [c for c in targets if c[3].requires_grad]
        if frozen == "error" and len(still) < len(targets):
            names = [c[0] for c in targets if not c[3].requires_grad]
            raise ValueError(
                f"{_count(names, 'target')} frozen (`requires_grad=False`): {_listed(names)}. Pass "
                "`frozen='skip'` to leave frozen parameters dense, `frozen='prune'` to prune them anyway, "
                f"`exclude={names[:5]!r}`, or unfreeze them before fitting."
            )
        if not still and targets:
            raise ValueError(
                f"Every target is frozen (`requires_grad=False`): {_listed([c[0] for c in targets])}; nothing "
                "trains to be pruned. Unfreeze the layers to prune, select trainable ones with `include`, or pass "
                "`frozen='prune'` to prune the frozen weights once."
            )
        targets = still
    if not targets:
        raise ValueError(
            "The model has no prunable parameter: by default the weight matrices of linear, convolution, "
            "attention, recurrent and HF Conv1D layers are pruned; select others with `include` (name patterns "
            "or module types) or relax `exclude`."
        )
    return {name: p for name, _, _, p in targets}


def frozen_targets(module: nn.Module, include: Selectors = None, exclude: Selectors = None) -> list[str]:
    """Names of the parameters :func:`select_targets` would pick that do not train (``requires_grad=False``)."""
    return [n for n, p in select_targets(module, include, exclude).items() if not p.requires_grad]


def _type_name(module: nn.Module) -> str:
    kind = type(module)
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn.") else kind.__name__


def _count(names: Sequence[str], what: str) -> str:
    return f"{len(names)} {what}{'' if len(names) == 1 else 's'} {'is' if len(names) == 1 else 'are'}"


def _listed(names: Sequence[str], limit: int = 5) -> str:
    """``a.weight, b.weight, ... (7 in all)``."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
