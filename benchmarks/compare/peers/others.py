"""Adapters for the other libraries, each used the way its own documentation shows.

- Lightning's ``ModelPruning("l1_unstructured", amount)``: its own ``apply_pruning`` (global L1 through
  ``torch.nn.utils.prune``) once at setup, as ``ModelPruningAtStart`` in ``step_time.py`` does at train start.
- rigl-torch's ``RigLScheduler``: ``loss.backward(); if scheduler(): optimizer.step()`` (its README).
- sparsimony's ``RigL`` / ``SET``: ``sparsifier.prepare(model, config)``, then ``optimizer.step();
  sparsifier.step()`` every step.
- ``torch.ao.pruning.WeightNormSparsifier``: ``prepare`` then one ``step()`` (masks once), unstructured
  (``sparse_block_shape=(1, 1)``).

Where a library's own layer selection differs from the common targets (every Conv/Linear weight) the
adapter says so in :attr:`Pruner.notes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peers.base import Pruner, default_targets, owner


class ModelPruningOnce(Pruner):
    """Lightning's ``ModelPruning("l1_unstructured", amount, use_global_unstructured=True)``, pruned at setup."""

    key, library, method = "modelpruning", "Lightning", "ModelPruning l1_unstructured"
    modules = ("pytorch_lightning",)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from pytorch_lightning.callbacks import ModelPruning

        super().setup(model, optimizer)
        params = [owner(model, n) for n in self.targets]
        self.cb = ModelPruning(
            "l1_unstructured", parameters_to_prune=params, amount=self.sparsity, use_global_unstructured=True, verbose=0
        )
        self.cb._parameters_to_prune = params  # what ModelPruning.setup() stores (it needs a Trainer otherwise)
        self.cb.apply_pruning(self.sparsity)

    def masks(self) -> dict[str, Tensor]:
        return {n: getattr(m, a + "_mask").bool() for n, (m, a) in zip(self.targets, self._owners())}

    def effective_weights(self) -> dict[str, Tensor]:
        return {n: getattr(m, a).detach() for n, (m, a) in zip(self.targets, self._owners())}

    def extra_tensors(self) -> list[Tensor]:
        return [getattr(m, a + "_mask") for m, a in self._owners()] + list(self.effective_weights().values())

    def _owners(self) -> list[tuple[nn.Module, str]]:
        return [owner(self.model, n) for n in self.targets]


class RigLTorch(Pruner):
    """rigl-torch 0.5.2 ``RigLScheduler`` (uniform distribution, its only one), targets matched to ours.

    As shipped it keeps the first layer dense (with ``sparsity_distribution="uniform"``), skips linear
    layers unless ``ignore_linear_layers=False`` and treats every module with a ``weight`` but
    ``BatchNorm2d`` as a layer (so it would also prune LayerNorm weights). Here the first layer is made
    sparse and 1-D weights are left dense (a 4-line subclass), so it prunes exactly the common targets
    at the requested sparsity; ``ignore_linear_layers=False``.
    """

    key, library, method, dynamic, prunes_once = "rigl_torch", "rigl-torch", "RigLScheduler", True, False
    modules = ("rigl_torch",)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping | None = None) -> None:
        from rigl_torch.RigL import RigLScheduler

        class Matched(RigLScheduler):
            def random_sparsify(self) -> None:
                self.S = [0 if w.dim() < 2 else 1 - self.dense_allocation for w in self.W]
                super().random_sparsify()

        super().setup(model, optimizer)
        if self.seed is not None:
            torch.manual_seed(self.seed)  # its random masks come from the global RNG
        self.scheduler = Matched(
            model,
            optimizer,
            dense_allocation=1 - self.sparsity,
            T_end=int(0.75 * self.total_steps),
            delta=self.delta_t,
            alpha=0.3,
            ignore_linear_layers=False,
            state_dict=state,
        )
        if state is None:
            self.scheduler.step = self.step  # a timing window placed mid-run (0 otherwise)
        w_ids = {id(w): i for i, w in enumerate(self.scheduler.W)}
        self._index = {n: w_ids[id(p)] for n, p in model.named_parameters() if id(p) in w_ids}
        self.targets = [n for n in default_targets(model) if n in self._index]

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        before = self.scheduler.rigl_steps
        if self.scheduler():  # README: the optimizer steps only when the scheduler did not rewire
            optimizer.step()
        self.step += 1
        if self.scheduler.rigl_steps > before:
            self.update_steps.append(self.step)
        return loss.detach()

    def masks(self) -> dict[str, Tensor]:
        m = self.scheduler.backward_masks
        return {n: m[i].bool().clone() for n, i in self._index.items() if m[i] is not None}

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def restore(self, model, optimizer, state, model_state, optimizer_state) -> None:
        """As its README: ``RigLScheduler(model, optimizer, ..., state_dict=state)`` on the fresh model."""
        self.setup(model, optimizer, state=dict(state))
        self.load_model(model, model_state)
        optimizer.load_state_dict(optimizer_state)

    def extra_tensors(self) -> list[Tensor]:
        hooks = [
            h.dense_grad for h in self.scheduler.backward_hook_objects if h is not None and h.dense_grad is not None
        ]
        return [m for m in self.scheduler.backward_masks if m is not None] + hooks


