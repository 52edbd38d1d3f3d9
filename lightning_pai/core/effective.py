"""Effective sparsity of any graph, by synaptic flow (Vysogorets & Kempe 2021), and pruning to a target of it.

Vysogorets & Kempe 2021, "Connectivity Matters: Neural Network Pruning Through the Lens of Effective Sparsity"
(arXiv:2107.02306; the authors' ``effective_masks_synflow`` and ``effective_correction_from_global_scores``). A
kept weight is *effective* when it lies on at least one path of kept weights from the network's input to its
output; the others (in a unit whose inputs were all pruned, or whose outputs were) cannot carry signal and count as
pruned. The paper finds them with SynFlow: linearise the network, set every weight to ``|w| ⊙ mask``, feed an
all-ones input, take ``R = sum(outputs)``: a weight is effective iff its SynFlow score ``w ⊙ ∂R/∂w`` is non-zero.
Autodiff follows the real graph, so residual additions (an identity shortcut carries activity around a dead
block), concatenations and shortcut convolutions need no special handling.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_pai.core.scorers import call_forward, output_tensor
from lightning_pai.core.sharding import is_sharded

__all__ = ["effective_masks_by_flow", "prune_to_effective"]

#: Calls that become the identity (their first argument) in the linearised network: activations, dropout,
#: normalisation without its affine part, softmax and sign flips.
_IDENTITY = frozenset(
    "relu relu_ relu6 gelu silu elu elu_ selu selu_ celu celu_ leaky_relu leaky_relu_ hardtanh hardtanh_ hardswish "
    "hardsigmoid mish softplus softsign tanhshrink logsigmoid sigmoid sigmoid_ tanh tanh_ threshold threshold_ prelu "
    "rrelu rrelu_ hardshrink softshrink dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout batch_norm layer_norm group_norm instance_norm rms_norm local_response_norm normalize "
    "softmax log_softmax softmin neg abs".split()
)
#: Normalisations that keep their affine part ``x * weight + bias`` (argument positions of weight and bias, and
#: whether they scale the channel axis 1 or the trailing axes): a targeted norm weight then gets its gradient.
_NORMS: dict[Any, tuple[int, int | None, bool]] = {
    F.batch_norm: (3, 4, True),
    F.instance_norm: (3, 4, True),
    F.group_norm: (2, 3, True),
    F.layer_norm: (2, 3, False),
    F.rms_norm: (2, None, False),
}

#: Calls whose outputs mix many inputs (path counts grow by the fan-in): their results are saturated to 0/1.
_MIXING = frozenset(
    "linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d matmul __matmul__ "
    "__rmatmul__ mm bmm addmm baddbmm addmv mv einsum tensordot".split()
)
#: Subtractions become additions: ``a - b`` depends on both, and a difference of path counts may cancel.
_SUBTRACT = frozenset({"sub", "subtract", "__sub__", "__rsub__", "rsub"})
_SUBTRACT_INPLACE = frozenset({"sub_", "subtract_", "__isub__"})


class _Saturate(torch.autograd.Function):
    """``x != 0`` forward and ``g != 0`` backward: path counts reduced to reachability, so nothing overflows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return (x != 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return (grad != 0).to(grad.dtype)


def _saturate(x: Any) -> Any:
    return _Saturate.apply(x) if isinstance(x, Tensor) and x.is_floating_point() else x


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _avg_pool(name: str, args: tuple, kwargs: dict) -> Tensor:
    """The average pool standing in for a max pool (every input of a window reaches its output)."""
    x, dims = args[0], int(re.search(r"(\d)d", name).group(1))
    if name.lstrip("_").startswith("adaptive"):
        if _arg(args, kwargs, 2, "return_indices", False):
            raise NotImplementedError("Effective sparsity by flow cannot follow a max pool with `return_indices=True`.")
        return getattr(F, f"adaptive_avg_pool{dims}d")(x, _arg(args, kwargs, 1, "output_size"))
    kernel, stride = _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride")
    padding, dilation = _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1)
    dilated = any(d != 1 for d in (dilation if isinstance(dilation, (tuple, list)) else (dilation,)))
    if dilated or "indices" in name or _arg(args, kwargs, 6, "return_indices", False):
        raise NotImplementedError(
            "Effective sparsity by flow replaces max pools by average pools, which have no `dilation` or "
            "`return_indices`."
        )
    ceil_mode = _arg(args, kwargs, 5, "ceil_mode", False)
    return getattr(F, f"avg_pool{dims}d")(x, kernel, stride or None, padding, ceil_mode, True)


