"""lightning_pai: pruning callbacks for PyTorch Lightning.

``sparsity`` always means the fraction of targeted weights removed; ``density = 1 - sparsity``.
"""

from lightning_pai import callbacks as _callbacks
from lightning_pai.callbacks import *  # noqa: F403  (the adapters and every registered method, e.g. RigL)
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
    scorer_info,
    select_targets,
    sparsity_report,
)
from lightning_pai.core.stability import Instability, error_barrier, instability, interpolate
from lightning_pai.deploy import (
    ShrinkReport,
    conversion_report,
    dense_state_dict,
    load_diff,
    load_shrunk,
    load_sparse,
    make_permanent,
    save_diff,
    save_shrunk,
    save_sparse,
    shrink,
    sparse_state_dict,
    to_sparse_inference,
)
from lightning_pai.deploy.ensemble import TicketEnsemble
from lightning_pai.sparsifier import Sparsifier

__version__ = "0.1.0"

__all__ = [
    *_callbacks.__all__,
    "DEFAULT_TARGET_TYPES",
    "Instability",
    "LayerSparsity",
    "MaskSet",
    "ScoringContext",
    "Sparsifier",
    "ShrinkReport",
    "SparsityReport",
    "TicketEnsemble",
    "compute_masks",
    "conversion_report",
    "dense_state_dict",
    "error_barrier",
    "get_distribution",
    "get_scorer",
    "instability",
    "interpolate",
    "list_distributions",
    "list_scorers",
    "load_diff",
    "load_shrunk",
    "load_sparse",
    "make_permanent",
    "register_distribution",
    "register_scorer",
    "save_diff",
    "save_shrunk",
    "save_sparse",
    "scorer_info",
    "shrink",
    "select_targets",
    "sparse_state_dict",
    "sparsity_report",
    "to_sparse_inference",
]
