"""Batching between (image, question, completion) records and Qwen2.5-VL tensors, and completion log-probabilities.

The trainer and the rollout backends build every model input here: prompts are left-padded, completions right-padded
after them, so the completion of every member starts at the same column. Imports torch, PIL and the policy; never Ray.
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicLayer

from visurf_ray.models.policy import Policy
from visurf_ray.validation import ValidationError, check_type, require

IMAGE_TOKEN_TYPE = 1  # mm_token_type_ids: 0 text, 1 image, 2 video

VisionLanguageModel = Qwen2_5_VLForConditionalGeneration
"""The policy module these functions run (its vision tower, language model and LM head are used directly)."""


@dataclass
class PromptBatch:
    """B chat-formatted prompts with one image each, left-padded to P tokens.

    input_ids, attention_mask, mm_token_type_ids: [B, P] (token ids; 1/0 mask; 0 text / 1 image token).
    pixel_values: [total patches of the B images, 3 * 2 * patch_size²] (1176 for 14-pixel patches), image after image.
    image_grid_thw: [B, 3] patch grid (frames, rows, columns) per image.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        """P, the padded prompt length in tokens."""
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors as keyword arguments of the model's forward and generate."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def to(self, device: str | torch.device) -> "PromptBatch":
        return replace(self, **{name: tensor.to(device) for name, tensor in self.model_inputs().items()})

    def select(self, prompt_index: list[int]) -> "PromptBatch":
        """Rows `prompt_index` (repeats allowed) with their images' patches, in that order; [len(prompt_index), P]."""
        for member, index in enumerate(prompt_index):
            require(
                0 <= index < len(self),
                f"prompt_index[{member}] = {index}",
                f"is outside the batch of {len(self)} prompts",
            )
        patch_counts = self.image_grid_thw.prod(dim=-1).tolist()
        patch_starts = [sum(patch_counts[:i]) for i in range(len(patch_counts))]
        rows = torch.tensor(prompt_index, dtype=torch.long, device=self.input_ids.device)
        patch_rows = torch.cat(
            [torch.arange(patch_starts[i], patch_starts[i] + patch_counts[i]) for i in prompt_index]
        ).to(self.pixel_values.device)
        return PromptBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            mm_token_type_ids=self.mm_token_type_ids[rows],
            pixel_values=self.pixel_values[patch_rows],
            image_grid_thw=self.image_grid_thw[rows],
        )


@dataclass
class SequenceBatch:
    """N prompt + completion sequences for one forward pass; member n uses prompt `prompt_index[n]` and its image.

    input_ids, attention_mask, mm_token_type_ids: [N, P + T] (left-padded prompt then right-padded completion).
    pixel_values: patches of the N members' images, member after member; image_grid_thw: [N, 3].
    completion_ids: [N, T] completion token ids, padded with the pad id.
    completion_mask: [N, T] float32, 1.0 on completion tokens and 0.0 on padding.
    prompt_index: [N] row of the prompt batch each member came from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_length(self) -> int:
        """T, the padded completion length in tokens."""
        return self.completion_ids.shape[1]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors of the model's forward as keyword arguments."""
        names = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        return {name: getattr(self, name) for name in names}

    def to(self, device: str | torch.device) -> "SequenceBatch":
        return replace(self, **{field.name: getattr(self, field.name).to(device) for field in fields(self)})


