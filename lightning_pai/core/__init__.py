"""The sparse engine: plain PyTorch, no Lightning imports."""

from lightning_pai.core import saliency  # noqa: F401  (registers snip, grasp, synflow)
from lightning_pai.core.distributions import (
    erdos_renyi_densities,
    get_distribution,
    lamp_scores,
    list_distributions,
    register_distribution,
)
from lightning_pai.core.dst import (
    Plan,
    Pruning,
    Rewire,
    TopologyUpdater,
    UpdateContext,
    list_drop_rules,
    list_growth_rules,
    list_redistributions,
    register_drop_rule,
    register_growth_rule,
    register_redistribution,
)
from lightning_pai.core.masks import MaskSet, check_sparsity, compute_masks
from lightning_pai.core.pruning import ABLATIONS, preserved_state, prune, reinitialize_, shuffle_masks
from lightning_pai.core.report import LayerSparsity, SparsityReport, sparsity_report
from lightning_pai.core.schedules import ROUND_SCHEDULES as SCHEDULES
from lightning_pai.core.schedules import round_sparsities
from lightning_pai.core.scorers import (
    ScoringContext,
    default_forward,
    get_scorer,
    list_scorers,
    register_scorer,
    scorer_info,
)
from lightning_pai.core.select import apportion, topk_mask
from lightning_pai.core.targets import DEFAULT_TARGET_TYPES, select_targets

__all__ = [
    "ABLATIONS",
    "Plan",
    "Pruning",
    "Rewire",
    "TopologyUpdater",
    "UpdateContext",
    "list_drop_rules",
    "list_growth_rules",
    "list_redistributions",
    "register_drop_rule",
    "register_growth_rule",
    "register_redistribution",
    "scorer_info",
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
