"""Lightning callbacks: thin adapters from trainer hooks to the engine's sessions, one file per method.

A method class registers itself by declaring a :class:`~lightning_pai.callbacks.base.MethodCard`;
:func:`list_methods` (and :data:`CALLBACKS`) list them for the registry-parametrized test suites, the CLI
check and the benchmarks. A new method is its class (and, if new, its rule in the engine) plus one import
line here.
"""

from lightning_pai.callbacks.base import MethodOptions, SparseCallback, TargetOptions
from lightning_pai.callbacks.dynamic import DynamicSparseTraining
from lightning_pai.callbacks.host import LightningHost
from lightning_pai.callbacks.learned import LearnedMask
from lightning_pai.callbacks.registry import MethodCard, list_methods
from lightning_pai.callbacks.topology import TopologyCallback

# The methods, in the order the docs present them (importing a module registers its class).
from lightning_pai.callbacks.prune_at_init import PruneAtInit as PruneAtInit  # isort: skip
from lightning_pai.callbacks.lottery import LotteryTicket as LotteryTicket  # isort: skip
from lightning_pai.callbacks.rigl import RigL as RigL  # isort: skip
from lightning_pai.callbacks.set import SET as SET  # isort: skip
from lightning_pai.callbacks.snfs import SNFS as SNFS  # isort: skip
from lightning_pai.callbacks.granet import GraNet as GraNet  # isort: skip
from lightning_pai.callbacks.dsr import DSR as DSR  # isort: skip
from lightning_pai.callbacks.deepr import DeepR as DeepR  # isort: skip
from lightning_pai.callbacks.freetickets import FreeTickets as FreeTickets  # isort: skip
from lightning_pai.callbacks.gradual import GradualMagnitudePruning as GradualMagnitudePruning  # isort: skip
from lightning_pai.callbacks.learned import EdgePopup as EdgePopup  # isort: skip
from lightning_pai.callbacks.learned import Supermask as Supermask  # isort: skip
from lightning_pai.callbacks.learned import MovementPruning as MovementPruning  # isort: skip
from lightning_pai.callbacks.learned import TrainableThresholds as TrainableThresholds  # isort: skip
from lightning_pai.callbacks.learned import ContinuousSparsification as ContinuousSparsification  # isort: skip
from lightning_pai.callbacks.fish import FISH as FISH  # isort: skip

# Structured (channel) pruning: its sparsity counts channels, not weights, so it is not among the registered methods
# the weight-sparsity suites run (tests/test_channels.py covers it).
from lightning_pai.callbacks.channels import ChannelPruning as ChannelPruning  # isort: skip
from lightning_pai.callbacks.earlybird import EarlyBird as EarlyBird  # isort: skip

#: Every registered method callback (the classes users put in a Trainer), in registration order.
CALLBACKS = tuple(list_methods())

__all__ = [
    "CALLBACKS",
    "ChannelPruning",
    "DynamicSparseTraining",
    "EarlyBird",
    "LearnedMask",
    "LightningHost",
    "MethodCard",
    "MethodOptions",
    "SparseCallback",
    "TargetOptions",
    "TopologyCallback",
    "list_methods",
    *(cls.__name__ for cls in CALLBACKS),
]
