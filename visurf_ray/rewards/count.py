"""The count / math task (counting, MathVista style): is the final answer exactly right after normalisation?

Pure Python: must not import torch, ray or transformers.
Everything about the task lives here (the task protocol: `visurf_ray.rewards.Task`): its prompt's answer format,
the verifier, its evaluation metrics and slices, and the geometry of its solutions.

Solution (what the dataset stores, and the canonical answer text): the answer as text, e.g. `3`, `-2.5`, `1,024`,
`B`; it may be written as `\\boxed{3}`. It must be non-empty after normalisation, contain no `<answer>`/`</answer>`
tag, and have balanced braces in its `\\boxed{…}`; anything else raises ValueError.

Completion: `<think>…</think><answer>\\boxed{3}</answer>` or `<answer>3</answer>`. When the answer block contains
`\\boxed{`, the content of the last `\\boxed{…}` is the answer; otherwise the whole block is.

Normalisation: strip whitespace, surrounding `$` and a trailing `.`; collapse whitespace; casefold. Numbers (optional
sign, digits with optional `,` thousands groups, optional decimal part; no exponents) compare by exact decimal value,
so `3`, `3.0` and `+3` are equal; everything else compares as normalised text.

Components (they add up to `overall`, in [0, OVERALL_MAX] = [0, 4]):
- thinking_format, non_repeat in {0, 1}: see thinking_format.py and non_repeat.py.
- answer_format in {0, 1}: 1 when there is an answer block whose answer is non-empty after normalisation (and whose
  last `\\boxed{` is closed).
- accuracy in {0, 1} = ACCURACY_MAX: 1 when the normalised answer equals the normalised solution.

Success (`is_success`): accuracy >= ACCURACY_MAX / 2, i.e. exact.

Evaluation (`item_values`, METRICS; headline "accuracy"): the fraction exactly right after normalisation. One slice,
"all".
"""

import re
from collections.abc import Mapping
from decimal import Decimal

from visurf_ray.rewards.answer import ANSWER_CLOSE, ANSWER_OPEN, extract_answer, require_str
from visurf_ray.rewards.components import FORMAT_MAX, accuracy_at_least_half, task_components
from visurf_ray.rewards.geometry import Box, Point, validate_image_size
from visurf_ray.rewards.item_metrics import SLICE_ALL, ItemMetric, no_dataset_metrics
from visurf_ray.validation import ValidationError

NAME = "count"
ANSWER_FORMAT = "\\boxed{n}"
ACCURACY_MAX = 1.0
OVERALL_MAX = FORMAT_MAX + ACCURACY_MAX
ANSWER_IS_JSON = False
BOXED = "\\boxed{"
ANSWER_WRAPPER = (BOXED, "}")
"""How a (non-JSON) answer may be wrapped; the label is wrapped like the rollouts when aligned."""
CANONICAL_KEY_ORDER: tuple[str, ...] = ()
ABSTAIN_ANSWER = None
METRICS = {"accuracy": ItemMetric("correct")}
HEADLINE = "accuracy"
_BRACE = re.compile(r"[{}]")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def unbox(text: str) -> str | None:
    """The content of the last `\\boxed{…}` in `text` (balanced braces), `text` itself when it has none, or None
    when the last `\\boxed{` is never closed. text: any string."""
    start = text.rfind(BOXED)
    if start < 0:
        return text
    depth = 1
    for brace in _BRACE.finditer(text, start + len(BOXED)):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[start + len(BOXED) : brace.start()]
    return None


def normalise(answer: str) -> str | Decimal:
    """Comparison key of an answer's text: its exact decimal value if it is a number, else normalised text."""
    text = " ".join(answer.split()).strip("$").strip()
    text = text.removesuffix(".").strip()
    if _NUMBER.fullmatch(text):
        return Decimal(text.replace(",", ""))
    return text.casefold()


def parse_solution(solution: str) -> str:
    """The answer text of a count/math solution (unboxed, stripped); ValueError naming `solution`."""
    text = require_str(solution, "solution")
    if ANSWER_OPEN in text or ANSWER_CLOSE in text:
        raise ValidationError(f"solution must not contain answer tags, got {text[:200]!r}")
    answer = unbox(text.strip())
    if answer is None or normalise(answer) == "":
        raise ValidationError(
            f"solution must be a non-empty answer (balanced \\boxed{{…}} if boxed), got {text[:200]!r}"
        )
    return answer.strip()


def parse_prediction(completion: str) -> str | Decimal | None:
    """The normalised final answer of any completion string, or None when missing, empty or unclosed-boxed."""
    content = extract_answer(completion)
    answer = None if content is None else unbox(content)
    key = None if answer is None else normalise(answer)
    return None if key == "" else key


def score(completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Reward components of one completion (any string) against a count/math solution; see the module docstring.

    image_size: (width, height) in pixels or None (validated only). Returns {"thinking_format", "non_repeat",
    "answer_format", "accuracy", "overall"}. Raises ValueError only for a malformed solution or image_size.
    """
    truth = normalise(parse_solution(solution))
    validate_image_size(image_size)
    answer = parse_prediction(completion)
    return task_components(completion, float(answer is not None), float(answer is not None and answer == truth))


def is_success(components: Mapping[str, float]) -> bool:
    """Whether a scored completion is exactly right: accuracy >= ACCURACY_MAX / 2."""
    return accuracy_at_least_half(components, ACCURACY_MAX)


def solution_geometry(parsed: str) -> tuple[list[Box], list[Point]]:
    """No boxes or points."""
    return [], []


def solution_slice(parsed: str) -> str:
    return SLICE_ALL


def item_values(
    completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
) -> dict[str, float]:
    """ "correct": the answer is exactly right after normalisation."""
    return {"correct": components["accuracy"]}


dataset_metrics = no_dataset_metrics
