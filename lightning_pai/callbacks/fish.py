"""FISH masks: fine-tune a fixed, Fisher-chosen fraction of the entries; the others stay frozen."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from typing_extensions import Unpack

from lightning_pai.callbacks.base import SparseCallback, TargetOptions
from lightning_pai.callbacks.registry import MethodCard
from lightning_pai.core.fish import PER_SAMPLE, FISHSession, Head, LossFn, TrainableReport
from lightning_pai.core.validation import check_choice, check_number, check_positive_int


class FISH(SparseCallback):
    """FISH masks (Sung, Nair & Raffel 2021, "Training neural networks with fixed sparse masks", NeurIPS).

    At fit start, with the model in eval mode, the empirical Fisher information of every trainable entry is
    estimated from the first ``samples`` training samples, one at a time, with their true labels:
    ``F_θ = Σ_{i=1..N} (∂L(x_i, y_i)/∂θ)²`` (the official code's ``calculate_the_importance_label``). The task
    head trains in full; of the other entries (embeddings, biases and norms included) the
    ``k = int(density · P) - P_head`` with the largest ``F_θ`` train, ``P`` being all trainable entries (one
    global top-k over the raw values; ties to the earliest entries). The mask is then fixed for the whole run.

    It is a *gradient-only* mask: nothing is pruned. ``density`` is the fraction of entries that *train*; every
    other entry is frozen at its pretrained value, bit for bit (gradients masked before each step; after the
    steps of optimizer groups with weight decay, or of optimizers other than SGD/Adam/AdamW, the frozen entries
    are written back from a copy). The report gives the trainable fraction, not a sparsity;
    :meth:`make_permanent` returns a plain copy (no zeros to bake in), and ``save_sparse``/``make_permanent`` /
    ``to_sparse_inference`` refuse these masks. :func:`~lightning_pai.deploy.export.save_diff` stores just the
    trained entries, to be applied onto the pretrained model with
    :func:`~lightning_pai.deploy.export.load_diff`.

    Under DDP the Fisher information is estimated on rank zero's samples and its masks are broadcast; the masks
    are saved in checkpoints, and a resumed fit (or a second ``fit`` with this callback) uses them without a new
    estimate. Scoring data and loss: the trainer's training batches and ``training_step``'s loss (Hugging Face:
    the model's ``loss``), unless ``loss_fn(logits, targets)`` is given, applied to ``forward_fn(module, batch)``
    (default: ``module(x), y``).

    Args:
        density: Fraction of the trainable entries that train, in ``(0, 1]`` (the paper's keep ratio; 0.005).
        samples: Training samples the Fisher information sums over (fewer if the data has fewer).
        head: Parameters trained in full, counted in the budget: glob patterns over parameter or module names
            (``"classifier"``, ``"fc.*"``), ``()`` for none, or None: the outermost module named ``classifier``,
            ``head``, ``fc``, ``lm_head`` or ``score``, else the last ``nn.Linear``.
        loss_fn: ``loss_fn(logits, targets) -> loss`` instead of the loop's own loss.
        forward_fn: ``forward_fn(module, batch) -> (logits, targets)`` (with cross-entropy when no ``loss_fn``).
        per_sample: ``"auto"`` (``torch.func.vmap`` where it pays, on an accelerator or for a small model, and the
            model allows it; else one backward pass per sample), ``"vmap"`` or ``"loop"``.
        **common: ``include`` (default: every floating parameter that requires grad), ``exclude`` (left out of the
            mask: they train in full, outside the budget), ``verbose``, ``resume``, ``frozen`` (``"skip"``: frozen
            parameters are neither trained nor counted; ``"error"``).

    Example::

        trainer = Trainer(callbacks=[FISH(density=0.005, samples=1024)])
    """

    card = MethodCard(
        "gradient_only", example={"density": 0.2, "samples": 16}, sparsity_argument=None, exact_sparsity=False
    )

    def __init__(
        self,
        density: float = 0.005,
        samples: int = 1024,
        *,
        head: Head = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        forward_fn: Callable[[Any, Any], tuple[Tensor, Tensor]] | None = None,
        per_sample: str = "auto",
        **common: Unpack[TargetOptions],
    ) -> None:
        check_number(density, "density", 0.0, 1.0, low_open=True, what="fraction of entries trained")
        check_positive_int(samples, "samples", "training samples of the Fisher information")
        check_choice(per_sample, PER_SAMPLE, "per_sample")
        if head is not None and not isinstance(head, str) and not all(isinstance(h, str) for h in head):
            raise TypeError(f"`head` takes glob patterns (a str or a list of them), () or None; got {head!r}.")
        super().__init__(**common)
        self.density, self.samples, self.head, self.per_sample = density, samples, head, per_sample
        self.loss_fn, self.forward_fn = loss_fn, forward_fn

    @property
    def state_key(self) -> str:
        return self._generate_state_key(density=self.density, samples=self.samples, head=self.head)

    @property
    def final_sparsity(self) -> None:
        """None: nothing is pruned (``density`` is the fraction of entries trained)."""
        return None

    def build_session(self) -> FISHSession:
        """The engine's :class:`~lightning_pai.core.fish.FISHSession` for these arguments."""
        return FISHSession(
            type(self).__name__, density=self.density, samples=self.samples, head=self.head,
            loss_fn=self._session_loss(), per_sample=self.per_sample, **self.session_options(),
        )  # fmt: skip

    def _session_loss(self) -> LossFn | None:
        """``loss_fn(*forward_fn(module, batch))``, cross-entropy of ``forward_fn``, or None (the loop's loss)."""
        if self.loss_fn is None and self.forward_fn is None:
            return None
        from lightning_pai.core.scorers import default_forward

        forward = self.forward_fn or default_forward
        loss = self.loss_fn or nn.functional.cross_entropy
        return lambda module, batch: loss(*forward(module, batch))

    def report(self, module: Any = None) -> TrainableReport:
        """Which entries train, per parameter, and the trainable fraction (see :class:`TrainableReport`)."""
        self._collect_handoff()
        return self.session.report(module)

    def make_permanent(self, module: Any) -> Any:
        """A plain copy of ``module``: FISH never zeroes a weight, so there is nothing to bake in."""
        return copy.deepcopy(module)


__all__ = ["FISH"]
