"""Choose the rollout backend named in the config. The vLLM backend is imported only when asked for (GPU extra)."""

from __future__ import annotations

from visurf_ray.config import RolloutConfig
from visurf_ray.models.policy import Policy
from visurf_ray.rollout.base import RolloutBackend
from visurf_ray.rollout.hf import HFRolloutBackend


def make_backend(rollout: RolloutConfig, policy: Policy) -> RolloutBackend:
    """`rollout.backend`: "hf" samples with the trained module itself; "vllm" runs a colocated vLLM engine."""
    if rollout.backend == "hf":
        return HFRolloutBackend(policy)
    from visurf_ray.rollout.vllm import VLLMRolloutBackend

    return VLLMRolloutBackend(
        policy,
        model_path=policy.model.config.name_or_path,  # the folder load_policy read
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        max_model_len=rollout.vllm_max_model_len or None,
    )
