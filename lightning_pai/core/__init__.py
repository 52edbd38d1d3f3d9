"""The sparse engine: plain PyTorch, no Lightning imports."""

from lightning_pai.core import saliency  # noqa: F401  (registers snip, grasp, synflow)
from lightning_pai.core.distributions import (
    erdos_renyi_densities,
    get_distribution,
    lamp_scores,
    list_distributions,
    register_distribution,
)
from lightning_pai.core.masks import MaskSet, check_sparsity, compute_masks
from lightning_pai.core.pruning import (
    ABLATIONS,
    SCHEDULES,
    preserved_state,
    prune,
    reinitialize_,
    round_sparsities,
    shuffle_masks,
)
from lightning_pai.core.report import LayerSparsity, SparsityReport, sparsity_report
from lightning_pai.core.scorers import ScoringContext, default_forward, get_scorer, list_scorers, register_scorer
from lightning_pai.core.select import apportion, topk_mask
from lightning_pai.core.targets import DEFAULT_TARGET_TYPES, select_targets

__all__ = [
    "ABLATIONS",
    "SCHEDULES",
    "default_forward",
    "preserved_state",
    "prune",
    "reinitialize_",
    "round_sparsities",
    "shuffle_masks",
    "DEFAULT_TARGET_TYPES",
    "LayerSparsity",
    "MaskSet",
    "ScoringContext",
    "SparsityReport",
    "apportion",
    "check_sparsity",
    "compute_masks",
    "erdos_renyi_densities",
    "get_distribution",
    "get_scorer",
    "lamp_scores",
    "list_distributions",
    "list_scorers",
    "register_distribution",
    "register_scorer",
    "select_targets",
    "sparsity_report",
    "topk_mask",
]
