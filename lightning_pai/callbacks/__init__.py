"""Lightning callbacks: thin adapters from trainer hooks to the sparse engine."""

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.callbacks.dynamic import SET, SNFS, DynamicSparseTraining, GraNet, RigL
from lightning_pai.callbacks.gradual import GradualMagnitudePruning
from lightning_pai.callbacks.lottery import LotteryTicket
from lightning_pai.callbacks.prune_at_init import PruneAtInit

__all__ = [
    "SET",
    "SNFS",
    "DynamicSparseTraining",
    "GradualMagnitudePruning",
    "GraNet",
    "LotteryTicket",
    "PruneAtInit",
    "RigL",
    "SparseCallback",
]
