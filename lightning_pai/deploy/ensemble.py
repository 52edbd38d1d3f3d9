"""The FreeTickets ensemble: sparse tickets of one architecture, averaged as probabilities (Liu et al. 2022)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pai.deploy.export import dense_state_dict, load_sparse, make_permanent


def _logits(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` / ``["logits"]``, or a tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Cannot find the logits in a model output of type {type(output).__name__}; pass `logits=`.")


class TicketEnsemble(nn.Module):
    """The FreeTickets ensemble: the unweighted mean of its members' softmax **probabilities** (not logits).

    ``forward(x) = mean_m softmax(f_m(x), dim)``, the reference's ``test_ensemble`` (Liu et al. 2022,
    VITA-Group/FreeTickets ``ensemble_freetickets.py``); take ``.log()`` for an NLL, ``.argmax(dim)`` for
    predictions, and :func:`lightning_pai.core.tickets.ensemble_nll` / ``expected_calibration_error`` to score it.
    Each member is a plain copy of ``model`` (no hooks) loaded with one ticket's weights (its zeros, biases and
    buffers), so the ensemble holds ``M`` dense copies (convert each with
    :func:`~lightning_pai.deploy.to_sparse_inference` to run them sparse); set its mode (``.eval()``) as for any
    module.

    Args:
        model: The architecture the tickets were taken from (its own weights are not used).
        tickets: The tickets: ``FreeTickets.tickets`` entries, sparse state dicts
            (:func:`~lightning_pai.deploy.sparse_state_dict`), or paths of files written by ``FreeTickets(save_dir=)``
            or :func:`~lightning_pai.deploy.save_sparse`.
        dim: The class dimension of the logits.
        logits: Maps a member's output to its logits (default: the output itself, ``.logits``, or a tuple's first).

    Raises:
        ValueError: If ``tickets`` is empty.
    """

    def __init__(
        self,
        model: nn.Module,
        tickets: Sequence[Mapping[str, Any] | str | os.PathLike],
        *,
        dim: int = -1,
        logits: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not tickets:
            raise ValueError("`tickets` is empty: a FreeTickets ensemble needs at least one ticket (train first).")
        members = []
        for ticket in tickets:
            if isinstance(ticket, (str, os.PathLike)):
                state = load_sparse(ticket, map_location="cpu")
            else:
                state = dense_state_dict(ticket["state"] if "state" in ticket else ticket)
            member = make_permanent(model, {})  # a plain copy
            member.load_state_dict(state)
            members.append(member)
        self.members = nn.ModuleList(members)
        self.dim = dim
        self.logits = logits if logits is not None else _logits

    def member_probabilities(self, *args: Any, **kwargs: Any) -> Tensor:
        """Every member's softmax probabilities, stacked on a new first dimension (``M, ...``)."""
        return torch.stack([torch.softmax(self.logits(m(*args, **kwargs)), dim=self.dim) for m in self.members])

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The mean of the members' softmax probabilities."""
        return self.member_probabilities(*args, **kwargs).mean(0)


__all__ = ["TicketEnsemble"]
