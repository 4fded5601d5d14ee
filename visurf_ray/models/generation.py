"""Sampling completions from a policy with Hugging Face `generate`, never emitting vision or control tokens.

A weak policy can sample `<|image_pad|>`, after which the model's next forward fails ("Image features and image tokens
do not match"); every special token except the eos token is therefore suppressed. Imports torch and transformers;
never Ray.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from visurf_ray.models.inputs import PromptBatch
from visurf_ray.models.policy import Policy
from visurf_ray.validation import check_int, check_number, require


@dataclass
class Rollouts:
    """Completions of one batch of prompts, ordered prompt-major (prompt 0's n completions, then prompt 1's, ...).

    completion_ids: N lists of token ids, each ending at (and including) the eos token unless cut at max_new_tokens.
    prompt_index:   N ints, the prompt each completion belongs to.
    texts:          N decoded completions (special tokens removed).
    old_logp:       N float32 tensors [len(completion_ids[i])]: the π_old of the clipped objective, taken from the
                    sampling engine (`rollout.old_logp=engine`); or None (the default, as in verl and EasyR1): the
                    trainer's own log-probs are π_old — at the one update per batch they are π_θ before the update,
                    so the trainer uses its log-probs of that update, detached (ratio exactly 1), instead of paying
                    for a second forward pass.
    engine_logp:    N float32 tensors [len(completion_ids[i])]: log-probs of the sampled tokens under a separate
                    engine's copy of the policy (vLLM; before temperature), reported against the trainer's own; None
                    when the trained module itself samples (HF backend).
    """

    completion_ids: list[list[int]]
    prompt_index: list[int]
    texts: list[str]
    old_logp: list[torch.Tensor] | None = None
    engine_logp: list[torch.Tensor] | None = None

    def __post_init__(self):
        sizes = {len(self.completion_ids), len(self.prompt_index), len(self.texts)}
        for per_completion in (self.old_logp, self.engine_logp):
            if per_completion is not None:
                sizes.add(len(per_completion))
        require(len(sizes) == 1, "Rollouts fields", f"have different lengths: {sorted(sizes)}")

    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


def suppressed_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the special tokens a policy must never sample: vision starts/ends/pads, `<|im_start|>`, the pad token and
    the other control tokens; the eos token (`<|im_end|>` for Qwen2.5-VL-Instruct and the tiny tokenizer) stays
    allowed. Non-special added tokens (the answer skeleton, `<tool_call>`) stay allowed. Sorted ascending."""
    return sorted(
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token.special and token_id != tokenizer.eos_token_id
    )


def _cut_at_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    return token_ids[: token_ids.index(eos_token_id) + 1] if eos_token_id in token_ids else token_ids


@torch.no_grad()
def generate(
    policy: Policy,
    prompt_batch: PromptBatch,
    *,
    num_return_sequences: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    seed: int = 0,
) -> Rollouts:
    """Sample completions for B prompts with the KV cache; the same seed gives the same completions on CPU.

    Args:
        prompt_batch: B left-padded prompts [B, P] (moved to the policy's device here).
        num_return_sequences: completions per prompt.
        max_new_tokens: completion length limit in tokens.
        temperature, top_p: sampling from softmax(logits / temperature) restricted to the top-p nucleus; no top-k and
            no repetition penalty, whatever the checkpoint's generation_config says. Ignored when do_sample is False
            (greedy decoding).
        seed: seeds torch's RNG for this call only (the global RNG state is restored afterwards).

    The model's train/eval mode is left as the caller set it.
    """
    check_int("num_return_sequences", num_return_sequences, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)
    if do_sample:
        check_number("temperature", temperature, low=0, low_open=True, note="(sampling)")
        check_number("top_p", top_p, low=0, high=1, low_open=True, note="(sampling)")
    tokenizer = policy.tokenizer
    prompt_index = [row for row in range(len(prompt_batch)) for _ in range(num_return_sequences)]
    # Expanded here rather than by `num_return_sequences` in generate: transformers versions differ in how they
    # repeat the flat pixel_values of variable-size images.
    device = policy.device
    prompts = prompt_batch.select(prompt_index).to(device)
    options: dict[str, Any] = {
        **prompts.model_inputs(),
        "do_sample": do_sample,
        "repetition_penalty": 1.0,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_tokens": suppressed_token_ids(tokenizer),
        "use_cache": True,
    }
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        # transformers types `generate`'s self as its GenerativePreTrainedModel protocol, which mypy cannot match
        sequences = policy.model.generate(**options)  # type: ignore[misc]
    new_tokens = sequences[:, prompts.prompt_length :].tolist()
    completion_ids = [_cut_at_eos(ids, tokenizer.eos_token_id) for ids in new_tokens]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(completion_ids=completion_ids, prompt_index=prompt_index, texts=texts)
