"""The sparse layers' computations, and the same as ``torch.library`` custom ops for ``torch.compile``.

Each computation is a plain function the eager modules call with their cached, prepared weights (no dispatcher
overhead on the eager path, which is what inference latency is made of), and a custom op over the layer's
buffers that ``torch.compile`` (``fullgraph=True`` included) records as one node of the graph:

- ``lightning_pai::sparse_mm_t(crow, col, values, bias, xt, in_features, layout, kernel, activation)``:
  ``act(W @ xt + bias[:, None])`` with ``W`` in CSR/BSR, returning ``(out, n)``;
- ``lightning_pai::sparse_conv2d(x, crow, col, values, bias, in_channels, kernel_size, stride, padding,
  dilation, activation)``: the direct sparse convolution of :class:`~lightning_pai.deploy.SparseConv2d`.

Their fake (meta) implementations give the output's shape and dtype, so the compiler never runs a kernel to
trace. The modules switch to the ops when :func:`torch.compiler.is_compiling` is true.
"""

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pai.core import kernels


def rows_contiguous(xt: Tensor, use_kernels: bool) -> Tensor:
    """``xt`` with contiguous rows (``stride(1) == 1``): itself, a blocked transpose of ``xt.t()``, or a copy."""
    if xt.stride(1) == 1:
        return xt
    if use_kernels and xt.stride(0) == 1 and xt.dtype == torch.float32 and xt.device.type == "cpu":
        return kernels.transpose(xt.t())  # the blocked, threaded transpose beats .contiguous() here
    return xt.contiguous()


def torch_mm_t(weight: Tensor, bias: Tensor | None, xt: Tensor, kernel: str, activation: str | None) -> Tensor:
    """``act(W @ xt + bias[:, None])`` with PyTorch's sparse kernels: ``"sum"`` (``torch.sparse.mm``) or ``"mm"``.

    Args:
        weight: ``(out, in)`` sparse CSR/BSR matrix.
        bias: ``(out,)`` or ``None``.
        xt: ``(in, n)`` input.
        kernel: ``"sum"`` (CSR on the CPU) or ``"mm"`` (``torch.addmm``).
        activation: ``None`` or ``"relu"``.

    Returns:
        The ``(out, n)`` result.
    """
    if not xt.is_contiguous():
        xt = xt.contiguous()
    if kernel == "sum":
        y = torch.sparse.mm(weight, xt, "sum")
        y = y if bias is None else y.add_(bias.unsqueeze(1))
    else:
        y = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
    return y if activation is None else y.relu_()


def sparse_tensor(crow: Tensor, col: Tensor, values: Tensor, layout: str, size: tuple[int, int]) -> Tensor:
    """The ``torch.sparse_csr`` / ``torch.sparse_bsr`` tensor over the given buffers (no copy)."""
    make = torch.sparse_csr_tensor if layout == "csr" else torch.sparse_bsr_tensor
    return make(crow, col, values, size, check_invariants=False)


def tap_offsets(
    col: Tensor,
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    planes: tuple[int, int],
    phases: tuple[int, int],
) -> Tensor:
    """int32 start of each kept weight's input run in an image's (phase) planes of ``planes[0] x planes[1]``.

    A kept weight at column ``c * kh * kw + u * kw + v`` of the flattened ``(out, in * kh * kw)`` matrix reads
    the plane of channel ``c`` and phase ``(d_h u mod s_h, d_w v mod s_w)`` from row ``d_h u div s_h`` and
    column ``d_w v div s_w``.

    Raises:
        ValueError: If an offset overflows int32 (an input too large for the kernel).
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, phases, dilation
    planes_h, planes_w = planes
    col64 = col.long()
    channel, tap = col64 // (kh * kw), col64 % (kh * kw)
    ry, rx = (tap // kw) * dh, (tap % kw) * dw
    plane = ((channel * sh + ry % sh) * sw + rx % sw) * (planes_h * planes_w)
    offsets = plane + (ry // sh) * planes_w + rx // sw
    if offsets.numel() and int(offsets.max()) >= 2**31:
        raise ValueError("SparseConv2d: an input this large overflows the kernel's int32 offsets.")
    return offsets.to(torch.int32)


def conv_output_size(
    size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """``(out_h, out_w)`` of a convolution of an ``(h, w)`` input; ``padding`` in ``F.pad`` order."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = size, kernel_size, stride, dilation
    left, right, top, bottom = padding
    return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1


