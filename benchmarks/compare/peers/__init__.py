"""Step-level adapters for lightning_pai and the libraries it is compared with (see ``benchmarks/compare/compare.py``).

``PRUNERS`` maps a key to its adapter class; :func:`installed` lists the keys whose library imports.
"""

from __future__ import annotations

from peers.base import Pruner, default_targets, state_bytes
from peers.others import ModelPruningOnce, RigLTorch, SparsimonyRigL, SparsimonySET, WeightNormAO
from peers.pai import PaiGMP, PaiLottery, PaiPruneAtInit, PaiRigL

#: Every adapter, ours first; ``"dense"`` is the baseline every ratio is taken against.
PRUNERS: dict[str, type[Pruner]] = {
    cls.key: cls
    for cls in (
        Pruner,
        PaiPruneAtInit,
        PaiRigL,
        PaiGMP,
        PaiLottery,
        ModelPruningOnce,
        RigLTorch,
        SparsimonyRigL,
        SparsimonySET,
        WeightNormAO,
    )
}


def installed(keys: list[str] | None = None) -> list[str]:
    """The keys (all, or those in ``keys``) whose libraries are importable, in registry order."""
    return [k for k, cls in PRUNERS.items() if (keys is None or k in keys) and cls.available()]


__all__ = ["PRUNERS", "Pruner", "default_targets", "installed", "state_bytes"]
