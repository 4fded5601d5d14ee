"""The GUI pointing task (OmniACT style): does the predicted click point land inside the target element's box?

Pure Python: must not import torch, ray or transformers.
Everything about the task lives here (the task protocol: `visurf_ray.rewards.Task`): its prompt's answer format,
the verifier, its evaluation metrics and slices, and the geometry of its solutions.

Solution (what the dataset stores, and the canonical answer text): a JSON array with exactly one object with exactly
the keys `bbox_2d` (the target element's box [x1, y1, x2, y2], x1 <= x2, y1 <= y2) and `point_2d` (a click point
[x, y] inside that box, e.g. its centre), in pixels of the screenshot the model sees. The grounding output style is
kept so that the label is itself a full-score answer. Anything else raises ValueError.

Completion: `<think>…</think><answer>[{"point_2d": [x, y]}]</answer>`; a `bbox_2d` may accompany the point and is
not scored for accuracy; extra keys are ignored.

Components (they add up to `overall`, in [0, OVERALL_MAX] = [0, 4]):
- thinking_format, non_repeat in {0, 1}: see thinking_format.py and non_repeat.py.
- answer_format in {0, 1}: 1 when the answer is an array of exactly one object with a valid `point_2d` and, if it
  has a `bbox_2d`, a valid one.
- accuracy in {0, 1} = ACCURACY_MAX: 1 when the answer is an array of exactly one object whose `point_2d` lies inside
  the target box (edges included). Containment is scale-free, so image_size is only validated.

Success (`is_success`): accuracy >= ACCURACY_MAX / 2, i.e. the point hit the target.

Evaluation (`item_values`, METRICS; headline "point_accuracy"): the fraction of predicted points inside the target
box. One slice, "all".
"""

from collections.abc import Mapping

from visurf_ray.rewards.answer import extract_answer, parse_json_answer, require_str
from visurf_ray.rewards.components import FORMAT_MAX, accuracy_at_least_half, task_components
from visurf_ray.rewards.geometry import Box, Point, as_box, as_point, point_in_box, validate_image_size
from visurf_ray.rewards.item_metrics import SLICE_ALL, ItemMetric, no_dataset_metrics
from visurf_ray.validation import ValidationError

NAME = "gui_point"
ANSWER_FORMAT = '[{"bbox_2d": [...], "point_2d": [...]}]'
ACCURACY_MAX = 1.0
OVERALL_MAX = FORMAT_MAX + ACCURACY_MAX
ANSWER_IS_JSON = True
ANSWER_WRAPPER = None
CANONICAL_KEY_ORDER = ("bbox_2d", "point_2d")
SOLUTION_KEYS = frozenset(CANONICAL_KEY_ORDER)
ABSTAIN_ANSWER = None
METRICS = {"point_accuracy": ItemMetric("hit")}
HEADLINE = "point_accuracy"


def parse_solution(solution: str) -> tuple[Box, Point]:
    """The target box and reference click point (pixels) of a gui_point solution; ValueError naming `solution`."""
    value = parse_json_answer(require_str(solution, "solution"))
    if not isinstance(value, list) or len(value) != 1:
        raise ValidationError(f"solution must be a JSON array with exactly one object, got {solution[:200]!r}")
    item = value[0]
    if not isinstance(item, dict) or set(item) != SOLUTION_KEYS:
        raise ValidationError(f"solution item must be an object with keys bbox_2d and point_2d, got {item!r}")
    box, point = as_box(item["bbox_2d"]), as_point(item["point_2d"])
    if box is None:
        raise ValidationError(f"solution bbox_2d must be [x1, y1, x2, y2] with x1<=x2, y1<=y2, got {item['bbox_2d']!r}")
    if point is None or not point_in_box(point, box):
        raise ValidationError(f"solution point_2d must be [x, y] inside bbox_2d, got {item!r}")
    return box, point


def parse_prediction(completion: str) -> tuple[Point | None, bool]:
    """(the predicted click point or None, whether the answer is well-formed) for any completion string."""
    answer = parse_json_answer(extract_answer(completion))
    if not isinstance(answer, list) or len(answer) != 1 or not isinstance(answer[0], dict):
        return None, False
    point = as_point(answer[0].get("point_2d"))
    box_ok = "bbox_2d" not in answer[0] or as_box(answer[0]["bbox_2d"]) is not None
    return point, point is not None and box_ok


def score(completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Reward components of one completion (any string) against a gui_point solution; see the module docstring.

    image_size: (width, height) in pixels or None (validated only). Returns {"thinking_format", "non_repeat",
    "answer_format", "accuracy", "overall"}. Raises ValueError only for a malformed solution or image_size.
    """
    target_box, _ = parse_solution(solution)
    validate_image_size(image_size)
    point, well_formed = parse_prediction(completion)
    hit = point is not None and point_in_box(point, target_box)
    return task_components(completion, float(well_formed), float(hit))


def is_success(components: Mapping[str, float]) -> bool:
    """Whether a scored completion hit the target: accuracy >= ACCURACY_MAX / 2."""
    return accuracy_at_least_half(components, ACCURACY_MAX)


def solution_geometry(parsed: tuple[Box, Point]) -> tuple[list[Box], list[Point]]:
    """(boxes, points) of a parsed solution: the target's box and its reference click point."""
    box, point = parsed
    return [box], [point]


def solution_slice(parsed: tuple[Box, Point]) -> str:
    return SLICE_ALL


def item_values(
    completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
) -> dict[str, float]:
    """ "hit": the predicted point lies inside the target box."""
    return {"hit": components["accuracy"]}


dataset_metrics = no_dataset_metrics
