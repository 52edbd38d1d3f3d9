"""FISH masks: a fixed set of trainable entries chosen by the empirical Fisher information, the others frozen.

Sung, Nair & Raffel 2021, "Training neural networks with fixed sparse masks" (NeurIPS; official code
varunnair18/FISH). Before training, with the model in eval mode (dropout off), the diagonal of the empirical
Fisher information is estimated from ``N`` single training samples ``(x_i, y_i)`` and their true labels::

    F_θ = Σ_{i=1..N} (∂ L(x_i, y_i) / ∂θ)²

for every entry ``θ`` of every trainable parameter (embeddings, biases and norms included). The task head
trains in full; of the others, the ``k = int(density · P) - P_head`` entries with the largest ``F_θ`` train
(``P``: the trainable entries in all, head included; one global top-k over the raw values, no per-layer
normalisation; ties to the earliest entries), and every other entry is *frozen*: it keeps its pretrained value
bit for bit. ``density`` is the fraction of entries trained, not kept: nothing is pruned.

The mask is a *gradient-only* mask (:class:`TrainableMasks`): the gradients of frozen entries are zeroed before
every optimizer step, which leaves them bit-identical under SGD (momentum, Nesterov) and Adam/AdamW without
weight decay (their state stays 0). Weight decay, coupled or decoupled, would move them, and so could any
other optimizer: for every parameter in an optimizer group with ``weight_decay != 0``, or held by an optimizer
other than ``torch.optim.SGD``/``Adam``/``AdamW``, the session keeps a copy and writes its frozen entries back
after every step. Exports refuse these masks as pruning masks (they would zero the frozen weights); a
fine-tuned model is stored as its trained entries by :func:`lightning_pai.deploy.export.save_diff`.

Per-sample gradients come from ``torch.func`` (``vmap`` of ``grad`` over a ``functional_call``, in chunks) when
the model allows it and it pays (small models, accelerators), else from one backward pass per sample.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_pai.core.masks import ZERO_PRESERVING, MaskSet
from lightning_pai.core.pruning import preserved_state
from lightning_pai.core.scorers import default_forward
from lightning_pai.core.select import active_counts, topk_masks
from lightning_pai.core.session import Host, Session
from lightning_pai.core.sharding import is_sharded
from lightning_pai.core.targets import Selectors, target_layouts
from lightning_pai.core.validation import check_choice, check_number, check_positive_int

#: Module names taken as the task head when ``head`` is not given (the outermost, last registered one wins).
HEAD_NAMES = ("classifier", "head", "fc", "lm_head", "score")
#: How per-sample gradients are computed: ``"auto"`` (``torch.func`` where it pays and the model allows it),
#: ``"vmap"`` or ``"loop"`` (one backward pass per sample).
PER_SAMPLE = ("auto", "vmap", "loop")
#: Largest number of per-sample gradient entries ``vmap`` materialises at once (a chunk of samples).
VMAP_ENTRIES = 1 << 22
#: ``per_sample="auto"`` on the CPU maps with ``vmap`` only models of at most this many entries: there the loop's
#: per-sample overhead dominates (1 thread, 256 samples: a 9.6k-entry MLP 7x faster by ``vmap``), above it the
#: batched per-sample gradients cost more memory traffic than they save (LeNet-300-100, 267k: 2x slower).
VMAP_CPU_MAX = 1 << 16

Head = str | Sequence[str] | None
LossFn = Callable[[nn.Module, Any], Tensor]


# ----------------------------------------------------------------------------------------------- samples
def _map(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor leaf (dicts, lists and tuples rebuilt; other leaves kept)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _leaves(batch: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _map(batch, out.append)
    return out


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the leading size of its first tensor with a dimension.

    Raises:
        ValueError: If the batch holds no such tensor.
    """
    for t in _leaves(batch):
        if t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError(
        f"Cannot split a training batch ({type(batch).__name__}) into samples: it holds no tensor with a batch "
        "dimension."
    )


