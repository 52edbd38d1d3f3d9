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
:mod:`lightning_pai.ckernels` (built once per machine with the system C compiler, cached; bias and a
following ``nn.ReLU`` applied in the same pass; inputs processed in cache-sized tiles of 64 columns). Without
a compiler the matmul layers use ``torch.sparse.mm(W, x^T, "sum")`` (PyTorch's native row-parallel CSR
kernel, the fastest of PyTorch's on CPU from about 16 rows) or ``torch.addmm(b, W, x^T)`` (MKL on CPU,
cuSPARSE on CUDA), and convolutions other than 1x1 stride-1 stay dense.

**Layouts.** The matmul layers compute ``y^T = W x^T`` with ``W`` in CSR (or BSR) form. The input is
transposed once to ``(in, rows)``; the output is returned as the transposed view ``(y^T)^T``, so a chain of
sparse layers (with elementwise activations between them, which keep the layout) transposes only at its first
layer. The outputs are therefore not contiguous; pass ``contiguous_outputs=True`` if your code calls ``.view``
on them. A single row (batch 1) uses PyTorch's sparse matrix-vector product ``torch.addmv(b, W, x)`` (with any
kernel: it beats the compiled kernel's one-column case) and returns a contiguous output. :class:`SparseConv2d`
returns ordinary contiguous ``NCHW`` outputs.

**Fusion.** With ``fuse=True`` (the default), an ``nn.ReLU`` that directly follows a converted layer in an
``nn.Sequential`` is folded into it, and, when a :class:`SparseLinear` uses the ``"c"`` kernel, each
``nn.LayerNorm`` becomes a :class:`TransposedLayerNorm`, which normalises the transposed layout in place of
copying it, so a transformer MLP stack (LayerNorm, Linear, GELU, Linear) runs without any transpose between its
layers.

**Crossover.** A layer is converted only where it is expected to be faster: below a density given by the user
or measured at conversion (dense layer against sparse copies at two densities, on this machine, at the layer's
input size when ``example_inputs`` is given).

On CUDA, a ``Linear``/``Conv1D`` whose mask is exactly 2:4 along the input dimension (each group of 4
consecutive input weights of every output row keeps exactly 2) uses
``torch.sparse.to_sparse_semi_structured`` instead: the weight is cast to float16 (or kept in
float16/bfloat16 if already so), the input is cast to it and the output cast back, so results match the
dense layer to float16 precision, not float32. PyTorch requires both weight dimensions to be multiples of
its minimum block (16 to 64 depending on the backend); other shapes fall back to CSR.

The sparse modules are **inference only**: calling them with gradients enabled on an input that requires
grad raises ``RuntimeError``. Their weights are buffers, so ``model.to(device)`` and ``state_dict()`` work
(except for 2:4 layers, which must be created on their final device).
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

from lightning_pai import ckernels
from lightning_pai.core.nm import is_nm
from lightning_pai.core.targets import LINEAR, is_hf_conv1d

#: Sparse layouts :func:`to_sparse_inference` can use for unstructured masks.
LAYOUTS = ("csr", "bsr")
#: Sparse kernels: ``"c"`` = the compiled CSR kernel of :mod:`lightning_pai.ckernels`, ``"sum"`` =
#: ``torch.sparse.mm(W, x^T, "sum")``, ``"mm"`` = ``torch.addmm(b, W, x^T)``.
KERNELS = ("auto", "c", "sum", "mm")
#: Activations a sparse layer can apply in its own output pass (fused from ``nn.Sequential(layer, nn.ReLU())``).
FUSABLE = {nn.ReLU: "relu"}
#: Densities at which :func:`measure_crossover` times the sparse kernel (a line is fitted through them).
_PROBE_DENSITIES = (0.05, 0.3)
_CROSSOVER_CACHE: dict[tuple, float] = {}


def _check_inference(x: Tensor, module: nn.Module) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(module).__name__} is an inference-only sparse layer and cannot backpropagate: call it under "
            "`torch.no_grad()` / `torch.inference_mode()` or with an input that does not require grad. Train the "
            "dense model (its masks stay in the checkpoint) and convert it again."
        )