def _affine(args: tuple, kwargs: dict, weight_at: int, bias_at: int | None, channels: bool) -> Tensor:
    """A normalisation's affine part alone, ``x * weight + bias`` (on axis 1 or the trailing axes)."""
    x = args[0]
    shape = (1, -1, *([1] * (x.dim() - 2))) if channels else None
    weight, bias = (
        _arg(args, kwargs, weight_at, "weight"),
        None if bias_at is None else _arg(args, kwargs, bias_at, "bias"),
    )
    for t, op in ((weight, torch.mul), (bias, torch.add)):
        if t is not None:
            x = op(x, t.view(shape) if shape else t)
    return x


def _attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Softmax-free attention ``(q kᵀ) v`` (heads on axis -3; fewer key/value heads repeated)."""
    if key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _saturate(_saturate(query @ key.transpose(-2, -1)) @ value)


def _multi_head_attention(args: tuple, kwargs: dict) -> tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` (inputs ``(L, N, E)``) without softmax, dropout or attention masks."""
    names = (
        "query key value embed_dim_to_check num_heads in_proj_weight in_proj_bias bias_k bias_v add_zero_attn "
        "dropout_p out_proj_weight out_proj_bias training key_padding_mask need_weights attn_mask "
        "use_separate_proj_weight q_proj_weight k_proj_weight v_proj_weight"
    ).split()
    a = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
    if a["use_separate_proj_weight"]:
        weights = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        weights = a["in_proj_weight"].chunk(3)
    biases = (None,) * 3 if a["in_proj_bias"] is None else a["in_proj_bias"].chunk(3)
    heads = a["num_heads"]

    def split(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # (L, N, E) -> (N, H, L, E / H)
        y = _saturate(F.linear(x, w, b))
        return y.reshape(y.shape[0], y.shape[1], heads, -1).permute(1, 2, 0, 3)

    q, k, v = (split(x, w, b) for x, w, b in zip((a["query"], a["key"], a["value"]), weights, biases))
    out = _attention(q, k, v).permute(2, 0, 1, 3).flatten(2)
    return _saturate(F.linear(out, a["out_proj_weight"], a["out_proj_bias"])), None


def _embedding(args: tuple, kwargs: dict) -> Tensor:
    """Every row of the table reaches every position (all tokens possible), not only the example's ids."""
    ids, weight = args[0], _arg(args, kwargs, 1, "weight")
    return _saturate(weight.sum(0).expand(*ids.shape, weight.shape[-1]))


class _Linearised(TorchFunctionMode):
    """The network of the paper's effective-sparsity computation: no nonlinearities, normalisation or max pools."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _NORMS:
            return _affine(args, kwargs, *_NORMS[func])
        if name in _IDENTITY:
            return args[0] if args else next(iter(kwargs.values()))
        if "max_pool" in name:
            return _avg_pool(name, args, kwargs)
        if name == "amax":  # every entry reaches the maximum's place, as in a max pool
            dim = _arg(args, kwargs, 1, "dim", ())
            keepdim = _arg(args, kwargs, 2, "keepdim", False)
            return torch.mean(args[0], dim=None if dim in ((), []) else dim, keepdim=keepdim)
        if name in _SUBTRACT:
            return torch.add(args[0], _arg(args, kwargs, 1, "other"))
        if name in _SUBTRACT_INPLACE:
            return args[0].add_(_arg(args, kwargs, 1, "other"))
        if name in ("masked_fill", "masked_fill_"):  # e.g. -inf before a softmax: a neutral 0 here
            value = _arg(args, kwargs, 2, "value")
            if not isinstance(value, Tensor) and (value < 0 or not math.isfinite(value)):
                return func(args[0], _arg(args, kwargs, 1, "mask"), 0.0)
        if name == "glu":
            a, b = args[0].chunk(2, _arg(args, kwargs, 1, "dim", -1))
            return a * b
        if name == "scaled_dot_product_attention":
            return _attention(*(_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value"))))
        if name == "multi_head_attention_forward":
            return _multi_head_attention(args, kwargs)
        if func is F.embedding:
            return _embedding(args, kwargs)
        out = func(*args, **kwargs)
        return _saturate(out) if name in _MIXING else out


def _ones_inputs(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (any nesting) with floating tensors as float64 ones of their shapes; others (token ids) kept."""
    if isinstance(inputs, Tensor):
        if inputs.is_floating_point():
            return torch.ones(inputs.shape, dtype=torch.float64, device=device)
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _ones_inputs(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_ones_inputs(v, device) for v in inputs)
    return inputs


@contextmanager
def _flow_weights(
    module: nn.Module, targets: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]
) -> Iterator[None]:
    """Targets as float64 0/1 masks, other parameters as ones, biases as zeros, buffers as ``|b|`` (restored on exit).

    A targeted bias is zero too (a constant, never on a path from the input); its gradient still tells whether its
    unit reaches the output. Shared (tied) tensors are replaced and restored once.
    """
    ids = {id(p): n for n, p in targets.items()}
    saved: list[tuple[Tensor, Tensor, bool]] = []
    seen: set[int] = set()
    for mod in module.modules():
        for store, buffers in ((mod._parameters, False), (mod._buffers, True)):
            for attr, t in store.items():
                if t is None or not t.is_floating_point() or id(t) in seen:
                    continue
                seen.add(id(t))
                saved.append((t, t.data, t.requires_grad))
                if buffers:
                    value = torch.nan_to_num(t.data.detach().abs().double(), posinf=0.0)
                elif id(t) in ids and not attr.endswith("bias"):
                    value = masks[ids[id(t)]].to(t.device, torch.float64)
                elif attr.endswith("bias"):
                    value = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
                else:
                    value = torch.ones(t.shape, dtype=torch.float64, device=t.device)
                t.data = value
                if not buffers:
                    t.requires_grad_(id(t) in ids)
    try:
        yield
    finally:
        for t, data, requires_grad in saved:
            t.data = data
            if isinstance(t, nn.Parameter):
                t.requires_grad_(requires_grad)


