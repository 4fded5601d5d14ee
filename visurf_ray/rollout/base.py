"""The rollout interface: prompts in, G sampled completions per prompt out, with token ids and old log-probs.

Backends (HF generate on CPU/GPU, vLLM on GPU) implement `RolloutBackend`; the trainer sees nothing else.
Imports torch only; never Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. `max_new_tokens` in tokens; greedy when `do_sample` is False."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True


@dataclass
class Rollouts:
    """Completions of one batch of prompts, ordered prompt-major (prompt 0's n completions, then prompt 1's, ...).

    completion_ids: N lists of token ids, each ending at (and including) the eos token unless cut at max_new_tokens.
    prompt_index:   N ints, the prompt each completion belongs to.
    texts:          N decoded completions (special tokens removed).
    old_logp:       N float32 tensors [len(completion_ids[i])]: log-probs of the sampled tokens under the sampling
                    engine's copy of the policy (before temperature), i.e. the π_old of the clipped objective; or
                    None when the completions were sampled from the very module being updated (HF backend): then
                    π_old equals π_θ at the one update per batch, and the trainer uses its own log-probs, detached
                    (ratio exactly 1), instead of paying for a second forward pass.
    """

    completion_ids: list[list[int]]
    prompt_index: list[int]
    texts: list[str]
    old_logp: list[torch.Tensor] | None = None

    def __post_init__(self):
        sizes = {len(self.completion_ids), len(self.prompt_index), len(self.texts)}
        if self.old_logp is not None:
            sizes.add(len(self.old_logp))
        if len(sizes) != 1:
            raise ValueError(f"Rollouts fields have different lengths: {sorted(sizes)}")

    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


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
