"""lightning_pai's methods in the comparison loop, through the public plain-loop API (``Sparsifier``).

Each adapter builds the method object (``PruneAtInit(...)``, ``RigL(...)``, ``GradualMagnitudePruning(...)``,
``LotteryTicket(...)``) and hands it to a ``Sparsifier``: the step that ``compare.py`` times is the user's
``sparsifier.step()`` — the same engine session the Lightning callbacks drive (gradients masked inside
backward, the post-step re-masking, the topology updates on schedule). Only public calls are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_pai import GradualMagnitudePruning, LotteryTicket, PruneAtInit, RigL, Sparsifier, compute_masks
from peers.base import Pruner


class _Pai(Pruner):
    library = "lightning_pai"

    def method_object(self) -> Any:
        """The lightning_pai method for this adapter's settings."""
        raise NotImplementedError

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        self.pai = self.method_object()
        self.sparsifier = Sparsifier(self.pai, model, optimizer, total_steps=self.total_steps, logger=self._metrics)
        self.targets = self.sparsifier.masks.names
        if self.start_step > 0:  # a timing window mid-run: continue from step `start_step`
            self._jump(self.start_step)

    def _jump(self, step: int) -> None:
        state = self.sparsifier.state_dict()
        self.sparsifier.load_state_dict({**state, "step": step, "in_epoch": step})

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics.get("dst/dropped", 0) + metrics.get("dst/grown", 0) > 0:
            self.update_steps.append(step)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        self.sparsifier.step()
        self.step = self.sparsifier.global_step
        return loss.detach()

    def masks(self) -> dict[str, Tensor]:
        return {n: m.detach().clone() for n, m in self.sparsifier.masks.items()}

    def stored_weights(self) -> dict[str, Tensor]:
        return self.sparsifier.masks.params

    def extra_tensors(self) -> list[Tensor]:
        return [m for _, m in self.sparsifier.masks.items()]

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sparsifier.load_state_dict(state)
        self.step = self.sparsifier.global_step

    def close(self) -> None:
        self.sparsifier.close()


class PaiPruneAtInit(_Pai):
    """``PruneAtInit("magnitude", sparsity)``: global magnitude masks once, then masked training."""

    key, method = "pai_pai", "PruneAtInit magnitude"

    def method_object(self) -> PruneAtInit:
        return PruneAtInit("magnitude", self.sparsity, seed=self.seed or 0, verbose=False)


class _PaiTopology(_Pai):
    prunes_once = False

    def extra_tensors(self) -> list[Tensor]:
        updater = self.pai.updater  # the ITOP set (bool per weight), the own momentum buffer if any
        return super().extra_tensors() + list((updater.fired or {}).values()) + list((updater.momentum or {}).values())


class PaiRigL(_PaiTopology):
    """``RigL(sparsity, delta_t)``: ERK random masks; every ``delta_t`` steps magnitude drop, gradient growth."""

    key, method, dynamic = "pai_rigl", "RigL", True

    def method_object(self) -> RigL:
        kwargs = {"distribution": self.options["distribution"]} if "distribution" in self.options else {}
        return RigL(self.sparsity, delta_t=self.delta_t, seed=self.seed or 0, verbose=False, **kwargs)


class PaiGMP(_PaiTopology):
    """``GradualMagnitudePruning(sparsity)``: cubic schedule, every ``delta_t`` steps, no regrowth."""

    key, method = "pai_gmp", "GradualMagnitudePruning"

    def method_object(self) -> GradualMagnitudePruning:
        return GradualMagnitudePruning(self.sparsity, frequency=self.delta_t, verbose=False)

    def _jump(self, step: int) -> None:
        """Continue from ``step`` with the masks the schedule has reached there (``s_t`` by magnitude)."""
        super()._jump(step)
        target = self.pai.target_sparsity(step)
        masks = self.sparsifier.masks
        weights = {n: p.detach().abs() for n, p in masks.params.items()}
        state = self.sparsifier.state_dict()
        state["session"]["masks"] = compute_masks(weights, target, self.pai.distribution, masks=dict(masks.items()))
        self.sparsifier.load_state_dict(state)


class PaiLottery(_Pai):
    """``LotteryTicket`` at a late round: every ``round_steps`` steps (default ``delta_t``) a round boundary.

    The ticket is resumed at global magnitude masks at ``sparsity`` (its rewind point: the model and optimizer
    at setup, ``rewind_to="init"``); each boundary is ``sparsifier.epoch_end()`` of a 1-epoch round: prune
    20 % of the survivors by magnitude, rewind weights and optimizer state, re-apply the masks.
    """

    key, method, prunes_once = "pai_lottery", "LotteryTicket", False

    def method_object(self) -> LotteryTicket:
        return LotteryTicket(rounds=1000, prune_fraction=0.2, epochs_per_round=1, verbose=False)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().setup(model, optimizer)
        self.round_steps = int(self.options.get("round_steps", self.delta_t))
        masks = self.sparsifier.masks
        state = self.sparsifier.state_dict()  # resume as a ticket whose rounds reached `sparsity`
        weights = {n: p.detach().abs() for n, p in masks.params.items()}
        state["session"]["masks"] = compute_masks(weights, self.sparsity, self.pai.distribution)
        self.sparsifier.load_state_dict(state)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
        loss = super().train_step(model, optimizer, x, y)
        if self.step % self.round_steps == 0:
            self.sparsifier.epoch_end()  # the round ends: prune, rewind
            self.update_steps.append(self.step)
        return loss

    def extra_tensors(self) -> list[Tensor]:
        point = self.pai.session.rewind_point  # the weights and optimizer state a round rewinds to
        return super().extra_tensors() + list(point["model"].values())
