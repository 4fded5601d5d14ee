"""Which policy a run starts from: a local checkpoint folder, or the embedded tiny base model (built and pretrained
once, then cached). Never imports Ray."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from visurf_ray.config import TINY_BASE_MODEL, ConfigError, ExperimentConfig, ModelConfig
from visurf_ray.models.inputs import VisionLanguageModel
from visurf_ray.models.policy import Policy, load_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir(model: ModelConfig) -> Path:
    """The checkpoint folder of `model.path`: the cached tiny base model (built on first use) for "tiny-base".

    With `model.weights_sha256` set, ConfigError unless the folder's weight files have that digest: the tiny base model
    is built on each node, and a node whose CPU rounds differently builds another model from the same recipe."""
    from visurf_ray.train.pretrain import REPORT_FILE, ensure_base_model, weights_sha256

    folder = ensure_base_model() if model.path == TINY_BASE_MODEL else Path(model.path)
    if model.weights_sha256 and (found := weights_sha256(folder)) != model.weights_sha256:
        report = folder / REPORT_FILE
        built = json.loads(report.read_text()).get("numerics") if report.is_file() else None
        raise ConfigError(
            f"model.weights_sha256: the weights in {folder} on {platform.node()} have sha256 {found}, not "
            f"{model.weights_sha256}" + (f" (built here with {built})" if built else "") + "; for the tiny base "
            "model, build it on one node and share it (a $VISURF_CACHE every node mounts) or run on nodes of one "
            "CPU type"
        )
    return folder


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
