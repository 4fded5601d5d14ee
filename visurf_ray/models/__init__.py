"""Policy models: a tiny Qwen2.5-VL built offline or a real Qwen2.5-VL checkpoint, one loader, batching, log-probs and
guarded generation. Uses torch and transformers; never Ray."""

from visurf_ray.models.generation import Rollouts, generate, suppressed_token_ids
from visurf_ray.models.inputs import (
    PromptBatch,
    SequenceBatch,
    completion_logprobs,
    completion_logprobs_and_entropy,
    encode_prompts,
    encode_sequences,
)
from visurf_ray.models.policy import Policy, load_policy
from visurf_ray.models.processor import ImageOnlyQwenVLProcessor
from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm
from visurf_ray.models.tokenizer import ANSWER_SKELETON_TOKENS, train_tokenizer

__all__ = [
    "ANSWER_SKELETON_TOKENS",
    "Rollouts",
    "ImageOnlyQwenVLProcessor",
    "Policy",
    "PromptBatch",
    "SequenceBatch",
    "TinyVLMSpec",
    "build_tiny_vlm",
    "completion_logprobs",
    "completion_logprobs_and_entropy",
    "encode_prompts",
    "encode_sequences",
    "generate",
    "load_policy",
    "suppressed_token_ids",
    "train_tokenizer",
]
