"""lightning_pai's methods driven step by step through the engine its callbacks use.

Each adapter builds the callback object only for its settings (``PruneAtInit(...)``, ``RigL(...).plan()``,
``GradualMagnitudePruning(...).plan()``, ``LotteryTicket(...)``) and runs what the callback's hooks run on
a single process: a :class:`~lightning_pai.MaskSet` over the default targets, gradients masked inside
backward (``mask_grads_in_backward``; on a step whose update reads dense gradients the hooks are off and
``mask_grads_`` runs after the gradients were copied), ``attach`` for the post-step re-masking, and a
:class:`~lightning_pai.core.TopologyUpdater` built from the callback's ``plan()`` for RigL and GMP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_pai import GradualMagnitudePruning, LotteryTicket, MaskSet, PruneAtInit, RigL, ScoringContext
from lightning_pai.core import TopologyUpdater, prune
from lightning_pai.core.lottery import prune_remaining, to_cpu
from peers.base import Pruner


class _Pai(Pruner):
    library = "lightning_pai"

    def _mask_set(self, model: nn.Module) -> MaskSet:
        self.maskset = MaskSet.from_module(model)
        self.targets = self.maskset.names
        return self.maskset

    def _initial(self, method: str, sparsity: float, distribution: str) -> dict[str, Tensor]:
        ms = self.maskset
        ctx = ScoringContext(params=ms.params, module=self.model, seed=self.seed or 0, layouts=ms.layouts)
        return prune(ctx, method, sparsity, distribution)

    def _enforce(self, optimizer: torch.optim.Optimizer, in_backward: bool = True, dense: bool = False) -> None:
        """What ``SparseCallback.on_fit_start`` does on one process."""
        ms = self.maskset
        if not dense:
            ms.mask_optimizer_state_(optimizer)
        ms.attach(optimizer, mask_grads=False, mask_weights=dense)
        self._in_backward = in_backward and not dense
        if self._in_backward:
            ms.mask_grads_in_backward()
        ms.apply_()

    def masks(self) -> dict[str, Tensor]:
        return {n: m.detach().clone() for n, m in self.maskset.items()}

    def stored_weights(self) -> dict[str, Tensor]:
        return self.maskset.params

    def extra_tensors(self) -> list[Tensor]:
        return [m for _, m in self.maskset.items()]

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.maskset.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.maskset.load_state_dict(state["masks"])
        self.maskset.apply_()
        self.step = int(state["step"])

    def close(self) -> None:
        self.maskset.detach()


class PaiPruneAtInit(_Pai):
    """``PruneAtInit("magnitude", sparsity)``: global magnitude masks once, then masked training."""

    key, method = "pai_pai", "PruneAtInit magnitude"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        cb = PruneAtInit("magnitude", self.sparsity, seed=self.seed or 0, verbose=False)
        self._mask_set(model).load_state_dict(self._initial(cb.method, cb.sparsity, cb.distribution))
        self._enforce(optimizer)


class _PaiTopology(_Pai):
    """A :class:`~lightning_pai.core.TopologyUpdater` from a callback's ``plan()``, wired as the callback does."""

    prunes_once = False

    def callback(self):
        raise NotImplementedError

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        cb = self.cb = self.callback()
        ms = self._mask_set(model)
        start = cb._start_sparsity()
        if start > 0:
            ms.load_state_dict(self._initial(cb.init, start, cb.distribution))
        self.updater = TopologyUpdater(cb.plan(), seed=cb.seed, beta=cb.beta)
        self.updater.use_optimizer(optimizer)
        self.updater.bind(dict(ms.items()))
        upd = self.updater
        backward = not upd.reads_every_step and not (upd.needs_grads and upd.plan.when.at_epoch_end)
        self._enforce(optimizer, in_backward=backward, dense=upd.dense_gradients)
        if self.start_step > 0 and upd.plan.prune is not None:  # a window mid-schedule: masks as they would be
            weights = {n: p.detach() for n, p in ms.params.items()}
            ms.update_(upd.compute(self.start_step, self.total_steps, weights, self.masks()), [optimizer])

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        ms, upd, t = self.maskset, self.updater, self.step + 1
        due = upd.is_update(t, self.total_steps)
        if self._in_backward:
            ms.grad_hooks_active = not (due and upd.needs_grads)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        params = ms.params
        if upd.observes_every_step:
            upd.observe({n: p.detach() for n, p in params.items()}, {n: p.grad for n, p in params.items()})
        grads = {n: p.grad.detach().clone() for n, p in params.items()} if due and upd.needs_grads else None
        if not upd.dense_gradients and not ms.grad_hooks_active:
            ms.mask_grads_()
        optimizer.step()
        self.step = t
        if due:
            old = self.masks()
            weights = {n: p.detach() for n, p in params.items()}
            new = upd.compute(t, self.total_steps, weights, old, grads)
            ms.update_(new, [optimizer], fill="mean" if upd.dense_gradients else "zero")
            update = upd.record(old, new)
            if sum(update.dropped.values()) + sum(update.grown.values()):
                self.update_steps.append(t)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updater": self.updater.state_dict()}

    def extra_tensors(self) -> list[Tensor]:
        upd = self.updater  # the ITOP set (bool per weight), the own momentum buffer if any
        return super().extra_tensors() + list((upd.fired or {}).values()) + list((upd.momentum or {}).values())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.updater.load_state_dict(state["updater"])
        self.updater.bind(dict(self.maskset.items()))


