"""Inference-only sparse layers: the modules :func:`~lightning_pai.deploy.to_sparse_inference` swaps in.

See :mod:`lightning_pai.deploy.convert` for when each is used, the kernels, layouts and fusion.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_pai.core import kernels
from lightning_pai.deploy import ops

#: Sparse layouts :func:`to_sparse_inference` can use for unstructured masks.
LAYOUTS = ("csr", "bsr")
#: Sparse kernels: ``"c"`` = the compiled CSR kernel of :mod:`lightning_pai.core.kernels`, ``"sum"`` =
#: ``torch.sparse.mm(W, x^T, "sum")``, ``"mm"`` = ``torch.addmm(b, W, x^T)``.
KERNELS = ("auto", "c", "sum", "mm")
#: Activations a sparse layer can apply in its own output pass (fused from ``nn.Sequential(layer, nn.ReLU())``).
FUSABLE = {nn.ReLU: "relu"}


class DenseWeightView(torch.Tensor):
    """What a converted layer's ``weight`` attribute returns: the dense weight's shape, dtype and device, no storage.

    Client code reads a layer's ``weight`` for its metadata (Hugging Face T5 compares ``wo.weight.dtype``,
    ViT reads ``projection.weight.dtype``, ``nn.TransformerEncoderLayer`` checks its layers' weights before its
    fused fast path): this tensor answers ``shape``, ``dtype``, ``device``, ``requires_grad`` (False) and
    ``isinstance(..., torch.Tensor)`` without building the dense matrix. Any operation on it (reading values,
    ``F.linear(x, layer.weight)``, ``.clone()``) computes on the dense weight rebuilt from the sparse buffers,
    so a result is never wrong, only dense. Being a tensor subclass, it also turns away PyTorch's fused
    transformer fast path (``has_torch_function``), which would otherwise bypass the sparse layer.
    """

    _layer: SparseMatmul

    @staticmethod
    def __new__(cls, layer: SparseMatmul) -> DenseWeightView:  # noqa: D102
        values = layer._buffers["values"]
        view = torch.Tensor._make_wrapper_subclass(cls, layer.weight_shape, dtype=values.dtype, device=values.device)
        view._layer = layer
        return view

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        layer = self._layer
        return (
            f"DenseWeightView(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"nnz={layer.nnz}: the weight of a {type(layer).__name__}, kept sparse)"
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Overridden (not inherited) so that ``torch.overrides.has_torch_function`` sees it: fused fast paths
        # that would read the weight's memory directly step aside. Results are plain tensors.
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def dense(t: Any) -> Any:
            return t._layer.dense_weight() if isinstance(t, DenseWeightView) else t

        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))


def _check_inference(x: Tensor, module: nn.Module) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(module).__name__} is an inference-only sparse layer and cannot backpropagate: call it under "
            "`torch.no_grad()` / `torch.inference_mode()` or with an input that does not require grad. Train the "
            "dense model (its masks stay in the checkpoint) and convert it again."
        )


def _c_usable(layout: str, device: torch.device, dtype: torch.dtype) -> bool:
    return layout == "csr" and device.type == "cpu" and dtype == torch.float32 and kernels.available()


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
    and ``values``, so the module deep-copies, moves with ``.to()`` and saves with ``state_dict()``. The
    attributes client code reads from the dense layer stay: ``in_features``, ``out_features``, ``bias``
    (``(out,)``) and ``weight``, a :class:`DenseWeightView` (the dense weight's shape, dtype and device,
    materialised only if an operation reads its values).

    Under ``torch.compile`` the layer calls the ``lightning_pai::sparse_mm_t`` custom op
    (:mod:`lightning_pai.deploy.ops`), so ``fullgraph=True`` traces it.

    Args:
        weight: Dense ``(out, in)`` matrix.
        bias: ``(out,)`` or ``None``.
        mask: Bool ``(out, in)`` keep-mask (default: ``weight != 0``).
        layout: ``"csr"`` or ``"bsr"`` (square ``blocksize`` blocks; both dimensions must divide).
        blocksize: BSR block edge.
        kernel: ``"c"`` (the compiled CSR kernel of :mod:`lightning_pai.core.kernels`: float32 CSR on the CPU
            with int32 indices, when :func:`lightning_pai.core.kernels.available`), ``"sum"``
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
                "`kernel='c'` needs a float32 CSR weight on the CPU and a C compiler (lightning_pai.deploy."
                "kernels.available() is False here, or the layout/dtype/device differ); use kernel='sum' or 'mm'."
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
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).clone())
        self._cache: tuple[tuple, Tensor] | None = None
        self._c_plan: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # sparse tensors and the compiled kernel's plan (raw pointers) cannot be copied; rebuilt on the next call
        state["_cache"] = state["_c_plan"] = None
        return state

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the dense weight this layer replaced (``(out, in)`` for a linear layer)."""
        return (self.out_features, self.in_features)

    @property
    def weight(self) -> Tensor:
        """The dense weight's stand-in: a :class:`DenseWeightView` (values only when an operation reads them).

        Under ``torch.compile`` it is a ``meta`` tensor of the weight's shape and dtype instead (which the
        compiler can trace): fine for metadata checks, an error if traced code computes with it.
        """
        if torch.compiler.is_compiling():
            return torch.empty(self.weight_shape, dtype=self._buffers["values"].dtype, device="meta")
        return DenseWeightView(self)

    def dense_weight(self) -> Tensor:
        """The dense weight rebuilt from the sparse buffers (a new tensor of :attr:`weight_shape`)."""
        return self.sparse_weight().to_dense().view(self.weight_shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        bias = state_dict.get(prefix + "bias")
        if bias is not None and bias.dim() == 2:  # saved before 0.2, when the bias was stored as (out, 1)
            state_dict[prefix + "bias"] = bias.reshape(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            weight = ops.sparse_tensor(crow, col, values, self.layout, (self.out_features, self.in_features))
            cache = self._cache = ((values, crow, col), weight)
        return cache[1]

    def matmul_t(self, xt: Tensor, kernel: str | None = None) -> Tensor:
        """``act(W @ xt + b)`` for an ``(in, cols)`` input with contiguous rows; returns ``(out, cols)``.

        ``kernel``: what :meth:`_kernel_for` returned for this input, if the caller asked already.
        """
        buffers = self._buffers
        if torch.compiler.is_compiling():
            return ops.sparse_mm_t(
                buffers["crow_indices"], buffers["col_indices"], buffers["values"], buffers["bias"], xt,
                self.in_features, self.layout, self._traced_kernel(xt), self.activation or "none",
            )  # fmt: skip
        kernel = kernel or self._kernel_for(xt)
        if kernel == "c":
            return kernels.csr_apply(self._plan(), xt if xt.stride(1) == 1 else xt.contiguous())
        return ops.torch_mm_t(self.sparse_weight(), buffers["bias"], xt, kernel, self.activation)

    def _traced_kernel(self, x: Tensor) -> str:
        """:meth:`_kernel_for` from tensor metadata alone (what ``torch.compile`` can trace)."""
        if self.kernel != "c":
            return self.kernel
        values, crow, col = (self._buffers[k] for k in ("values", "crow_indices", "col_indices"))
        bias = self._buffers["bias"]
        usable = x.dtype == values.dtype == torch.float32 and crow.dtype == col.dtype == torch.int32
        if usable and x.device.type == values.device.type == "cpu" and (bias is None or bias.dtype == torch.float32):
            return "c"
        return "sum" if values.device.type == "cpu" else "mm"

    def _kernel_for(self, x: Tensor) -> str:
        """The kernel for input ``x``: ``self.kernel``, or PyTorch's where the ``"c"`` kernel does not apply.

        A ``"c"`` layer whose input or buffers are no longer float32 CPU tensors (after ``.double()``,
        ``.to("cuda")``) falls back to ``"sum"`` on the CPU and ``"mm"`` elsewhere.
        """
        if self.kernel != "c":
            return self.kernel
        if x.is_cpu and x.dtype == torch.float32 and self._plan() is not None:
            return "c"
        return "sum" if self._buffers["values"].device.type == "cpu" else "mm"

    def _plan(self) -> kernels.CsrPlan | None:
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
            plan = kernels.CsrPlan(crow, col, values, bias, self.in_features, self.activation)
        self._c_plan = (values, crow, col, bias, self.activation, plan)
        return plan

    def matvec(self, x: Tensor) -> Tensor:
        """``act(W @ x + b)`` for one ``(in,)`` vector: ``torch.addmv`` (the fastest here for every kernel)."""
        w, bias = self.sparse_weight(), self._buffers["bias"]
        y = torch.mv(w, x) if bias is None else torch.addmv(bias, w, x)
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
        if torch.compiler.is_compiling():
            y = self.matmul_t(x.reshape(-1, self.in_features).t()).t().reshape(*lead, self.out_features)
            return y.contiguous() if self.contiguous_outputs else y
        if x.numel() == self.in_features and (self.layout == "csr" or x.device.type == "cpu"):
            # one row: sparse matrix-vector product, no transposes
            return self.matvec(x.reshape(self.in_features)).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        xt = x2.t()
        kernel = self._kernel_for(x2)
        xt = ops.rows_contiguous(xt, kernel == "c")  # free when x is the transposed output of a sparse layer
        y = self.matmul_t(xt, kernel).t().reshape(*lead, self.out_features)
        return y.contiguous() if self.contiguous_outputs else y


class SparseConv1x1(SparseMatmul):
    """Inference-only sparse 1x1 ``nn.Conv2d`` (stride 1, no padding, one group): ``y[n,:,h,w] = W x[n,:,h,w] + b``.

    Computed as ``W @ X`` with ``X`` the ``(C_in, N*H*W)`` matrix of the input's pixels (a copy when ``N > 1``);
    the output is a permuted view of the ``(C_out, N, H, W)`` result. See :class:`SparseMatmul`; the
    convolution's attributes (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, a ``(out, in, 1, 1)`` ``weight`` view) stay readable.
    """

    kernel_size = stride = dilation = (1, 1)
    padding = (0, 0)
    groups = 1
    padding_mode = "zeros"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """``(out, in, 1, 1)``: the replaced convolution's weight shape."""
        return (self.out_features, self.in_features, 1, 1)

    @property
    def in_channels(self) -> int:
        """Input channels (``in_features`` of the matmul)."""
        return self.in_features

    @property
    def out_channels(self) -> int:
        """Output channels (``out_features`` of the matmul)."""
        return self.out_features

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
    so every output channel is a sum of shifted rows (computed by :func:`lightning_pai.core.kernels.sparse_conv` on
    an output grid ``W_p`` wide, whose extra columns are dropped); a stride-``s`` convolution first splits the
    padded input into ``s_h x s_w`` phase planes ``x_p[c, s_h i + a, s_w j + b]``, after which it is a stride-1
    convolution over them. A 1x1 kernel reads the strided input directly. Only the grid's first ``W_out``
    columns are written out: the output is an ordinary contiguous ``(n, out, H_out, W_out)`` tensor.

    Needs the compiled kernels (float32, CPU); after ``.double()`` or a move to another device the module
    computes ``F.conv2d`` with its weight rebuilt dense. ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``dilation``, ``groups`` (1) and ``weight`` (a :class:`DenseWeightView` of shape
    ``(out, in, kh, kw)``) read as on the ``nn.Conv2d``; ``padding`` is the ``F.pad``-order 4-tuple. Under
    ``torch.compile`` the layer calls the ``lightning_pai::sparse_conv2d`` custom op.

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
        self._offsets: tuple[tuple, Tensor, Tensor] | None = None

    groups = 1
    padding_mode = "zeros"

    @property
    def out_channels(self) -> int:
        """Output channels."""
        return self.out_features

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """``(out, in, kh, kw)``: the replaced convolution's weight shape."""
        return (self.out_features, self.in_channels, *self.kernel_size)

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

    def _tap_offsets(self, planes: tuple[int, int], phases: tuple[int, int]) -> Tensor:
        """:func:`~lightning_pai.deploy.ops.tap_offsets` for these planes, cached until ``col_indices`` changes."""
        col = self._buffers["col_indices"]
        key = (planes, phases)
        if self._offsets is not None and self._offsets[0] == key and self._offsets[1] is col:
            return self._offsets[2]
        offsets = ops.tap_offsets(col, self.kernel_size, self.dilation, planes, phases)
        self._offsets = (key, col, offsets)
        return offsets

    def forward(self, x: Tensor) -> Tensor:
        _check_inference(x, self)
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        crow, col, values, bias = (self._buffers[k] for k in ("crow_indices", "col_indices", "values", "bias"))
        if torch.compiler.is_compiling():
            return ops.sparse_conv2d(
                x, crow, col, values, bias, self.in_channels, list(self.kernel_size), list(self.stride),
                list(self.padding), list(self.dilation), self.activation or "none",
            )  # fmt: skip
        if self._kernel_for(x) != "c":
            weight = self.dense_weight()
            return ops.dense_conv(x, weight, bias, self.stride, self.padding, self.dilation, self.activation)
        geometry = (self.in_channels, self.kernel_size, self.stride, self.padding, self.dilation)
        return ops.direct_conv(x, crow, values, bias, geometry, self.activation, self._tap_offsets)

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
    :func:`lightning_pai.core.kernels.layer_norm_t` (same formula as PyTorch: biased variance, ``eps`` inside the
    square root) and returns a view of the same layout; any other input goes to ``nn.LayerNorm.forward``.
    :func:`to_sparse_inference` swaps it in for the ``nn.LayerNorm`` modules (1-D ``normalized_shape``) of a
    model whose sparse layers use the ``"c"`` kernel; parameters and ``state_dict`` keys are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        (features,) = self.normalized_shape
        if torch.compiler.is_compiling():
            return super().forward(x)
        params = [p for p in (self.weight, self.bias) if p is not None]
        tracked = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if (
            not tracked
            and x.dim() >= 2
            and x.stride(-1) != 1
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params)
            and kernels.available()
        ):
            xt = x.reshape(-1, features).t()
            if xt.stride(1) == 1:
                return kernels.layer_norm_t(xt, self.weight, self.bias, self.eps).t().reshape(x.shape)
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

    @property
    def weight(self) -> Tensor:
        """The compressed 2:4 weight (a ``torch.sparse`` semi-structured tensor of shape ``(out, in)``)."""
        return self.weight_2to4

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


__all__ = [
    "FUSABLE",
    "KERNELS",
    "LAYOUTS",
    "DenseWeightView",
    "SemiStructuredLinear",
    "SparseConv1x1",
    "SparseConv2d",
    "SparseLinear",
    "SparseMatmul",
    "TransposedLayerNorm",
]
