"""The rollout interface: prompts in, G sampled completions per prompt out (`models.generation.Rollouts`).

Backends (HF: the trained module samples, `models.generation.generate`; vLLM; each on CPU or GPU) implement
`RolloutBackend`; the trainer sees nothing else.
Imports torch only; never Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from visurf_ray.models.generation import Rollouts


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. `max_new_tokens` in tokens; greedy when `do_sample` is False."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True


class RolloutBackend(Protocol):
    """Samples `n` completions for each prompt of a batch with the current policy weights."""

    def generate(
        self, prompt_batch, n: int, sampling: SamplingConfig, seed: int, *, images: list, questions: list[str]
    ) -> Rollouts:
        """n completions per prompt of `prompt_batch` [B, P]; `images` (B PIL images) and `questions` (B texts) are
        the same prompts unencoded, for engines that run their own processor (vLLM)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` use `model`'s current weights (a no-op when the backend shares the module)."""
        ...