def _c_usable(layout: str, device: torch.device, dtype: torch.dtype) -> bool:
    return layout == "csr" and device.type == "cpu" and dtype == torch.float32 and ckernels.available()


def _resolve_kernel(kernel: str, layout: str, device: torch.device, rows: int, dtype: torch.dtype) -> str:
    if kernel != "auto":
        return kernel
    if layout == "bsr" or device.type != "cpu":
        return "mm"
    if _c_usable(layout, device, dtype):
        return "c"
    return "sum" if rows >= 16 else "mm"


class SparseMatmul(nn.Module):
    """Inference-only ``y^T = W x^T + b`` with ``W`` (``out x in``) stored as CSR or BSR.

    The kept entries of ``weight`` (where ``mask`` is True, including kept entries that happen to be zero;
    everything else counts as zero) are stored in three buffers: ``crow_indices``, ``col_indices`` (int32)
    and ``values``, so the module deep-copies, moves with ``.to()`` and saves with ``state_dict()``.

    Args:
        weight: Dense ``(out, in)`` matrix.
        bias: ``(out,)`` or ``None``.
        mask: Bool ``(out, in)`` keep-mask (default: ``weight != 0``).
        layout: ``"csr"`` or ``"bsr"`` (square ``blocksize`` blocks; both dimensions must divide).
        blocksize: BSR block edge.
        kernel: ``"c"`` (the compiled CSR kernel of :mod:`lightning_pai.ckernels`: float32 CSR on the CPU with
            int32 indices, when :func:`lightning_pai.ckernels.available`), ``"sum"``
            (``torch.sparse.mm(W, x^T, "sum")``, CSR on CPU only) or ``"mm"`` (``torch.addmm``; MKL on CPU,
            cuSPARSE on CUDA).
        contiguous_outputs: Return contiguous outputs (one extra transpose copy) instead of transposed views.
        activation: ``None`` or ``"relu"``: applied to the output (by the ``"c"`` kernel in the same pass), so
            ``nn.Sequential(layer, nn.ReLU())`` becomes one module.

    Raises:
        ValueError: If ``layout``/``kernel`` are unknown or incompatible, or the BSR block does not divide.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        layout: str = "csr",
        blocksize: int = 4,
        kernel: str = "sum",
        contiguous_outputs: bool = False,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
        if kernel not in KERNELS[1:]:
            raise ValueError(f"`kernel` must be one of {KERNELS[1:]}, got {kernel!r}.")
        if kernel == "sum" and (layout != "csr" or weight.device.type != "cpu"):
            raise ValueError("`kernel='sum'` needs the CSR layout on the CPU; use kernel='mm'.")
        if kernel == "c" and not _c_usable(layout, weight.device, weight.dtype):
            raise ValueError(
                "`kernel='c'` needs a float32 CSR weight on the CPU and a C compiler (lightning_pai.ckernels."
                "available() is False here, or the layout/dtype/device differ); use kernel='sum' or 'mm'."
            )
        if activation not in (None, *FUSABLE.values()):
            raise ValueError(f"`activation` must be None or one of {tuple(FUSABLE.values())}, got {activation!r}.")
        self.activation = activation
        weight = weight.detach()
        mask = (weight != 0) if mask is None else mask.to(device=weight.device, dtype=torch.bool)
        self.out_features, self.in_features = weight.shape
        self.layout, self.blocksize, self.kernel = layout, blocksize, kernel
        self.contiguous_outputs = contiguous_outputs
        if layout == "csr":
            rows, cols = mask.nonzero(as_tuple=True)  # row-major order, as CSR needs
            counts = torch.bincount(rows, minlength=self.out_features)
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            values = weight[rows, cols]
        else:
            if self.out_features % blocksize or self.in_features % blocksize:
                raise ValueError(
                    f"{blocksize}x{blocksize} BSR blocks do not tile a {self.out_features}x{self.in_features} matrix."
                )
            bsr = weight.masked_fill(~mask, 0).to_sparse_bsr((blocksize, blocksize))
            crow, cols, values = bsr.crow_indices(), bsr.col_indices(), bsr.values()
        index_dtype = torch.int32 if max(weight.shape) < 2**31 and values.shape[0] < 2**31 else torch.int64
        if kernel == "c" and index_dtype != torch.int32:
            raise ValueError("`kernel='c'` needs fewer than 2**31 stored weights; use kernel='sum'.")
        self.register_buffer("crow_indices", crow.to(index_dtype).contiguous())
        self.register_buffer("col_indices", cols.to(index_dtype).contiguous())
        self.register_buffer("values", values.contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().unsqueeze(1))
        self._cache: tuple[tuple, Tensor] | None = None
        self._c_plan: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # sparse tensors and the compiled kernel's plan (raw pointers) cannot be copied; rebuilt on the next call
        state["_cache"] = state["_c_plan"] = None
        return state

    @property
    def nnz(self) -> int:
        """Number of stored weights (for BSR: every entry of every stored block)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Stored fraction of the matrix, ``nnz / (out * in)``."""
        return self.nnz / max(1, self.out_features * self.in_features)

    def sparse_weight(self) -> Tensor:
        """``W`` as a ``torch.sparse_csr`` / ``torch.sparse_bsr`` tensor over the buffers (cached)."""
        # The sparse tensor aliases the buffers, so in-place edits (``load_state_dict``) show through; a
        # replaced buffer (``.to()``, ``.double()``) is another object and triggers a rebuild.
        buffers = self._buffers
        crow, col, values = buffers["crow_indices"], buffers["col_indices"], buffers["values"]
        cache = self._cache
        if cache is None or cache[0][0] is not values or cache[0][1] is not crow or cache[0][2] is not col:
            make = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
            size = (self.out_features, self.in_features)
            cache = self._cache = ((values, crow, col), make(crow, col, values, size, check_invariants=False))
        return cache[1]

    def matmul_t(self, xt: Tensor, kernel: str | None = None) -> Tensor:
        """``act(W @ xt + b)`` for an ``(in, cols)`` input with contiguous rows; returns ``(out, cols)``.

        ``kernel``: what :meth:`_kernel_for` returned for this input, if the caller asked already.
        """
        buffers = self._buffers
        bias = buffers["bias"]
        kernel = kernel or self._kernel_for(xt)
        if kernel == "c":
            return ckernels.csr_apply(self._plan(), xt if xt.stride(1) == 1 else xt.contiguous())
        w = self.sparse_weight()
        if not xt.is_contiguous():
            xt = xt.contiguous()
        if kernel == "sum":
            y = torch.sparse.mm(w, xt, "sum")
            y = y if bias is None else y.add_(bias)
        else:
            y = torch.mm(w, xt) if bias is None else torch.addmm(bias, w, xt)
        return y if self.activation is None else y.relu_()

    def _kernel_for(self, x: Tensor) -> str:
        """The kernel for input ``x``: ``self.kernel``, or PyTorch's where the ``"c"`` kernel does not apply.

        A ``"c"`` layer whose input or buffers are no longer float32 CPU tensors (after ``.double()``,
        ``.to("cuda")``) falls back to ``"sum"`` on the CPU and ``"mm"`` elsewhere.
        """
        if self.kernel != "c":
            return self.kernel
        if x.dtype == torch.float32 and x.device.type == "cpu" and self._plan() is not None:
            return "c"
        return "sum" if self._buffers["values"].device.type == "cpu" else "mm"

    def _plan(self) -> ckernels.CsrPlan | None:
        """The compiled kernel's prepared weight, or ``None`` once the buffers are not float32 CPU tensors.

        Rebuilt when a buffer is replaced (``.to()``, ``.double()``) or the activation changes; in-place edits
        (``load_state_dict``) keep the buffers and so the plan's pointers.
        """
        buffers = self._buffers
        values, crow, col, bias = buffers["values"], buffers["crow_indices"], buffers["col_indices"], buffers["bias"]
        cached = self._c_plan
        if (
            cached is not None
            and cached[0] is values
            and cached[1] is crow
            and cached[2] is col
            and cached[3] is bias
            and cached[4] == self.activation
        ):
            return cached[5]
        plan = None
        usable = values.dtype == torch.float32 and crow.dtype == col.dtype == torch.int32
        usable = usable and values.is_contiguous() and crow.is_contiguous() and col.is_contiguous()
        if usable and values.device.type == "cpu" and (bias is None or bias.dtype == torch.float32):
            flat_bias = None if bias is None else bias.view(-1)
            plan = ckernels.CsrPlan(crow, col, values, flat_bias, self.in_features, self.activation)
        self._c_plan = (values, crow, col, bias, self.activation, plan)
        return plan

    def matvec(self, x: Tensor) -> Tensor:
        """``act(W @ x + b)`` for one ``(in,)`` vector: ``torch.addmv`` (the fastest here for every kernel)."""
        w, bias = self.sparse_weight(), self._buffers["bias"]
        y = torch.mv(w, x) if bias is None else torch.addmv(bias.view(-1), w, x)
        return y if self.activation is None else y.relu_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
            f"kernel={self.kernel}, density={self.density:.4f}, bias={self.bias is not None}"
            + ("" if self.activation is None else f", activation={self.activation}")
        )


class SparseLinear(SparseMatmul):
    """Inference-only sparse ``nn.Linear``: ``y = x W^T + b`` for inputs ``(..., in)``, as ``(W x^T)^T``.

    Built from an ``nn.Linear`` (``weight`` ``(out, in)``) or a ``Conv1D`` (``weight`` ``(in, out)``, pass its
    transpose). See :class:`SparseMatmul` for the arguments.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x, self)
        lead = x.shape[:-1]
        if x.numel() == self.in_features and (self.layout == "csr" or x.device.type == "cpu"):
            # one row: sparse matrix-vector product, no transposes
            return self.matvec(x.reshape(self.in_features)).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        xt = x2.t()
        kernel = self._kernel_for(x2)
        if not xt.is_contiguous():  # free when x is the transposed output of another sparse layer
            xt = ckernels.transpose(x2) if kernel == "c" and x2.stride(1) == 1 else xt.contiguous()
        y = self.matmul_t(xt, kernel).t().reshape(*lead, self.out_features)
        return y.contiguous() if self.contiguous_outputs else y


