"""The sparse engine: plain PyTorch, no Lightning imports.

Masks, target selection, scorers, distributions, schedules, the rules of dynamic sparse training, lottery
rounds and the one protocol every training loop drives (:class:`~lightning_pai.core.session.Session`).
"""

from lightning_pai.core import saliency  # noqa: F401  (registers snip, grasp, synflow)
from lightning_pai.core.channel_scorers import list_channel_scorers, register_channel_scorer
from lightning_pai.core.channel_session import ChannelSession, EarlyBirdSession
from lightning_pai.core.channels import (
    ChannelGroup,
    ChannelReport,
    channel_groups,
    channel_keep,
    predicted_shrunk_macs,
    predicted_shrunk_params,
)
from lightning_pai.core.distributions import (
    counts_from_densities,
    distribution_info,
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
    StepContext,
    TopologyUpdater,
    UpdateContext,
    list_drop_rules,
    list_growth_rules,
    list_redistributions,
    list_step_rules,
    register_drop_rule,
    register_growth_rule,
    register_redistribution,
    register_step_rule,
)
from lightning_pai.core.effective import effective_masks_by_flow, prune_to_effective
from lightning_pai.core.lottery import LotterySession
from lightning_pai.core.masks import MaskSet, check_sparsity, compute_masks
from lightning_pai.core.pruning import ABLATIONS, Pruner, preserved_state, prune, reinitialize_, shuffle_masks
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
from lightning_pai.core.session import Host, PruneSession, Session, TopologySession
from lightning_pai.core.targets import DEFAULT_TARGET_TYPES, select_targets

__all__ = [
    "ABLATIONS",
    "DEFAULT_TARGET_TYPES",
    "SCHEDULES",
    "ChannelGroup",
    "ChannelReport",
    "ChannelSession",
    "EarlyBirdSession",
    "Host",
    "LayerSparsity",
    "LotterySession",
    "MaskSet",
    "Plan",
    "PruneSession",
    "Pruner",
    "Pruning",
    "Rewire",
    "ScoringContext",
    "Session",
    "SparsityReport",
    "StepContext",
    "TopologySession",
    "TopologyUpdater",
    "UpdateContext",
    "apportion",
    "channel_groups",
    "channel_keep",
    "check_sparsity",
    "compute_masks",
    "counts_from_densities",
    "default_forward",
    "distribution_info",
    "effective_masks_by_flow",
    "erdos_renyi_densities",
    "get_distribution",
    "get_scorer",
    "lamp_scores",
    "list_channel_scorers",
    "list_distributions",
    "list_drop_rules",
    "list_growth_rules",
    "list_redistributions",
    "list_scorers",
    "list_step_rules",
    "predicted_shrunk_macs",
    "predicted_shrunk_params",
    "preserved_state",
    "prune",
    "prune_to_effective",
    "register_channel_scorer",
    "register_distribution",
    "register_drop_rule",
    "register_growth_rule",
    "register_redistribution",
    "register_scorer",
    "register_step_rule",
    "reinitialize_",
    "round_sparsities",
    "scorer_info",
    "select_targets",
    "shuffle_masks",
    "sparsity_report",
    "topk_mask",
]
