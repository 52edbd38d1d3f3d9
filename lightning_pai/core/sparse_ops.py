"""Truly sparse training of a linear layer: ``Y = X Wᵀ + b`` with ``W`` in CSR, as ``torch.library`` custom ops.

Only the kept entries of ``W`` exist (its CSR ``values``) and only they are trained (Liu, Mocanu et al. 2020,
"Sparse evolutionary deep learning with over one million artificial neurons on commodity hardware",
Neural Computing and Applications 33:2589): for an input ``X`` of ``n`` rows, a layer costs three products of
``O(nnz * n)`` instead of ``O(out * in * n)``::

    Yᵀ  = W  Xᵀ            (forward; sparse x dense, the CSR of W)
    dXᵀ = Wᵀ dYᵀ           (backward to the input; the CSR of Wᵀ: W's values permuted, structure precomputed)
    dW  = (dYᵀ X) ⊙ S      (backward to the weights, sampled at the kept positions S only: an SDDMM)

The ops:

- ``lightning_pai::sparse_linear(x, values, crow, col, t_crow, t_col, t_perm, bias, in_features)``: the layer's
  output, with an autograd formula (``torch.library.register_autograd``) that calls
- ``lightning_pai::sparse_linear_backward(grad, x, values, crow, col, t_crow, t_col, t_perm, in_features,
  input_grad, bias_grad)``: ``(dX, d values, d bias)``.

Both have fake (meta) implementations, so ``torch.compile`` records each as one node; eager calls of
:func:`sparse_linear` run the same computations in an ``autograd.Function`` (no dispatcher overhead). Their
two products, :func:`csr_mm_t` (CSR times a dense matrix) and :func:`csr_sddmm` (a dense product sampled at the CSR's
positions), and the transpose of a batch-major input are looked up per device type in :data:`KERNELS`: on the CPU
the compiled kernels of :mod:`lightning_pai.core.kernels` (float32, int32 indices; :func:`compiled_cpu_kernels`),
elsewhere and for other dtypes PyTorch's own (``torch.sparse.mm(..., "sum")`` on the CPU, cuSPARSE through
``torch.mm`` elsewhere, and ``torch.sparse.sampled_addmm``); other kernels are registered with
:func:`register_sparse_kernels`.

Activations are kept feature-major where it is free: ``Y`` is returned as the transpose of the contiguous
``(out, n)`` product, so the next sparse layer reads ``Xᵀ`` without a copy and ``dY`` usually arrives with
``dYᵀ`` contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_pai.core import kernels as compiled


# ------------------------------------------------------------------------------------------------ kernels
def csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """The ``torch.sparse_csr`` tensor over the given buffers (no copy, no invariant check)."""
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def torch_csr_mm_t(
    crow: Tensor, col: Tensor, values: Tensor, dense_t: Tensor, cols: int, bias: Tensor | None = None
) -> Tensor:
    """``W @ dense_t (+ bias[:, None])`` for the ``(rows, cols)`` CSR ``W`` and a contiguous ``(cols, n)`` matrix.

    PyTorch's CSR kernels: the row-parallel ``"sum"`` reduction on the CPU (several times faster there than the
    MKL product for the shapes of a training batch), ``torch.mm`` (cuSPARSE) on other devices.

    Returns:
        ``(rows, n)``, contiguous.
    """
    weight = csr(crow, col, values, (crow.numel() - 1, cols))
    out = torch.sparse.mm(weight, dense_t, "sum") if dense_t.device.type == "cpu" else torch.mm(weight, dense_t)
    return out if bias is None else out.add_(bias.unsqueeze(1))


def torch_csr_sddmm(crow: Tensor, col: Tensor, values: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)`` at the kept positions of the CSR structure, in its order: ``(nnz,)``.

    Args:
        crow: Row offsets of the CSR structure of a ``(rows, cols)`` matrix.
        col: Its column indices.
        values: Its values (only their dtype and device are used).
        a: ``(rows, n)``.
        b: ``(n, cols)`` (column-major, i.e. ``bᵀ`` contiguous, is the fast case on the CPU).
    """
    if a.device.type == "cpu" and a.dtype not in (torch.float32, torch.float64):  # no CPU kernel: in float32
        return torch_csr_sddmm(crow, col, values.float(), a.float(), b.float()).to(a.dtype)
    pattern = csr(crow, col, values, (a.shape[0], b.shape[1]))
    return torch.sparse.sampled_addmm(pattern, a, b, beta=0.0).values()


