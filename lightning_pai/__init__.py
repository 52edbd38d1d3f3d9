"""lightning_pai: pruning callbacks for PyTorch Lightning.

``sparsity`` always means the fraction of targeted weights removed; ``density = 1 - sparsity``.
"""

from lightning_pai.callbacks import (
    SET,
    SNFS,
    DynamicSparseTraining,
    GradualMagnitudePruning,
    GraNet,
    LotteryTicket,
    PruneAtInit,
    RigL,
    SparseCallback,
)
from lightning_pai.core import (
    DEFAULT_TARGET_TYPES,
    LayerSparsity,
    MaskSet,
    ScoringContext,
    SparsityReport,
    compute_masks,
    get_distribution,
    get_scorer,
    list_distributions,
    list_scorers,
    register_distribution,
    register_scorer,
    select_targets,
    sparsity_report,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_TYPES",
    "SET",
    "SNFS",
    "DynamicSparseTraining",
    "GradualMagnitudePruning",
    "GraNet",
    "LayerSparsity",
    "LotteryTicket",
    "MaskSet",
    "PruneAtInit",
    "RigL",
    "ScoringContext",
    "SparseCallback",
    "SparsityReport",
    "compute_masks",
    "get_distribution",
    "get_scorer",
    "list_distributions",
    "list_scorers",
    "register_distribution",
    "register_scorer",
    "select_targets",
    "sparsity_report",
]