def direct_conv(
    x: Tensor,
    crow: Tensor,
    values: Tensor,
    bias: Tensor | None,
    geometry: tuple[int, Sequence[int], Sequence[int], Sequence[int], Sequence[int]],
    activation: str | None,
    offsets: Callable[[tuple[int, int], tuple[int, int]], Tensor],
) -> Tensor:
    """Direct sparse convolution of a float32 CPU ``(n, c, h, w)`` input with the compiled kernels.

    Args:
        x: The input.
        crow: ``(out + 1,)`` int32 row offsets of the ``(out, in * kh * kw)`` CSR weight.
        values: Its float32 values.
        bias: ``(out,)`` or ``None``.
        geometry: ``(in_channels, kernel_size, stride, padding (F.pad order), dilation)``.
        activation: ``None`` or ``"relu"``.
        offsets: ``offsets(planes, phases)``: :func:`tap_offsets` for that plane size (a cached one in eager mode).

    Returns:
        The contiguous ``(n, out, out_h, out_w)`` result.

    Raises:
        RuntimeError: If the input has the wrong channel count or is smaller than the kernel.
    """
    in_channels, kernel_size, stride, padding, dilation = geometry
    n, c, h, w_in = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    left, _, top, _ = padding
    out_h, out_w = conv_output_size((h, w_in), kernel_size, stride, padding, dilation)
    if c != in_channels or out_h < 1 or out_w < 1:
        raise RuntimeError(
            f"SparseConv2d: input of shape {tuple(x.shape)} for {in_channels} channels, kernel "
            f"{tuple(kernel_size)}, padding {tuple(padding)}: expected more channels/pixels."
        )
    if kh == kw == 1:  # a 1x1 kernel reads every s-th pixel: one plane, no phases
        planes, phases = (out_h, out_w), (1, 1)
    else:
        planes, phases = (out_h + dh * (kh - 1) // sh, out_w + dw * (kw - 1) // sw), (sh, sw)
    if x.stride(3) != 1 or x.stride(0) != c * x.stride(1):
        x = x.contiguous()
    flat = kernels.phase_planes(x, (top, left), (sh, sw), phases, planes)
    return kernels.sparse_conv(crow, offsets(planes, phases), values, bias, flat, (out_h, out_w), planes[1], activation)


def dense_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str | None,
) -> Tensor:
    """``act(conv2d(pad(x), W) + b)`` with a dense ``W``: the fallback off float32 CPU tensors."""
    y = F.conv2d(F.pad(x, list(padding)), weight, bias, list(stride), 0, list(dilation))
    return y if activation is None else y.relu_()


def _act(activation: str) -> str | None:
    return None if activation == "none" else activation


@torch.library.custom_op("lightning_pai::sparse_mm_t", mutates_args=())
def sparse_mm_t(
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Optional[Tensor],  # noqa: UP045  (torch.library reads the annotation at runtime)
    xt: Tensor,
    in_features: int,
    layout: str,
    kernel: str,
    activation: str,
) -> Tensor:
    """``act(W @ xt + bias[:, None])`` for ``W`` given by its CSR/BSR buffers; ``activation`` ``"none"``/``"relu"``."""
    act = _act(activation)
    rows = crow.shape[0] - 1
    if kernel == "c" and kernels.available() and xt.dtype == torch.float32 and xt.device.type == "cpu":
        plan = kernels.CsrPlan(crow, col, values, bias, in_features, act)
        return kernels.csr_apply(plan, rows_contiguous(xt, True))
    if kernel == "c":
        kernel = "sum" if values.device.type == "cpu" and layout == "csr" else "mm"
    weight = sparse_tensor(crow, col, values, layout, (rows, in_features))
    return torch_mm_t(weight, bias, xt, kernel, act).contiguous()


@sparse_mm_t.register_fake
def _sparse_mm_t_fake(
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    xt: Tensor,
    in_features: int,
    layout: str,
    kernel: str,
    activation: str,
) -> Tensor:
    return xt.new_empty((crow.shape[0] - 1, xt.shape[1]), dtype=values.dtype)


@torch.library.custom_op("lightning_pai::sparse_conv2d", mutates_args=())
def sparse_conv2d(
    x: Tensor,
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    in_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: str,
) -> Tensor:
    """The direct sparse convolution of ``SparseConv2d`` over its buffers (dense ``F.conv2d`` off float32 CPU)."""
    act = _act(activation)
    if kernels.available() and x.dtype == values.dtype == torch.float32 and x.device.type == "cpu":

        def offsets(planes: tuple[int, int], phases: tuple[int, int]) -> Tensor:
            return tap_offsets(col, kernel_size, dilation, planes, phases)

        geometry = (in_channels, kernel_size, stride, padding, dilation)
        return direct_conv(x, crow, values, bias, geometry, act, offsets)
    out = crow.shape[0] - 1
    weight = sparse_tensor(crow, col, values, "csr", (out, in_channels * math.prod(kernel_size))).to_dense()
    return dense_conv(x, weight.view(out, in_channels, *kernel_size), bias, stride, padding, dilation, act)


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(
    x: Tensor,
    crow: Tensor,
    col: Tensor,
    values: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    in_channels: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: str,
) -> Tensor:
    out_h, out_w = conv_output_size(x.shape[-2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], crow.shape[0] - 1, out_h, out_w), dtype=values.dtype)


__all__ = [
    "conv_output_size",
    "dense_conv",
    "direct_conv",
    "rows_contiguous",
    "sparse_conv2d",
    "sparse_mm_t",
    "sparse_tensor",
    "tap_offsets",
    "torch_mm_t",
]
