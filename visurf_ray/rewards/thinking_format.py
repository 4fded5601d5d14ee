"""Thinking-format reward: does the whole completion read `<think>…</think>` then `<answer>…</answer>`?

Pure Python: must not import torch, ray or transformers.

Completion: any string. Solution: ignored (accepted so that every reward module has the same call shape).
Component: `thinking_format` in {0, 1}: 1 when the whole completion matches (DOTALL)

    ^\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*$

as in Seg-Zero / VisionReasoner (plus optional surrounding whitespace), else 0. `overall` equals it.

That rule lets `.*?` span tags: `<think></think><answer>…</think><answer>[…]</answer>` matches, and the verifiers
score its last answer block. `follows_strict_format` also requires exactly one of each tag (one think block, one
answer block); `is_multi_block` flags completions with more than one think or answer tag of a kind.

The match is decided in linear time without that regex: the regex backtracks quadratically on long completions full
of `</think><answer>` pairs. A property test checks the two agree.
"""

import re

from visurf_ray.rewards.answer import ANSWER_CLOSE, require_str

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINKING_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
"""The documented rule (re.DOTALL); `follows_thinking_format` decides the same match in linear time."""

_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")


def follows_thinking_format(completion: str) -> bool:
    """Whether `completion` (any string) fully matches THINKING_FORMAT_PATTERN with re.DOTALL."""
    text = require_str(completion, "completion").strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    # The earliest `</think>\s*<answer>` after the opening tag leaves the most room for the answer content.
    middle = _THINK_THEN_ANSWER.search(text, len(THINK_OPEN))
    return middle is not None and middle.end() <= len(text) - len(ANSWER_CLOSE)


TAGS = (THINK_OPEN, THINK_CLOSE, "<answer>", ANSWER_CLOSE)


def is_multi_block(completion: str) -> bool:
    """Whether `completion` (any string) holds any of the four think/answer tags more than once."""
    text = require_str(completion, "completion")
    return any(text.count(tag) > 1 for tag in TAGS)


def follows_strict_format(completion: str) -> bool:
    """THINKING_FORMAT_PATTERN with exactly one of each think/answer tag: one think block, then one answer block."""
    return follows_thinking_format(completion) and all(completion.count(tag) == 1 for tag in TAGS)


def score(completion: str, solution: str = "") -> dict[str, float]:
    """{"thinking_format": 0.0 | 1.0, "overall": same}. completion: any string; solution: ignored."""
    value = 1.0 if follows_thinking_format(completion) else 0.0
    return {"thinking_format": value, "overall": value}