class PaiRigL(_PaiTopology):
    """``RigL(sparsity, delta_t)``: ERK random masks; every ``delta_t`` steps magnitude drop, gradient growth."""

    key, method, dynamic = "pai_rigl", "RigL", True

    def callback(self) -> RigL:
        kwargs = {"distribution": self.options["distribution"]} if "distribution" in self.options else {}
        return RigL(self.sparsity, delta_t=self.delta_t, seed=self.seed or 0, verbose=False, **kwargs)


class PaiGMP(_PaiTopology):
    """``GradualMagnitudePruning(sparsity)``: cubic schedule, every 100 steps, no regrowth."""

    key, method = "pai_gmp", "GradualMagnitudePruning"

    def callback(self) -> GradualMagnitudePruning:
        return GradualMagnitudePruning(self.sparsity, frequency=self.delta_t, verbose=False)


class PaiLottery(_Pai):
    """``LotteryTicket``'s round boundary: prune 20 % of the survivors by magnitude, rewind weights and optimizer.

    Starts at a late round (global magnitude masks at ``sparsity``, the rewind point captured at setup, i.e.
    ``rewind_to="init"``); every ``round_steps`` steps (default ``delta_t``) a boundary runs what
    ``LotteryTicket._next_round`` runs: ``prune_remaining`` of ``|w|``, restore the rewind point (model
    and optimizer state), ``MaskSet.update_``.
    """

    key, method, prunes_once = "pai_lottery", "LotteryTicket", False

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        self.cb = LotteryTicket(rounds=10, prune_fraction=0.2, verbose=False)
        self._mask_set(model).load_state_dict(self._initial("magnitude", self.sparsity, self.cb.distribution))
        self._enforce(optimizer)
        self.round_steps = int(self.options.get("round_steps", self.delta_t))
        self.rewind = {"model": to_cpu(model.state_dict()), "optimizer": to_cpu(optimizer.state_dict())}

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        loss = super().train_step(model, optimizer, x, y)
        if self.step % self.round_steps == 0:
            ms = self.maskset
            scores = {n: p.detach().abs() for n, p in ms.params.items()}
            new = prune_remaining(scores, self.masks(), self.cb.prune_fraction, self.cb.distribution)
            model.load_state_dict(self.rewind["model"])
            optimizer.load_state_dict(to_cpu(self.rewind["optimizer"]))
            ms.update_(new, [optimizer])
            self.update_steps.append(self.step)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rewind": self.rewind}  # the callback keeps its rewind point in its state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rewind = state["rewind"]

    def extra_tensors(self) -> list[Tensor]:
        return super().extra_tensors() + list(self.rewind["model"].values())
