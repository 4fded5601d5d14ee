"""Shared parsing of model completions for the reward verifiers: find the answer block, parse its JSON, check numbers.

Pure Python (json, math): must not import torch, ray or transformers. Every function here accepts any string and
never raises on its content; only a non-string argument is a `ValueError`.
"""

import json
import math
from typing import Any, TypeGuard

from visurf_ray.validation import check_type

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def require_str(value: object, name: str) -> str:
    """Return `value` unchanged if it is a str; otherwise raise a ValueError naming the argument `name`."""
    check_type(name, value, str, "a str")
    assert isinstance(value, str)
    return value


def find_answer_span(completion: str) -> tuple[int, int] | None:
    """Character offsets [start, end) of the content of the last complete `<answer>…</answer>` block, or None.

    The last block is the text between the last `</answer>` and the last `<answer>` that precedes it, so stray tags
    earlier in the completion do not matter. completion: any string; offsets are in characters. O(len) time.
    """
    close = require_str(completion, "completion").rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = completion.rfind(ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    return open_ + len(ANSWER_OPEN), close


def extract_answer(completion: str) -> str | None:
    """Content of the last complete `<answer>…</answer>` block with surrounding whitespace stripped, or None.

    completion: any string. Returns None when there is no `<answer>` before the last `</answer>`.
    """
    span = find_answer_span(completion)
    return None if span is None else completion[span[0] : span[1]].strip()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"JSON number {text[:20]!r} overflows to infinity")
    return value


def parse_json_answer(text: str | None) -> list[Any] | dict[str, Any] | None:
    """The JSON array or object in `text`, or None when `text` is None, is not valid JSON, or is a JSON scalar.

    NaN, Infinity and numbers that overflow float64 are rejected (None), as are integers longer than Python's
    int-parsing limit and nesting deeper than the recursion limit. Never raises on any string.
    """
    if text is None:
        return None
    try:
        value = json.loads(require_str(text, "text"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, list | dict) else None


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """True for an int or float (not bool) whose value is finite as a float64; False for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
