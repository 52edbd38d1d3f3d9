"""Which parameters of a module are prunable."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

#: Module types whose ``weight`` is pruned when ``include`` is not given (subclasses included).
DEFAULT_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Selector = str | type[nn.Module]
Selectors = Selector | Sequence[Selector] | None

#: Named selections usable in ``include`` / ``exclude``: the input layer (``"stem"``), the classifier
#: (``"head"``) or both (``"stem_and_head"``). See :func:`preset_names`.
PRESETS = ("stem", "head", "stem_and_head")


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
    first and ``"head"`` the last ``nn.Linear``/``nn.Conv*`` weight in registration order.

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
        f"{prefix}.weight" if prefix else "weight"
        for prefix, mod in module.named_modules()
        if isinstance(mod, DEFAULT_TARGET_TYPES) and isinstance(getattr(mod, "weight", None), nn.Parameter)
    ]
    if not defaults:
        return []
    return [defaults[0] if part == "stem" else defaults[-1] for part in parts]


def _as_list(selectors: Selectors, argument: str) -> list[Selector]:
    if selectors is None:
        return []
    if isinstance(selectors, (str, type)):
        selectors = [selectors]
    out = list(selectors)
    for s in out:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(
                f"`{argument}` takes glob patterns of parameter names (str) or `nn.Module` subclasses, got {s!r}."
            )
    return out


def _expand_presets(module: nn.Module, selectors: list[Selector]) -> list[Selector]:
    out: list[Selector] = []
    for s in selectors:
        out.extend(preset_names(module, s) or [s] if isinstance(s, str) and s in PRESETS else [s])
    return out


def validate_selectors(include: Selectors = None, exclude: Selectors = None) -> None:
    """Check the types of ``include``/``exclude`` without a model (for early errors in ``__init__``).

    Raises:
        TypeError: If an entry is neither a string nor an ``nn.Module`` subclass.

    """
    _as_list(include, "include")
    _as_list(exclude, "exclude")


def _matches(selector: Selector, name: str, module: nn.Module, attr: str) -> bool:
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    return attr == "weight" and isinstance(module, selector)


def select_targets(module: nn.Module, include: Selectors = None, exclude: Selectors = None) -> dict[str, nn.Parameter]:
    """Return the prunable parameters of ``module``, keyed by fully qualified name, in registration order.

    Without ``include`` the targets are the ``weight`` of every :data:`DEFAULT_TARGET_TYPES` module
    (``nn.Linear`` and ``nn.Conv1d/2d/3d`` and their subclasses, such as timm's); biases, norms and
    embeddings are left dense.

    Args:
        module: The model.
        include: Replaces the default targets. Each entry is a glob over parameter names
            (``"encoder.*.weight"``, ``"*.bias"``), a module type (selects that type's ``weight``) or a
            preset of :data:`PRESETS` (``"stem"``, ``"head"``, ``"stem_and_head"``, see :func:`preset_names`).
        exclude: Removed from the targets; same forms as ``include`` (e.g. ``exclude="stem_and_head"``
            keeps a timm model's input layer and classifier dense).

    Returns:
        Ordered mapping from parameter name to parameter.

    Raises:
        ValueError: If an ``include`` or ``exclude`` entry matches no parameter, or nothing is left to prune.

    """
    inc = _expand_presets(module, _as_list(include, "include"))
    exc = _expand_presets(module, _as_list(exclude, "exclude"))
    owners = [
        (f"{prefix}.{attr}" if prefix else attr, mod, attr, p)
        for prefix, mod in module.named_modules()
        for attr, p in mod.named_parameters(recurse=False)
    ]
    seen: set[int] = set()
    candidates = []
    for name, mod, attr, p in owners:  # shared parameters are kept once, under their first name
        if id(p) not in seen and p.is_floating_point():
            seen.add(id(p))
            candidates.append((name, mod, attr, p))

    def _pick(selectors: list[Selector], pool: list, argument: str) -> list:
        picked = []
        for s in selectors:
            hits = [c for c in pool if _matches(s, c[0], c[1], c[2])]
            if not hits:
                example = ", ".join(c[0] for c in pool[:5]) + (", ..." if len(pool) > 5 else "")
                what = s if isinstance(s, str) else s.__name__
                raise ValueError(
                    f"`{argument}` entry {what!r} matches no parameter"
                    f"{' among the targets' if argument == 'exclude' else ''}. Parameter names look like: {example}"
                )
            picked.extend(hits)
        return picked

    if inc:
        chosen = {id(c[3]) for c in _pick(inc, candidates, "include")}
        targets = [c for c in candidates if id(c[3]) in chosen]
    else:
        targets = [c for c in candidates if c[2] == "weight" and isinstance(c[1], DEFAULT_TARGET_TYPES)]
    if exc:
        dropped = {id(c[3]) for c in _pick(exc, targets, "exclude")}
        targets = [c for c in targets if id(c[3]) not in dropped]
    if not targets:
        raise ValueError(
            "The model has no prunable parameter: by default the weights of `nn.Linear` and `nn.Conv1d/2d/3d` "
            "layers are pruned; select others with `include` (name patterns or module types) or relax `exclude`."
        )
    return {name: p for name, _, _, p in targets}
