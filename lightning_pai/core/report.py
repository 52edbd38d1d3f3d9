"""Per-layer sparsity tables."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.effective import effective_masks_by_flow
from lightning_pai.core.masks import MaskSet
from lightning_pai.core.targets import Layout, Selectors, select_targets, target_layouts


@dataclass(frozen=True)
class LayerSparsity:
    """One row of a sparsity report.

    Attributes:
        name: Fully qualified parameter name.
        shape: Parameter shape.
        kept: Number of kept (unmasked, or nonzero when no mask is given) weights.
        total: Number of weights.

    """

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int
    effective_kept: int | None = None

    @property
    def effective_sparsity(self) -> float | None:
        """Fraction removed once disconnected weights count as pruned (None if not computed)."""
        return None if self.effective_kept is None else 1.0 - self.effective_kept / self.total

    @property
    def density(self) -> float:
        """Fraction kept."""
        return self.kept / self.total

    @property
    def sparsity(self) -> float:
        """Fraction removed (``1 - density``)."""
        return 1.0 - self.density

    @property
    def collapsed(self) -> bool:
        """True when the layer is fully pruned (no signal can pass through it)."""
        return self.kept == 0


@dataclass(frozen=True)
class Coverage:
    """How much of a model the targets are: the honest denominator behind a sparsity figure.

    Attributes:
        targeted: Weights under masks.
        params: All (unique) parameters of the model.
        matrix_params: All parameters with two or more dimensions.
        embedding_params: The part of ``matrix_params`` owned by ``nn.Embedding`` / ``nn.EmbeddingBag``.
        untargeted: ``(name, shape)`` of the >=2-D parameters under no mask, largest first.
    """

    targeted: int
    params: int
    matrix_params: int
    embedding_params: int
    untargeted: list[tuple[str, tuple[int, ...]]]

    @property
    def fraction(self) -> float:
        """Targeted weights / all parameters."""
        return self.targeted / self.params if self.params else 0.0

    @property
    def matrix_fraction(self) -> float:
        """Targeted weights / all >=2-D parameters."""
        return self.targeted / self.matrix_params if self.matrix_params else 0.0

    @property
    def non_embedding_fraction(self) -> float:
        """Targeted weights / >=2-D parameters other than embeddings (targeted embeddings count as covered)."""
        denominator = self.matrix_params - self.embedding_params
        covered = min(self.targeted, denominator)
        return covered / denominator if denominator > 0 else 1.0

    def __str__(self) -> str:
        largest = ", ".join(f"{n} ({'x'.join(map(str, s))})" for n, s in self.untargeted[:3])
        more = f" and {len(self.untargeted) - 3} more" if len(self.untargeted) > 3 else ""
        text = (
            f"masks cover {self.matrix_fraction:.1%} of the model's >=2-D parameters "
            f"({self.non_embedding_fraction:.1%} without embeddings) and {self.fraction:.1%} of all parameters"
        )
        return text + (f"; not under masks: {largest}{more}" if self.untargeted else "")


def coverage(module: nn.Module, targets: Mapping[str, object]) -> Coverage:
    """The :class:`Coverage` of ``targets`` (parameter names, e.g. a mask set) in ``module``."""
    seen: set[int] = set()
    params = matrix = embedding = targeted = 0
    untargeted: list[tuple[str, tuple[int, ...]]] = []
    for prefix, mod in module.named_modules():
        dense = getattr(mod, "dense_named_parameters", None)  # a layer training sparse counts as its dense self
        for attr, p in dense() if callable(dense) else mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{prefix}.{attr}" if prefix else attr
            params += p.numel()
            if name in targets:
                targeted += p.numel()
            if p.dim() >= 2:
                matrix += p.numel()
                if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                    embedding += p.numel()
                if name not in targets:
                    untargeted.append((name, tuple(p.shape)))
    untargeted.sort(key=lambda item: -math.prod(item[1]))
    return Coverage(targeted, params, matrix, embedding, untargeted)


@dataclass(frozen=True)
class SparsityReport:
    """Rows per layer plus totals; ``str()`` gives a compact table.

    Attributes:
        rows: One row per target.
        coverage: How much of the model the targets are (when the report was made with the model).
        skipped: Frozen (``requires_grad=False``) parameters the selection left dense (``frozen="skip"``).
        notes: Further lines printed under the table (e.g. the layers N:M groups cannot fit, and what became of
            them).
    """

    rows: list[LayerSparsity]
    coverage: Coverage | None = None
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def kept(self) -> int:
        """Kept weights over all layers."""
        return sum(r.kept for r in self.rows)

    @property
    def total(self) -> int:
        """Targeted weights over all layers."""
        return sum(r.total for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall fraction removed."""
        return 1.0 - self.kept / self.total

    @property
    def collapsed(self) -> list[str]:
        """Names of fully pruned layers."""
        return [r.name for r in self.rows if r.collapsed]

    @property
    def effective_sparsity(self) -> float | None:
        """Overall effective sparsity (None unless the report was made with ``effective=True``)."""
        if any(r.effective_kept is None for r in self.rows):
            return None
        return 1.0 - sum(r.effective_kept for r in self.rows) / self.total

    def metrics(self, prefix: str = "sparsity") -> dict[str, float]:
        """Flat metrics for loggers: ``{prefix}/global`` and ``{prefix}/{layer}`` (fraction removed)."""
        out = {f"{prefix}/global": self.sparsity}
        out.update({f"{prefix}/{r.name}": r.sparsity for r in self.rows})
        if self.effective_sparsity is not None:
            out[f"{prefix}/effective"] = self.effective_sparsity
        if self.coverage is not None:
            out[f"{prefix}/coverage"] = self.coverage.fraction
            out[f"{prefix}/coverage_2d"] = self.coverage.matrix_fraction
        return out

    def summary(self) -> str:
        """One line: layers, sparsity of the targets and, when known, how much of the model they cover."""
        text = f"{len(self.rows)} layers, sparsity {self.sparsity:.4f} of the targeted weights"
        return text + (f"; {self.coverage}" if self.coverage is not None else "")

    def __str__(self) -> str:
        eff = self.effective_sparsity is not None
        header = ("", "Layer", "Shape", "Kept / Total", "Density") + (("Effective density",) if eff else ())
        body = [
            (
                str(i),
                r.name,
                "x".join(map(str, r.shape)),
                f"{r.kept:,} / {r.total:,}",
                f"{r.density:.4f}" + ("  COLLAPSED" if r.collapsed else ""),
            )
            + ((f"{r.effective_kept / r.total:.4f}",) if eff else ())
            for i, r in enumerate(self.rows)
        ]
        total = ("", "Total", "", f"{self.kept:,} / {self.total:,}", f"{1 - self.sparsity:.4f}")
        body.append(total + ((f"{1 - self.effective_sparsity:.4f}",) if eff else ()))
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), "-" * (sum(widths) + 3 * (len(widths) - 1))]
        lines += [fmt.format(*row) for row in body]
        if self.coverage is not None:
            lines.append(f"Coverage: {self.coverage}.")
        if self.skipped:
            line = skipped_line(self.skipped)
            lines.append(line[0].upper() + line[1:] + ".")
        lines += list(self.notes)
        return "\n".join(lines)