def torch_transpose(x: Tensor) -> Tensor:
    """``x.t()`` made contiguous (PyTorch's strided copy)."""
    return x.t().contiguous()


@dataclass(frozen=True)
class SparseKernels:
    """The products of a sparse layer on one device type (see :func:`register_sparse_kernels`).

    Attributes:
        mm_t: ``fn(crow, col, values, dense_t, cols, bias=None) -> W @ dense_t (+ bias[:, None])`` (``(rows, n)``,
            contiguous), see :func:`torch_csr_mm_t`.
        sddmm: ``fn(crow, col, values, a, b) -> (a @ b)[kept]`` (``(nnz,)``), see :func:`torch_csr_sddmm`.
        transpose: ``fn(x) -> x.t().contiguous()`` for a 2-D ``x`` with contiguous rows (a batch-major input made
            feature-major), see :func:`torch_transpose`.
    """

    mm_t: Callable[..., Tensor]
    sddmm: Callable[..., Tensor]
    transpose: Callable[[Tensor], Tensor] = torch_transpose


#: The products by device type (``"cpu"``, ``"cuda"``, ...); ``"default"`` serves every other device. The CPU entry
#: is filled at first use: the compiled kernels of :mod:`lightning_pai.core.kernels` when they are available
#: (:func:`compiled_cpu_kernels`), else PyTorch's.
KERNELS: dict[str, SparseKernels] = {"default": SparseKernels(torch_csr_mm_t, torch_csr_sddmm)}


def register_sparse_kernels(
    device_type: str,
    mm_t: Callable[..., Tensor],
    sddmm: Callable[..., Tensor],
    transpose: Callable[[Tensor], Tensor] = torch_transpose,
) -> None:
    """Use other kernels for the sparse layers' products on ``device_type`` (e.g. ``"cuda"``).

    They keep the signatures of :func:`torch_csr_mm_t`, :func:`torch_csr_sddmm` and :func:`torch_transpose`; the
    ops, their autograd formula and the modules are unchanged.
    """
    KERNELS[device_type] = SparseKernels(mm_t, sddmm, transpose)


