"""The anomaly task (RealIAD / ISIC style): is there a defect, and where?

Pure numpy: must not import torch, ray or transformers.
Everything about the task lives here (the task protocol: `visurf_ray.rewards.Task`): its prompt's answer format,
the verifier, its evaluation metrics and slices, and the geometry of its solutions.

Solution (what the dataset stores, and the canonical answer text): a JSON object, one of
`{"defect": true, "bbox_2d": [x1, y1, x2, y2]}` (defect with its box, pixels, x1 <= x2, y1 <= y2),
`{"defect": true}` (defect, location not given) or `{"defect": false}`. `defect` is a JSON boolean; no other keys.
Anything else raises ValueError.

Completion: `<think>…</think><answer>{"defect": true, "bbox_2d": [x1, y1, x2, y2]}</answer>` or
`<answer>{"defect": false}</answer>` after the thinking block; extra keys are ignored. The answer uses JSON booleans,
like the solution, so that the label is itself a full-score answer.

Components (they add up to `overall`, in [0, OVERALL_MAX] = [0, 5]):
- thinking_format, non_repeat in {0, 1}: see thinking_format.py and non_repeat.py.
- answer_format in {0, 1}: 1 when the answer is an object whose `defect` is a boolean and whose `bbox_2d`, if
  present, is a valid box given with `"defect": true`.
- accuracy in {0, 1, 2} (ACCURACY_MAX = 2) = presence + localisation, where presence = 1[predicted defect equals the
  true defect] and localisation = 1[predicted box has IoU > 0.5 with the true box] when the solution has a box, else
  localisation = presence (nothing to localise). A missing or unparsable answer scores 0.

Success (`is_success`): accuracy >= ACCURACY_MAX / 2, i.e. at least the presence is right.

Evaluation (`item_values`, METRICS; headline "balanced_accuracy"): "balanced_accuracy" (the mean of "accuracy_clean"
and "accuracy_defect": a constant answer scores 0.5 whatever the defect share) and "accuracy" (fraction whose
predicted defect presence matches; a missing answer counts wrong). Slices: "clean" and "defect".
"""

from collections.abc import Mapping

from visurf_ray.rewards.answer import extract_answer, parse_json_answer, require_str
from visurf_ray.rewards.components import FORMAT_MAX, accuracy_at_least_half, task_components
from visurf_ray.rewards.geometry import IOU_THRESHOLD, Box, Point, as_box, box_iou, validate_image_size
from visurf_ray.rewards.item_metrics import ItemMetric, no_dataset_metrics
from visurf_ray.validation import ValidationError

NAME = "anomaly"
ANSWER_FORMAT = '{"defect": true, "bbox_2d": [...]} or {"defect": false}'
ACCURACY_MAX = 2.0
OVERALL_MAX = FORMAT_MAX + ACCURACY_MAX
ANSWER_IS_JSON = True
ANSWER_WRAPPER = None
CANONICAL_KEY_ORDER = ("defect", "bbox_2d")
ABSTAIN_ANSWER = None
CLEAN, DEFECT = "clean", "defect"
METRICS = {
    "accuracy": ItemMetric("correct"),
    "accuracy_clean": ItemMetric("correct", ((CLEAN,),)),
    "accuracy_defect": ItemMetric("correct", ((DEFECT,),)),
    "balanced_accuracy": ItemMetric("correct", ((CLEAN,), (DEFECT,))),
}
HEADLINE = "balanced_accuracy"


def parse_solution(solution: str) -> tuple[bool, Box | None]:
    """(defect present, its box in pixels or None) of an anomaly solution; ValueError naming `solution`."""
    value = parse_json_answer(require_str(solution, "solution"))
    if not isinstance(value, dict) or not isinstance(value.get("defect"), bool):
        raise ValidationError(f"solution must be a JSON object with a boolean 'defect', got {solution[:200]!r}")
    unknown = set(value) - set(CANONICAL_KEY_ORDER)
    if unknown:
        raise ValidationError(f"solution has unknown keys {sorted(unknown)}: {solution[:200]!r}")
    if "bbox_2d" not in value:
        return value["defect"], None
    box = as_box(value["bbox_2d"])
    if not value["defect"] or box is None:
        raise ValidationError(f"solution bbox_2d must be a valid [x1, y1, x2, y2] given with defect true: {value!r}")
    return True, box


def parse_prediction(completion: str) -> tuple[bool | None, Box | None, bool]:
    """(predicted defect or None, predicted box or None, whether the answer is well-formed) for any completion."""
    answer = parse_json_answer(extract_answer(completion))
    if not isinstance(answer, dict) or not isinstance(answer.get("defect"), bool):
        return None, None, False
    defect = answer["defect"]
    if "bbox_2d" not in answer:
        return defect, None, True
    box = as_box(answer["bbox_2d"])
    return defect, box, defect and box is not None


def score(completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Reward components of one completion (any string) against an anomaly solution; see the module docstring.

    image_size: (width, height) in pixels or None (validated only: IoU is scale-free). Returns {"thinking_format",
    "non_repeat", "answer_format", "accuracy", "overall"}. Raises ValueError only for a malformed solution/image_size.
    """
    true_defect, true_box = parse_solution(solution)
    validate_image_size(image_size)
    defect, box, well_formed = parse_prediction(completion)
    presence = float(defect is not None and defect == true_defect)
    if true_box is None:
        localisation = presence
    else:
        localisation = float(bool(defect) and box is not None and box_iou(box, true_box) > IOU_THRESHOLD)
    return task_components(completion, float(well_formed), presence + localisation)


def is_success(components: Mapping[str, float]) -> bool:
    """Whether a scored completion got at least the defect's presence right: accuracy >= ACCURACY_MAX / 2."""
    return accuracy_at_least_half(components, ACCURACY_MAX)


def solution_geometry(parsed: tuple[bool, Box | None]) -> tuple[list[Box], list[Point]]:
    """(boxes, points) of a parsed solution: the defect's box, if any."""
    _, box = parsed
    return ([] if box is None else [box]), []


def solution_slice(parsed: tuple[bool, Box | None]) -> str:
    return DEFECT if parsed[0] else CLEAN


def item_values(
    completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
) -> dict[str, float]:
    """ "correct": the predicted defect presence is right (a missing answer counts wrong)."""
    return {"correct": float(parse_prediction(completion)[0] == parse_solution(solution)[0])}


dataset_metrics = no_dataset_metrics
