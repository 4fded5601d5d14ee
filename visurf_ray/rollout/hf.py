"""Rollouts from the policy module itself (CPU or GPU; `models.generation.generate`, the tokens of transformers'
`generate`): batched, KV cache, vision and control tokens suppressed. The module being trained samples, so no weight
sync is needed. Never imports Ray."""

from __future__ import annotations

import torch

from visurf_ray.models.generation import Rollouts, generate
from visurf_ray.models.inputs import PromptBatch
from visurf_ray.models.policy import Policy
from visurf_ray.rollout.base import SamplingConfig


class HFRolloutBackend:
    """Samples from `policy.model` (the trainer's module, e.g. a DeepSpeed engine's `.module`)."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def generate(
        self,
        prompt_batch: PromptBatch,
        n: int,
        sampling: SamplingConfig,
        seed: int,
        *,
        images: list,
        questions: list[str],
    ) -> Rollouts:
        """n completions per prompt of `prompt_batch` [B, P] (already encoded: `images`/`questions` are not needed);
        old_logp is None (on-policy, see `Rollouts`)."""
        return generate(
            self.policy,
            prompt_batch,
            num_return_sequences=n,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            do_sample=sampling.do_sample,
            seed=seed,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generation runs on the trained module itself (`policy.model`)."""