def effective_masks_by_flow(
    module: nn.Module,
    masks: Mapping[str, Tensor],
    example_inputs: Any,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """The kept weights of ``module`` that lie on an input-to-output path of kept weights, on any graph.

    Vysogorets & Kempe 2021 ("Connectivity Matters", arXiv:2107.02306), their ``effective_masks_synflow``: the
    network is linearised — activations, dropout and softmax become the identity, normalisation layers keep only
    their affine part, max pools become average pools, subtractions additions — every target is set to its 0/1
    mask, every other parameter to ones (dense: all its paths open) and biases to zero (they carry no input, and a
    targeted bias counts as effective when its unit reaches the output). An all-ones input of
    ``example_inputs``' shapes is fed forward, ``R`` is the sum of the output and a kept weight ``w`` is effective
    iff ``∂R/∂w ≠ 0``: the SynFlow score ``w ⊙ ∂R/∂w`` of a kept weight is non-zero exactly when some path of
    non-zero weights runs from an input through ``w`` to an output. Autodiff follows the real graph, so residual
    additions, concatenations and shortcut convolutions are handled as they are wired.

    The path counts of the paper's ``|w|``-weighted pass overflow in deep networks (the authors rescale layers);
    here the output of every mixing operation (linear, convolution, matrix products) is reduced to ``count ≠ 0``
    in the forward and its gradient likewise in the backward — the same reachability without overflow, in
    float64.

    Exact for networks built from weighted sums, additions, concatenations, pooling and element-wise operations.
    Spatial geometry counts as in the paper: a kernel tap that only ever meets zero padding at the example's
    input size is ineffective (3x3 convolutions on 1x1 feature maps keep only their centre taps). Approximations:
    attention is taken as ``(q kᵀ) v`` without softmax (a product of two paths is open when both are);
    learned additive tensors other than biases (positional embeddings, class tokens) and constants added in the
    forward (``1 - z``, ``x + eps``) count as inputs; an embedding's every row counts as reachable (all tokens
    possible); ``torch.max`` / ``min`` reductions keep their argmax-only gradient.

    Args:
        module: The model (left as it was: weights, buffers, ``requires_grad`` flags and train/eval modes).
        masks: Bool keep-masks of (some of) its parameters, by fully qualified name.
        example_inputs: One input like those the model runs (a tensor, a tuple of positional arguments or a dict of
            keyword arguments); floating tensors become ones of their shapes (one sample is enough), integer ones
            (token ids) are used as they are.
        forward: ``forward(module, inputs) -> output`` (default: ``module(inputs)``, ``module(*inputs)`` or
            ``module(**inputs)``); the output, its ``logits`` or its first tensor is summed.

    Returns:
        Bool effective masks by name (each a subset of its mask, on the mask's device).

    Raises:
        NotImplementedError: For sharded (FSDP2) parameters, or a max pool with dilation or returned indices.
        ValueError: If the model's output holds no tensor.
    """
    targets = {n: module.get_parameter(n) for n in masks}
    if any(is_sharded(p) for p in targets.values()):
        raise NotImplementedError(
            "Effective sparsity by flow rewrites the parameters as float64 masks, which FSDP2's sharded storage does "
            "not allow; compute it on an unsharded copy of the model."
        )
    device = next(iter(targets.values())).device
    inputs = _ones_inputs(example_inputs, device)
    params = list(targets.values())
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with _flow_weights(module, targets, masks), torch.enable_grad():
            with _Linearised():
                out = forward(module, inputs) if forward is not None else call_forward(module, inputs)
            total = output_tensor(out).sum()
            grads = torch.autograd.grad(total, params, allow_unused=True) if total.requires_grad else None
    finally:
        for m, training in modes:
            m.training = training
    out_masks = {}
    for i, (n, mask) in enumerate(masks.items()):
        g = None if grads is None else grads[i]
        reached = (g != 0).to(mask.device) if g is not None else torch.zeros_like(mask, dtype=torch.bool)
        out_masks[n] = mask.to(torch.bool) & reached
    return out_masks


def prune_to_effective(
    masks_at: Callable[[int], Mapping[str, Tensor]],
    effective: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
    total: int,
    sparsity: float,
) -> dict[str, Tensor]:
    """The masks with the most weights pruned whose *effective* sparsity is at most ``sparsity``.

    Vysogorets & Kempe 2021's ``effective_correction_from_global_scores`` (and its layer-wise twin): a binary
    search over ``n``, the number of weights pruned directly, for the largest ``n`` whose masks ``masks_at(n)``
    have effective sparsity ``1 - effective_kept / total <= sparsity``. Since effective sparsity is never below
    the direct one, ``n <= sparsity * total``; the search keeps ``ok(low)`` and ``not ok(high)``, so the result's
    ``n + 1`` exceeds the target even where effective sparsity is not monotone in ``n`` (layer-wise budgets).
    Deterministic: every process that runs it gets the same masks.

    Args:
        masks_at: The bool masks with exactly ``n`` of the ``total`` weights pruned (e.g. the ``n`` lowest scores).
        effective: Their effective masks (e.g. :func:`effective_masks_by_flow` on the model).
        total: Number of targeted weights.
        sparsity: Target effective sparsity, in ``[0, 1)``.

    Returns:
        ``masks_at(n)`` for the ``n`` found.

    Raises:
        ValueError: If even the unpruned network's effective sparsity exceeds ``sparsity`` (weights that never
            reach the output, e.g. kernel taps that only meet padding at the example's input size).
    """

    def effective_sparsity(masks: Mapping[str, Tensor]) -> float:
        kept = sum(int(torch.count_nonzero(m)) for m in effective(masks).values())
        return 1.0 - kept / total

    low, high = 0, min(total, math.floor(sparsity * total) + 1)
    best = masks_at(0)
    dense = effective_sparsity(best)
    if dense > sparsity:
        raise ValueError(
            f"The unpruned network's effective sparsity is already {dense:.6f} > the target `sparsity={sparsity}`: "
            "some targeted weights never reach the output (e.g. kernel taps that only meet zero padding at this "
            "input size). Lower the target, or exclude those layers."
        )
    while high - low > 1:
        middle = (low + high) // 2
        candidate = masks_at(middle)
        if effective_sparsity(candidate) <= sparsity:
            low, best = middle, candidate
        else:
            high = middle
    return dict(best)
