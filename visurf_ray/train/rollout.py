"""Choose the rollout backend named in the config. The vLLM backend is imported only when asked for (vLLM installed:
the `gpu` extra on CUDA machines, .venv-vllm on CPU)."""

from __future__ import annotations

from visurf_ray.config import RolloutConfig
from visurf_ray.models.policy import Policy
from visurf_ray.rollout.base import RolloutBackend
from visurf_ray.rollout.hf import HFRolloutBackend
from visurf_ray.validation import ValidationError


def make_backend(rollout: RolloutConfig, policy: Policy) -> RolloutBackend:
    """`rollout.backend`: "hf" samples with the trained module itself; "vllm" runs a colocated vLLM engine."""
    if rollout.backend == "hf":
        return HFRolloutBackend(policy)
    from visurf_ray.rollout.vllm import VLLMRolloutBackend

    folder = policy.model.config.name_or_path  # the folder load_policy read
    if not folder:
        raise ValidationError("rollout.backend=vllm needs a policy loaded from a checkpoint folder (load_policy)")
    return VLLMRolloutBackend(
        policy,
        model_path=folder,
        kv_cache_bytes=rollout.vllm_kv_cache_bytes,
        max_model_len=rollout.vllm_max_model_len or None,
        engine_old_logp=rollout.old_logp == "engine",
    )
