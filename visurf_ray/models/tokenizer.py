"""A small byte-level BPE tokenizer in Qwen2.5-VL's format, trained in-process for the tiny policy.

It keeps Qwen2.5-VL's special tokens and chat markup, so the same prompt and generation code serves the tiny model and a
real checkpoint; digits are always one token each and the grounding answer skeleton is made of single added tokens.
Imports `tokenizers` and `transformers` (tokenizer classes only); never Ray, never model code.
"""

import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from visurf_ray.validation import check_int, check_type, require

# Qwen2.5-VL's special tokens, in its id order (151643..151656 there).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Pieces of a ViSurf grounding answer that become single (non-special, so decoded) tokens.
ANSWER_SKELETON_TOKENS = (
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    '[{"bbox_2d": [',
    '], "point_2d": [',
    "]}]",
    ", ",
)

# Qwen2's pre-tokenisation pattern; `\p{N}` alone makes every digit its own pre-token.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's message format without its default system prompt (short prompts for the tiny model).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'text' -%}"
    "{{- content['text'] -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported content type ' + content['type'] + ': use image or text') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _texts_without_added_tokens(corpus: Iterable[str], added_tokens: tuple[str, ...]) -> Iterator[str]:
    """Yield the corpus pieces between added tokens, so BPE merges are not spent on them."""
    splitter = re.compile("|".join(re.escape(token) for token in sorted(added_tokens, key=len, reverse=True)))
    for record, text in enumerate(corpus):
        check_type(f"corpus[{record}]", text, str, "a str")
        yield from (piece for piece in splitter.split(text) if piece)


def train_tokenizer(
    corpus: Iterable[str], *, vocab_size: int = 512, extra_tokens: tuple[str, ...] = ANSWER_SKELETON_TOKENS
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template.

    Args:
        corpus: training texts (prompts and answers in the task's format); the same corpus gives the same tokenizer.
        vocab_size: size of the BPE vocabulary in tokens, counting the 256 byte symbols and the 14 special tokens;
            training stops earlier when the corpus has no more pairs to merge. `extra_tokens` come on top.
        extra_tokens: strings that always encode to one token each and decode verbatim (non-special added tokens).

    Returns:
        A tokenizer with `eos_token` `<|im_end|>`, `pad_token` `<|endoftext|>`, left padding and a chat template that
        renders `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]` as
        `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\\n` (+ `<|im_start|>assistant\\n`).
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum_size = len(byte_alphabet) + len(QWEN_SPECIAL_TOKENS)
    check_int("vocab_size", vocab_size, low=minimum_size, note="(bytes + special tokens)")
    clashes = sorted(set(extra_tokens) & set(QWEN_SPECIAL_TOKENS))
    require(not clashes, "extra_tokens", f"must not repeat special tokens: {clashes}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts_without_added_tokens(corpus, QWEN_SPECIAL_TOKENS + extra_tokens), trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in extra_tokens])

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
