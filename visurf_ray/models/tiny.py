"""A tiny, randomly initialised Qwen2.5-VL policy built offline: transformers' own model class from a config, a
tokenizer trained on a local corpus and the image-only processor.

Used for CPU experiments and tests; `load_policy` loads what `build_tiny_vlm(..., out_dir=...)` saves just as it
loads a real checkpoint. Imports torch and transformers; never Ray.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

from visurf_ray.models.policy import Policy
from visurf_ray.models.processor import TEMPORAL_PATCH_SIZE, ImageOnlyQwenVLProcessor, build_image_processor
from visurf_ray.models.tokenizer import train_tokenizer
from visurf_ray.models.vision_attention import batch_vision_windows
from visurf_ray.validation import check_int, check_number, require


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of the tiny Qwen2.5-VL (defaults: 1,651,744 parameters, with the settings that make it learn where
    objects are, see below).

    head_dim is text_hidden / text_heads (64 at the defaults, as vLLM needs): transformers' Qwen2.5-VL attention
    derives it from those two and ignores a separate head_dim, so it cannot be chosen independently.

    The defaults are what made the tiny model learn where objects are (measured with a probe of the column/row digits'
    loss, see `visurf_ray.data.benchmark.BACKGROUND`):
    - vision attention windows of one image token (as Qwen2.5-VL's windowed blocks, without its full-attention
      blocks) keep each token's features local, and vision weights drawn with std 0.1 rather than transformers' 0.02
      give image tokens ~25x the norm of text embeddings, so they are not washed out in the residual stream (with the
      stock settings the vision features collapsed and the digits stayed at chance);
    - M-RoPE with rope_theta 10 and the height/width sections on the fastest frequencies (`mrope_section`) gives the
      language model the index of each of the 4 x 4 image tokens: without it only an object's offset inside its
      token was learnt (digit loss plateau 1.3 nats, chance 1.95); with it 0.75 nats after 300 steps.
    """

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 2
    text_kv_heads: int = 1
    text_mlp: int = 512
    vision_depth: int = 2
    vision_hidden: int = 96
    vision_heads: int = 2
    vision_mlp: int = 384
    patch_size: int = 14  # pixels
    spatial_merge: int = 2  # patches per side merged into one image token
    image_size: int = 112  # pixels per side: (112 / 14)² = 64 patches -> 16 image tokens
    vocab_size: int = 512  # BPE vocabulary before the answer-skeleton tokens (see train_tokenizer)
    max_positions: int = 4096  # tokens
    rope_theta: float = 10.0  # the language model's (M-)RoPE base
    vision_window: int = 28  # pixels per side of the vision tower's attention windows (28: one image token)
    vision_full_attention_blocks: tuple[int, ...] = ()  # vision blocks attending across the whole image instead
    vision_init_std: float = 0.1  # std of the vision tower's weight matrices at initialisation

    def __post_init__(self):
        for name in ("text_hidden", "text_layers", "text_heads", "text_kv_heads", "text_mlp", "vision_depth"):
            check_int(f"TinyVLMSpec.{name}", getattr(self, name), low=1)
        require(
            not (self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads),
            "TinyVLMSpec",
            f"text_hidden ({self.text_hidden}) must divide by text_heads ({self.text_heads}) and text_heads by "
            f"text_kv_heads ({self.text_kv_heads})",
        )
        require(
            self.head_dim % 16 == 0,
            "TinyVLMSpec.head_dim",
            f"(text_hidden / text_heads) must be a multiple of 16 (M-RoPE splits it 2:3:3), got {self.head_dim}",
        )
        token_pixels = self.patch_size * self.spatial_merge
        require(
            self.vision_window >= token_pixels and self.vision_window % token_pixels == 0,
            f"TinyVLMSpec.vision_window ({self.vision_window})",
            f"must be a positive multiple of patch_size x spatial_merge ({token_pixels} pixels, one image token)",
        )
        require(
            all(0 <= block < self.vision_depth for block in self.vision_full_attention_blocks),
            f"TinyVLMSpec.vision_full_attention_blocks {self.vision_full_attention_blocks}",
            f"must index vision blocks 0..{self.vision_depth - 1}",
        )
        check_number("TinyVLMSpec.vision_init_std", self.vision_init_std, low=0, low_open=True, finite=False)
        require(
            not (self.vision_hidden % self.vision_heads or (self.vision_hidden // self.vision_heads) % 4),
            "TinyVLMSpec",
            f"vision_hidden ({self.vision_hidden}) / vision_heads ({self.vision_heads}) must be a multiple of 4",
        )

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    @property
    def image_tokens(self) -> int:
        """Language-model tokens per `image_size`² image."""
        return (self.image_size // (self.patch_size * self.spatial_merge)) ** 2

    def mrope_section(self) -> list[int]:
        """Rotary frequency pairs given to (time, height, width): none to time (one image, no video) and half each to
        height and width, so that image tokens' rows and columns get the fastest-turning frequencies."""
        half = self.head_dim // 2
        return [0, half // 2, half - half // 2]


def build_tiny_vlm(
    corpus: Iterable[str], spec: TinyVLMSpec = TinyVLMSpec(), *, seed: int = 0, out_dir: str | Path | None = None
) -> Policy:
    """Build a randomly initialised tiny Qwen2.5-VL policy (float32, CPU), the same for the same corpus and seed.

    Args:
        corpus: texts in the task's format to train the tokenizer on (prompts and answers).
        spec: model sizes.
        seed: seeds the weight initialisation (the global torch RNG is left as it was).
        out_dir: when given, the policy is saved there (model, generation config, processor, tokenizer, chat template)
            so that `load_policy(out_dir)` loads it back.
    """
    tokenizer = train_tokenizer(corpus, vocab_size=spec.vocab_size)

    def token_id(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int):
            raise ValueError(f"the trained tokenizer has no single id for {token!r}")
        return found

    text_config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        max_window_layers=spec.text_layers,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope_section()},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = Qwen2_5_VLVisionConfig(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        num_heads=spec.vision_heads,
        intermediate_size=spec.vision_mlp,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.spatial_merge,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        window_size=spec.vision_window,
        out_hidden_size=spec.text_hidden,
        fullatt_block_indexes=list(spec.vision_full_attention_blocks),
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        with torch.no_grad():
            for weight in model.model.visual.parameters():
                if weight.ndim > 1:  # matrices and the patch convolution; norms and biases keep their init
                    weight.normal_(0.0, spec.vision_init_std)
    batch_vision_windows(model)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    processor = ImageOnlyQwenVLProcessor(
        image_processor=build_image_processor(
            image_size=spec.image_size, patch_size=spec.patch_size, merge_size=spec.spatial_merge
        ),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    policy = Policy(model=model, processor=processor)
    if out_dir is not None:
        policy.save_pretrained(out_dir)
    return policy
