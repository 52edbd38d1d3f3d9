"""Boolean keep-masks over named parameters, and their enforcement on weights, gradients and optimizer state."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_pai.core.distributions import Distribution, distribute, get_distribution, global_, global_masks
from lightning_pai.core.kernels import mask_bits_
from lightning_pai.core.nm import nm_fits, nm_mask
from lightning_pai.core.select import active_counts, masks_from_counts, raise_to_floors
from lightning_pai.core.sharding import full, is_sharded, local, local_slice
from lightning_pai.core.targets import Layout, Selectors, select_targets, target_layouts
from lightning_pai.core.validation import check_min_density, check_sparsity

__all__ = ["ZERO_PRESERVING", "MaskSet", "check_min_density", "check_sparsity", "compute_masks", "zero_masked_"]

#: Integer type of each element size: a tensor seen as its bit patterns (see :func:`zero_masked_`).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: Tensor) -> Tensor | None:
    """``tensor``'s bytes seen as integers of the same width (a view), or None for a 16-byte element type."""
    kind = _BITS.get(tensor.element_size())
    return None if kind is None else tensor.view(kind)


@torch.no_grad()
def zero_masked_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Set the entries of ``tensors`` whose mask entry is 0 / False to exactly 0, whatever they hold (NaN, Inf).

    ``tensor * mask`` keeps ``0 * NaN = NaN``: a NaN gradient at a pruned weight would make the weight NaN. Here
    each tensor's bit patterns (its bytes seen as integers of the same width) are multiplied by the 0/1 mask
    instead: an entry is cleared to ``+0.0`` or left bit-for-bit untouched — ``torch.where(mask, t, 0)`` semantics,
    in place. On the CPU a compiled kernel does it in one vectorised pass reading one mask byte per element
    (:func:`lightning_pai.core.kernels.mask_bits_`, about twice as fast as PyTorch's multiply of integers by a
    uint8 mask, which converts every element); elsewhere PyTorch's fused multiply (ResNet-18 step times in
    ``benchmarks/training_cost/masking_cost.py``). Element types without an integer of their width (complex128)
    fall back to ``masked_fill_``.

    Args:
        tensors: Tensors edited in place (weights, gradients, optimizer state).
        masks: One bool or uint8 (0/1) mask per tensor, of its shape.
    """
    bits, flags = [], []
    for t, m in zip(tensors, masks):
        m = m if m.dtype == torch.uint8 else m.to(torch.bool).view(torch.uint8)
        if mask_bits_(t, m):  # the compiled one-pass kernel, where it applies
            continue
        view = _as_bits(t)
        if view is None:
            t.masked_fill_(m == 0, 0)
        else:
            bits.append(view)
            flags.append(m)
    if bits:
        torch._foreach_mul_(bits, flags)


def compute_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    distribution: str | Distribution = "global",
    masks: Mapping[str, Tensor] | None = None,
    min_density: float = 0.0,
    invert: bool = False,
    layouts: Mapping[str, Layout] | None = None,
    nm: Mapping[str, tuple[int, int]] | None = None,
    options: Mapping[str, object] | None = None,
    nm_incompatible: str = "error",
) -> dict[str, Tensor]:
    """Turn scores into keep-masks: the distribution fixes each layer's count, the highest scores are kept.

    Args:
        scores: Score per weight, by parameter name (higher = keep first).
        sparsity: Fraction of all targeted weights removed, in ``[0, 1)``.
        distribution: Name of a registered distribution or a callable (see
            :mod:`lightning_pai.core.distributions`).
        masks: Current masks; weights they prune stay pruned (their scores are treated as ``-inf``,
            and no layer is asked to keep more than it still has).
        min_density: Each layer keeps at least ``ceil(min_density * size)`` weights (capped by what it still
            has); the extra weights come from the other layers, so the total is unchanged.
        invert: Keep the *lowest*-scored weights, with the per-layer counts the scores would have given
            (the "inversion" sanity check of Frankle et al. 2021).
        layouts: Each target's matrix layout, for shape-based distributions (ERK, ER) and N:M groups.
        nm: Layers kept N:M instead: name -> ``(k, m)``, the ``k`` highest scores of every group of ``m``
            inputs (see :mod:`lightning_pai.core.nm`); ``sparsity`` and ``distribution`` then apply to the
            other layers only.
        options: Keyword options for a distribution registered with ``options=True``.
        nm_incompatible: An ``nm`` layer whose input channels are not a multiple of ``m``: ``"error"`` raises,
            ``"dense"`` keeps every weight it still has, ``"unstructured"`` keeps its ``round(size * k / m)``
            highest scores (see :func:`~lightning_pai.core.nm.nm_mask`).

    Returns:
        New bool masks, by name.
    """
    if nm:
        if layouts is None:
            raise ValueError("N:M masks need the targets' `layouts` (their input-channel axes).")
        out = {}
        for n, (k, m) in nm.items():
            s = scores[n].masked_fill(~masks[n].to(scores[n].device), -math.inf) if masks is not None else scores[n]
            out[n] = nm_mask(torch.where(torch.isfinite(s), -s, s) if invert else s, k, m, layouts[n], nm_incompatible)
            if masks is not None and nm_incompatible == "dense" and not nm_fits(s.shape, layouts[n], m):
                out[n] &= masks[n].to(out[n].device)  # left dense: what it still has
        rest = [n for n in scores if n not in nm]
        if rest:
            sub = compute_masks(
                {n: scores[n] for n in rest},
                sparsity,
                distribution,
                masks=None if masks is None else {n: masks[n] for n in rest},
                min_density=min_density,
                invert=invert,
                layouts=layouts,
                options=options,
            )
            out.update(sub)
        return {n: out[n] for n in scores}
    density = 1.0 - check_sparsity(sparsity)
    check_min_density(min_density, sparsity)
    get_distribution(distribution)
    if masks is not None:
        scores = {n: s.masked_fill(~masks[n].to(s.device), -math.inf) for n, s in scores.items()}
    kept = active_counts(masks) if masks is not None else None
    fast = get_distribution(distribution) is global_ and min_density == 0 and not invert and not options
    total = sum(s.numel() for s in scores.values())
    if fast and (kept is None or sum(kept.values()) >= round(density * total)):
        return global_masks(scores, density)  # the same masks as per-layer top-k of its counts, one selection
    counts = distribute(distribution, scores, density, layouts, options)
    available = {n: kept[n] if kept is not None else s.numel() for n, s in scores.items()}
    counts = {n: min(c, available[n]) for n, c in counts.items()}
    if min_density > 0:
        floors = {n: min(available[n], math.ceil(min_density * s.numel() - 1e-9)) for n, s in scores.items()}
        counts = raise_to_floors(counts, floors)
    if invert:
        scores = {n: torch.where(torch.isfinite(s), -s, s) for n, s in scores.items()}
    return masks_from_counts(scores, counts)


#: Optimizers (exact types, not subclasses) whose step keeps a weight at exactly zero when the weight,
#: its gradient and its state are zero: every term of their update (momentum, dampening, Nesterov, L2 or
#: decoupled weight decay, Adam's moments and ``m / (sqrt(v) + eps)``) is then zero.
ZERO_PRESERVING: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class MaskSet:
    """One bool keep-mask per prunable parameter, keyed by fully qualified name.

    Weights stay ordinary parameters (no ``weight_orig``, no forward hooks, 1 byte of mask per weight).
    Sharded (FSDP2 ``DTensor``) parameters keep their full-shape mask on every rank and are masked on their
    local shard (see :mod:`lightning_pai.core.sharding`).
    Sparsity is enforced by zeroing, in place and with fused multi-tensor ops (:func:`zero_masked_`: exactly
    zero whatever the entry held, NaN and Inf included), the masked weights (:meth:`apply_`), their gradients
    before the optimizer step (:meth:`mask_grads_`) and their optimizer state when the masks change
    (:meth:`mask_optimizer_state_`). With zero weight, zero
    gradient and zero state, SGD (momentum, weight decay, Nesterov) and Adam(W) leave the weight at
    exactly zero, so :meth:`attach` skips re-applying the masks after their steps; it re-applies them
    after every step of any other optimizer.

    Args:
        params: Prunable parameters by name.
        masks: Initial masks (default: keep everything).
        layouts: How each parameter maps to weight matrices (default: output axis first, fan-in after).

    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        masks: Mapping[str, Tensor] | None = None,
        layouts: Mapping[str, Layout] | None = None,
    ) -> None:
        if not params:
            raise ValueError("A `MaskSet` needs at least one parameter.")
        self._params: dict[str, nn.Parameter] = dict(params)
        generic = {n: Layout("other", 0, tuple(range(1, p.dim()))) for n, p in self._params.items()}
        self.layouts: dict[str, Layout] = {**generic, **dict(layouts or {})}
        self._masks: dict[str, Tensor] = {
            n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in self._params.items()
        }
        self._handles: list[RemovableHandle] = []
        self.grad_hooks_active = False
        self._refresh_lists()
        if masks is not None:
            self.load_state_dict(masks)

    @classmethod
    def from_module(cls, module: nn.Module, include: Selectors = None, exclude: Selectors = None) -> MaskSet:
        """Masks (all kept) over the targets :func:`~lightning_pai.core.targets.select_targets` picks."""
        params = select_targets(module, include, exclude)
        return cls(params, layouts=target_layouts(module, list(params)))

    def _refresh_lists(self) -> None:
        self._plist = list(self._params.values())
        self._mlist = [self._masks[n] for n in self._params]
        # The same bytes seen as uint8: a float tensor times a uint8 one takes PyTorch's fast same-kind
        # multiply path, a float times a bool one a slow promotion path (2.3 vs 5.9 ms per step on ResNet-18
        # on 2 CPU threads); still 1 byte per weight, and the views follow every in-place mask update.
        # For a sharded (FSDP2) parameter it is the view of this rank's shard of the full mask.
        self._ulist = [local_slice(m, p).view(torch.uint8) for m, p in zip(self._mlist, self._plist)]
        self._sharded = any(is_sharded(p) for p in self._plist)

    # ----------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        """Parameter names, in order."""
        return list(self._params)

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The masked parameters by name."""
        return dict(self._params)

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self) -> Iterable[tuple[str, Tensor]]:
        """``(name, mask)`` pairs."""
        return self._masks.items()

    def kept(self) -> dict[str, int]:
        """Number of kept weights per layer (one host synchronisation for all layers)."""
        return active_counts(self._masks)

    def weights(self) -> dict[str, Tensor]:
        """The masked parameters' values by name (detached; what a topology update reads)."""
        return {n: p.detach() for n, p in self._params.items()}

    def grads(self) -> dict[str, Tensor]:
        """The gradients of the masked parameters that have one, by name (as they are: masked or not yet)."""
        return {n: p.grad for n, p in self._params.items() if p.grad is not None}

    @property
    def total(self) -> int:
        """Number of masked (targeted) weights."""
        return sum(m.numel() for m in self._mlist)

    @property
    def density(self) -> float:
        """Fraction of targeted weights kept (``1 - sparsity``)."""
        return sum(self.kept().values()) / self.total

    # -------------------------------------------------------------- enforcing
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight in place."""
        zero_masked_([local(p) for p in self._plist] if self._sharded else self._plist, self._ulist)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of masked weights in place (call after backward, before the step)."""
        pairs = [(local(p.grad), m) for p, m in zip(self._plist, self._ulist) if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            zero_masked_(grads, masks)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer, fill: str = "zero") -> None:
        """Reset the masked entries of every parameter-shaped optimizer state (momentum, ``exp_avg``, ...).

        Args:
            optimizer: The optimizer whose ``state`` to edit.
            fill: ``"zero"`` (the entries of masked weights become 0), or ``"mean"``: they become the mean of
                the kept entries of the same tensor (SNFS's ``reset_momentum``, Dettmers & Zettlemoyer 2019).

        """
        if fill not in ("zero", "mean"):
            raise ValueError(f"`fill` must be 'zero' or 'mean'; got {fill!r}.")
        for p, m, u in zip(self._plist, self._mlist, self._ulist):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    if fill == "zero":
                        zero_masked_([local(value)], [u])
                    else:  # the mean over the whole tensor (gathered when sharded), written to the local shard
                        whole = full(value)
                        mean = torch.where(m, whole, 0.0).sum() / m.sum().clamp_min(1)
                        local(value).copy_(torch.where(u.bool(), local(value), mean))

    def update_(
        self, masks: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = (), fill: str = "zero"
    ) -> None:
        """Replace the masks in place, zero the newly masked weights and reset their optimizer state.

        Args:
            masks: New bool mask per name (every name of this set, same shapes).
            optimizers: Optimizers whose state to clean.
            fill: How masked state entries are reset, see :meth:`mask_optimizer_state_`.

        """
        self.load_state_dict(masks)
        self.apply_()
        for opt in optimizers:
            self.mask_optimizer_state_(opt, fill)

    def attach(self, optimizer: torch.optim.Optimizer, mask_grads: bool = True, mask_weights: bool = False) -> None:
        """Enforce the masks around every ``optimizer.step()``.

        Registers a step post-hook that re-applies the masks to the weights (not for the optimizers in
        :data:`ZERO_PRESERVING`, which leave zero weights with zero gradient and zero state at exactly
        zero, unless ``mask_weights``) and, if ``mask_grads``, a pre-hook that zeroes masked gradients.
        Lightning calls the step with a closure that runs backward *inside* the step, after the pre-hook;
        there, pass ``mask_grads=False`` and call :meth:`mask_grads_` from ``on_before_optimizer_step``
        instead. Pass ``mask_weights=True`` when the gradients of masked weights reach the optimizer.
        """
        if mask_grads:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.mask_grads_()))
        if mask_weights or type(optimizer) not in ZERO_PRESERVING:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))

    def mask_grads_in_backward(self) -> None:
        """Zero each masked gradient right after backward accumulates it (while it is still in cache).

        Registers a ``register_post_accumulate_grad_hook`` per parameter; the multiply then happens inside the
        backward pass, with the gradient hot in cache, instead of in a separate pass over all gradients
        (on ResNet-18 on 2 CPU threads, 1.009-1.016x the dense step vs 1.016-1.038x). Set
        :attr:`grad_hooks_active` to False for a backward whose dense gradients are needed (e.g. a RigL update
        step), and call :meth:`mask_grads_` after it. Only for single-process training: under DDP/FSDP the
        gradients are overwritten by their all-reduced values after the hooks ran. :meth:`detach` removes them.
        Frozen parameters (``requires_grad=False``, never given a gradient) get no hook.
        """
        self.grad_hooks_active = True
        for p, u in zip(self._plist, self._ulist):
            if not p.requires_grad:
                continue
            self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._mask_one_grad, u)))

    def _mask_one_grad(self, mask: Tensor, param: Tensor) -> None:
        grad = param.grad
        if not self.grad_hooks_active or grad is None or mask_bits_(grad, mask):
            return  # (the compiled kernel writes through a pointer: no autograd state to switch off)
        with torch.no_grad():
            bits = _as_bits(grad)
            if bits is None:
                grad.masked_fill_(mask == 0, 0)
            else:
                bits.mul_(mask)  # exactly 0 where pruned, even for a NaN gradient (see `zero_masked_`)

    def detach(self) -> None:
        """Remove every hook :meth:`attach` registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------ persistence
    def bind_(self, module: nn.Module) -> None:
        """Point the masks at the same-named parameters of ``module`` (e.g. after the model object changed).

        Raises:
            KeyError: If a masked parameter name is missing from ``module``.
            ValueError: If a shape differs.

        """
        found = dict(module.named_parameters())
        missing = [n for n in self._params if n not in found]
        if missing:
            raise KeyError(f"The model has no parameter named {missing[:5]}; the masks were made for another model.")
        for n in self._params:
            if found[n].shape != self._masks[n].shape:
                raise ValueError(
                    f"Parameter {n!r} has shape {tuple(found[n].shape)}, its mask {tuple(self._masks[n].shape)}."
                )
            self._params[n] = found[n]
            if self._masks[n].device != found[n].device:
                self._masks[n] = self._masks[n].to(found[n].device)
        self._refresh_lists()

    def state_dict(self) -> dict[str, Tensor]:
        """Masks as CPU bool tensors, by name."""
        return {n: m.detach().cpu().clone() for n, m in self._masks.items()}

    def load_state_dict(self, masks: Mapping[str, Tensor]) -> None:
        """Copy ``masks`` into the existing mask tensors (in place).

        Raises:
            KeyError: If the names differ from this set's.
            ValueError: If a shape differs.

        """
        if set(masks) != set(self._masks):
            extra, missing = sorted(set(masks) - set(self._masks)), sorted(set(self._masks) - set(masks))
            raise KeyError(f"Mask names differ: unexpected {extra[:5]}, missing {missing[:5]}.")
        for n, m in masks.items():
            if m.shape != self._masks[n].shape:
                raise ValueError(f"Mask {n!r} has shape {tuple(m.shape)}, expected {tuple(self._masks[n].shape)}.")
            self._masks[n].copy_(m.to(torch.bool))