def compiled_cpu_kernels() -> SparseKernels:
    """The CPU products on the compiled kernels of :mod:`lightning_pai.core.kernels` (PyTorch's where they cannot).

    The compiled kernels take float32 values with int32 indices (the structure :func:`~lightning_pai.core.
    sparse_train.csr_structure` builds below 2³¹ entries): a row-tiled ``W Xᵀ`` with the bias added in the same
    pass (no zero-filled output), a four-at-a-time SDDMM, and a blocked transpose. Other dtypes (float64 for
    ``gradcheck``, bfloat16) and int64 structures go to PyTorch's kernels. Without a C compiler (or with
    ``LIGHTNING_PAI_NO_CKERNELS=1``) every product is PyTorch's.
    """
    if not compiled.available():
        return KERNELS["default"]

    def fits(values: Tensor, crow: Tensor, *dense: Tensor) -> bool:
        return (
            values.dtype == torch.float32
            and crow.dtype == torch.int32
            and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in dense)
        )

    def mm_t(crow: Tensor, col: Tensor, values: Tensor, dense_t: Tensor, cols: int, bias: Tensor | None = None):
        if fits(values, crow, dense_t) and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())):
            return compiled.csr_matmul_t(crow, col, values.contiguous(), bias, dense_t)
        return torch_csr_mm_t(crow, col, values, dense_t, cols, bias)

    def sddmm(crow: Tensor, col: Tensor, values: Tensor, a: Tensor, b: Tensor) -> Tensor:
        bt = b.t()
        if fits(values, crow, a, bt):
            return compiled.csr_sddmm(crow, col, a, bt)
        return torch_csr_sddmm(crow, col, values, a, b)

    def transpose(x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and x.stride(1) == 1:
            return compiled.transpose(x)
        return torch_transpose(x)

    return SparseKernels(mm_t, sddmm, transpose)


def _kernels(t: Tensor) -> SparseKernels:
    device = t.device.type
    kernels = KERNELS.get(device)
    if kernels is None:
        if device != "cpu":
            return KERNELS["default"]
        kernels = KERNELS["cpu"] = compiled_cpu_kernels()
    return kernels


def csr_mm_t(
    crow: Tensor, col: Tensor, values: Tensor, dense_t: Tensor, cols: int, bias: Tensor | None = None
) -> Tensor:
    """``W @ dense_t (+ bias[:, None])`` with the registered kernel of the device (``dense_t`` made contiguous)."""
    dense_t = dense_t if dense_t.is_contiguous() else dense_t.contiguous()
    return _kernels(values).mm_t(crow, col, values, dense_t, cols, bias)


def csr_sddmm(crow: Tensor, col: Tensor, values: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)`` sampled at the CSR's positions with the registered kernel of the device."""
    return _kernels(values).sddmm(crow, col, values, a, b)


# ---------------------------------------------------------------------------------------------- the ops
def _feature_major(x: Tensor, in_features: int) -> Tensor:
    """``x`` as ``(n, in)``, then its transpose ``(in, n)`` made contiguous (free when ``x`` is feature-major)."""
    x = x if x.dim() == 2 else x.reshape(-1, in_features)
    if x.t().is_contiguous():
        return x.t()
    return _kernels(x).transpose(x if x.stride(1) == 1 else x.contiguous())


def forward_impl(
    xt: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, shape: tuple[int, ...]
) -> Tensor:
    """``x @ Wᵀ + bias`` from ``xt``, the contiguous ``(in, n)`` transpose of ``x`` (of shape ``shape``).

    Returns:
        ``(*shape[:-1], out)``, feature-major (the transpose of a contiguous array).
    """
    yt = csr_mm_t(crow, col, values, xt, xt.shape[0], bias)
    return yt.t() if len(shape) == 2 else yt.t().reshape(*shape[:-1], yt.shape[0])


def backward_impl(
    grad: Tensor,
    xt: Tensor,
    values: Tensor,
    structure: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    shape: tuple[int, ...],
    input_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``(dX, d values, d bias)``: ``dXᵀ = Wᵀ dYᵀ``, ``d values = (dYᵀ X)`` at the kept positions, ``Σ_rows dY``.

    ``xt`` is the contiguous ``(in, n)`` transpose of the input ``x`` (of shape ``shape``), ``structure``
    ``(crow, col, t_crow, t_col, t_perm)``; grads not asked for are None.
    """
    crow, col, t_crow, t_col, t_perm = structure
    out = crow.numel() - 1
    gt = (grad if grad.dim() == 2 else grad.reshape(-1, out)).t()  # (out, n): contiguous if dY is feature-major
    gt = gt if gt.is_contiguous() else gt.contiguous()
    d_values = csr_sddmm(crow, col, values, gt, xt.t())
    dx = None
    if input_grad:
        dx = csr_mm_t(t_crow, t_col, values[t_perm], gt, out).t()
        dx = dx if len(shape) == 2 else dx.reshape(shape)
    return dx, d_values, gt.sum(1) if bias_grad else None


class _SparseLinear(torch.autograd.Function):
    """The eager path of :func:`sparse_linear`: the same computations without the dispatcher's overhead.

    (About 70 us per layer and step on a CPU, a third of a 300 x 784 layer's whole step at 98 % sparsity.)
    """

    @staticmethod
    def forward(ctx, x, values, crow, col, t_crow, t_col, t_perm, bias, in_features):  # noqa: D102
        xt = _feature_major(x, in_features)  # saved instead of x: the backward pass reads xᵀ
        ctx.save_for_backward(xt, values)
        # the structure is never changed in place (an update replaces the buffers): no version check needed
        ctx.structure, ctx.shape, ctx.has_bias = (crow, col, t_crow, t_col, t_perm), x.shape, bias is not None
        return forward_impl(xt, values, crow, col, bias, x.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        xt, values = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, d_values, db = backward_impl(
            grad, xt, values, ctx.structure, ctx.shape, needs[0], ctx.has_bias and needs[7]
        )
        return dx, d_values if needs[1] else None, None, None, None, None, None, db, None


def sparse_linear(
    x: Tensor,
    values: Tensor,
    crow: Tensor,
    col: Tensor,
    t_crow: Tensor,
    t_col: Tensor,
    t_perm: Tensor,
    bias: Tensor | None,
    in_features: int,
) -> Tensor:
    """``x @ Wᵀ + bias`` for ``W`` given by its CSR ``(crow, col, values)`` of shape ``(out, in_features)``.

    Differentiable in ``x``, ``values`` and ``bias``. ``(t_crow, t_col, t_perm)`` is the CSR structure of ``Wᵀ``
    (its values are ``values[t_perm]``), read by the backward pass. Eager calls run an ``autograd.Function``;
    under ``torch.compile`` the custom op ``lightning_pai::sparse_linear`` (one graph node, same kernels).

    Returns:
        ``(*x.shape[:-1], out)``, feature-major (the transpose of a contiguous array).
    """
    if torch.compiler.is_compiling():
        return sparse_linear_op(x, values, crow, col, t_crow, t_col, t_perm, bias, in_features)
    return _SparseLinear.apply(x, values, crow, col, t_crow, t_col, t_perm, bias, in_features)


@torch.library.custom_op("lightning_pai::sparse_linear", mutates_args=())
def sparse_linear_op(
    x: Tensor,
    values: Tensor,
    crow: Tensor,
    col: Tensor,
    t_crow: Tensor,
    t_col: Tensor,
    t_perm: Tensor,
    bias: Optional[Tensor],  # noqa: UP045  (torch.library reads the annotation at runtime)
    in_features: int,
) -> Tensor:
    """The custom op of :func:`sparse_linear` (its autograd formula calls ``lightning_pai::sparse_linear_backward``)."""
    return forward_impl(_feature_major(x, in_features), values, crow, col, bias, tuple(x.shape)).contiguous()


@sparse_linear_op.register_fake
def _sparse_linear_fake(x, values, crow, col, t_crow, t_col, t_perm, bias, in_features):
    return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))


@torch.library.custom_op("lightning_pai::sparse_linear_backward", mutates_args=())
def sparse_linear_backward_op(
    grad: Tensor,
    x: Tensor,
    values: Tensor,
    crow: Tensor,
    col: Tensor,
    t_crow: Tensor,
    t_col: Tensor,
    t_perm: Tensor,
    in_features: int,
    input_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dX, d values, d bias)`` of ``lightning_pai::sparse_linear`` (empty tensors for grads not asked for)."""
    structure = (crow, col, t_crow, t_col, t_perm)
    xt = _feature_major(x, in_features)
    dx, d_values, db = backward_impl(grad, xt, values, structure, tuple(x.shape), input_grad, bias_grad)
    return (
        dx if dx is not None else x.new_empty(0),
        d_values,
        db if db is not None else values.new_empty(0),
    )


@sparse_linear_backward_op.register_fake
def _sparse_linear_backward_fake(grad, x, values, crow, col, t_crow, t_col, t_perm, in_features, input_grad, bias_grad):
    out = crow.shape[0] - 1
    dx = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    return dx, torch.empty_like(values), values.new_empty(out if bias_grad else 0)


def _setup_context(ctx, inputs, output) -> None:
    x, values, crow, col, t_crow, t_col, t_perm, bias, in_features = inputs
    ctx.save_for_backward(x, values, crow, col, t_crow, t_col, t_perm)
    ctx.in_features, ctx.has_bias = in_features, bias is not None


def _backward(ctx, grad):
    x, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
    needs = ctx.needs_input_grad
    bias_grad = ctx.has_bias and needs[7]
    dx, d_values, db = sparse_linear_backward_op(
        grad, x, values, crow, col, t_crow, t_col, t_perm, ctx.in_features, needs[0], bias_grad
    )
    return (
        dx if needs[0] else None,
        d_values if needs[1] else None,
        None,
        None,
        None,
        None,
        None,
        db if bias_grad else None,
        None,
    )


sparse_linear_op.register_autograd(_backward, setup_context=_setup_context)