class SparseConv1x1(SparseMatmul):
    """Inference-only sparse 1x1 ``nn.Conv2d`` (stride 1, no padding, one group): ``y[n,:,h,w] = W x[n,:,h,w] + b``.

    Computed as ``W @ X`` with ``X`` the ``(C_in, N*H*W)`` matrix of the input's pixels (a copy when ``N > 1``);
    the output is a permuted view of the ``(C_out, N, H, W)`` result. See :class:`SparseMatmul`.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x, self)
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        n, c, h, w = x.shape
        xt = x.reshape(c, h * w) if n == 1 else x.reshape(n, c, h * w).transpose(0, 1).reshape(c, n * h * w)
        y = self.matmul_t(xt.contiguous()).view(self.out_features, n, h, w).permute(1, 0, 2, 3)
        return y.contiguous() if self.contiguous_outputs else y


class SparseConv2d(SparseMatmul):
    """Inference-only sparse ``nn.Conv2d`` by direct sparse convolution.

    Park et al. 2017, "Faster CNNs with Direct Sparse Convolutions and Guided Pruning" (ICLR):
    ``y[n, o, i, j] = b[o] + sum over kept (c, u, v) of W[o, c, u, v] x_p[n, c, s_h i + d_h u, s_w j + d_w v]``
    with ``x_p`` the zero-padded input, for any kernel size, stride, zero padding and dilation (one group). The
    kept weights are stored as CSR rows of the ``(out, in x kh x kw)`` matrix. For a stride-1 convolution each
    kept tap reads a contiguous run of the flattened padded input, shifted by ``c H_p W_p + d_h u W_p + d_w v``,
    so every output channel is a sum of shifted rows (computed by :func:`lightning_pai.ckernels.sparse_conv` on
    an output grid ``W_p`` wide, whose extra columns are dropped); a stride-``s`` convolution first splits the
    padded input into ``s_h x s_w`` phase planes ``x_p[c, s_h i + a, s_w j + b]``, after which it is a stride-1
    convolution over them. A 1x1 kernel reads the strided input directly. Only the grid's first ``W_out``
    columns are written out: the output is an ordinary contiguous ``(n, out, H_out, W_out)`` tensor.

    Needs the compiled kernels (float32, CPU); after ``.double()`` or a move to another device the module
    computes ``F.conv2d`` with its weight rebuilt dense.

    Args:
        weight: Dense ``(out, in, kh, kw)`` weight.
        bias: ``(out,)`` or ``None``.
        mask: Bool keep-mask of ``weight``'s shape (default: ``weight != 0``).
        stride: ``(s_h, s_w)``.
        padding: Zero padding ``(left, right, top, bottom)`` (``F.pad`` order).
        dilation: ``(d_h, d_w)``.
        activation: ``None`` or ``"relu"``, applied in the output pass.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        dilation: tuple[int, int] = (1, 1),
        activation: str | None = None,
    ) -> None:
        flat_mask = None if mask is None else mask.reshape(weight.shape[0], -1)
        super().__init__(weight.reshape(weight.shape[0], -1), bias, flat_mask, kernel="c", activation=activation)
        self.in_channels, self.kernel_size = weight.shape[1], tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self._offsets: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: Tensor | None = None, activation: str | None = None) -> SparseConv2d:
        """The sparse equivalent of ``conv`` (one group, ``padding_mode="zeros"``) keeping ``mask``'s weights."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("SparseConv2d needs `groups=1` and `padding_mode='zeros'`.")
        pad = tuple(conv._reversed_padding_repeated_twice) if conv.padding != "valid" else (0, 0, 0, 0)
        return cls(
            conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), mask,
            stride=conv.stride, padding=pad, dilation=conv.dilation, activation=activation,
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_offsets"] = None
        return state

    def _tap_offsets(self, planes_h: int, planes_w: int, phases: tuple[int, int]) -> Tensor:
        """int32 start of each kept weight's input run in an image's (phase) planes of ``planes_h x planes_w``."""
        col = self._buffers["col_indices"]
        key = (planes_h, planes_w, phases)
        if self._offsets is not None and self._offsets[0] == key and self._offsets[1] is col:
            return self._offsets[2]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, phases, self.dilation
        col64 = col.long()
        channel, tap = col64 // (kh * kw), col64 % (kh * kw)
        ry, rx = (tap // kw) * dh, (tap % kw) * dw
        plane = ((channel * sh + ry % sh) * sw + rx % sw) * (planes_h * planes_w)
        offsets = plane + (ry // sh) * planes_w + rx // sw
        if offsets.numel() and int(offsets.max()) >= 2**31:
            raise ValueError("SparseConv2d: an input this large overflows the kernel's int32 offsets.")
        offsets = offsets.to(torch.int32)
        self._offsets = (key, col, offsets)
        return offsets

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x, self)
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        bias = self._buffers["bias"]
        b = None if bias is None else bias.view(-1)
        if self._kernel_for(x) != "c":
            w = self.sparse_weight().to_dense().view(self.out_features, self.in_channels, *self.kernel_size)
            y = F.conv2d(F.pad(x, self.padding), w, b, self.stride, 0, self.dilation)
            return y if self.activation is None else y.relu_()
        n, c, h, w_in = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.padding
        out_h = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (w_in + left + right - dw * (kw - 1) - 1) // sw + 1
        if c != self.in_channels or out_h < 1 or out_w < 1:
            raise RuntimeError(
                f"SparseConv2d: input of shape {tuple(x.shape)} for {self.in_channels} channels, kernel "
                f"{self.kernel_size}, padding {self.padding}: expected more channels/pixels."
            )
        if kh == kw == 1:  # a 1x1 kernel reads every s-th pixel: one plane, no phases
            planes_h, planes_w, phases = out_h, out_w, (1, 1)
        else:
            planes_h, planes_w, phases = out_h + dh * (kh - 1) // sh, out_w + dw * (kw - 1) // sw, (sh, sw)
        if x.stride(3) != 1 or x.stride(0) != c * x.stride(1):
            x = x.contiguous()
        planes = ckernels.phase_planes(x, (top, left), (sh, sw), phases, (planes_h, planes_w))
        offsets = self._tap_offsets(planes_h, planes_w, phases)
        crow, values = self._buffers["crow_indices"], self._buffers["values"]
        return ckernels.sparse_conv(crow, offsets, values, b, planes, (out_h, out_w), planes_w, self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, density={self.density:.4f}, "
            f"bias={self.bias is not None}" + ("" if self.activation is None else f", activation={self.activation}")
        )


class TransposedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that keeps the transposed layout sparse layers produce.

    The output of a sparse layer is the transposed view ``(Y^T)^T``; ``nn.LayerNorm`` would copy it to
    contiguous memory, and the next sparse layer would transpose it back. For a float32 CPU input whose
    ``(-1, features)`` matrix is such a view, this module normalises ``Y^T`` directly with the compiled
    :func:`lightning_pai.ckernels.layer_norm_t` (same formula as PyTorch: biased variance, ``eps`` inside the
    square root) and returns a view of the same layout; any other input goes to ``nn.LayerNorm.forward``.
    :func:`to_sparse_inference` swaps it in for the ``nn.LayerNorm`` modules (1-D ``normalized_shape``) of a
    model whose sparse layers use the ``"c"`` kernel; parameters and ``state_dict`` keys are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        (features,) = self.normalized_shape
        params = [p for p in (self.weight, self.bias) if p is not None]
        tracked = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if (
            not tracked
            and x.dim() >= 2
            and x.stride(-1) != 1
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
            and ckernels.available()
        ):
            xt = x.reshape(-1, features).t()
            if xt.stride(1) == 1:
                return ckernels.layer_norm_t(xt, self.weight, self.bias, self.eps).t().reshape(x.shape)
        return super().forward(x)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> TransposedLayerNorm:
        """A :class:`TransposedLayerNorm` sharing ``norm``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__ = norm.__dict__.copy()
        new._parameters = dict(norm._parameters)
        new._buffers = dict(norm._buffers)
        new._modules = dict(norm._modules)
        return new


