"""Sparse inference: masked layers replaced by sparse modules that compute the same outputs from the kept weights.

:func:`to_sparse_inference` swaps, in a copy of the model, each sparse enough layer for a module that stores
only its kept weights and multiplies with them:

- ``nn.Linear`` (subclasses that keep ``nn.Linear.forward``): ``y = x W^T + b`` for inputs ``(..., in)``
  (:class:`SparseLinear`);
- Hugging Face style ``Conv1D`` (recognised without importing ``transformers``: a module with an ``nf``
  attribute and a 2-D ``weight`` of shape ``(in, nf)``): ``y = x W + b`` (:class:`SparseLinear`);
- ``nn.Conv2d`` with a 1x1 kernel, stride 1 and no padding: a matmul over channels (:class:`SparseConv1x1`);
- every other ``nn.Conv2d`` with one group and zero padding (any kernel, stride, padding, dilation): direct
  sparse convolution (:class:`SparseConv2d`, Park et al. 2017), with the compiled kernels only.

Every other layer stays dense and is listed, with the reason, in the :class:`ConversionReport`. In particular
``nn.MultiheadAttention.out_proj`` is skipped: ``nn.MultiheadAttention`` passes ``out_proj.weight`` straight
to ``F.multi_head_attention_forward``, so a replaced ``out_proj`` would never be called; grouped and depthwise
convolutions stay dense too.

**Kernels.** On the CPU in float32 the default kernel is ``"c"``: the compiled kernels of
:mod:`lightning_pai.core.kernels` (built once per machine with the system C compiler, cached; bias and a
following ``nn.ReLU`` applied in the same pass; inputs processed in cache-sized tiles of 64 columns). Without
a compiler the matmul layers use ``torch.sparse.mm(W, x^T, "sum")`` (PyTorch's native row-parallel CSR
kernel, the fastest of PyTorch's on CPU from about 16 rows) or ``torch.addmm(b, W, x^T)`` (MKL on CPU,
cuSPARSE on CUDA), and convolutions other than 1x1 stride-1 stay dense.

**Layouts.** The matmul layers compute ``y^T = W x^T`` with ``W`` in CSR (or BSR) form. The input is
transposed once to ``(in, rows)``; the output is returned as the transposed view ``(y^T)^T``, so a chain of
sparse layers (with elementwise activations between them, which keep the layout) transposes only at its first
layer. Such outputs are not contiguous, which code that calls ``.view`` on them cannot take; so by default
(``contiguous_outputs=None``) a layer keeps the transposed layout only where that is known to be safe: when
its output feeds another converted layer (or a LayerNorm) inside an ``nn.Sequential``; any other layer keeps it
if the converted model runs ``example_inputs`` that way, and returns contiguous outputs otherwise.
A single row (batch 1) uses PyTorch's sparse matrix-vector product ``torch.addmv(b, W, x)`` (with any
kernel: it beats the compiled kernel's one-column case) and returns a contiguous output. :class:`SparseConv2d`
returns ordinary contiguous ``NCHW`` outputs.

**Fusion.** With ``fuse=True`` (the default), an ``nn.ReLU`` that directly follows a converted layer in an
``nn.Sequential`` is folded into it, and, when a :class:`SparseLinear` uses the ``"c"`` kernel, each
``nn.LayerNorm`` becomes a :class:`TransposedLayerNorm`, which normalises the transposed layout in place of
copying it, so a transformer MLP stack (LayerNorm, Linear, GELU, Linear) runs without any transpose between its
layers.

**Crossover.** A layer is converted only where it is expected to be faster: below a density given by the user,
or where a sparse kernel is measured faster than the dense layer at conversion (a sparse copy with a random
mask at the layer's density against the dense layer, timed in turns on this machine, at the layer's input size
when ``example_inputs`` is given; convolutions: a crossover density from copies at two densities). With
``kernel="auto"`` both the compiled CSR kernel and PyTorch's are timed and the faster is used, so a converted
matmul is never slower than ``torch.sparse`` either, as far as the timings tell.

On CUDA, a ``Linear``/``Conv1D`` whose mask is exactly 2:4 along the input dimension (each group of 4
consecutive input weights of every output row keeps exactly 2) uses
``torch.sparse.to_sparse_semi_structured`` instead: the weight is cast to float16 (or kept in
float16/bfloat16 if already so), the input is cast to it and the output cast back, so results match the
dense layer to float16 precision, not float32. PyTorch requires both weight dimensions to be multiples of
its minimum block (16 to 64 depending on the backend); other shapes fall back to CSR.

The sparse modules are **inference only**: calling them with gradients enabled on an input that requires
grad raises ``RuntimeError``. Their weights are buffers, so ``model.to(device)`` and ``state_dict()`` work
(except for 2:4 layers, which must be created on their final device). They keep the attributes client code
reads from the layers they replace (``in_features``/``out_features``, ``in_channels``/``out_channels``,
``bias``, and a ``weight`` with the dense shape, dtype and device that is materialised only when an operation
reads its values: :class:`~lightning_pai.deploy.modules.DenseWeightView`), so models that inspect their layers
(Hugging Face T5 and ViT, ``nn.TransformerEncoder``) run converted.

**Compiling.** Under ``torch.compile`` the sparse layers call the custom ops of :mod:`lightning_pai.deploy.ops`
(with fake implementations for tracing), so ``torch.compile(converted, fullgraph=True)`` works.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_pai.core.nm import is_nm
from lightning_pai.core.targets import LINEAR, is_hf_conv1d
from lightning_pai.deploy.export import check_pruning_masks
from lightning_pai.deploy.modules import (
    FUSABLE,
    KERNELS,
    LAYOUTS,
    SemiStructuredLinear,
    SparseConv1x1,
    SparseConv2d,
    SparseLinear,
    TransposedLayerNorm,
    _c_usable,
    _resolve_kernel,
)

#: Densities at which the sparse kernels are timed (:class:`KernelTimes`: a line is fitted through them).
_PROBE_DENSITIES = (0.05, 0.3)
#: Seconds per call measured by :func:`_timed`, by what was timed and the thread count.
_TIMINGS: dict[tuple, float] = {}


# ----------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_times(calls: dict[tuple, Callable[[], Any]], device: torch.device, budget_s: float) -> dict[tuple, float]:
    """Fastest call of each of ``calls``, timed in turns (7 to 25 rounds, after one warm-up call each), in seconds.

    In turns, so that a load that comes and goes hits every candidate alike; the minimum, not the median:
    other processes on the machine only ever add time. ``budget_s`` is the time for all of them together,
    exceeded where 7 rounds take longer: on a loaded machine a call that wakes a sleeping thread of the pool
    can wait a whole scheduling period (tens of ms), and a few rounds can all be such calls.
    """
    first = 0.0
    for fn in calls.values():
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        first += time.perf_counter() - start
    best = dict.fromkeys(calls, math.inf)
    for _ in range(max(7, min(25, int(budget_s / max(first, 1e-6)) - 1))):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def _timed(
    makers: dict[tuple, Callable[[], Callable[[], Any]]], device: torch.device, budget_s: float
) -> dict[tuple, float]:
    """:func:`_best_times` of the calls the ``makers`` return (those not cached yet, together), by key.

    Cached by key and the thread count, so each is measured once per process (:func:`clear_crossover_cache`).
    """
    threads = torch.get_num_threads()
    missing = {key: make for key, make in makers.items() if (*key, threads) not in _TIMINGS}
    if missing:
        with torch.inference_mode():
            measured = _best_times({key: make() for key, make in missing.items()}, device, budget_s)
        _TIMINGS.update({(*key, threads): t for key, t in measured.items()})
    return {key: _TIMINGS[(*key, threads)] for key in makers}


@dataclass(frozen=True)
class KernelTimes:
    """Seconds per call of one layer shape on this machine: the dense layer, and each sparse kernel by density.

    Each sparse kernel is timed at the densities ``probes`` (random masks keeping that fraction of the weights).
    At a probe the prediction is the time measured there; elsewhere it is the line through the first two probes,
    ``t(d) = t_0 + (t_1 - t_0) (d - d_0) / (d_1 - d_0)`` (``t_1`` at every density when timing noise made the
    slope negative; with a single probe, its time).

    Attributes:
        dense: Seconds per call of the dense layer.
        sparse: ``{kernel: (t_0, t_1, ...)}``: seconds per call of each sparse kernel at the probes.
        probes: The probe densities (fractions of weights kept, ``1 - sparsity``).
    """

    dense: float
    sparse: Mapping[str, tuple[float, ...]]
    probes: tuple[float, ...] = _PROBE_DENSITIES

    def _line(self, kernel: str) -> tuple[float, float, float]:
        """``(d_0, t_0, slope)`` through the first two probes (slope 0 and ``t_1`` when noise made it negative)."""
        (d0, d1), (t0, t1) = self.probes[:2], self.sparse[kernel][:2]
        slope = (t1 - t0) / (d1 - d0)
        return (d0, t0, slope) if slope > 0 else (d1, t1, 0.0)

    def predict(self, kernel: str, density: float) -> float:
        """Predicted seconds per call of ``kernel`` at ``density`` (``"dense"``: the dense layer's time)."""
        if kernel == "dense":
            return self.dense
        times = self.sparse[kernel]
        if density in self.probes:
            return times[self.probes.index(density)]
        if len(self.probes) < 2:
            return times[0]
        d0, t0, slope = self._line(kernel)
        return max(0.0, t0 + slope * (density - d0))

    def crossover(self, kernel: str) -> float:
        """Density in ``[0, 1]`` below which ``kernel`` is predicted faster than the dense layer (needs 2 probes).

        Raises:
            ValueError: With a single probe.
        """
        if len(self.probes) < 2:
            raise ValueError(f"A crossover needs timings at two densities or more; these are at {self.probes}.")
        d0, t0, slope = self._line(kernel)
        if slope == 0:  # timing noise swamped the nnz dependence
            return 1.0 if t0 < self.dense else 0.0
        return min(1.0, max(0.0, d0 + (self.dense - t0) / slope))

    def fastest(self, density: float) -> tuple[str, dict[str, float]]:
        """``(the fastest of "dense" and the sparse kernels at density, {each: predicted seconds})``.

        Ties go to the dense layer, then to the kernels in the order they were timed.
        """
        predicted = {"dense": self.dense} | {k: self.predict(k, density) for k in self.sparse}
        return min(predicted, key=predicted.__getitem__), predicted


def measure_kernel_times(
    out_features: int,
    in_features: int,
    rows: int = 64,
    *,
    kernels: tuple[str, ...] = ("auto",),
    densities: tuple[float, ...] = _PROBE_DENSITIES,
    layout: str = "csr",
    blocksize: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    budget_s: float = 0.3,
    transposed_input: bool = False,
) -> KernelTimes:
    """Time a dense ``(out, in)`` matmul of ``rows`` rows against :class:`SparseLinear` with each of ``kernels``.

    ``F.linear`` on a row-major ``(rows, in)`` input against the sparse layer at each of ``densities`` with a
    random mask keeping that fraction of the weights (for BSR: of the blocks), the fastest of several calls each,
    all timed in turns (so that a load that comes and goes hits every candidate alike; about ``budget_s / 3``
    seconds per timing). The sparse layer's time includes transposing its input, unless ``transposed_input``
    (its input is the transposed view another sparse layer returns, as inside a chain of converted layers; the
    dense layer then gets the same view). Every timing is cached per shape, rows, layout, kernel, density, dtype,
    device, input layout and thread count, so each is measured once per process (:func:`clear_crossover_cache`).

    Args:
        out_features: Rows of ``W``.
        in_features: Columns of ``W``.
        rows: Rows of the input matrix (batch, or batch x sequence for token inputs, or batch x H x W for 1x1
            convolutions).
        kernels: Sparse kernels to time: ``"auto"``, ``"c"``, ``"sum"`` or ``"mm"`` (see :class:`SparseMatmul`;
            ``"auto"`` is resolved as :func:`to_sparse_inference` resolves it).
        densities: Fractions of weights kept at which to time them (:class:`KernelTimes` ``probes``; a line
            through the first two predicts the others; :func:`to_sparse_inference` times at the layer's own).
        layout: ``"csr"`` or ``"bsr"``.
        blocksize: BSR block edge.
        dtype: Floating dtype of the layer.
        device: Device of the layer.
        budget_s: Approximate time to spend on every three timings.
        transposed_input: Time both layers on a transposed ``(in, rows)`` buffer's view.

    Returns:
        The :class:`KernelTimes`, its ``sparse`` keyed by the resolved kernel names.
    """
    device = torch.device(device)
    resolved = tuple(dict.fromkeys(_resolve_kernel(k, layout, device, rows, dtype) for k in kernels))
    shape = ("linear", out_features, in_features, rows, dtype, str(device), transposed_input)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    if transposed_input:
        x = x.t().contiguous().t()
    w = torch.randn(out_features, in_features, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(out_features, generator=gen).to(device=device, dtype=dtype)

    def sparse_at(kernel: str, d: float) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            cells = (out_features // blocksize, in_features // blocksize) if layout == "bsr" else w.shape
            mask = _random_mask(cells, d)
            if layout == "bsr":
                mask = mask.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)
            layer = SparseLinear(w, b, mask.to(device), layout=layout, blocksize=blocksize, kernel=kernel)
            return lambda: layer(x)

        return make

    def key(kernel: str, d: float) -> tuple:
        return (*shape, layout, blocksize, kernel, round(d, 9))

    makers = {(*shape, "dense"): lambda: lambda: F.linear(x, w, b)}
    makers |= {key(k, d): sparse_at(k, d) for k in resolved for d in densities}
    times = _timed(makers, device, budget_s * len(makers) / 3)
    sparse = {k: tuple(times[key(k, d)] for d in densities) for k in resolved}
    return KernelTimes(times[(*shape, "dense")], sparse, tuple(densities))


def _random_mask(shape: tuple[int, ...], density: float) -> Tensor:
    """A bool mask of ``shape`` keeping ``round(density * numel)`` random entries (the same ones every time)."""
    numel = math.prod(shape)
    keep = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[: round(density * numel)]
    return torch.zeros(numel, dtype=torch.bool).index_fill_(0, keep, True).view(shape)


def measure_crossover(
    out_features: int,
    in_features: int,
    rows: int = 64,
    *,
    layout: str = "csr",
    blocksize: int = 4,
    kernel: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    budget_s: float = 0.3,
    transposed_input: bool = False,
) -> float:
    """Density below which a sparse ``(out, in)`` matmul beats the dense one on this machine, for ``rows`` rows.

    Times (best of several calls) ``F.linear`` on a row-major ``(rows, in)`` input against
    :class:`SparseLinear` at densities 0.05 and 0.3 with random masks (for BSR: random blocks), fits
    ``t_sparse(d) = a + c d`` through the two points and returns ``d* = (t_dense - a) / c`` clipped to
    ``[0, 1]``. The sparse layer's time includes transposing its input, unless ``transposed_input`` (its input
    is the transposed view another sparse layer returns, as inside a chain of converted layers; the dense layer
    then gets the same view). Results are cached per shape, rows, layout, kernel, dtype, device, input layout
    and thread count, so each distinct case is measured once per process (in about ``budget_s`` seconds; the
    timings are those of :func:`measure_kernel_times`, which :func:`to_sparse_inference` uses to pick the
    fastest of the dense layer and the sparse kernels).

    Args:
        out_features: Rows of ``W``.
        in_features: Columns of ``W``.
        rows: Rows of the input matrix (batch, or batch x sequence for token inputs, or batch x H x W for 1x1
            convolutions).
        layout: ``"csr"`` or ``"bsr"``.
        blocksize: BSR block edge.
        kernel: ``"auto"``, ``"c"``, ``"sum"`` or ``"mm"`` (see :class:`SparseMatmul`).
        dtype: Floating dtype of the layer.
        device: Device of the layer.
        budget_s: Approximate time to spend measuring.
        transposed_input: Time both layers on a transposed ``(in, rows)`` buffer's view.

    Returns:
        The crossover density in ``[0, 1]`` (the fraction of weights kept, ``1 - sparsity``).
    """
    times = measure_kernel_times(
        out_features, in_features, rows, kernels=(kernel,), layout=layout, blocksize=blocksize, dtype=dtype,
        device=device, budget_s=budget_s, transposed_input=transposed_input,
    )  # fmt: skip
    return times.crossover(next(iter(times.sparse)))


def measure_conv_crossover(conv: nn.Conv2d, input_size: tuple[int, int, int, int], *, budget_s: float = 0.3) -> float:
    """Density below which :class:`SparseConv2d` beats ``conv`` on this machine for inputs of ``input_size``.

    As :func:`measure_crossover`: ``conv`` itself (its weights' values do not matter) against sparse copies with
    random masks at densities 0.05 and 0.3, a line through the two, cached per convolution geometry, input
    size and thread count.

    Args:
        conv: A float32 CPU ``nn.Conv2d`` with one group and zero padding.
        input_size: ``(n, c, h, w)`` of the inputs to time.
        budget_s: Approximate time to spend measuring.

    Returns:
        The crossover density in ``[0, 1]``.
    """
    w = conv.weight.detach()
    key = ("conv", tuple(w.shape), conv.stride, conv.padding, conv.dilation, conv.bias is not None, tuple(input_size))
    x = torch.randn(*input_size, generator=torch.Generator().manual_seed(0)).to(w)

    def sparse_at(d: float) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            layer = SparseConv2d.from_conv(conv, _random_mask(tuple(w.shape), d))
            return lambda: layer(x)

        return make

    makers = {(*key, "dense"): lambda: lambda: conv(x)} | {(*key, "direct", d): sparse_at(d) for d in _PROBE_DENSITIES}
    times = _timed(makers, w.device, budget_s)
    direct = tuple(times[(*key, "direct", d)] for d in _PROBE_DENSITIES)
    return KernelTimes(times[(*key, "dense")], {"direct": direct}).crossover("direct")  # type: ignore[dict-item]


def clear_crossover_cache() -> None:
    """Forget every timing the crossover functions and :func:`measure_kernel_times` made (e.g. load changed)."""
    _TIMINGS.clear()


# --------------------------------------------------------------------------------------------- converting
@dataclass(frozen=True)
class LayerConversion:
    """What :func:`to_sparse_inference` did with one layer.

    Attributes:
        name: Module name in the model.
        kind: ``"Linear"``, ``"Conv2d 1x1"`` (a matmul), ``"Conv2d"``, ``"Conv1D"``, or the module's class name
            when unsupported.
        shape: ``(out, in)`` of the layer's matmul (the weight's shape for ``"Conv2d"`` and unsupported layers).
        density: Fraction of weights kept (``1 - sparsity``); for BSR, the fraction stored in kept blocks.
        converted: Whether the layer was replaced.
        implementation: ``"csr/c"``, ``"csr/sum"``, ``"csr/mm"``, ``"bsr4/mm"``, ``"direct/c"`` (direct sparse
            convolution), ``"2:4/float16"`` (each with ``"+relu"`` when a ReLU was fused), or ``"dense"``.
        reason: Why (``"at density 0.100: csr/c 0.21 ms < csr/sum 0.64 ms < dense 2.1 ms (measured at 64 rows)"``,
            ``"density 0.100 < crossover 0.420 (given)"``, ``"stride (2, 2)"``, ...).
        timings: ``(implementation, predicted seconds per call)`` for each candidate timed at the layer's shape
            and density, fastest first (``"dense"``, ``"csr/c"``, ``"csr/sum"``, ...); empty when nothing was
            timed (a given ``crossover``, a convolution, a layer that cannot be converted).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    converted: bool
    implementation: str
    reason: str
    timings: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ConversionReport:
    """Per-layer outcome of :func:`to_sparse_inference`; ``str()`` gives a markdown table."""

    rows: list[LayerConversion]
    #: Largest absolute difference between the converted and the dense model's outputs on ``example_inputs``
    #: (``None`` without them).
    max_abs_diff: float | None = None
    #: Whether the layers outside a known chain of sparse layers return contiguous outputs (see
    #: :func:`to_sparse_inference`'s ``contiguous_outputs``).
    contiguous_outputs: bool = True

    @property
    def converted(self) -> list[str]:
        """Names of the replaced layers."""
        return [r.name for r in self.rows if r.converted]

    @property
    def dense(self) -> list[str]:
        """Names of the layers left dense."""
        return [r.name for r in self.rows if not r.converted]

    def __str__(self) -> str:
        lines = ["| layer | kind | shape | density | sparse | how / why |", "|---|---|---|---:|---|---|"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            lines.append(
                f"| {r.name or '(root)'} | {r.kind} | {shape} | {r.density:.4f} | "
                f"{r.implementation if r.converted else 'no'} | {r.reason} |"
            )
        if self.max_abs_diff is not None:
            lines.append(f"\nOn `example_inputs`: max |converted - dense| = {self.max_abs_diff:.3g}.")
        return "\n".join(lines)


def _classify(name: str, module: nn.Module, parent: nn.Module | None) -> tuple[str, str | None]:
    """``(kind, reason it cannot be converted or None)``."""
    if isinstance(parent, nn.MultiheadAttention):
        return type(module).__name__, "inside nn.MultiheadAttention, which reads out_proj.weight directly"
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return type(module).__name__, f"{type(module).__name__} overrides nn.Linear.forward"
        return "Linear", None
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return type(module).__name__, f"{type(module).__name__} overrides nn.Conv2d.forward"
        problems = []
        if module.groups != 1:
            problems.append(f"groups {module.groups}")
        if module.padding_mode != "zeros":
            problems.append(f"padding_mode {module.padding_mode!r}")
        if problems:
            return "Conv2d", "only convolutions with one group and zero padding are converted; this one has " + (
                ", ".join(problems)
            )
        matmul = tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
        if matmul and module.padding in ("valid", "same", (0, 0)):  # "same" pads nothing for a 1x1 kernel
            return "Conv2d 1x1", None
        return "Conv2d", None
    if is_hf_conv1d(module):
        return "Conv1D", None
    return type(module).__name__, "not an nn.Linear, an nn.Conv2d or a Conv1D"


def _matrix(kind: str, module: nn.Module, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's ``(out, in)`` matmul weight and mask."""
    w = module.weight.detach()
    if kind == "Conv1D":
        return w.t(), mask.t()
    if kind in ("Conv2d 1x1", "Conv2d"):
        return w.reshape(w.shape[0], -1), mask.reshape(w.shape[0], -1)
    return w, mask


def _in_sequential(model: nn.Module, name: str) -> tuple[str, nn.Sequential, list[str], int] | None:
    """``(parent name, parent, its child keys, the position of name)`` if ``name``'s parent is a Sequential."""
    parent_name, _, child = name.rpartition(".")
    if not name:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    return parent_name, parent, keys, keys.index(child)


def _fused_activation(model: nn.Module, name: str) -> str | None:
    """The activation of the ``nn.Sequential`` sibling right after module ``name``, replaced by ``nn.Identity``."""
    found = _in_sequential(model, name)
    if found is None or found[3] + 1 == len(found[2]):
        return None
    _, parent, keys, position = found
    activation = FUSABLE.get(type(parent._modules[keys[position + 1]]))
    if activation is not None:
        parent._modules[keys[position + 1]] = nn.Identity()
    return activation


#: Modules that keep a sparse layer's transposed output layout (elementwise), skipped when looking for a
#: converted predecessor in an ``nn.Sequential``.
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ReLU6, nn.Dropout, nn.Identity)
#: Spatial size at which convolutions are timed when no ``example_inputs`` show theirs.
_CONV_PROBE_HW = 32
#: Images per timing of a convolution (the batch of ``example_inputs``, at most this many).
_CONV_PROBE_BATCH = 8


def _follows_sparse_matmul(model: nn.Module, name: str, replacements: list[tuple[str, nn.Module]]) -> bool:
    """Whether module ``name`` receives the transposed output of a layer already replaced by a SparseLinear.

    That is: it sits in an ``nn.Sequential`` right after such a layer, elementwise modules aside.
    """
    previous = _sequential_neighbour(model, name, -1)
    return previous is not None and isinstance(dict(replacements).get(previous), SparseLinear)


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _probe(model: nn.Module, example_inputs: Any, record: bool = True) -> tuple[dict[str, tuple[int, ...]], Any]:
    """Run ``example_inputs`` in eval mode under ``torch.no_grad``: each module's first input shape, and the output."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in model.named_modules()] if record else []
    try:
        model.eval()
        with torch.no_grad():
            output = _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes, output


def _max_abs_diff(got: Any, want: Any) -> float:
    """Largest ``|got - want|`` over the floating tensors of two outputs of the same structure."""
    pairs = zip(tree_flatten(got)[0], tree_flatten(want)[0], strict=False)
    diffs = [
        float((a.float() - b.float()).abs().max())
        for a, b in pairs
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point() and a.shape == b.shape
        and a.numel()
    ]  # fmt: skip
    return max(diffs, default=0.0)


def _sequential_neighbour(model: nn.Module, name: str, step: int) -> str | None:
    """Name of the next (``step=1``) or previous (``-1``) non-elementwise sibling in ``name``'s ``nn.Sequential``."""
    found = _in_sequential(model, name)
    if found is None:
        return None
    parent_name, parent, keys, position = found
    others = keys[position + 1 :] if step > 0 else list(reversed(keys[:position]))
    for key in others:
        if not isinstance(parent._modules[key], _ELEMENTWISE):
            return f"{parent_name}.{key}" if parent_name else key
    return None


def _conv_probe_size(conv: nn.Conv2d, seen: tuple[int, ...] | None) -> tuple[int, int, int, int]:
    """Input size at which to time ``conv``: what ``example_inputs`` gave it (at most 8 images), else 32x32."""
    if seen is not None and len(seen) in (3, 4):
        n, (c, h, w) = (seen[0] if len(seen) == 4 else 1), seen[-3:]
        return min(n, _CONV_PROBE_BATCH), c, h, w
    reach = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return 1, conv.in_channels, max(_CONV_PROBE_HW, reach[0]), max(_CONV_PROBE_HW, reach[1])


def _candidate_kernels(kernel: str, chosen: str, layout: str, rows: int) -> tuple[str, ...]:
    """Sparse kernels to time against the dense layer: the one asked for, or both candidates of ``"auto"``.

    With ``"auto"`` on float32 CSR on the CPU those are the compiled kernel and PyTorch's own CSR kernel (what
    ``"auto"`` picks without the compiled kernels), so a layer never gets the slower of the two.
    """
    if kernel == "auto" and chosen == "c" and layout == "csr":
        return ("c", "sum" if rows >= 16 else "mm")
    return (chosen,)


def is_two_four(mask: Tensor) -> bool:
    """Whether an ``(out, in)`` mask is exactly 2:4 along ``in``: every 4 consecutive entries of a row keep 2."""
    if mask.dim() != 2 or mask.shape[1] % 4 or mask.numel() == 0:
        return False
    return is_nm(mask, 2, 4, LINEAR)


def to_sparse_inference(
    model: nn.Module,
    masks: Mapping[str, Tensor] | Any | None = None,
    *,
    crossover: float | None = None,
    layout: str = "csr",
    blocksize: int = 4,
    kernel: str = "auto",
    batch_size: int = 64,
    semi_structured: bool = True,
    contiguous_outputs: bool | None = None,
    fuse: bool = True,
    example_inputs: Any = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace each sparse enough layer by an inference-only sparse equivalent.

    A supported layer (see the module docstring: ``nn.Linear``, ``Conv1D``, ``nn.Conv2d``) with density ``d``
    (fraction of weights kept, ``1 - sparsity``) is converted when ``d < crossover``; its output equals the
    masked dense layer's up to float rounding (summation order). With ``crossover=None`` a matmul layer gets
    whichever is fastest, timed at its shape and density, of the dense layer and the sparse kernels: with
    ``kernel="auto"`` on float32 CSR on the CPU both the compiled kernel and PyTorch's own CSR kernel, so a
    conversion is never slower than the best path measured (:func:`measure_kernel_times` at ``batch_size`` rows
    or each layer's rows in ``example_inputs``, with the input layout a chain of sparse layers gives it; cached;
    well under a second per shape); a convolution is converted below its measured crossover
    (:func:`measure_conv_crossover`). The report's ``implementation`` says which kernel each layer got and its
    ``timings`` what each candidate was predicted to take.
    On CUDA a layer with an exact 2:4 mask uses ``to_sparse_semi_structured`` (float16, see the module
    docstring) whatever the crossover, unless ``semi_structured=False``.

    The report (:class:`ConversionReport`: each considered layer, converted or not, and why) is attached to
    the returned model as ``model.sparse_conversion``; :func:`conversion_report` returns it.

    Args:
        model: The pruned model (weights with zeros at pruned positions).
        masks: Bool keep-masks by parameter name (a dict or a :class:`~lightning_pai.MaskSet`); the layers
            whose ``weight`` has a mask are considered, and weights outside a mask count as zero. ``None``:
            every supported layer is considered, with the mask ``weight != 0``.
        crossover: Density threshold in ``[0, 1]``: ``0.0`` converts nothing, ``1.0`` every considered layer
            with at least one zero weight (with ``kernel``'s choice, nothing timed). ``None`` measures.
        layout: ``"csr"`` or ``"bsr"`` (``blocksize`` square blocks; the density compared is then the fraction
            stored in nonzero blocks). CSR is the faster for unstructured masks.
        blocksize: BSR block edge.
        kernel: ``"auto"`` (CPU float32 CSR: ``"c"`` when :func:`lightning_pai.core.kernels.available`, else
            ``"sum"`` from 16 rows of ``batch_size`` and ``"mm"`` below; CUDA or BSR: ``"mm"``), ``"c"``,
            ``"sum"`` or ``"mm"`` (see :class:`SparseMatmul`).
        batch_size: Expected rows per call (batch; batch x sequence for token inputs; batch x H x W for 1x1
            convs), used to pick the kernel and to measure the crossover.
        semi_structured: Use 2:4 semi-structured sparsity for exact 2:4 masks on CUDA.
        contiguous_outputs: ``True``: every sparse matmul layer returns contiguous outputs (a copy per layer);
            ``False``: transposed views (see "Layouts" in the module docstring). ``None`` (default): views
            where the consumer is known to take them — another converted layer or a LayerNorm next in an
            ``nn.Sequential``, elementwise modules between — and, for every other layer, views if the converted
            model runs ``example_inputs`` with them, else contiguous outputs (always contiguous without
            ``example_inputs``).
        example_inputs: One input like those the model will run (a tensor, a tuple of positional arguments or
            a dict of keyword arguments): the model runs it once in eval mode (under ``torch.no_grad``) to record
            each layer's input size, so each crossover is measured at the layer's real rows (overriding
            ``batch_size``) and each convolution at its real spatial size (at most 8 images). Without it,
            convolutions are timed on one 32x32 image.
        fuse: Fold an ``nn.ReLU`` that directly follows a converted layer in an ``nn.Sequential`` into that
            layer's output pass (the ``nn.ReLU`` becomes ``nn.Identity``), and, when a layer uses the ``"c"``
            kernel, replace each ``nn.LayerNorm`` by a :class:`TransposedLayerNorm` (the same function, without
            the transposes between sparse layers). Forward hooks on those modules would no longer fire.
        inplace: Modify ``model`` itself instead of a deep copy.

    Returns:
        The converted model (``model`` itself if ``inplace``, unless ``model`` is itself the converted layer).

    Raises:
        ValueError: If an argument is out of range, or a mask's shape differs from its weight's.
        KeyError: If a mask names no parameter of ``model``.
    """
    if crossover is not None and (isinstance(crossover, bool) or not 0.0 <= crossover <= 1.0):
        raise ValueError(f"`crossover` must be None (measure it) or a density in [0, 1], got {crossover!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` (rows per call) must be a positive int, got {batch_size!r}.")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"`blocksize` must be a positive int, got {blocksize!r}.")
    check_pruning_masks(masks, "to_sparse_inference")
    given = None if masks is None else dict(masks.items())
    if given is not None:
        params = dict(model.named_parameters())
        missing = [n for n in given if n not in params]
        if missing:
            raise KeyError(f"The model has no parameter named {missing[:5]}; the masks were made for another model.")
    out = model if inplace else copy.deepcopy(model)
    parents: dict[str, nn.Module] = {}
    for prefix, mod in out.named_modules():
        for child_name, _ in mod.named_children():
            parents.setdefault(f"{prefix}.{child_name}" if prefix else child_name, mod)
    inputs, expected = ({}, None) if example_inputs is None else _probe(out, example_inputs)
    rows: list[LayerConversion] = []
    consumed: set[str] = set()
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in list(out.named_modules()):
        weight_name = f"{name}.weight" if name else "weight"
        weight = module._parameters.get("weight")
        if given is not None:
            if weight_name not in given or weight is None:
                continue
            consumed.add(weight_name)
            mask = given[weight_name].to(device=weight.device, dtype=torch.bool)
            if mask.shape != weight.shape:
                raise ValueError(
                    f"Mask {weight_name!r} has shape {tuple(mask.shape)}, its weight {tuple(weight.shape)}."
                )
        else:
            if weight is None or not isinstance(module, (nn.Linear, nn.Conv2d)) and not is_hf_conv1d(module):
                continue
            mask = weight.detach() != 0
        density = float(mask.sum()) / max(1, mask.numel())
        kind, problem = _classify(name, module, parents.get(name))
        compiled = layout == "csr" and _c_usable("csr", weight.device, weight.dtype)
        if problem is None and kind == "Conv2d" and not compiled:
            problem = (
                "convolutions other than 1x1 stride-1 need the compiled kernels (lightning_pai.core.kernels: "
                "a C compiler, float32 on the CPU, layout='csr')"
            )
        if problem is not None:
            rows.append(LayerConversion(name, kind, tuple(weight.shape), density, False, "dense", problem))
            continue
        w, m = _matrix(kind, module, mask)
        shape = tuple(weight.shape) if kind == "Conv2d" else tuple(w.shape)
        bias = getattr(module, "bias", None)
        if semi_structured and kind not in ("Conv2d 1x1", "Conv2d") and w.is_cuda and is_two_four(m):
            dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
            try:
                new: nn.Module = SemiStructuredLinear(w.masked_fill(~m, 0), bias, dtype)
            except (RuntimeError, ValueError) as err:
                reason_24 = f"2:4 not usable ({str(err).splitlines()[0][:80]}); "
            else:
                impl = f"2:4/{str(dtype).removeprefix('torch.')}"
                rows.append(LayerConversion(name, kind, shape, density, True, impl, "exact 2:4 mask on CUDA"))
                replacements.append((name, new))
                continue
        else:
            reason_24 = ""
        stored = density
        if layout == "bsr":
            if w.shape[0] % blocksize or w.shape[1] % blocksize:
                why = f"{reason_24}{blocksize}x{blocksize} BSR blocks do not tile {w.shape[0]}x{w.shape[1]}"
                rows.append(LayerConversion(name, kind, shape, density, False, "dense", why))
                continue
            blocks = m.reshape(w.shape[0] // blocksize, blocksize, w.shape[1] // blocksize, blocksize).any(3).any(1)
            stored = float(blocks.sum()) / max(1, blocks.numel())
        seen = inputs.get(name)
        matmul_rows = batch_size if seen is None else max(1, math.prod(seen) // w.shape[1])
        chained = kind != "Conv2d" and contiguous_outputs is not True
        chained = chained and _follows_sparse_matmul(out, name, replacements)
        chosen = _resolve_kernel(kernel, layout, w.device, matmul_rows, w.dtype)
        prefix = f"{layout}{blocksize if layout == 'bsr' else ''}/"
        timings: tuple[tuple[str, float], ...] = ()
        if crossover is not None or kind == "Conv2d":
            if crossover is not None:
                threshold, source = crossover, "given"
            else:
                size = _conv_probe_size(module, seen)
                threshold = measure_conv_crossover(module, size)
                source = "measured on " + "x".join(map(str, size))
            convert = stored < threshold
            verdict = f"density {stored:.3f} {'<' if convert else '>='} crossover {threshold:.3f} ({source})"
        else:  # the fastest of the dense layer and the sparse kernels, measured at this shape
            times = measure_kernel_times(
                w.shape[0], w.shape[1], matmul_rows, kernels=_candidate_kernels(kernel, chosen, layout, matmul_rows),
                densities=(stored,), layout=layout, blocksize=blocksize, dtype=w.dtype, device=w.device,
                transposed_input=chained,
            )  # fmt: skip
            best, predicted = times.fastest(stored)
            timings = tuple(
                (k if k == "dense" else prefix + k, t) for k, t in sorted(predicted.items(), key=lambda kv: kv[1])
            )
            convert, chosen = best != "dense", chosen if best == "dense" else best
            source = f"measured at {matmul_rows} rows" + (", chained" if chained else "")
            ranking = " < ".join(f"{k} {t * 1e3:.3g} ms" for k, t in timings)
            verdict = f"at density {stored:.3f}: {ranking} ({source})"
        if not convert:
            rows.append(LayerConversion(name, kind, shape, stored, False, "dense", reason_24 + verdict, timings))
            continue
        activation = _fused_activation(out, name) if fuse else None
        if kind == "Conv2d":
            new, impl = SparseConv2d.from_conv(module, mask, activation), "direct/c"
        else:
            cls = SparseConv1x1 if kind == "Conv2d 1x1" else SparseLinear
            new = cls(
                w, bias, m, layout=layout, blocksize=blocksize, kernel=chosen,
                contiguous_outputs=bool(contiguous_outputs), activation=activation,
            )  # fmt: skip
            impl = prefix + chosen
        impl += f"+{activation}" if activation else ""
        rows.append(LayerConversion(name, kind, shape, stored, True, impl, reason_24 + verdict, timings))
        replacements.append((name, new))
    for name in [n for n in given or () if n not in consumed]:
        shape = tuple(given[name].shape)
        density = float(given[name].sum()) / max(1, given[name].numel())
        why = "not a layer's `weight` (no sparse kernel)"
        rows.append(LayerConversion(name, "parameter", shape, density, False, "dense", why))
    if fuse and any(type(new) is SparseLinear and new.kernel == "c" for _, new in replacements):
        replacements += [
            (n, TransposedLayerNorm.from_layer_norm(mod))
            for n, mod in out.named_modules()
            if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1
        ]
    for name, new in replacements:
        if not name:
            out = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, new)
    contiguous, diff = bool(contiguous_outputs), None
    if contiguous_outputs is None:
        contiguous, diff = _choose_output_layout(out, replacements, example_inputs, expected)
    elif example_inputs is not None:
        diff = _max_abs_diff(_probe(out, example_inputs, record=False)[1], expected)
    out.sparse_conversion = ConversionReport(rows, diff, contiguous)
    return out


def _choose_output_layout(
    model: nn.Module, replacements: list[tuple[str, nn.Module]], example_inputs: Any, expected: Any
) -> tuple[bool, float | None]:
    """Set ``contiguous_outputs`` of the converted matmul layers; ``(outside chains contiguous, max |diff|)``.

    A layer whose output goes, inside an ``nn.Sequential``, to another converted layer or a LayerNorm returns
    the transposed view. The others return it too if the model then runs ``example_inputs``; if it does not
    (client code calling ``.view`` on an output, say) or there are no ``example_inputs``, they copy to contiguous.
    """
    loose = []
    for name, layer in replacements:
        if not isinstance(layer, (SparseLinear, SparseConv1x1)):
            continue
        after = _sequential_neighbour(model, name, 1) if name else None
        in_chain = after is not None and isinstance(model.get_submodule(after), (SparseLinear, nn.LayerNorm))
        if not (in_chain and isinstance(layer, SparseLinear)):
            loose.append(layer)
    if example_inputs is None:
        for layer in loose:
            layer.contiguous_outputs = True
        return True, None
    try:
        return False, _max_abs_diff(_probe(model, example_inputs, record=False)[1], expected)
    except RuntimeError:
        for layer in loose:
            layer.contiguous_outputs = True
        return True, _max_abs_diff(_probe(model, example_inputs, record=False)[1], expected)


def conversion_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` :func:`to_sparse_inference` attached to ``model``.

    Raises:
        ValueError: If ``model`` did not come from :func:`to_sparse_inference`.
    """
    report = getattr(model, "sparse_conversion", None)
    if not isinstance(report, ConversionReport):
        raise ValueError("This model has no conversion report: it was not returned by `to_sparse_inference`.")
    return report


__all__ = [
    "ConversionReport",
    "KernelTimes",
    "LayerConversion",
    "clear_crossover_cache",
    "conversion_report",
    "is_two_four",
    "measure_conv_crossover",
    "measure_crossover",
    "measure_kernel_times",
    "to_sparse_inference",
]