def _rows(batch: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``start:stop`` of ``batch``: every tensor whose leading size is ``size`` sliced, the rest kept."""
    return _map(batch, lambda t: t[start:stop] if t.dim() >= 1 and t.shape[0] == size else t)


def split_samples(batches: Sequence[Any], samples: int) -> list[Any]:
    """The first ``samples`` samples of ``batches``, each a batch of one (at most as many as there are)."""
    out: list[Any] = []
    for batch in batches:
        size = batch_size(batch)
        for i in range(size):
            if len(out) == samples:
                return out
            out.append(_rows(batch, i, i + 1, size))
    return out


# ------------------------------------------------------------------------------------------------ Fisher
class _Loss(nn.Module):
    """``loss_fn(module, batch)`` as a module, so ``torch.func.functional_call`` can swap the parameters in."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.inner, batch)


def _accumulate(fisher: list[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``F += g²`` for one sample (missing gradients count as 0)."""
    for f, g in zip(fisher, grads):
        if g is not None:
            g = g.detach().to(f.dtype)
            f.add_(g * g)


def _loop(module: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, samples: Sequence[Any], fisher) -> None:
    for sample in samples:
        loss = loss_fn(module, sample)
        _accumulate(fisher, torch.autograd.grad(loss, params, allow_unused=True))


def _vmap(
    module: nn.Module, names: list[str], params: list[nn.Parameter], loss_fn: LossFn, batches, samples: int, fisher
) -> None:
    """Per-sample gradients by ``vmap(grad(...))`` over chunks of each batch's rows; their squares summed per chunk."""
    from torch.func import functional_call, grad, vmap

    wrapper = _Loss(module, loss_fn)
    values = {f"inner.{n}": p.detach() for n, p in zip(names, params)}
    rows = max(1, VMAP_ENTRIES // max(1, sum(p.numel() for p in params)))

    def sample_loss(values: dict[str, Tensor], sample: Any) -> Tensor:
        return functional_call(wrapper, values, (_map(sample, lambda t: t.unsqueeze(0)),))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))
    done = 0
    for batch in batches:
        size = batch_size(batch)
        if any(t.dim() == 0 or t.shape[0] != size for t in _leaves(batch)):
            raise ValueError("every tensor of a batch must have the batch dimension to be mapped over")
        for start in range(0, size, rows):
            stop = min(size, start + rows, start + samples - done)
            if stop <= start:
                return
            grads = per_sample(values, _rows(batch, start, stop, size))
            for f, n in zip(fisher, names):
                g = grads[f"inner.{n}"].detach().to(f.dtype)
                f.add_((g * g).sum(0))
            done += stop - start


@dataclass(frozen=True)
class Fisher:
    """The empirical Fisher information of some parameters, and how it was computed.

    Attributes:
        values: ``Σ_i (∂L_i/∂θ)²`` per parameter, by name (float32, float64 for float64 parameters).
        samples: Number of samples summed.
        per_sample: ``"vmap"`` or ``"loop"``: how the per-sample gradients were computed.
    """

    values: dict[str, Tensor]
    samples: int
    per_sample: str


def empirical_fisher(
    module: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Sequence[Any],
    loss_fn: LossFn | None = None,
    samples: int = 1024,
    per_sample: str = "auto",
) -> Fisher:
    """The diagonal empirical Fisher information ``F_θ = Σ_i (∂L(x_i, y_i)/∂θ)²`` over single samples.

    The first ``samples`` samples of ``batches`` are taken one by one (a batch of one each, so ``L`` is the
    sample's own loss with its true label), with ``module`` in eval mode; its train/eval flags, buffers and
    ``requires_grad`` are restored afterwards and no ``.grad`` is touched.

    Args:
        module: The model.
        params: The parameters to estimate it for, by name (each must require grad).
        batches: Training batches (tensors with a leading batch dimension, in tuples, lists or dicts).
        loss_fn: ``loss_fn(module, batch) -> scalar loss`` (default: cross-entropy of
            :func:`~lightning_pai.core.scorers.default_forward`).
        samples: How many samples to sum over (fewer if the batches hold fewer).
        per_sample: ``"auto"``: ``torch.func.vmap`` over chunks of samples for models on an accelerator or small
            ones (:data:`VMAP_CPU_MAX`), falling back to one backward pass per sample when the model cannot be
            mapped over (in-place updates, ``.item()``, data-dependent control flow), and that loop for larger
            models on the CPU; ``"vmap"`` or ``"loop"`` to force one.

    Returns:
        The :class:`Fisher` values and how many samples they sum.

    Raises:
        ValueError: If ``batches`` hold no sample, or ``per_sample`` is unknown.
    """
    check_choice(per_sample, PER_SAMPLE, "per_sample")
    samples = check_positive_int(samples, "samples", "training samples of the Fisher information")
    if loss_fn is None:

        def loss_fn(m: nn.Module, batch: Any) -> Tensor:
            return nn.functional.cross_entropy(*default_forward(m, batch))

    names = list(params)
    plist = list(params.values())
    rows = split_samples(batches, samples)
    if not rows:
        raise ValueError("The training data gave no sample to estimate the Fisher information on.")

    def zeros() -> list[Tensor]:
        return [torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                            device=p.device) for p in plist]  # fmt: skip

    fisher = zeros()
    used = "loop"
    with preserved_state(module), torch.enable_grad():
        module.eval()
        entries = sum(p.numel() for p in plist)
        small = entries <= VMAP_CPU_MAX or any(p.device.type != "cpu" for p in plist)
        if per_sample == "vmap" or (per_sample == "auto" and small and VMAP_ENTRIES // max(1, entries) > 1):
            try:
                _vmap(module, names, plist, loss_fn, batches, len(rows), fisher)
                used = "vmap"
            except Exception:
                if per_sample == "vmap":
                    raise
                fisher = zeros()  # a model torch.func cannot map over: one backward pass per sample
        if used == "loop":
            _loop(module, plist, loss_fn, rows, fisher)
    return Fisher(dict(zip(names, fisher)), len(rows), used)


# ------------------------------------------------------------------------------------------ head, budget
def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def resolve_head(module: nn.Module, targets: Mapping[str, nn.Parameter], head: Head = None) -> list[str]:
    """The targets that form the task head (they train in full), in target order.

    Args:
        module: The model.
        targets: The parameters under the mask, by name.
        head: Glob patterns over parameter or module names (a module's pattern selects all its parameters, e.g.
            ``"classifier"``), ``()`` for no head, or None: the outermost module named one of :data:`HEAD_NAMES`
            registered last (e.g. BERT's ``classifier``, a timm model's ``head``/``fc``), else the last
            ``nn.Linear``.

    Raises:
        ValueError: If a pattern matches no parameter or module.
    """
    mods = dict(module.named_modules())
    if head is None:
        found = [
            n
            for n, m in mods.items()
            if n and n.rsplit(".", 1)[-1] in HEAD_NAMES and next(m.parameters(), None) is not None
        ]
        outer = [n for n in found if not any(a in found for a in _ancestors(n))]
        linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        pick = outer[-1] if outer else linears[-1] if linears else None
        ids = set() if pick is None else {id(p) for p in mods[pick].parameters()}
    else:
        patterns = [head] if isinstance(head, str) else list(head)
        named = list(module.named_parameters(remove_duplicate=False))
        ids = set()
        for pattern in patterns:
            hits = [p for n, p in named if any(fnmatch.fnmatchcase(x, pattern) for x in [n, *_ancestors(n)])]
            if not hits:
                example = ", ".join(n for n, _ in named[:5]) + (", ..." if len(named) > 5 else "")
                raise ValueError(
                    f"`head` entry {pattern!r} matches no parameter or module. Parameter names look like: {example}"
                )
            ids.update(id(p) for p in hits)
    return [n for n, p in targets.items() if id(p) in ids]


def trainable_budget(total: int, head_size: int, density: float, head: Sequence[str] = (), name: str = "FISH") -> int:
    """``k = int(density · total) - head_size``: the entries besides the head that train.

    Raises:
        ValueError: If the head alone exceeds ``int(density · total)``.
    """
    allowed = int(density * total)
    k = allowed - head_size
    if k < 0:
        shown = ", ".join(head[:4]) + (", ..." if len(head) > 4 else "")
        raise ValueError(
            f"`{name}(density={density:g})` trains int({density:g} x {total:,}) = {allowed:,} of the {total:,} "
            f"trainable entries, but the head alone (`head`: {shown}) has {head_size:,}: raise `density` to at least "
            f"{math.ceil(head_size / total * 1e4) / 1e4:g}, or name a smaller head (`head=[...]`, `head=()` for none)."
        )
    return k


def fish_masks(fisher: Mapping[str, Tensor], sizes: Mapping[str, int], head: Sequence[str], k: int) -> dict:
    """The FISH masks: every head entry, and the ``k`` largest Fisher values of the others (one global top-k).

    Args:
        fisher: Fisher values of the non-head targets, by name (raw values, no per-layer normalisation).
        sizes: Shapes of every target (head included), by name, in order.
        head: Names of the head's targets.
        k: Entries to select besides the head.

    Returns:
        Bool masks by name (True: trains), in ``sizes``' order; ties at the k-th value go to the earliest entries.
    """
    rest = [n for n in sizes if n not in head]
    picked = dict(zip(rest, topk_masks([fisher[n] for n in rest], k))) if rest else {}
    return {n: torch.ones(sizes[n], dtype=torch.bool) if n in head else picked[n].cpu() for n in sizes}


# -------------------------------------------------------------------------------------------------- masks
class TrainableMasks(MaskSet):
    """Gradient-only masks: True entries train, False entries are *frozen* (kept at their values), never zeroed.

    A :class:`~lightning_pai.core.masks.MaskSet` whose :meth:`apply_` does nothing: gradients (and optimizer
    state) of frozen entries are zeroed as for pruning masks, the weights are left alone. ``prunes`` is False, so
    exports that would bake zeros (``make_permanent``, ``save_sparse``, ``to_sparse_inference``) refuse them.
    """

    #: Not pruning masks: the False entries keep their values.
    prunes = False

    def apply_(self) -> None:
        """Nothing to apply: frozen entries keep their values (their gradients are masked instead)."""

    @property
    def trainable_fraction(self) -> float:
        """Entries that train / all entries under the masks (``density``)."""
        return self.density


@dataclass(frozen=True)
class TrainableRow:
    """One parameter of a :class:`TrainableReport`: how many of its entries train."""

    name: str
    shape: tuple[int, ...]
    trainable: int
    total: int
    head: bool = False

    @property
    def fraction(self) -> float:
        """Entries that train / all entries."""
        return self.trainable / self.total if self.total else 0.0


@dataclass(frozen=True)
class TrainableReport:
    """Which entries a gradient-only mask trains, per parameter and in all; nothing is pruned.

    Attributes:
        rows: One row per parameter under the mask.
        samples: Samples the Fisher information was estimated on (None when the masks were restored).
        skipped: Frozen parameters (``requires_grad=False``), which neither train nor count.
    """

    rows: list[TrainableRow]
    samples: int | None = None
    skipped: tuple[str, ...] = ()

    @property
    def trainable(self) -> int:
        """Entries that train."""
        return sum(r.trainable for r in self.rows)

    @property
    def total(self) -> int:
        """Entries under the mask."""
        return sum(r.total for r in self.rows)

    @property
    def trainable_fraction(self) -> float:
        """Entries that train / entries under the mask (the method's ``density``)."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def head(self) -> list[str]:
        """The head's parameters (trained in full)."""
        return [r.name for r in self.rows if r.head]

    def metrics(self, prefix: str = "fish") -> dict[str, float]:
        """``{prefix}/trainable_fraction`` and ``{prefix}/trainable`` (a count) for loggers."""
        return {f"{prefix}/trainable_fraction": self.trainable_fraction, f"{prefix}/trainable": float(self.trainable)}

    def summary(self) -> str:
        """One line: the trainable fraction, counts and the head."""
        head = sum(r.total for r in self.rows if r.head)
        where = f" on {self.samples:,} samples" if self.samples is not None else ""
        return (
            f"trainable fraction {self.trainable_fraction:.4f} ({self.trainable:,} of {self.total:,} entries; head "
            f"{head:,} in full, the rest chosen by Fisher information{where}); the other entries stay frozen"
        )

    def __str__(self) -> str:
        header = ("", "Parameter", "Shape", "Trainable / Total", "Fraction")
        body = [
            (str(i), r.name + ("  (head)" if r.head else ""), "x".join(map(str, r.shape)),
             f"{r.trainable:,} / {r.total:,}", f"{r.fraction:.4f}")
            for i, r in enumerate(self.rows)
        ]  # fmt: skip
        body.append(("", "Total", "", f"{self.trainable:,} / {self.total:,}", f"{self.trainable_fraction:.4f}"))
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), "-" * (sum(widths) + 3 * (len(widths) - 1)), *(fmt.format(*r) for r in body)]
        if self.skipped:
            lines.append(f"Not counted, frozen by the model (requires_grad=False): {', '.join(self.skipped[:5])}.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ session
class FISHSession(Session):
    """FISH (Sung et al. 2021): a fixed gradient-only mask from the empirical Fisher information, enforced.

    ``start`` estimates ``F_θ = Σ_i (∂L_i/∂θ)²`` over the first ``samples`` training samples of rank zero (one by
    one, model in eval mode; :func:`empirical_fisher`) and selects the head plus the
    ``int(density · P) - P_head`` entries with the largest values (:func:`fish_masks`); every rank gets rank
    zero's masks. The masks then never change: frozen entries' gradients are zeroed before each step, and
    their values are written back after each step of an optimizer that could move them (weight decay, or not
    SGD/Adam/AdamW). Restored masks (checkpoint, previous fit) are used as they are: no new estimate.

    Args:
        name: The method's name, used in messages.
        density: Fraction of the trainable entries that train, in ``(0, 1]`` (the rest are frozen, not removed).
        samples: Training samples the Fisher information sums over.
        head: The task head's parameters (see :func:`resolve_head`).
        loss_fn: ``loss_fn(module, batch) -> loss``; None: the loop's own loss (Lightning's ``training_step``,
            the HF model's ``loss``), else cross-entropy of ``default_forward``.
        per_sample: How per-sample gradients are computed (:data:`PER_SAMPLE`).
        include: The parameters under the mask (default: every floating parameter that requires grad).
        exclude: Parameters left out of the mask (they train in full, outside the budget).
        verbose: Print the table (rank zero) when the masks are set.
        frozen: Parameters with ``requires_grad=False``: ``"skip"`` (leave them out), or ``"error"``.
    """

    #: Gradient-only masks: nothing is pruned (exports refuse to treat them as pruning masks).
    prunes = False

    def __init__(
        self,
        name: str,
        *,
        density: float,
        samples: int = 1024,
        head: Head = None,
        loss_fn: LossFn | None = None,
        per_sample: str = "auto",
        include: Selectors = None,
        exclude: Selectors = None,
        verbose: bool = True,
        frozen: str = "skip",
    ) -> None:
        super().__init__(name, include="*" if include is None else include, exclude=exclude, verbose=verbose,
                         frozen=frozen)  # fmt: skip
        self.density = check_number(density, "density", 0.0, 1.0, low_open=True, what="fraction of entries trained")
        self.samples = check_positive_int(samples, "samples", "training samples of the Fisher information")
        check_choice(per_sample, PER_SAMPLE, "per_sample")
        self.head, self.loss_fn, self.per_sample = head, loss_fn, per_sample
        self.head_names: list[str] = []
        self.fisher_samples: int | None = None
        self.fisher_per_sample: str | None = None
        self.estimates = 0  # Fisher estimates made by this session (0 after a restore)
        self._anchors: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ set-up
    def frozen_conflict(self) -> str | None:
        """A frozen parameter has no gradient to score or train."""
        return "chooses the entries it trains by their gradients (Fisher information)"

    def _plan(self, module: nn.Module) -> tuple[dict[str, nn.Parameter], list[str], int]:
        targets = self.select(module)
        head = resolve_head(module, targets, self.head)
        total = sum(p.numel() for p in targets.values())
        k = trainable_budget(total, sum(targets[n].numel() for n in head), self.density, head, self.name)
        return targets, head, k

    def check(self, module: nn.Module) -> None:
        """Refuse before training: frozen targets under ``frozen="prune"``, a ``head`` larger than the budget."""
        super().check(module)
        self._plan(module)

    def start(self, module: nn.Module, host: Host | None = None) -> None:
        """Set the masks (restored, kept from a previous fit, or estimated on rank zero) and enforce them."""
        self.module, self.host = module, host if host is not None else Host()
        targets, self.head_names, k = self._plan(module)
        sharded = [n for n, p in targets.items() if is_sharded(p)]
        if sharded:
            raise ValueError(
                f"`{self.name}` estimates per-sample gradients, which are not sharded yet: it does not run on "
                f"FSDP2-sharded parameters ({', '.join(sharded[:3])}). Use DDP."
            )
        masks = TrainableMasks(targets, layouts=target_layouts(module, list(targets)))
        self._note_targets(module, targets)
        self._load_masks(masks, lambda: self._decide(targets, k))
        self.masks = masks
        for opt in self.host.optimizers:
            masks.mask_optimizer_state_(opt)
        self._anchor()
        self._in_backward = self.host.world_size == 1
        if self._in_backward:
            masks.mask_grads_in_backward()
        self.masks_changed()

    def _decide(self, targets: dict[str, nn.Parameter], k: int) -> dict[str, Tensor]:
        """Rank zero's masks and estimate facts, on every rank (every rank draws the batches: a collective)."""
        batches = self._batches()
        decided = None
        if self.host.is_global_zero:
            rest = {n: p for n, p in targets.items() if n not in self.head_names}
            fisher = empirical_fisher(self.module, rest, batches, self._loss(), self.samples, self.per_sample)
            sizes = {n: p.shape for n, p in targets.items()}
            decided = {
                "masks": fish_masks(fisher.values, sizes, self.head_names, k),
                "samples": fisher.samples,
                "per_sample": fisher.per_sample,
            }
            self.estimates += 1
            if fisher.samples < self.samples:
                self.host.warn(
                    f"`{self.name}`: the training data holds {fisher.samples} samples, fewer than `samples`="
                    f"{self.samples}: the Fisher information sums over those."
                )
        if self.host.world_size > 1:
            decided = self.host.broadcast(decided, src=0)
        self.fisher_samples, self.fisher_per_sample = decided["samples"], decided["per_sample"]
        return decided["masks"]

    def _batches(self) -> list[Any]:
        """Enough training batches for ``samples`` samples (the first one tells the batch size)."""
        try:
            first = self.host.batches(1)
            if first:
                need = math.ceil(self.samples / batch_size(first[0]))
                return first if need <= 1 else self.host.batches(need)
        except ValueError as err:
            raise ValueError(
                f"`{self.name}` estimates the Fisher information on training samples before training: {err}"
            ) from err
        raise ValueError(
            f"`{self.name}` estimates the Fisher information on training samples before training, but the training "
            "data gave none: pass a non-empty training dataloader (`data=` for a plain loop)."
        )

    def _loss(self) -> LossFn | None:
        return self.loss_fn if self.loss_fn is not None else self.host.default_loss(self.name)

    def _anchor(self) -> None:
        """Copy the parameters whose frozen entries an optimizer step could move, and write them back after it."""
        moving: set[int] = set()
        for opt in self.host.optimizers:
            exact = type(opt) in ZERO_PRESERVING  # zero gradient and zero state: no move without weight decay
            for group in opt.param_groups:
                if not exact or group.get("weight_decay", 0) != 0:
                    moving.update(id(p) for p in group["params"])
        counts = active_counts(dict(self.masks.items()))
        params = self.masks.params
        self._anchors = {n: p.detach().clone() for n, p in params.items() if id(p) in moving and counts[n] < p.numel()}
        if self._anchors:
            for opt in self.host.optimizers:
                self._handles.append(opt.register_step_post_hook(lambda *_: self.restore_frozen_()))

    @torch.no_grad()
    def restore_frozen_(self) -> None:
        """Write the frozen entries of the anchored parameters back (after an optimizer step)."""
        params = self.masks.params
        for n, anchor in self._anchors.items():
            p = params[n].detach()
            torch.where(self.masks[n], p, anchor, out=p)

    def stop(self) -> None:
        """Remove the hooks and drop the copies (masks and facts are kept)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._anchors = {}
        super().stop()

    # ------------------------------------------------------------------ reporting
    def _announce(self) -> None:
        self.masks_changed()

    def report(self, module: nn.Module | None = None) -> TrainableReport:
        """Which entries train: per parameter and the trainable fraction (nothing is pruned).

        Raises:
            RuntimeError: Before the session has masks.
        """
        masks = self.current_masks()
        if masks is None:
            raise RuntimeError(f"`{self.name}` has no masks yet: they are set when training starts.")
        counts = active_counts(masks)
        head = set(self.head_names)
        rows = [TrainableRow(n, tuple(m.shape), counts[n], m.numel(), n in head) for n, m in masks.items()]
        return TrainableReport(rows, self.fisher_samples, tuple(self.skipped))

    def masks_changed(self, step: int | None = None) -> None:
        """Log ``fish/*`` metrics and, if verbose, print the table (rank zero)."""
        if not self.host.is_global_zero:
            return
        report = self.report(self.module)
        self.host.log(report.metrics(), step)
        if self.verbose:
            self.host.echo(f"{self.name}: {report.summary()}\n{report}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The masks, the head and how the Fisher information was estimated."""
        return {
            **super().state_dict(),
            "head": list(self.head_names),
            "samples": self.fisher_samples,
            "per_sample": self.fisher_per_sample,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied at once when started, else at :meth:`start`)."""
        super().load_state_dict(state)
        if state.get("masks") is not None:
            self.fisher_samples, self.fisher_per_sample = state.get("samples"), state.get("per_sample")
            self.head_names = list(state.get("head") or self.head_names)


__all__ = [
    "HEAD_NAMES",
    "PER_SAMPLE",
    "FISHSession",
    "Fisher",
    "TrainableMasks",
    "TrainableReport",
    "TrainableRow",
    "batch_size",
    "empirical_fisher",
    "fish_masks",
    "resolve_head",
    "split_samples",
    "trainable_budget",
]
