"""Truly sparse training (``backend="sparse"``): the targets train as CSR matrices, only their kept values exist.

Liu, Mocanu et al. 2020 ("Sparse evolutionary deep learning with over one million artificial neurons on
commodity hardware", Neural Computing and Applications 33:2589) train SET networks whose weights are sparse
matrices, so the cost of a step follows the kept count instead of the dense size. Here a session with
``backend="sparse"`` makes each targeted ``nn.Linear`` (or HF ``Conv1D``) a :class:`SparseTraining` layer once its
masks are decided (:class:`SparseMaskSet`), for the run only (:meth:`SparseMaskSet.revert` at the session's stop):

- the layer keeps ``values`` (an ``nn.Parameter`` of the kept count, in CSR order) and its CSR structure
  (``crow_indices``/``col_indices`` and those of the transpose) as buffers; forward and backward are the custom
  ops of :mod:`lightning_pai.core.sparse_ops` (``O(nnz)`` per input row);
- the optimizers are re-pointed from the dense ``weight`` to ``values``, their state (momentum, ``exp_avg``,
  ...) gathered to the kept count; a topology update rebuilds the structure in place and carries the state
  of surviving weights over (grown weights start at zero with zero state, as in the masked-dense path);
- the masks (:class:`SparseMaskSet`, a :class:`~lightning_pai.core.masks.MaskSet`) are unchanged for the
  session, its updater and its reports: names, bool masks and checkpoints are those of the masked run;
- ``state_dict`` shows the dense ``weight`` (zeros where pruned) and ``load_state_dict`` takes one, and the
  optimizers' ``state_dict`` shows dense-shaped state (zeros where pruned) and takes it back: checkpoints
  load into an ordinary dense model and optimizer, and the reverse;
- under DDP, the targets are left out of DDP's reducer (:func:`ignore_in_ddp`, from :meth:`Session.prepare
  <lightning_pai.core.session.Session.prepare>`, before the model is wrapped: Lightning's ``Trainer`` calls it in
  ``setup``; a plain loop creates its ``Sparsifier`` before wrapping; the Hugging Face ``Trainer`` wraps first, so
  there only one process trains sparse) and the kept values' gradients are all-reduced by the session, one bucket
  per step;
- a dense gradient exists only when an update reads it (RigL's growth, every ``delta_t`` steps, as the
  paper's cost model assumes): :meth:`SparseMaskSet.capture` makes each layer accumulate ``dYᵀ X`` for the
  step. SET's random growth never needs one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.core.masks import MaskSet
from lightning_pai.core.sharding import is_sharded
from lightning_pai.core.sparse_ops import sparse_linear
from lightning_pai.core.targets import is_hf_conv1d

#: How a session trains its targets: ``"masked"`` (dense weights, masks enforced around each step) or
#: ``"sparse"`` (CSR values only, :mod:`lightning_pai.core.sparse_train`).
BACKENDS = ("masked", "sparse")

#: Names of the buffers a :class:`SparseTraining` layer keeps (none is saved: ``state_dict`` shows ``weight``).
_STRUCTURE = ("crow_indices", "col_indices", "t_crow", "t_col", "t_perm")


# ------------------------------------------------------------------------------------------ structure
def csr_structure(mask: Tensor) -> dict[str, Tensor]:
    """The CSR structure of a 2-D bool ``mask`` and of its transpose, on the mask's device.

    The indices are int32 (what the compiled CPU kernels read, and half the memory traffic) while every count
    fits, int64 beyond 2³¹ - 1.

    Returns:
        ``crow_indices`` ``(rows + 1,)`` and ``col_indices`` ``(nnz,)`` of the mask (row-major order), and
        ``t_crow`` ``(cols + 1,)``, ``t_col`` ``(nnz,)`` of its transpose with ``t_perm`` ``(nnz,)`` (int64): the
        transpose's values are ``values[t_perm]``.
    """
    rows, cols = mask.shape
    index = mask.nonzero()
    r, c = index[:, 0], index[:, 1].contiguous()
    dtype = torch.int32 if max(rows, cols, r.numel()) < 2**31 else torch.long
    crow = torch.zeros(rows + 1, dtype=dtype, device=mask.device)
    crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    t_perm = torch.sort(c, stable=True).indices  # by column; rows ascending within a column (r is sorted)
    t_crow = torch.zeros(cols + 1, dtype=dtype, device=mask.device)
    t_crow[1:] = torch.bincount(c, minlength=cols).cumsum(0)
    return {
        "crow_indices": crow,
        "col_indices": c.to(dtype),
        "t_crow": t_crow,
        "t_col": r[t_perm].to(dtype),
        "t_perm": t_perm,
    }


def remap(old: Tensor, old_index: Tensor, new_index: Tensor) -> Tensor:
    """Entries of ``old`` (one per sorted flat index ``old_index``) at ``new_index``; 0 where ``old`` has none."""
    if old_index.numel() == 0 or new_index.numel() == 0:
        return old.new_zeros(new_index.shape)
    pos = torch.searchsorted(old_index, new_index).clamp_(max=old_index.numel() - 1)
    return torch.where(old_index[pos] == new_index, old[pos], 0)


# ------------------------------------------------------------------------------------------ the modules
class SparseTraining(nn.Module):
    """A linear-like layer training only its kept weights, stored in CSR (Liu, Mocanu et al. 2020).

    Made from a layer by :func:`to_sparse_training` (the object stays the same, so references, hooks and the
    parent module are untouched; its class becomes a subclass of this one, as ``torch.nn.utils.parametrize``
    does) and turned back by :func:`to_dense_training`. ``y = x Wᵀ + b`` with ``W`` (``(out, in)``) the CSR of
    ``values`` (:func:`~lightning_pai.core.sparse_ops.sparse_linear`: ``O(nnz)`` work per input row, forward and
    backward). The parameter it replaces, ``weight``, is ``W`` itself (``nn.Linear``) or ``Wᵀ`` (HF ``Conv1D``,
    :attr:`transposed`); every dense view (``state_dict``, :meth:`dense_weight`, :meth:`mask`, ``dense_grad``) has
    that parameter's shape.

    Attributes:
        values: The kept weights in CSR (row-major) order of ``W``, the parameter the optimizer steps.
        crow_indices, col_indices: The CSR structure (buffers, not saved: ``state_dict`` holds ``weight``).
        dense_grad: The dense gradient ``dL/dweight`` accumulated while :meth:`capture` is on, else None.
    """

    #: Whether the replaced ``weight`` is ``Wᵀ`` (``(in, out)``, HF ``Conv1D``) rather than ``W``.
    transposed = False
    values: nn.Parameter
    crow_indices: Tensor
    col_indices: Tensor
    in_features: int
    out_features: int
    bias: Tensor | None

    # ------------------------------------------------------------------ structure
    @property
    def nnz(self) -> int:
        """Number of kept weights."""
        return self.values.numel()

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the replaced ``weight``."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)

    def _rows(self) -> Tensor:
        device = self.crow_indices.device
        return torch.repeat_interleave(torch.arange(self.out_features, device=device), self.crow_indices.diff())

    def flat_index(self) -> Tensor:
        """The kept positions as sorted flat indices ``row * in_features + col`` of ``W`` (CSR order, int64)."""
        return self._rows() * self.in_features + self.col_indices.long()

    def weight_index(self) -> Tensor:
        """The kept positions as flat indices of the replaced ``weight`` (in CSR order): ``weight.view(-1)[i]``."""
        if self.transposed:
            return self.col_indices.long() * self.out_features + self._rows()
        return self.flat_index()

    def mask(self) -> Tensor:
        """The bool keep-mask the CSR structure stands for, in the replaced ``weight``'s shape."""
        out = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.values.device)
        out[self.weight_index()] = True
        return out.view(self.weight_shape)

    def set_structure(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Make ``mask`` (in ``weight``'s shape) the kept positions; surviving values stay, new ones start at 0.

        Returns:
            The old and the new sorted flat indices (to carry other per-weight state, see :func:`remap`).
        """
        old = self.flat_index()
        mask = mask.to(self.values.device)
        for name, t in csr_structure(mask.t() if self.transposed else mask).items():
            self._buffers[name] = t
        new = self.flat_index()
        with torch.no_grad():
            self.values.data = remap(self.values.detach(), old, new)
        self.values.grad = None
        return old, new

    # ------------------------------------------------------------------ dense views
    def dense_weight(self) -> Tensor:
        """The dense ``weight`` (zeros where pruned), a new tensor, no autograd."""
        values = self.values.detach()
        out = values.new_zeros(self.out_features * self.in_features)
        out[self.weight_index()] = values
        return out.view(self.weight_shape)

    @property
    def weight(self) -> Tensor:
        """The dense weight rebuilt from ``values``, differentiable (for code that reads ``layer.weight``)."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.weight_index(),), self.values).view(self.weight_shape)

    def dense_named_parameters(self) -> list[tuple[str, Tensor]]:
        """The dense layer's ``(name, parameter)`` pairs, for counts such as a report's coverage.

        ``weight`` is a storage-less ``meta`` tensor of its shape.
        """
        weight = torch.empty(self.weight_shape, dtype=self.values.dtype, device="meta")
        return [("weight", weight)] + ([("bias", self.bias)] if self.bias is not None else [])

    # ------------------------------------------------------------------ dense gradient capture
    def capture(self, on: bool) -> None:
        """Start (``on``: a zeroed ``dense_grad``) or stop (``dense_grad`` freed) accumulating ``dL/dweight``."""
        self.dense_grad = self.values.new_zeros(self.weight_shape) if on else None

    def _accumulate(self, x: Tensor, grad: Tensor) -> None:
        with torch.no_grad():
            dtype = self.dense_grad.dtype
            grad, x = grad.reshape(-1, self.out_features).to(dtype), x.reshape(-1, self.in_features).to(dtype)
            if self.transposed:
                self.dense_grad.addmm_(x.t(), grad)
            else:
                self.dense_grad.addmm_(grad.t(), x)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        values, bias = self.values, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, values = x.to(dtype), values.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif x.dtype != values.dtype:
            x = x.to(values.dtype)
        b = self._buffers
        y = sparse_linear(
            x, values, b["crow_indices"], b["col_indices"], b["t_crow"], b["t_col"], b["t_perm"], bias, self.in_features
        )
        if self.dense_grad is not None and y.requires_grad:  # an update step that reads dL/dW
            saved = x.detach()
            y.register_hook(lambda grad: self._accumulate(saved, grad))
        return y

    # ------------------------------------------------------------------ state
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "weight"
        if key in state_dict:
            dense = state_dict[key]
            local = {k: v for k, v in state_dict.items() if k != key}
            if tuple(dense.shape) == self.weight_shape:
                local[prefix + "values"] = dense.reshape(-1).to(self.values.device)[self.weight_index()]
            else:  # the base class reports the size mismatch
                local[prefix + "values"] = dense
            state_dict = local
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.out_features * self.in_features)
        return f"in={self.in_features}, out={self.out_features}, nnz={self.nnz} (density {density:.4f})"


class SparseTrainLinear(SparseTraining, nn.Linear):
    """An ``nn.Linear`` training sparse (see :class:`SparseTraining`)."""

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, nnz={self.nnz}, CSR"


class SparseTrainConv1D(SparseTraining):
    """An HF ``Conv1D`` (``y = x @ weight + b``, ``weight`` of shape ``(in, out)``) training sparse."""

    transposed = True

    def __repr__(self) -> str:
        return f"SparseTrainConv1D({self.extra_repr()})"


def sparse_class(module: nn.Module) -> type[SparseTraining] | None:
    """The :class:`SparseTraining` class ``module`` becomes, or None when it cannot train sparse.

    ``nn.Linear`` (exactly: a subclass may compute with its weight in other ways) and HF-style ``Conv1D``.
    """
    if type(module) is nn.Linear:
        return SparseTrainLinear
    if is_hf_conv1d(module) and type(module).__name__ == "Conv1D":
        return SparseTrainConv1D
    return None


def to_sparse_training(module: nn.Module, mask: Tensor) -> SparseTraining:
    """Make ``module`` (``nn.Linear`` or HF ``Conv1D``) train only the kept weights of ``mask``, in place.

    The dense ``weight`` parameter leaves the module (its storage is released; the object is kept and comes
    back at :func:`to_dense_training`); ``values`` holds its kept entries.

    Raises:
        TypeError: If ``module`` cannot train sparse (see :func:`sparse_class`).
    """
    cls = sparse_class(module)
    if cls is None:
        raise TypeError(f"Only `nn.Linear` and HF `Conv1D` layers train sparse; got {type(module).__name__}.")
    weight = module._parameters.pop("weight")
    module.__dict__["_dense_weight"], module.__dict__["_dense_class"] = weight, type(module)
    if cls is SparseTrainConv1D:
        module.in_features, module.out_features = weight.shape
    mask = mask.to(weight.device, torch.bool)
    module.__class__ = cls
    for name, t in csr_structure(mask.t() if cls.transposed else mask).items():
        module.register_buffer(name, t, persistent=False)
    flat = module.weight_index()
    values = nn.Parameter(weight.detach().reshape(-1)[flat].clone(), requires_grad=weight.requires_grad)
    module.register_parameter("values", values)
    module.dense_grad = None
    weight.data = weight.data.new_empty(0)  # the dense storage is released while the layer trains sparse
    return module


def to_dense_training(module: SparseTraining) -> nn.Module:
    """Turn a :class:`SparseTraining` layer back into the layer it was (same ``weight`` parameter object)."""
    dense = module.dense_weight()
    weight = module.__dict__.pop("_dense_weight")
    weight.data = dense
    del module._parameters["values"]
    for name in _STRUCTURE:
        del module._buffers[name]
    module.__dict__.pop("dense_grad", None)
    module.__class__ = module.__dict__.pop("_dense_class")
    if module.__class__ is not nn.Linear:
        del module.in_features, module.out_features
    module.register_parameter("weight", weight)
    return module


# ------------------------------------------------------------------------------------------ checks
def sparse_target_problems(module: nn.Module, names: Iterable[str]) -> list[str]:
    """The targets ``backend="sparse"`` cannot train, each with its owner's type (empty: all can)."""
    owners = dict(module.named_modules())
    uses: dict[int, int] = {}  # owners per parameter (a tied weight has several)
    for mod in module.modules():
        for p in mod._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    bad = []
    for name in names:
        prefix, _, attr = name.rpartition(".")
        owner = owners.get(prefix)
        param = getattr(owner, attr, None) if owner is not None else None
        if owner is None or sparse_class(owner) is None or attr != "weight":
            bad.append(f"{name} ({type(owner).__name__})")
        elif is_sharded(param):
            bad.append(f"{name} (sharded, FSDP)")
        elif uses.get(id(param), 0) > 1:
            bad.append(f"{name} (tied to another layer's weight)")
    return bad


def check_sparse_targets(module: nn.Module, names: Iterable[str], method: str) -> None:
    """Raise before training when ``backend="sparse"`` cannot train a target.

    Raises:
        ValueError: Naming ``backend``, its values, the targets that cannot train sparse and the supported types.
    """
    bad = sparse_target_problems(module, names)
    if bad:
        listed = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ValueError(
            f"`{method}(backend='sparse')` trains the weights of `nn.Linear` (exactly that type) and HF `Conv1D` "
            f"layers only, not sharded; these targets are not: {listed}. Use `backend='masked'` (the default; "
            f"`backend` is one of {', '.join(map(repr, BACKENDS))}) or leave them out with `exclude=`."
        )


def ignore_in_ddp(module: nn.Module, names: Iterable[str]) -> None:
    """Leave the sparse targets (their dense ``weight`` and the ``values`` that replace it) out of DDP.

    Call before the model is wrapped: DDP then neither broadcasts nor all-reduces them, and the session all-reduces
    the kept values' gradients itself (:meth:`SparseMaskSet.reduce_grads`).
    """
    names = list(names)
    extra = [n.rpartition(".")[0] + ("." if "." in n else "") + s for n in names for s in ("values", *_STRUCTURE)]
    current = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = list(dict.fromkeys([*current, *names, *extra]))


# ------------------------------------------------------------------------------------------ the mask set
def _swap_param(
    optimizers: Iterable[torch.optim.Optimizer], old: Tensor, new: Tensor, shape: tuple[int, ...], convert
) -> None:
    """Put ``new`` where ``old`` is in every optimizer's groups; state of ``old``'s ``shape`` becomes ``convert(t)``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = opt.state.pop(old, None)
        if state is not None:
            opt.state[new] = {
                k: convert(v) if isinstance(v, Tensor) and tuple(v.shape) == shape and v.dim() > 0 else v
                for k, v in state.items()
            }


class SparseMaskSet(MaskSet):
    """The masks of a session whose targets train sparse (:class:`SparseTraining`); see the module docstring.

    The bool masks, names, layouts, counts and ``state_dict`` are a :class:`~lightning_pai.core.masks.MaskSet`'s;
    enforcement is structural (nothing pruned is stored), so :meth:`apply_`, :meth:`mask_grads_` and
    :meth:`mask_optimizer_state_` have nothing to do, and :meth:`update_` rebuilds the CSR structures.

    Args:
        masks: The session's masks (over the dense parameters).
        module: The model the targets belong to.
        optimizers: The loop's optimizers (re-pointed to the ``values``).
    """

    def __init__(self, masks: MaskSet, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        # The same parameters, layouts and mask tensors as `masks` (no copy; they stay in step with it).
        self._params, self.layouts, self._masks = masks._params, masks.layouts, masks._masks
        self._handles: list = []
        self.grad_hooks_active = False
        self._refresh_lists()
        self.dense_masks = masks
        self.optimizers = list(optimizers)
        self._capturing = False
        self._reduced_step: int | None = None
        self.layers: dict[str, SparseTraining] = {}
        owners = dict(module.named_modules())
        for name, mask in self.items():
            owner = owners[name.rpartition(".")[0]]
            weight = owner.weight
            shape = tuple(weight.shape)
            layer = to_sparse_training(owner, mask)
            flat = layer.weight_index()
            _swap_param(self.optimizers, weight, layer.values, shape, lambda t, f=flat: t.reshape(-1)[f].clone())
            self.layers[name] = layer
        self._hooks = [
            handle
            for opt in self.optimizers
            for handle in (
                opt.register_state_dict_post_hook(self._dense_state),
                opt.register_load_state_dict_pre_hook(self._sparse_state),
            )
        ]

    # ----------------------------------------------------------------- reading
    def kept(self) -> dict[str, int]:
        """Number of kept weights per layer (the CSR counts: no device synchronisation)."""
        return {n: layer.nnz for n, layer in self.layers.items()}

    def weights(self) -> dict[str, Tensor]:
        """The dense weights rebuilt from the CSR values (zeros where pruned)."""
        return {n: layer.dense_weight() for n, layer in self.layers.items()}

    def grads(self) -> dict[str, Tensor]:
        """The dense gradients while :meth:`capture` is on, else the kept values' gradients (those that exist)."""
        if self._capturing:
            return {n: layer.dense_grad for n, layer in self.layers.items()}
        return {n: layer.values.grad for n, layer in self.layers.items() if layer.values.grad is not None}

    @property
    def values(self) -> list[nn.Parameter]:
        """The trained parameters, one per target."""
        return [layer.values for layer in self.layers.values()]

    # ----------------------------------------------------------------- per step
    def capture(self, on: bool) -> None:
        """Whether the coming forward/backward passes accumulate each layer's dense gradient (an update reads it)."""
        if on or self._capturing:
            for layer in self.layers.values():
                layer.capture(on)
        self._capturing = on

    def reduce_grads(self, host: Any, step: int) -> None:
        """Average the values' gradients (and captured dense gradients) over the processes, once per step."""
        if host.world_size <= 1 or self._reduced_step == step:
            return
        self._reduced_step = step
        grads = [v.grad for v in self.values if v.grad is not None]
        if self._capturing:
            grads += [layer.dense_grad for layer in self.layers.values()]
        host.all_reduce_mean(grads)

    def broadcast_values(self, host: Any) -> None:
        """Rank zero's values on every rank (DDP, which leaves the sparse targets alone, did not sync them)."""
        if host.world_size <= 1:
            return
        mine = [v.detach().cpu() for v in self.values]
        theirs = host.broadcast(mine, src=0)
        with torch.no_grad():
            for v, t in zip(self.values, theirs):
                v.copy_(t.to(v.device))

    # ----------------------------------------------------------------- enforcement: structural
    def apply_(self) -> None:
        """Nothing to zero: pruned weights are not stored."""

    def mask_grads_(self) -> None:
        """Nothing to zero: only kept weights have gradients."""

    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer, fill: str = "zero") -> None:
        """Nothing to reset: the optimizer state is sized to the kept count.

        Raises:
            ValueError: For ``fill="mean"`` (state of pruned weights, which sparse training does not keep).
        """
        if fill != "zero":
            raise ValueError("`backend='sparse'` keeps no optimizer state for pruned weights (`fill='zero'` only).")

    def attach(self, optimizer: torch.optim.Optimizer, mask_grads: bool = True, mask_weights: bool = False) -> None:
        """Nothing to enforce around the step."""

    def mask_grads_in_backward(self) -> None:
        """Nothing to mask in backward."""

    def bind_(self, module: nn.Module) -> None:
        """Not supported while training sparse.

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError("A `SparseMaskSet` stays on the model it converted; revert it first.")

    # ----------------------------------------------------------------- changes
    @torch.no_grad()
    def update_(
        self, masks: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = (), fill: str = "zero"
    ) -> None:
        """New masks: each changed layer's CSR rebuilt, surviving values and optimizer state kept, new ones 0.

        Raises:
            ValueError: For ``fill="mean"`` (see :meth:`mask_optimizer_state_`).
        """
        self.mask_optimizer_state_(None, fill)
        optimizers = list(optimizers)
        for name, mask in masks.items():
            mask = mask.to(self._masks[name].device, torch.bool)
            if torch.equal(mask, self._masks[name]):
                continue
            layer = self.layers[name]
            old, new = layer.set_structure(mask)
            for opt in optimizers:
                state = opt.state.get(layer.values)
                if state is None:
                    continue
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == old.numel():
                        state[key] = remap(value, old, new)
        MaskSet.load_state_dict(self, masks)

    def load_state_dict(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (in place), rebuilding the CSR structures (see :meth:`update_`)."""
        self.update_(masks, self.optimizers)

    # ----------------------------------------------------------------- optimizer checkpoints
    def _slots(self, optimizer: torch.optim.Optimizer) -> dict[int, SparseTraining]:
        """Index in ``optimizer.state_dict()['state']`` -> layer, for the values it steps."""
        layers = {id(layer.values): layer for layer in self.layers.values()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: layers[id(p)] for i, p in enumerate(params) if id(p) in layers}

    def _dense_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``optimizer.state_dict()`` with each values' state scattered to the dense weight's shape."""
        slots = self._slots(optimizer)
        state = dict(state_dict["state"])
        for i, layer in slots.items():
            if i in state:
                flat, shape = layer.weight_index(), layer.weight_shape
                state[i] = {k: _scatter(v, flat, shape, layer.nnz) for k, v in state[i].items()}
        return {**state_dict, "state": state}

    def _sparse_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A dense-shaped optimizer state (a masked or a sparse run's checkpoint) gathered to the values."""
        slots = self._slots(optimizer)
        state = dict(state_dict["state"])
        for i, layer in slots.items():
            if i in state:
                shape, flat = layer.weight_shape, layer.weight_index().cpu()
                state[i] = {
                    k: v.reshape(-1)[flat.to(v.device)].clone() if isinstance(v, Tensor) and tuple(v.shape) == shape
                    else v
                    for k, v in state[i].items()
                }  # fmt: skip
        return {**state_dict, "state": state}

    # ----------------------------------------------------------------- the end
    def revert(self) -> MaskSet:
        """Dense layers again (same ``weight`` objects, optimizers re-pointed, state scattered); the dense masks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.capture(False)
        for layer in self.layers.values():
            flat, shape, values = layer.weight_index(), layer.weight_shape, layer.values
            to_dense_training(layer)
            scatter = lambda t, f=flat, s=shape: _scatter(t, f, s, t.numel())  # noqa: E731
            _swap_param(self.optimizers, values, layer.weight, (values.numel(),), scatter)
        self.layers = {}
        return self.dense_masks


def _scatter(value: Any, flat: Tensor, shape: tuple[int, int], nnz: int) -> Any:
    """A per-value state tensor ``(nnz,)`` as the dense ``shape`` (zeros where pruned); anything else as is."""
    if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() != nnz:
        return value
    out = value.new_zeros(shape[0] * shape[1])
    out[flat.to(value.device)] = value
    return out.view(shape)
