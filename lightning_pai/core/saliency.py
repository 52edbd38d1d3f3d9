"""Data-driven and data-free saliency scorers for pruning at initialization: SNIP, GraSP, SynFlow.

All follow the scorer signature ``fn(ctx: ScoringContext) -> dict[str, Tensor]`` (higher = kept first)
and compute gradients with ``torch.autograd.grad``, so ``.grad`` fields and DDP gradient hooks are never
touched. Run them through :func:`lightning_pai.core.pruning.prune`, which restores the model's state
(weights, buffers, train/eval flags, ``requires_grad``) afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_pai.core.scorers import (
    ScoringContext,
    call_forward,
    default_forward,
    output_tensor,
    register_scorer,
    split_batch,
)
from lightning_pai.core.sharding import is_sharded


def _grads(output: Tensor, params: list[nn.Parameter], **kwargs) -> list[Tensor]:
    if any(is_sharded(p) for p in params):
        return _sharded_grads(output, params, **kwargs)
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _sharded_grads(output: Tensor, params: list[nn.Parameter], create_graph: bool = False) -> list[Tensor]:
    """Gradients of FSDP2-sharded parameters, by a real ``backward()`` read from ``.grad`` and reset.

    FSDP2 computes them through its all-gather/reduce-scatter hooks, which ``autograd.grad`` bypasses. They
    are FSDP2's: averaged over the ranks' batches, i.e. those of the union of the batches.
    """
    if create_graph:
        raise NotImplementedError(
            "Second-order scores (GraSP's Hessian-gradient product) are not supported for FSDP2-sharded "
            "parameters; use 'snip', 'magnitude' or 'random', or score the model before sharding it."
        )
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    output.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    for p, g in zip(params, saved):
        p.grad = g
    return grads


@register_scorer("snip")
def snip(ctx: ScoringContext) -> dict[str, Tensor]:
    """SNIP connection sensitivity (Lee et al. 2019, arXiv:1810.02340).

    ``score = |g ⊙ w|`` with ``g = ∂L/∂w`` the gradient of the loss summed over ``ctx.batches``
    (i.e. ``|∂L/∂c|`` for a multiplicative mask ``c = 1``; the paper's normalisation by the sum of
    scores does not change the ranking). Computed in train mode, like the paper's single-batch pass.
    """
    ctx.require_data("snip")
    names, params = list(ctx.params), list(ctx.params.values())
    ctx.module.train()
    total = [torch.zeros_like(p) for p in params]
    for batch in ctx.batches:
        for acc, g in zip(total, _grads(ctx.loss(batch), params)):
            acc.add_(g)
    return {n: (g * p.detach()).abs().float() for n, g, p in zip(names, total, params)}


@register_scorer("force", iterations=60, revives=True)
def force(ctx: ScoringContext) -> dict[str, Tensor]:
    """FORCE, progressive skeletonization: ``|θ ⊙ ∂L/∂(c ⊙ θ)|`` over every weight, pruned ones included.

    de Jorge et al. 2021, "Progressive skeletonization: trimming more fat from a network at initialization"
    (ICLR; official code naver/force).

    ``score = |θ ⊙ ∂L/∂(c ⊙ θ)|``: the gradient of the loss of the *pruned* network ``c ⊙ θ`` (the driver
    zeroes the weights pruned so far), times the *initial* weights ``θ`` of every weight, pruned ones included,
    so a weight pruned in one round can come back in a later one (Iter-SNIP's ``|g ⊙ (c ⊙ θ)|`` cannot). Run
    over exponentially shrinking rounds (60 by default, `iterations=` to change).
    """
    ctx.require_data("force")
    names, params = list(ctx.params), list(ctx.params.values())
    initial = ctx.extras.get("initial_weights") or {n: p.detach() for n, p in ctx.params.items()}
    ctx.module.train()
    total = [torch.zeros_like(p) for p in params]
    for batch in ctx.batches:
        for acc, g in zip(total, _grads(ctx.loss(batch), params)):
            acc.add_(g)
    return {n: (g * initial[n].to(g.device)).abs().float() for n, g in zip(names, total)}


@register_scorer("grasp", signed=True)
def grasp(ctx: ScoringContext) -> dict[str, Tensor]:
    """GraSP, gradient signal preservation (Wang et al. 2020, arXiv:2002.07376).

    With ``g = ∇L`` and ``H g`` the Hessian-gradient product of the cross-entropy of
    ``logits / T`` (``T = ctx.extras.get("temperature", 200)``, the official code's value), the paper
    scores ``S(-θ) = -θ ⊙ H g`` and removes the weights with the *highest* ``S``: their removal reduces
    the gradient norm least (or increases it). In our higher-is-kept convention the score is therefore
    ``θ ⊙ H g`` (signed). ``g`` is accumulated over all batches first, then ``H g = ∇(gᵀ ∇L)``
    over the same batches, as in the official implementation.
    """
    ctx.require_data("grasp")
    temperature = float(ctx.extras.get("temperature", 200.0))
    names, params = list(ctx.params), list(ctx.params.values())
    ctx.module.train()

    def loss(batch):
        logits, targets = ctx.forward_fn(ctx.module, batch)
        return F.cross_entropy(logits / temperature, targets)

    g = [torch.zeros_like(p) for p in params]
    for batch in ctx.batches:
        for acc, gi in zip(g, _grads(loss(batch), params)):
            acc.add_(gi)
    hg = [torch.zeros_like(p) for p in params]
    for batch in ctx.batches:
        grads = _grads(loss(batch), params, create_graph=True)
        z = sum((gi.detach() * gr).sum() for gi, gr in zip(g, grads) if gr.requires_grad)
        if not torch.is_tensor(z) or not z.requires_grad:
            continue  # piecewise-linear model without curvature on this batch
        for acc, h in zip(hg, _grads(z, params)):
            acc.add_(h)
    return {n: (p.detach() * h).float() for n, p, h in zip(names, params, hg)}


@contextmanager
def _linearized(module: nn.Module) -> Iterator[None]:
    """Replace every floating parameter and buffer by its float64 absolute value (restored on exit).

    Shared (tied) tensors, e.g. GPT-2's embedding and output weight, are replaced and restored once.
    """
    saved, seen = [], set()
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for t in store.values():
                if t is not None and t.is_floating_point() and id(t) not in seen:
                    seen.add(id(t))
                    saved.append((t, t.data))
                    t.data = t.data.detach().abs().double()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def _ones_like_inputs(inputs: object) -> object:
    """One sample of ``inputs`` (any nesting): floating tensors become float64 ones, others (token ids, masks) stay."""
    if isinstance(inputs, Tensor):
        sample = inputs[:1]
        return torch.ones_like(sample, dtype=torch.float64) if sample.is_floating_point() else sample
    if isinstance(inputs, dict):
        return {k: _ones_like_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_ones_like_inputs(v) for v in inputs)
    return inputs


@register_scorer("synflow", needs="shape", iterations=100)
def synflow(ctx: ScoringContext) -> dict[str, Tensor]:
    """Iterative Synaptic Flow (Tanaka et al. 2020, arXiv:2006.05467); data-free.

    All parameters and buffers are replaced by their absolute values, the model runs in eval mode on an
    all-ones input of one sample, ``R = sum(f(1; |θ|))`` and ``score = |θ ⊙ ∂R/∂θ|``. The input has the
    structure of the first batch's inputs (several positional inputs, or a dict of keyword inputs):
    floating tensors become ones, integer ones (token ids, attention masks) are one sample of the batch.
    A custom ``forward_fn`` is called on that one-sample batch instead. Run it
    iteratively (``iterations=100`` on the exponential schedule in the paper) for its
    no-layer-collapse guarantee. Scoring is done in float64: ``R`` is a product over layers and
    overflows float32 in deep networks. Non-finite scores raise an error instead of silently mis-ranking.
    """
    if ctx.module is None:
        raise ValueError("The `synflow` scorer needs the model.")
    names, params = list(ctx.params), list(ctx.params.values())
    if any(is_sharded(p) for p in params):
        raise NotImplementedError(
            "SynFlow rewrites every parameter as float64 |θ|, which FSDP2's sharded storage does not allow; "
            "use 'snip', 'magnitude' or 'random' under FSDP2, or score the model before sharding it."
        )
    device = params[0].device
    custom = ctx.forward_fn is not default_forward
    if ctx.input_shape is not None:
        inputs: object = torch.ones((1, *ctx.input_shape), dtype=torch.float64, device=device)
    elif ctx.batches:
        batch = ctx.batches[0]
        inputs = _ones_like_inputs(batch if custom else split_batch(ctx.module, batch)[0])
    else:
        raise ValueError("The `synflow` scorer needs `input_shape` or one batch to take the input shape from.")
    ctx.module.eval()
    with _linearized(ctx.module):
        if custom and ctx.input_shape is None:  # the user's call, on a one-sample all-ones batch
            out = output_tensor(ctx.forward_fn(ctx.module, inputs)[0])
        else:
            out = output_tensor(call_forward(ctx.module, inputs))
        grads = _grads(out.sum(), params)
        scores = {n: (g * p.detach()).abs() for n, g, p in zip(names, grads, params)}
    bad = [n for n, s in scores.items() if not torch.isfinite(s).all()]
    if bad:
        raise FloatingPointError(f"SynFlow scores overflowed float64 in {bad[:3]}; the network is too deep to score.")
    return scores
