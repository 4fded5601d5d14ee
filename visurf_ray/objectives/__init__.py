"""Objectives of the suite: group advantages (GRPO, ViSurf with the label as member G+1), token-level losses and their
aggregations, and the registry of training paradigms (sft, rlvr, visurf, sft_rlvr, luffy, chord).

Pure torch. Must not import ray, transformers or visurf_ray.rewards.
"""

from visurf_ray.objectives.advantages import constant_rows, group_advantages, smoothing_mask, visurf_advantages
from visurf_ray.objectives.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    clipped_surrogate,
    kl_penalty,
    masked_mean,
    policy_loss,
    policy_shaping,
    sft_loss,
)
from visurf_ray.objectives.paradigms import (
    PARADIGMS,
    GroupAdvantages,
    ObjectiveConfig,
    Paradigm,
    get_paradigm,
    register_paradigm,
    stack_members,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PARADIGMS",
    "GroupAdvantages",
    "ObjectiveConfig",
    "Paradigm",
    "clipped_surrogate",
    "constant_rows",
    "get_paradigm",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "policy_shaping",
    "register_paradigm",
    "sft_loss",
    "smoothing_mask",
    "stack_members",
    "visurf_advantages",
]