class SemiStructuredLinear(nn.Module):
    """Inference-only 2:4 sparse linear layer on CUDA (``torch.sparse.to_sparse_semi_structured``).

    ``y = cast(x, dtype) W_{2:4}^T + b`` cast back to the input's dtype: the weight is stored compressed in
    ``dtype`` (float16 or bfloat16, what the sparse tensor cores take), so results match the dense float32
    layer to ``dtype`` precision. The compressed weight is not a buffer: build this module on its final device.

    Args:
        weight: Dense ``(out, in)`` CUDA matrix, 2:4 sparse along ``in``.
        bias: ``(out,)`` or ``None``.
        dtype: ``torch.float16`` or ``torch.bfloat16``.

    Raises:
        RuntimeError: From PyTorch, if the device, dtype or shape is not supported (dimensions must be multiples
            of the backend's block, 16 to 64).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.weight_2to4 = to_sparse_semi_structured(weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("A SemiStructuredLinear cannot be copied or pickled; convert the dense model again.")

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x, self)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        y = F.linear(x2, self.weight_2to4, self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, 2:4"


# ----------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], Any], device: torch.device, budget_s: float) -> float:
    """Fastest of as many ``fn()`` calls as fit in ``budget_s`` (3 to 25, after one warm-up call), in seconds.

    The minimum, not the median: other processes on the machine only ever add time.
    """
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    best = math.inf
    for _ in range(max(3, min(25, int(budget_s / max(first, 1e-6)) - 1))):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _measured(
    key: tuple,
    dense: Callable[[], Any],
    sparse_at: Callable[[float], Callable[[], Any]],
    device: torch.device,
    budget_s: float,
) -> float:
    """Crossover density from timing ``dense()`` and ``sparse_at(d)()`` at the probe densities (cached by key).

    Fits ``t_sparse(d) = a + c d`` through the two probes and returns ``d* = (t_dense - a) / c`` in ``[0, 1]``.
    """
    key = (*key, torch.get_num_threads())
    if key in _CROSSOVER_CACHE:
        return _CROSSOVER_CACHE[key]
    with torch.inference_mode():
        t_dense = _best_time(dense, device, budget_s / 3)
        t_sparse = [_best_time(sparse_at(d), device, budget_s / 3) for d in _PROBE_DENSITIES]
    (d0, d1), (t0, t1) = _PROBE_DENSITIES, t_sparse
    slope = (t1 - t0) / (d1 - d0)
    if slope <= 0:  # timing noise swamped the nnz dependence
        crossover = 1.0 if t1 < t_dense else 0.0
    else:
        crossover = min(1.0, max(0.0, d0 + (t_dense - t0) / slope))
    _CROSSOVER_CACHE[key] = crossover
    return crossover


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
    and thread count, so each distinct case is measured once per process (in about ``budget_s`` seconds).

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
    device = torch.device(device)
    kernel = _resolve_kernel(kernel, layout, device, rows, dtype)
    key = (out_features, in_features, rows, layout, blocksize, kernel, dtype, str(device), transposed_input)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    if transposed_input:
        x = x.t().contiguous().t()
    w = torch.randn(out_features, in_features, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(out_features, generator=gen).to(device=device, dtype=dtype)

    def sparse_at(d: float) -> Callable[[], Any]:
        if layout == "bsr":
            blocks = torch.rand(out_features // blocksize, in_features // blocksize, generator=gen) < d
            mask = blocks.repeat_interleave(blocksize, 0).repeat_interleave(blocksize, 1)
        else:
            mask = torch.rand(out_features, in_features, generator=gen) < d
        layer = SparseLinear(w, b, mask.to(device), layout=layout, blocksize=blocksize, kernel=kernel)
        return lambda: layer(x)

    return _measured(key, lambda: F.linear(x, w, b), sparse_at, device, budget_s)


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
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*input_size, generator=gen).to(w)

    def sparse_at(d: float) -> Callable[[], Any]:
        layer = SparseConv2d.from_conv(conv, torch.rand(w.shape, generator=gen) < d)
        return lambda: layer(x)

    return _measured(key, lambda: conv(x), sparse_at, w.device, budget_s)


def clear_crossover_cache() -> None:
    """Forget every crossover :func:`measure_crossover` measured (e.g. after the machine's load changed)."""
    _CROSSOVER_CACHE.clear()


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
        reason: Why (``"density 0.100 < crossover 0.420 (measured)"``, ``"stride (2, 2)"``, ...).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float
    converted: bool
    implementation: str
    reason: str


@dataclass(frozen=True)
class ConversionReport:
    """Per-layer outcome of :func:`to_sparse_inference`; ``str()`` gives a markdown table."""

    rows: list[LayerConversion]

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
    found = _in_sequential(model, name)
    if found is None:
        return False
    parent_name, parent, keys, position = found
    replaced = dict(replacements)
    for key in reversed(keys[:position]):
        if isinstance(parent._modules[key], _ELEMENTWISE):
            continue
        return isinstance(replaced.get(f"{parent_name}.{key}" if parent_name else key), SparseLinear)
    return False


def _input_shapes(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """Shape of the first input each module receives when ``model`` runs ``example_inputs`` (in eval mode)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _conv_probe_size(conv: nn.Conv2d, seen: tuple[int, ...] | None) -> tuple[int, int, int, int]:
    """Input size at which to time ``conv``: what ``example_inputs`` gave it (at most 8 images), else 32x32."""
    if seen is not None and len(seen) in (3, 4):
        n, (c, h, w) = (seen[0] if len(seen) == 4 else 1), seen[-3:]
        return min(n, _CONV_PROBE_BATCH), c, h, w
    reach = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return 1, conv.in_channels, max(_CONV_PROBE_HW, reach[0]), max(_CONV_PROBE_HW, reach[1])


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
    contiguous_outputs: bool = False,
    fuse: bool = True,
    example_inputs: Any = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace each sparse enough layer by an inference-only sparse equivalent.

    A supported layer (see the module docstring: ``nn.Linear``, ``Conv1D``, ``nn.Conv2d``) with density ``d``
    (fraction of weights kept, ``1 - sparsity``) is converted when ``d < crossover``; its output equals the
    masked dense layer's up to float rounding (summation order). With ``crossover=None`` the crossover is
    measured on this machine for each distinct layer shape and input size (:func:`measure_crossover` at
    ``batch_size`` rows or each layer's rows in ``example_inputs``, with the input layout a chain of sparse
    layers gives it; :func:`measure_conv_crossover` for convolutions; cached; well under a second per shape).
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
            with at least one zero weight. ``None`` measures it.
        layout: ``"csr"`` or ``"bsr"`` (``blocksize`` square blocks; the density compared is then the fraction
            stored in nonzero blocks). CSR is the faster for unstructured masks.
        blocksize: BSR block edge.
        kernel: ``"auto"`` (CPU float32 CSR: ``"c"`` when :func:`lightning_pai.ckernels.available`, else
            ``"sum"`` from 16 rows of ``batch_size`` and ``"mm"`` below; CUDA or BSR: ``"mm"``), ``"c"``,
            ``"sum"`` or ``"mm"`` (see :class:`SparseMatmul`).
        batch_size: Expected rows per call (batch; batch x sequence for token inputs; batch x H x W for 1x1
            convs), used to pick the kernel and to measure the crossover.
        semi_structured: Use 2:4 semi-structured sparsity for exact 2:4 masks on CUDA.
        contiguous_outputs: Make sparse layers return contiguous tensors (costs a copy per layer).
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
    inputs = {} if example_inputs is None else _input_shapes(out, example_inputs)
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
                "convolutions other than 1x1 stride-1 need the compiled kernels (lightning_pai.ckernels: "
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
        chained = kind != "Conv2d" and not contiguous_outputs and _follows_sparse_matmul(out, name, replacements)
        if crossover is not None:
            threshold, source = crossover, "given"
        elif kind == "Conv2d":
            size = _conv_probe_size(module, seen)
            threshold = measure_conv_crossover(module, size)
            source = "measured on " + "x".join(map(str, size))
        else:
            threshold = measure_crossover(
                w.shape[0], w.shape[1], matmul_rows, layout=layout, blocksize=blocksize, kernel=kernel,
                dtype=w.dtype, device=w.device, transposed_input=chained,
            )  # fmt: skip
            source = f"measured at {matmul_rows} rows" + (", chained" if chained else "")
        if not stored < threshold:
            why = f"{reason_24}density {stored:.3f} >= crossover {threshold:.3f} ({source})"
            rows.append(LayerConversion(name, kind, shape, stored, False, "dense", why))
            continue
        activation = _fused_activation(out, name) if fuse else None
        if kind == "Conv2d":
            new, impl = SparseConv2d.from_conv(module, mask, activation), "direct/c"
        else:
            chosen = _resolve_kernel(kernel, layout, w.device, matmul_rows, w.dtype)
            cls = SparseConv1x1 if kind == "Conv2d 1x1" else SparseLinear
            new = cls(
                w, bias, m, layout=layout, blocksize=blocksize, kernel=chosen, contiguous_outputs=contiguous_outputs,
                activation=activation,
            )  # fmt: skip
            impl = f"{layout}{blocksize if layout == 'bsr' else ''}/{chosen}"
        impl += f"+{activation}" if activation else ""
        why = f"{reason_24}density {stored:.3f} < crossover {threshold:.3f} ({source})"
        rows.append(LayerConversion(name, kind, shape, stored, True, impl, why))
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
    out.sparse_conversion = ConversionReport(rows)
    return out


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
    "FUSABLE",
    "KERNELS",
    "LAYOUTS",
    "ConversionReport",
    "LayerConversion",
    "SemiStructuredLinear",
    "SparseConv1x1",
    "SparseConv2d",
    "SparseLinear",
    "SparseMatmul",
    "TransposedLayerNorm",
    "clear_crossover_cache",
    "conversion_report",
    "is_two_four",
    "measure_conv_crossover",
    "measure_crossover",
    "to_sparse_inference",
]
