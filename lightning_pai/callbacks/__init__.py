"""Lightning callbacks: thin adapters from trainer hooks to the sparse engine."""

from lightning_pai.callbacks.base import SparseCallback
from lightning_pai.callbacks.dynamic import DSR, SET, SNFS, DynamicSparseTraining, GraNet, RigL, TopologyCallback
from lightning_pai.callbacks.gradual import GradualMagnitudePruning, MovementPruning
from lightning_pai.callbacks.lottery import LotteryTicket
from lightning_pai.callbacks.prune_at_init import PruneAtInit

#: Every method callback (the classes users put in a Trainer), in the order the docs present them.
CALLBACKS = (PruneAtInit, LotteryTicket, RigL, SET, SNFS, GraNet, DSR, GradualMagnitudePruning, MovementPruning)

__all__ = [
    "CALLBACKS",
    "DSR",
    "SET",
    "SNFS",
    "DynamicSparseTraining",
    "GradualMagnitudePruning",
    "GraNet",
    "LotteryTicket",
    "MovementPruning",
    "PruneAtInit",
    "RigL",
    "SparseCallback",
    "TopologyCallback",
]
