"""Which policy a run starts from: a local checkpoint folder, or the embedded tiny base model (built and pretrained
once, then cached). Never imports Ray."""

from __future__ import annotations

from pathlib import Path

import torch

from visurf_ray.config import TINY_BASE_MODEL, ExperimentConfig, ModelConfig
from visurf_ray.models.inputs import VisionLanguageModel
from visurf_ray.models.policy import Policy, load_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(model: ModelConfig) -> Path:
    """The checkpoint folder of `model.path`: the cached tiny base model (built on first use) for "tiny-base"."""
    if model.path == TINY_BASE_MODEL:
        from visurf_ray.train.pretrain import ensure_base_model

        return ensure_base_model()
    return Path(model.path)


def resolve_policy(model: ModelConfig) -> Policy:
    """Load `model.path` (the tiny base model when it is "tiny-base") with `model.dtype`."""
    policy = load_policy(model_dir(model), dtype=DTYPES.get(model.dtype))
    if model.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
        policy.model.config.use_cache = False
    return policy


def load_reference(cfg: ExperimentConfig) -> VisionLanguageModel:
    """The frozen reference policy of the KL term: the run's starting checkpoint, in eval mode, without gradients."""
    reference = resolve_policy(cfg.model).model.eval()
    reference.requires_grad_(False)
    return reference