def chat_prompt(policy: Policy, question: str) -> str:
    """The chat-formatted text of one user turn holding an image and `question`, ending with the assistant header."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return policy.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(policy: Policy, images: list[Image.Image], questions: list[str]) -> PromptBatch:
    """Tokenize B (image, question) prompts with the policy's chat template and image processor.

    Args:
        images: B PIL images (any size; the processor resizes them within its pixel bounds).
        questions: B question texts.

    Returns:
        A left-padded PromptBatch on CPU (see its docstring for shapes).
    """
    require(
        len(images) == len(questions),
        f"images ({len(images)}) and questions ({len(questions)})",
        "must have the same length",
    )
    require(images, "encode_prompts", "needs at least one prompt")
    for record, image in enumerate(images):
        check_type(f"images[{record}]", image, Image.Image, "a PIL.Image.Image")
    for record, question in enumerate(questions):
        check_type(f"questions[{record}]", question, str, "a str")
    encoded = policy.processor(
        images=images,
        text=[chat_prompt(policy, question) for question in questions],
        padding=True,
        padding_side="left",
        return_tensors="pt",
        return_mm_token_type_ids=True,
    )
    return PromptBatch(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        mm_token_type_ids=encoded["mm_token_type_ids"],
        pixel_values=encoded["pixel_values"],
        image_grid_thw=encoded["image_grid_thw"],
    )


@dataclass
class CompletionBatch:
    """N completions, right-padded; member n continues prompt row `prompt_index[n]`.

    ids: [N, T] token ids padded with the pad id; mask: [N, T] float32, 1.0 on completion tokens; prompt_index: [N].
    """

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        """T, the padded completion length in tokens."""
        return self.ids.shape[1]

    def to(self, device: str | torch.device) -> "CompletionBatch":
        return replace(self, **{field.name: getattr(self, field.name).to(device) for field in fields(self)})


def encode_completions(policy: Policy, completion_ids: list[list[int]], prompt_index: list[int]) -> CompletionBatch:
    """Pad N completions (token ids; rollouts and labels alike, each non-empty, ending with eos or not) to one
    [N, T] batch, T the longest; `prompt_index` gives each member's prompt row. On CPU."""
    require(
        len(completion_ids) == len(prompt_index),
        f"completion_ids ({len(completion_ids)}) and prompt_index ({len(prompt_index)})",
        "must have the same length",
    )
    require(completion_ids, "a completion batch", "needs at least one completion")
    config = policy.model.config
    vision_token_ids = {config.image_token_id, config.video_token_id}
    for member, ids in enumerate(completion_ids):
        require(ids, f"completion_ids[{member}]", "is empty")
        require(
            not vision_token_ids & set(ids),
            f"completion_ids[{member}]",
            f"contains image/video placeholder tokens {vision_token_ids}",
        )
    length = max(len(ids) for ids in completion_ids)
    padded = torch.full((len(completion_ids), length), policy.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(completion_ids), length, dtype=torch.float32)
    for member, ids in enumerate(completion_ids):
        padded[member, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[member, : len(ids)] = 1.0
    return CompletionBatch(ids=padded, mask=mask, prompt_index=torch.tensor(prompt_index, dtype=torch.long))


def encode_sequences(
    policy: Policy, prompt_batch: PromptBatch, completion_ids: list[list[int]], prompt_index: list[int]
) -> SequenceBatch:
    """Append completions to their prompts for one forward pass.

    Args:
        prompt_batch: B prompts [B, P].
        completion_ids: N completions as token ids (see `encode_completions`).
        prompt_index: N prompt rows; a prompt's image and tokens are reused by all its members (e.g. G + 1).

    Returns:
        A SequenceBatch of N rows of P + T tokens, T the longest completion, on the prompt batch's device.
    """
    completions = encode_completions(policy, completion_ids, prompt_index)
    prompts = prompt_batch.select(prompt_index)
    completions = completions.to(prompts.input_ids.device)
    return SequenceBatch(
        input_ids=torch.cat([prompts.input_ids, completions.ids], dim=1),
        attention_mask=torch.cat([prompts.attention_mask, completions.mask.to(prompts.attention_mask.dtype)], dim=1),
        mm_token_type_ids=torch.cat(
            [prompts.mm_token_type_ids, torch.zeros_like(completions.ids, dtype=prompts.mm_token_type_ids.dtype)],
            dim=1,
        ),
        pixel_values=prompts.pixel_values,
        image_grid_thw=prompts.image_grid_thw,
        completion_ids=completions.ids,
        completion_mask=completions.mask,
        prompt_index=completions.prompt_index,
    )


def image_features(model: VisionLanguageModel, prompts: PromptBatch) -> list[torch.Tensor]:
    """The vision tower's output for each prompt's image: B tensors [image tokens of prompt b, hidden], model dtype.

    Image tokens per prompt = its patches / spatial_merge_size² (16 for a 112×112-pixel image with 14-pixel patches).
    """
    device = next(model.parameters()).device
    features = model.get_image_features(prompts.pixel_values.to(device), prompts.image_grid_thw.to(device))
    pooled = getattr(features, "pooler_output", features)  # transformers 5.19 wraps the per-image tuple in an output
    if isinstance(pooled, tuple | list):
        return list(pooled)
    merged_patches = model.model.visual.spatial_merge_size**2
    return list(torch.split(pooled, (prompts.image_grid_thw.prod(dim=-1) // merged_patches).tolist()))


def member_image_features(model: VisionLanguageModel, seq_batch: SequenceBatch) -> dict[int, torch.Tensor]:
    """`image_features` of each distinct prompt row among the members, {prompt row: [image tokens, hidden]}: the
    vision tower runs once per prompt on its first member's copy of the image, not once per member."""
    owners = seq_batch.prompt_index.tolist()
    first_member = {owner: member for member, owner in reversed(list(enumerate(owners)))}
    # the members' rows as a prompt batch (prompt + completion columns): only its images are read
    firsts = PromptBatch(**seq_batch.model_inputs()).select(list(first_member.values()))
    return dict(zip(first_member, image_features(model, firsts)))


def input_embeddings(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """Token embeddings [N, P + T, hidden] with member n's image tokens replaced by `features[prompt_index[n]]`
    ([image tokens, hidden] per prompt row), as the model's own forward does with one encoding per member."""
    owners = seq_batch.prompt_index.tolist()
    missing = sorted(set(owners) - set(features))
    require(not missing, "features", f"has no image features for prompt rows {missing}")
    image_embeds = torch.cat([features[owner] for owner in owners])
    _require_image_tokens(seq_batch.input_ids, image_embeds.shape[0], model.config.image_token_id)
    return _embed_with_images(model, seq_batch.input_ids, image_embeds)


def _embed_with_images(model: VisionLanguageModel, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings [N, L, hidden] of `input_ids` [N, L] with the image tokens' replaced, row-major in order, by
    `image_embeds` [image tokens of the batch, hidden] (cast to the embeddings' dtype). Its callers check that the
    two match (`_require_image_tokens`)."""
    embeddings = model.get_input_embeddings()(input_ids)
    image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeddings.masked_scatter(image_mask, image_embeds.to(embeddings.dtype))


def _require_image_tokens(input_ids: torch.Tensor, embeddings: int, image_token_id: int) -> None:
    """The image tokens of `input_ids` must number `embeddings`: checked where input_ids lie on the CPU (counting
    them on an accelerator would sync it every forward pass), i.e. before the batch moves to the model's device."""
    if input_ids.device.type != "cpu":
        return
    image_tokens = int((input_ids == image_token_id).sum())
    require(
        image_tokens == embeddings,
        "features",
        f"give {embeddings} image embeddings but the batch has {image_tokens} image tokens",
    )


def completion_logits(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor] | None = None
) -> torch.Tensor:
    """Next-token logits at the positions that predict the completion tokens: [N, T, V], model dtype.

    Only the last T + 1 positions go through the LM head (`logits_to_keep`), not the prompt's. The image embeddings
    are `features` ({prompt row: [image tokens, hidden]}, e.g. shared by several forward passes over one prompt's
    members) or else `member_image_features`: one vision-tower pass per distinct prompt, never one per member.
    `input_ids` still set the multimodal rotary positions.
    """
    outputs = _sequence_forward(model, seq_batch, features, logits_to_keep=seq_batch.completion_length + 1)
    return outputs.logits[:, :-1]


def completion_hidden_states(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, ...]:
    """The language model's hidden states over prompts and completions, [N, P + T, hidden] each: the embeddings,
    then every decoder layer's output (transformers' `output_hidden_states`). features: as in `completion_logits`."""
    return _sequence_forward(model, seq_batch, features, logits_to_keep=1, output_hidden_states=True).hidden_states


def _sequence_forward(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor] | None, **options: Any
) -> Any:
    """One forward pass over prompts and completions with the image features spliced in (see `completion_logits`)."""
    if features is None:
        features = member_image_features(model, seq_batch)
    return model(
        input_ids=seq_batch.input_ids,
        inputs_embeds=input_embeddings(model, seq_batch, features),
        attention_mask=seq_batch.attention_mask,
        mm_token_type_ids=seq_batch.mm_token_type_ids,
        image_grid_thw=seq_batch.image_grid_thw,
        use_cache=False,
        **options,
    )


def _token_log_probs(logits: torch.Tensor, completion_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π over the vocabulary [N, T, V] and of the completion tokens [N, T], in at least float32."""
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return log_probs, log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def completion_logprobs(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(completion token | image, prompt, earlier completion tokens).

    features: optional image features per prompt row, as in `completion_logits`.

    Returns:
        logp: [N, T] in nats, float32 (float64 for a float64 model), 0 on padding; differentiable.
        mask: [N, T] float32 completion mask (`seq_batch.completion_mask`).
    """
    _, logp = _token_log_probs(completion_logits(model, seq_batch, features), seq_batch.completion_ids)
    mask = seq_batch.completion_mask
    return logp * mask, mask


def completion_logprobs_and_entropy(
    model: VisionLanguageModel, seq_batch: SequenceBatch, features: Mapping[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`completion_logprobs` plus the policy's entropy at each completion position, from the same forward pass.

    features: optional image features per prompt row, as in `completion_logits`.

    Returns:
        logp: [N, T] nats; entropy: [N, T] nats, -Σ_v π(v) log π(v) over the vocabulary; both 0 on padding.
        mask: [N, T] float32 completion mask.
    """
    log_probs, logp = _token_log_probs(completion_logits(model, seq_batch, features), seq_batch.completion_ids)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    mask = seq_batch.completion_mask
    return logp * mask, entropy * mask, mask


@dataclass
class PromptStates:
    """The language model's state after B prompts, so that many completions per prompt are scored without running the
    prompt (and its image tokens) once per completion.

    keys, values: per decoder layer [B, kv heads, P, head_dim], differentiable (gradients reach the prompt tokens,
    the image features and the vision tower, summed over every completion that attends to them).
    last_hidden: [B, hidden] final hidden state at each prompt's last token (it predicts the first completion token).
    attention_mask: [B, P] the prompts' (left-padding) mask; next_position: [B] rotary position of the first
    completion token (text positions continue after the prompt's largest multimodal position).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor
    attention_mask: torch.Tensor
    next_position: torch.Tensor


def require_kv_cache(model: VisionLanguageModel, user: str) -> None:
    """`user` runs the model with its key/value cache, which gradient checkpointing drops in train mode
    (transformers' GradientCheckpointingLayer)."""
    if getattr(model, "is_gradient_checkpointing", False) and model.training:
        raise ValidationError(f"{user} needs the key/value cache, which gradient checkpointing drops in train mode")


def prompt_positions(model: VisionLanguageModel, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary positions [3, B, P] of B left-padded prompts, and each prompt's next position [B]: that of
    its first completion token (text positions continue after the prompt's largest multimodal position)."""
    positions, _ = model.model.get_rope_index(
        input_ids=prompts.input_ids,
        mm_token_type_ids=prompts.mm_token_type_ids,
        image_grid_thw=prompts.image_grid_thw,
        attention_mask=prompts.attention_mask,
    )
    return positions, positions.amax(dim=(0, 2)) + 1


def prompt_states(
    model: VisionLanguageModel, prompts: PromptBatch, features: list[torch.Tensor] | None = None
) -> PromptStates:
    """Run the language model once over B prompts and keep its key/value states.

    features: the prompts' image features (`image_features(model, prompts)`, computed when None). Not usable under
    gradient checkpointing in train mode (`require_kv_cache`).
    """
    require_kv_cache(model, "prompt_states")
    if features is not None:
        _require_image_tokens(prompts.input_ids, sum(f.shape[0] for f in features), model.config.image_token_id)
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    if features is None:
        features = image_features(model, prompts)
    embeddings = _embed_with_images(model, prompts.input_ids, torch.cat(list(features)))
    positions, next_position = prompt_positions(model, prompts)
    cache = DynamicCache()
    outputs = model.model.language_model(
        inputs_embeds=embeddings,
        attention_mask=prompts.attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    keys, values = [], []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise ValueError(f"the prompts' key/value cache has a layer without keys and values: {layer!r}")
        keys.append(layer.keys)
        values.append(layer.values)
    return PromptStates(
        keys=keys,
        values=values,
        last_hidden=outputs.last_hidden_state[:, -1],  # left padding: the last column is every prompt's last token
        attention_mask=prompts.attention_mask,
        next_position=next_position,
    )


def shared_prompt_logprobs_and_entropy(
    model: VisionLanguageModel, states: PromptStates, completions: CompletionBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`completion_logprobs_and_entropy` of N completions scored against their prompts' `states`: only the completion
    tokens run through the language model, attending to their prompt's keys and values (each prompt ran once).
    Equal to scoring every prompt + completion sequence in full (to float64 rounding, with float64 norms).

    completions: `prompt_index` are rows of `states`. Returns logp, entropy, mask as `completion_logprobs_and_entropy`.
    """
    device = states.last_hidden.device
    completions = completions.to(device)
    rows = completions.prompt_index
    hidden = states.last_hidden[rows].unsqueeze(1)
    if completions.length > 1:  # the last completion token predicts nothing
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(states.keys, states.values)):
            cache.update(keys[rows], values[rows], layer)
        steps = torch.arange(completions.length - 1, device=device)
        positions = (states.next_position[rows, None] + steps).expand(3, -1, -1)
        attention_mask = torch.cat(
            [states.attention_mask[rows], completions.mask[:, :-1].to(states.attention_mask.dtype)], dim=1
        )
        outputs = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(completions.ids[:, :-1]),
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = torch.cat([hidden, outputs.last_hidden_state], dim=1)
    log_probs, logp = _token_log_probs(model.lm_head(hidden), completions.ids)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp * completions.mask, entropy * completions.mask, completions.mask
