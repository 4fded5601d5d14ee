"""Sampling completions from a policy with a KV cache, never emitting vision or control tokens.

A weak policy can sample `<|image_pad|>`, after which the model's next forward fails ("Image features and image tokens
do not match"); every special token except the eos token is therefore suppressed. Imports torch and transformers;
never Ray.
"""

from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from visurf_ray.models.inputs import PromptBatch, VisionLanguageModel, prompt_positions, require_kv_cache
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

    The same tokens as Hugging Face `generate` with these settings and `num_return_sequences` copies of each prompt
    (tested token for token on CPU), for about half its time at G = 8 on the tiny model: `generate` runs the prompt
    of every copy and keeps every finished sequence in the batch to the end (on the preset's rollouts about two
    thirds of its decoding rows were finished ones); here each prompt runs once, its key/value states are shared by
    its copies, and finished rows leave the batch. The model's train/eval mode is left as the caller set it.
    """
    check_int("num_return_sequences", num_return_sequences, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)
    if do_sample:
        check_number("temperature", temperature, low=0, low_open=True, note="(sampling)")
        check_number("top_p", top_p, low=0, high=1, low_open=True, note="(sampling)")
    model = policy.model
    require_kv_cache(model, "generate")
    tokenizer = policy.tokenizer
    device = policy.device
    # transformers' own processors, in the order and under the conditions of its `generate`
    processors = LogitsProcessorList(
        [SuppressTokensLogitsProcessor(suppressed_token_ids(tokenizer), device=str(device))]
    )
    if do_sample and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        tokens, lengths = _decode(
            model,
            prompt_batch.to(device),
            copies=num_return_sequences,
            max_new_tokens=max_new_tokens,
            processors=processors,
            do_sample=do_sample,
            eos_token_id=tokenizer.eos_token_id,
        )
    completion_ids = [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]
    prompt_index = [row for row in range(len(prompt_batch)) for _ in range(num_return_sequences)]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(completion_ids=completion_ids, prompt_index=prompt_index, texts=texts)


def _decode(
    model: VisionLanguageModel,
    prompts: PromptBatch,
    *,
    copies: int,
    max_new_tokens: int,
    processors: LogitsProcessorList,
    do_sample: bool,
    eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `copies` completions of each prompt: tokens [B * copies, max_new_tokens] (prompt-major; a row's tokens
    after its eos are unset) and each row's length [B * copies] (up to and including its eos)."""
    positions, next_position = prompt_positions(model, prompts)
    cache = DynamicCache()
    logits = model(
        **prompts.model_inputs(), position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]
    cache.batch_repeat_interleave(copies)
    logits = logits.repeat_interleave(copies, dim=0)
    attention_mask = prompts.attention_mask.repeat_interleave(copies, dim=0)
    next_position = next_position.repeat_interleave(copies, dim=0)
    rows = logits.shape[0]
    tokens = torch.empty((rows, max_new_tokens), dtype=torch.long, device=logits.device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=logits.device)
    running = torch.arange(rows, device=logits.device)
    for step in range(max_new_tokens):
        # the suppression, temperature and top-p processors read only the scores
        scores = processors(None, logits.to(dtype=torch.float32, copy=True))  # type: ignore[arg-type]
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            # torch.multinomial(probs, 1) of the whole batch, as `generate` draws it: its one-sample path races
            # Exp(1) noise over every row, finished ones included, so the draws match row for row
            race = torch.empty((rows, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1)
            next_tokens = (probs / race[running]).argmax(dim=-1)
        else:
            next_tokens = scores.argmax(dim=-1)
        tokens[running, step] = next_tokens
        ended = next_tokens == eos_token_id
        lengths[running[ended]] = step + 1
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            running, next_tokens, attention_mask, next_position = (
                running[keep],
                next_tokens[keep],
                attention_mask[keep],
                next_position[keep],
            )
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], dim=1)
        logits = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=(next_position + step).view(1, -1, 1).expand(3, -1, -1),
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return tokens, lengths
