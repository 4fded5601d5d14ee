"""Non-repeat reward: 0 when the completion's reasoning keeps repeating sentences, else 1.

Pure Python: must not import torch, ray or transformers.

Completion: any string. Solution: ignored (accepted so that every reward module has the same call shape).
Component: `non_repeat` in {0, 1}; `overall` equals it.

The exact rule:
1. Text: the completion with the content of its final `<answer>…</answer>` block removed (our reading: the answer
   is JSON or a number, and decimal points would cut it into fragments that are not sentences).
2. Sentences: split the text on `.`, `!`, `?`, `;` and newlines; collapse runs of whitespace to one space, strip,
   casefold; fragments with fewer than MIN_SENTENCE_WORDS words are ignored (list markers, numbers, tags).
3. Repeats: each occurrence of a sentence after its first is one repeat, summed over all sentences.
4. `non_repeat` = 0 when repeats >= MAX_TOLERATED_REPEATS + 1 (= 2), else 1. This is Seg-Zero / VisionReasoner's
   `repeats >= 2` counter ("two or more repeats"): one sentence said three times, or two sentences said twice each,
   scores 0; a single repeated sentence is tolerated. Their split is on `.` alone and keeps short fragments.
"""

import re
from collections import Counter

from visurf_ray.rewards.answer import find_answer_span, require_str

MIN_SENTENCE_WORDS = 3
MAX_TOLERATED_REPEATS = 1
_SENTENCE_BOUNDARY = re.compile(r"[.!?;\n]")


def count_repeats(completion: str) -> int:
    """Number of sentence occurrences beyond each sentence's first, following the module's rule (steps 1-3)."""
    text = require_str(completion, "completion")
    span = find_answer_span(text)
    if span is not None:
        text = text[: span[0]] + text[span[1] :]
    sentences = Counter(" ".join(fragment.split()).casefold() for fragment in _SENTENCE_BOUNDARY.split(text))
    return sum(count - 1 for sentence, count in sentences.items() if len(sentence.split(" ")) >= MIN_SENTENCE_WORDS)


def score(completion: str, solution: str = "") -> dict[str, float]:
    """{"non_repeat": 0.0 | 1.0, "overall": same}. completion: any string; solution: ignored."""
    value = 0.0 if count_repeats(completion) > MAX_TOLERATED_REPEATS else 1.0
    return {"non_repeat": value, "overall": value}