def skipped_line(names: Sequence[str], limit: int = 5) -> str:
    """``skipped 2 frozen parameters (requires_grad=False), left dense: a.weight, b.weight``."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    plural = "" if len(names) == 1 else "s"
    return (
        f"skipped {len(names)} frozen parameter{plural} (requires_grad=False), left dense: "
        + ", ".join(names[:limit])
        + more
    )


@torch.no_grad()
def sparsity_report(
    module: nn.Module | None,
    masks: MaskSet | Mapping[str, Tensor] | None = None,
    include: Selectors = None,
    exclude: Selectors = None,
    effective: bool = False,
    example_inputs: Any = None,
) -> SparsityReport:
    """Per-layer kept counts of ``module``.

    Args:
        module: The model (may be None when ``masks`` is given).
        masks: Masks to count; without them, the nonzero weights of the targets selected by
            ``include``/``exclude`` (see :func:`~lightning_pai.core.targets.select_targets`) are counted.
        include: Target selection when ``masks`` is None.
        exclude: Target selection when ``masks`` is None.
        effective: Also compute effective sparsity (Vysogorets & Kempe 2021): the fraction of the targeted
            weights that are pruned or lie on no input-to-output path of kept weights. With ``example_inputs``, on
            any graph (residual additions, concatenations, shortcut convolutions) by synaptic flow, see
            :func:`~lightning_pai.core.effective.effective_masks_by_flow`; without, only for a plain chain of
            layers (:func:`chain_order` checks ``module``'s traced forward), see :func:`effective_masks`.
        example_inputs: One input like those the model runs (a tensor, a tuple of positional arguments or a dict of
            keyword arguments; one sample is enough, floating values are replaced by ones) for ``effective=True``.

    Returns:
        The report; ``str(report)`` is a table, ``report.metrics()`` a dict for loggers.

    Raises:
        ValueError: With ``effective=True``, if ``module`` is None, or there are no ``example_inputs`` and its
            targets do not form a plain chain (residual connections, attention, parallel branches) or its forward
            cannot be traced to tell.

    """
    if masks is None and module is None:
        raise ValueError("`sparsity_report` needs a `module` or `masks`.")
    if masks is not None:
        rows = [LayerSparsity(n, tuple(m.shape), int(torch.count_nonzero(m)), m.numel()) for n, m in masks.items()]
    else:
        rows = [
            LayerSparsity(n, tuple(p.shape), int(torch.count_nonzero(p)), p.numel())
            for n, p in select_targets(module, include, exclude).items()
        ]
    if effective:
        if module is None:
            raise ValueError(
                "`effective=True` needs the `module`: effective sparsity follows the paths of the model's forward."
            )
        names = [r.name for r in rows]
        if example_inputs is not None:
            kept = {n: (masks[n] if masks is not None else module.get_parameter(n) != 0) for n in names}
            eff = effective_masks_by_flow(module, kept, example_inputs)
        else:
            order = chain_order(module, names)
            kept = {n: (masks[n] if masks is not None else module.get_parameter(n) != 0) for n in order}
            layouts = getattr(masks, "layouts", None) or target_layouts(module, order)
            eff = effective_masks(kept, layouts)
        rows = [replace(r, effective_kept=int(torch.count_nonzero(eff[r.name]))) for r in rows]
    cover = coverage(module, {r.name for r in rows}) if module is not None else None
    return SparsityReport(rows, cover)


#: Layouts a layer of a chain may have (one weight matrix, output and input-channel axes known).
_CHAIN_KINDS = ("linear", "conv", "conv_transpose", "conv1d")
#: Modules that keep each unit (feature / channel) of a chain in place: activations, dropout, pooling,
#: flattening and per-channel batch norm. Anything else between two targets (an untargeted layer, a layer norm,
#: softmax) mixes units and breaks the chain.
_UNITWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.batchnorm._BatchNorm,
)  # fmt: skip
#: Functions and tensor methods (by name) that keep units in place, applied to one tensor (other arguments constant).
_UNITWISE_CALLS = frozenset(
    "relu relu_ relu6 gelu silu elu selu celu leaky_relu hardtanh hardswish hardsigmoid mish softplus softsign "
    "tanhshrink logsigmoid sigmoid tanh threshold dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout max_pool1d max_pool2d max_pool3d _max_pool1d _max_pool2d _max_pool3d avg_pool1d "
    "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
    "adaptive_max_pool2d adaptive_max_pool3d _adaptive_max_pool1d _adaptive_max_pool2d _adaptive_max_pool3d "
    "batch_norm flatten view reshape squeeze unsqueeze contiguous clamp clamp_min clamp_max float half bfloat16 "
    "double to add sub mul truediv neg iadd isub imul itruediv".split()
)
#: Calls that read a tensor's metadata, not its values (their results are not data flowing through the chain).
_META_CALLS = frozenset({"size", "dim", "numel", "getattr", "type", "device"})


def _call_name(node: Any) -> str:
    """The function or method name a traced node calls (``""`` for other nodes)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return ""


def chain_order(module: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` (weights of ``module``) in forward order, once the forward shows they form a plain chain.

    Effective sparsity (:func:`effective_masks`) reads the targets as a chain: each targeted layer's input is
    the previous targeted layer's output, through unit-wise operations only (activations, dropout, pooling,
    per-channel batch norm, flattening, arithmetic with constants). The forward is traced with ``torch.fx``
    (the targets' modules as leaves) and checked for exactly that: residual additions, concatenations,
    attention products, parallel branches, untargeted layers between targets or a layer used twice break
    the chain. Before the first target and after the last any single-input computation is allowed (an
    excluded stem or head).

    Raises:
        ValueError: Naming the first target where the chain breaks, a target that is not a single weight
            matrix, or the tracing error when the forward cannot be traced (HF transformers models, for one).
    """
    import torch.fx

    hint = (
        "Pass `example_inputs=` (one input of the model) to compute it on any graph by synaptic flow, or use "
        "`effective=False` (the masks' own sparsity is exact)."
    )
    plain = "without `example_inputs`, effective sparsity is only defined for a plain chain of layers"
    layouts = target_layouts(module, names)
    owners: dict[str, str] = {}
    for n in names:
        prefix, _, attr = n.rpartition(".")
        kind = layouts[n].kind
        if kind not in _CHAIN_KINDS or attr != "weight":
            raise ValueError(f"`{n}` ({kind} weight) is not a layer of a chain: {plain}. {hint}")
        owners[prefix] = n

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in owners or super().is_leaf_module(m, qualname)

    try:
        params = inspect.signature(module.forward).parameters.values()
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        graph = _Tracer().trace(module, concrete_args=concrete or None)
    except Exception as error:  # any tracing failure: the graph cannot be checked
        raise ValueError(
            f"Cannot check that the {len(names)} targets of `{type(module).__name__}` ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) form a plain chain, and {plain}: torch.fx cannot trace its "
            f"forward ({type(error).__name__}: {error}). {hint}"
        ) from error
    nodes = list(graph.nodes)
    data: dict[Any, bool] = {}
    for node in nodes:
        if node.op == "placeholder":
            data[node] = True
        elif node.op == "get_attr" or _call_name(node) in _META_CALLS:
            data[node] = False
        else:
            data[node] = any(data.get(i, False) for i in node.all_input_nodes)
    calls: dict[str, list[Any]] = {n: [] for n in names}
    for node in nodes:
        if node.op == "call_module" and node.target in owners:
            calls[owners[node.target]].append(node)
    for n, used in calls.items():
        if len(used) != 1:
            how = "is never called as a module" if not used else f"is called {len(used)} times"
            raise ValueError(f"The chain breaks at `{n}`: its layer {how} in the forward, and {plain}. {hint}")
    order = sorted(names, key=lambda n: nodes.index(calls[n][0]))
    position = {calls[n][0]: n for n in order}

    def _inputs(node: Any) -> list[Any]:
        return [i for i in node.all_input_nodes if data.get(i, False)]

    def _describe(node: Any) -> str:
        if node.op == "call_module":
            return f"`{node.target}` ({type(module.get_submodule(str(node.target))).__name__})"
        return f"`{_call_name(node) or node.op}`"

    def _walk(start: Any, stop: Any, strict: bool, where: str) -> None:
        """Follow the single data input back from ``start`` to ``stop`` (unit-wise steps only if ``strict``)."""
        node = start
        while True:
            inputs = _inputs(node)
            if len(inputs) != 1:
                raise ValueError(
                    f"The chain breaks {where}: {_describe(node)} combines {len(inputs)} tensors (a residual, "
                    f"concatenation, product or several outputs), and {plain}. {hint}"
                )
            node = inputs[0]
            if node is stop:
                return
            if node in position or node.op == "placeholder":
                source = f"`{position[node]}`" if node in position else "the model's input"
                expected = f"`{position[stop]}`" if stop in position else "the previous target"
                raise ValueError(
                    f"The chain breaks {where}: its input comes from {source}, not from {expected} (parallel "
                    f"branches), and {plain}. {hint}"
                )
            if strict:
                unitwise = (
                    isinstance(module.get_submodule(str(node.target)), _UNITWISE_MODULES)
                    if node.op == "call_module"
                    else _call_name(node) in _UNITWISE_CALLS
                )
                if not unitwise:
                    raise ValueError(
                        f"The chain breaks {where}: {_describe(node)} runs between it and the previous target "
                        f"`{position[stop]}` and mixes their units (only activations, dropout, pooling, batch norm "
                        f"and flattening keep them), and {plain}. {hint}"
                    )

    for prev, cur in zip(order, order[1:]):
        _walk(calls[cur][0], calls[prev][0], True, f"at `{cur}`")
    output = next(node for node in reversed(nodes) if node.op == "output")
    _walk(output, calls[order[-1]][0], False, f"after the last target `{order[-1]}`")
    return order


def _to_units(alive: Tensor, width: int, argument: str) -> Tensor:
    """Map a unit vector onto a layer's ``width`` inputs, across a channel-major flatten if needed."""
    if alive.numel() == width:
        return alive
    if width % alive.numel() == 0:
        return alive.repeat_interleave(width // alive.numel())
    raise ValueError(
        f"Effective sparsity needs a plain chain of layers: {argument} has {width} inputs, the layer before it "
        f"{alive.numel()} outputs. Residual or branching graphs are not supported."
    )


def _from_units(useful: Tensor, width: int) -> Tensor:
    """Inverse of :func:`_to_units`: a unit is useful if any of its flattened positions is."""
    if useful.numel() == width:
        return useful
    return useful.view(width, -1).any(1)


@torch.no_grad()
def effective_masks(masks: Mapping[str, Tensor], layouts: Mapping[str, Layout] | None = None) -> dict[str, Tensor]:
    """Masks with the weights that cannot carry signal removed (Vysogorets & Kempe 2021, arXiv:2107.02306).

    The layers are taken as a plain chain in the given order (an MLP or a conv stack, with flattening
    between conv and linear layers handled channel-major). A kept weight ``w[o, i, ...]`` is *effective*
    only if input unit ``i`` is reachable from the network input through kept weights and output unit
    ``o`` reaches the network output through kept weights. Biases are ignored (they carry no input
    signal). Residual connections, concatenations and attention are not modelled: for such graphs the
    result is undefined, and inconsistent widths raise an error (use
    :func:`~lightning_pai.core.effective.effective_masks_by_flow`, which follows any graph). This function trusts
    the order it is given; :func:`sparsity_report` first checks the model's forward with :func:`chain_order`.
    Connections are counted per channel: on an MLP it equals the flow computation exactly; on a conv chain the
    flow also drops kernel taps that only ever meet zero padding at the example's input size.

    Args:
        masks: Bool masks in forward order (``[out, in, *kernel]`` without ``layouts``).
        layouts: Each mask's :class:`~lightning_pai.core.targets.Layout`, so that transposed weights (HF
            ``Conv1D``, ``ConvTranspose``) are read the right way round.

    Returns:
        Effective masks, by name (a subset of ``masks``).
    """
    names = list(masks)
    oriented = {n: _out_in(masks[n], layouts.get(n) if layouts else None) for n in names}
    conn = {n: m.reshape(m.shape[0], m.shape[1], -1).any(-1) for n, m in oriented.items()}  # [out, in]
    reach_in: dict[str, Tensor] = {}
    alive = None
    for n in names:
        width = conn[n].shape[1]
        reach_in[n] = torch.ones(width, dtype=torch.bool) if alive is None else _to_units(alive, width, n)
        alive = (conn[n].float() @ reach_in[n].float().to(conn[n].device)) > 0
    useful_out: dict[str, Tensor] = {}
    useful = None
    for n in reversed(names):
        out_width = conn[n].shape[0]
        useful_out[n] = torch.ones(out_width, dtype=torch.bool) if useful is None else _from_units(useful, out_width)
        useful = (conn[n].float().t() @ useful_out[n].float().to(conn[n].device)) > 0
    out = {}
    for n in names:
        m = oriented[n]
        gate = useful_out[n].to(m.device)[:, None] & reach_in[n].to(m.device)[None, :]
        effective = m & gate.view(*gate.shape, *([1] * (m.dim() - 2)))
        out[n] = _back(effective, layouts.get(n) if layouts else None)
    return out


def _out_in(mask: Tensor, layout: Layout | None) -> Tensor:
    """``mask`` with the output axis first and the input-channel axis second (kernel axes after)."""
    if layout is None or mask.dim() < 2 or (layout.out_dim == 0 and layout.in_dims[:1] == (1,)):
        return mask
    order = [layout.out_dim, layout.in_dims[0]]
    return mask.permute(*order, *[d for d in range(mask.dim()) if d not in order])


def _back(mask: Tensor, layout: Layout | None) -> Tensor:
    """Inverse of :func:`_out_in`."""
    if layout is None or mask.dim() < 2 or (layout.out_dim == 0 and layout.in_dims[:1] == (1,)):
        return mask
    order = [layout.out_dim, layout.in_dims[0]]
    perm = order + [d for d in range(mask.dim()) if d not in order]
    return mask.permute(*[perm.index(d) for d in range(mask.dim())])