class _Parametrized(Pruner):
    """A sparsifier that masks through torch.ao's ``FakeSparsity`` parametrizations (sparsimony, torch.ao)."""

    def _parametrization(self, name: str):
        mod, attr = owner(self.model, name)
        return getattr(mod.parametrizations, attr)

    def masks(self) -> dict[str, Tensor]:
        return {n: self._parametrization(n)[0].mask.bool() for n in self.targets}

    def effective_weights(self) -> dict[str, Tensor]:
        return {n: getattr(*owner(self.model, n)).detach() for n in self.targets}

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sparsifier.load_state_dict(dict(state))

    def extra_tensors(self) -> list[Tensor]:
        return [b for n in self.targets for b in self._parametrization(n)[0].buffers()]


class _Sparsimony(_Parametrized):
    """sparsimony 0.1.0 dynamic sparse training (``FakeSparsity`` parametrizations from ``torch.ao``), ERK."""

    library, dynamic, prunes_once = "sparsimony", True, False
    modules = ("sparsimony",)

    def make(self, optimizer: torch.optim.Optimizer):
        raise NotImplementedError

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        if self.seed is not None:
            torch.manual_seed(self.seed)  # its random masks come from the global RNG
        self.sparsifier = self.make(optimizer)
        self.sparsifier.prepare(model, [{"tensor_fqn": n} for n in self.targets])
        if self.start_step:  # a timing window placed mid-run: the counter as it would be after start_step steps
            self.sparsifier._step_count = self.counts_per_step * self.start_step

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        before = self.masks() if self._track else None
        self.sparsifier.step()
        self.step += 1
        if before is not None and any(bool((before[n] != m).any()) for n, m in self.masks().items()):
            self.update_steps.append(self.step)
        return loss.detach()

    _track = False  # comparing masks every step costs time: only the correctness checks turn it on
    counts_per_step = 1  # how much one ``sparsifier.step()`` advances ``_step_count``


class SparsimonyRigL(_Sparsimony):
    key, method = "sparsimony_rigl", "RigL"

    def make(self, optimizer: torch.optim.Optimizer):
        from sparsimony.distributions.base import ERKDistribution
        from sparsimony.dst.rigl import RigL
        from sparsimony.schedulers.base import CosineDecayScheduler

        scheduler = CosineDecayScheduler(0.3, t_end=int(0.75 * self.total_steps), delta_t=self.delta_t)
        return RigL(scheduler, ERKDistribution(), optimizer, sparsity=self.sparsity, init_method=None)


class SparsimonySET(_Sparsimony):
    """sparsimony's SET. Its ``_step`` adds 1 to ``_step_count`` twice, so its scheduler sees only odd steps:
    with an even ``delta_t`` it never updates, with an odd one its first update fails an assertion."""

    key, method = "sparsimony_set", "SET"
    counts_per_step = 2

    def make(self, optimizer: torch.optim.Optimizer):
        from sparsimony.distributions.base import ERKDistribution
        from sparsimony.dst.set import SET
        from sparsimony.schedulers.base import ConstantScheduler

        scheduler = ConstantScheduler(0.3, t_end=self.total_steps, delta_t=self.delta_t)
        return SET(scheduler, ERKDistribution(), optimizer, sparsity=self.sparsity, init_method=None)


class WeightNormAO(_Parametrized):
    """``torch.ao.pruning.WeightNormSparsifier(sparsity_level, sparse_block_shape=(1, 1))``, masks once per layer.

    It builds 2-D masks only (``_make_tensor_mask`` reads ``data.shape[-2:]``), so a 4-D conv weight raises;
    it is given the Linear weights among the common targets (all of LeNet's, ViT's blocks and head, only
    ``fc`` of a ResNet).
    """

    key, library, method = "ao_weightnorm", "torch.ao", "WeightNormSparsifier"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.ao.pruning import WeightNormSparsifier

        super().setup(model, optimizer)
        self.targets = [n for n in self.targets if isinstance(owner(model, n)[0], nn.Linear)]
        self.sparsifier = WeightNormSparsifier(sparsity_level=self.sparsity, sparse_block_shape=(1, 1))
        self.sparsifier.prepare(model, [{"tensor_fqn": n} for n in self.targets])
        self.sparsifier.step()
