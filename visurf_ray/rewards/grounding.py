"""The grounding task (gRefCOCO / ReasonSeg style): boxes and points of every referred object, or none.

Pure numpy/scipy: must not import torch, ray or transformers. Everything about the task lives here (the task
protocol: `visurf_ray.rewards.Task`): its prompt's answer format, the verifier, its evaluation metrics and slices,
and the geometry of its solutions.

Solution (what the dataset stores, and the canonical answer text): a JSON array of objects, each with exactly the keys
`bbox_2d` ([x1, y1, x2, y2], x1 <= x2, y1 <= y2) and `point_2d` ([x, y] inside its box), in pixels of the image the
model sees; `[]` when nothing in the image matches the query (no-object). Anything else raises ValueError.

Completion: `<think>…</think><answer>[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y]}, …]</answer>`; the last
answer block is scored; extra keys in predicted objects are ignored.

Components (they add up to `overall`, in [0, OVERALL_MAX] = [0, 6]):
- thinking_format, non_repeat in {0, 1}: see thinking_format.py and non_repeat.py.
- answer_format in [0, 1]: 1 for `[]`; for a non-empty array, the mean over its items of
  0.5·[valid bbox_2d] + 0.5·[valid point_2d] (Seg-Zero's per-item format reward, halved to [0, 1]); 0 when the
  answer block is missing, is not JSON or is not an array.
- accuracy in [0, ACCURACY_MAX] = [0, 3] (VisionReasoner): per (predicted, true) pair the reward is
  1[IoU > 0.5] + 1[mean corner L1 < 10 px] + 1[point within 30 px of the true point and inside the predicted
  object's own box] (the authors' code checks the predicted point against the predicted box); pixel thresholds are at
  840×840 and scale by max(image_size) / 840. Predicted and true objects are matched one-to-one by the Hungarian
  algorithm maximising the summed pair reward, and the sum is divided by max(#predicted, #true). A predicted item
  without a valid box earns nothing but still counts in #predicted; an item without a valid point can earn 2.
  No-object: `[]` for a `[]` solution scores the full 3 (our reading: the authors' earlier code scored it 0 through a
  swallowed division by zero, and ViSurf's no-object gains need it to count); anything else for `[]` scores 0, as
  N-Acc counts it. A missing or unparsable answer scores 0.

Success (`is_success`): accuracy >= ACCURACY_MAX / 2.

Evaluation (`item_values`, METRICS; headline "giou"): "giou" (mean per-sample IoU) and "giou_object" / "giou_seen" /
"giou_unseen_attribute" (on items with an object, by slice), "n_acc" (correct empty predictions / empty ground truths,
on the "no_object" slice: other objects are in the image), "n_acc_empty_image" (the same on the "empty_image" slice:
nothing is) beside "empty_rate_object" (valid `[]` predictions on items with an object), "logp_empty_no_object" /
"logp_empty_empty_image" / "logp_empty_object" (log π(`[]`) after the model's own `<answer>`, which the trainer's
evaluation adds as "logp_empty", on those slices), "abstain_balanced_accuracy" / "..._empty_image" (balanced accuracy
of the decision to answer `[]`: the mean of N-Acc on that no-object slice and of not answering `[]` on items with an
object — 0.5 for a blind `[]` guess at any rate, as anomaly's balanced accuracy is for a constant answer),
and, over the dataset, "ciou" (cumulative intersection / cumulative union, pixels). A sample's IoU compares the union
masks of the predicted and true boxes rendered on its image grid (`geometry.box_mask`); an empty prediction for an empty
ground truth counts IoU 1, an empty prediction for a non-empty one (or the reverse) 0. A prediction is invalid when its
answer is missing, is not a JSON array, or has an item without a valid bbox_2d: its IoU is 0, it adds nothing to the
cumulative intersection and the true area to the cumulative union, and it is not a correct empty prediction. Boxes are
masks here (the paper turns boxes and points into masks with SAM2; box masks are our stand-in). Slices: "seen",
"unseen_attribute" (or "object" when the data says no more), "no_object" and "empty_image"."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from visurf_ray.rewards.answer import extract_answer, parse_json_answer, require_str
from visurf_ray.rewards.components import FORMAT_MAX, accuracy_at_least_half, task_components
from visurf_ray.rewards.geometry import (
    BBOX_L1_THRESHOLD,
    IOU_THRESHOLD,
    POINT_DISTANCE_THRESHOLD,
    Box,
    Point,
    as_box,
    as_point,
    box_mask,
    distance_matrix,
    iou_matrix,
    l1_matrix,
    pixel_scale,
    point_in_box,
)
from visurf_ray.rewards.item_metrics import ItemMetric
from visurf_ray.validation import ValidationError

NAME = "grounding"
ANSWER_FORMAT = '[{"bbox_2d": [...], "point_2d": [...]}] or []'
ACCURACY_MAX = 3.0
OVERALL_MAX = FORMAT_MAX + ACCURACY_MAX
ANSWER_IS_JSON = True
ANSWER_WRAPPER = None
CANONICAL_KEY_ORDER = ("bbox_2d", "point_2d")
SOLUTION_KEYS = frozenset(CANONICAL_KEY_ORDER)
ABSTAIN_ANSWER = "[]"
"""The answer "nothing matches", whose log-prob the trainer's evaluation reports per item ("logp_empty")."""

NO_OBJECT = "no_object"
EMPTY_IMAGE = "empty_image"
OBJECT_SLICES = ("seen", "unseen_attribute", "object")
"""Slices whose items have at least one true object: the query names a pretraining attribute ("seen"), the
post-training-only colour ("unseen_attribute"), or, for rows without that information, just "object"."""
METRICS = {
    "giou": ItemMetric("iou"),
    "giou_object": ItemMetric("iou", (OBJECT_SLICES,)),
    "giou_seen": ItemMetric("iou", (("seen",),)),
    "giou_unseen_attribute": ItemMetric("iou", (("unseen_attribute",),)),
    "n_acc": ItemMetric("empty", ((NO_OBJECT,),)),
    "n_acc_empty_image": ItemMetric("empty", ((EMPTY_IMAGE,),)),
    "empty_rate_object": ItemMetric("empty", (OBJECT_SLICES,)),
    "logp_empty_no_object": ItemMetric("logp_empty", ((NO_OBJECT,),)),
    "logp_empty_empty_image": ItemMetric("logp_empty", ((EMPTY_IMAGE,),)),
    "logp_empty_object": ItemMetric("logp_empty", (OBJECT_SLICES,)),
    "abstain_balanced_accuracy": ItemMetric("abstain_correct", ((NO_OBJECT,), OBJECT_SLICES)),
    "abstain_balanced_accuracy_empty_image": ItemMetric("abstain_correct", ((EMPTY_IMAGE,), OBJECT_SLICES)),
}
HEADLINE = "giou"


def parse_solution(solution: str) -> list[tuple[Box, Point]]:
    """The true objects of a grounding solution as (box, point) pairs in pixels; [] for no-object.

    Raises ValueError naming `solution` and the offending item/field when the string is not in the module's format.
    """
    value = parse_json_answer(require_str(solution, "solution"))
    if not isinstance(value, list):
        raise ValidationError(f"solution must be a JSON array of objects, got {solution[:200]!r}")
    objects = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != SOLUTION_KEYS:
            raise ValidationError(
                f"solution item {index} must be an object with keys bbox_2d and point_2d, got {item!r}"
            )
        box, point = as_box(item["bbox_2d"]), as_point(item["point_2d"])
        if box is None:
            raise ValidationError(
                f"solution item {index}: bbox_2d must be [x1, y1, x2, y2] with x1<=x2, y1<=y2: {item!r}"
            )
        if point is None or not point_in_box(point, box):
            raise ValidationError(f"solution item {index}: point_2d must be [x, y] inside bbox_2d: {item!r}")
        objects.append((box, point))
    return objects


def parse_prediction(completion: str) -> list[tuple[Box | None, Point | None]] | None:
    """The predicted objects as (box or None, point or None) per array item, or None when the answer is not an array.

    completion: any string. An item that is not an object, or whose field is malformed, gives None in that field.
    """
    answer = parse_json_answer(extract_answer(completion))
    if not isinstance(answer, list):
        return None
    return [
        (as_box(item.get("bbox_2d")), as_point(item.get("point_2d"))) if isinstance(item, dict) else (None, None)
        for item in answer
    ]


def answer_format(prediction: list[tuple[Box | None, Point | None]] | None) -> float:
    """Answer-format component in [0, 1] of a parsed prediction (see the module docstring)."""
    if prediction is None:
        return 0.0
    if not prediction:
        return 1.0
    return sum(0.5 * (box is not None) + 0.5 * (point is not None) for box, point in prediction) / len(prediction)


def accuracy(
    prediction: list[tuple[Box | None, Point | None]] | None,
    truth: list[tuple[Box, Point]],
    image_size: tuple[int, int] | None = None,
) -> float:
    """Accuracy component in [0, 3] (see the module docstring). image_size: (width, height) in pixels or None."""
    scale = pixel_scale(image_size)
    if prediction is None:
        return 0.0
    if not truth:
        return ACCURACY_MAX if not prediction else 0.0
    if not prediction:
        return 0.0
    has_box = np.array([box is not None for box, _ in prediction])
    has_point = np.array(
        [box is not None and point is not None and point_in_box(point, box) for box, point in prediction]
    )
    pred_boxes = np.array([box if box is not None else (0.0, 0.0, 0.0, 0.0) for box, _ in prediction])
    pred_points = np.array([point if point is not None else (0.0, 0.0) for _, point in prediction])
    true_boxes = np.array([box for box, _ in truth])
    true_points = np.array([point for _, point in truth])
    pair_reward = (
        (iou_matrix(pred_boxes, true_boxes) > IOU_THRESHOLD).astype(float)
        + (l1_matrix(pred_boxes, true_boxes) < BBOX_L1_THRESHOLD * scale)
        + ((distance_matrix(pred_points, true_points) < POINT_DISTANCE_THRESHOLD * scale) & has_point[:, None])
    ) * has_box[:, None]
    rows, cols = linear_sum_assignment(pair_reward, maximize=True)
    return float(pair_reward[rows, cols].sum()) / max(len(prediction), len(truth))


def score(completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Reward components of one completion (any string) against a grounding solution; see the module docstring.

    image_size: (width, height) in pixels of the image the model saw, or None for 840×840. Returns
    {"thinking_format", "non_repeat", "answer_format", "accuracy", "overall"} (floats; overall is their sum).
    Raises ValueError only for a malformed solution or image_size, never for the completion's content.
    """
    truth = parse_solution(solution)
    prediction = parse_prediction(completion)
    return task_components(completion, answer_format(prediction), accuracy(prediction, truth, image_size))


def is_success(components: Mapping[str, float]) -> bool:
    """Whether a scored completion solved its item: accuracy >= ACCURACY_MAX / 2."""
    return accuracy_at_least_half(components, ACCURACY_MAX)


def solution_geometry(parsed: list[tuple[Box, Point]]) -> tuple[list[Box], list[Point]]:
    """(boxes, points) of a parsed solution."""
    return [box for box, _ in parsed], [point for _, point in parsed]


def solution_slice(parsed: list[tuple[Box, Point]]) -> str:
    """ "no_object" for `[]`, else "object" (the slice when the data says no more)."""
    return NO_OBJECT if not parsed else "object"


@dataclass(frozen=True)
class MaskOverlap:
    """Pixel overlap of one sample's predicted and true box masks.

    intersection, union: pixel counts; an invalid prediction has intersection 0 and union = the true mask's area.
    truth_empty: the solution is `[]`. prediction_empty: the prediction is a valid `[]`.
    """

    intersection: int
    union: int
    truth_empty: bool
    prediction_empty: bool

    @property
    def iou(self) -> float:
        """gIoU's per-sample term in [0, 1]: 1 for empty/empty, 0 when exactly one side is empty, else I / U."""
        if self.truth_empty or self.prediction_empty:
            return float(self.truth_empty and self.prediction_empty)
        return self.intersection / self.union if self.union else 0.0


def mask_overlap(completion: str, solution: str, image_size: tuple[int, int]) -> MaskOverlap:
    """Overlap of the predicted and true box masks of one sample on its image grid.

    completion: any string; solution: a grounding solution; image_size: (width, height) in pixels.
    """
    truth = [box for box, _ in parse_solution(solution)]
    prediction = parse_prediction(completion)
    true_mask = box_mask(truth, image_size)
    boxes = [box for box, _ in prediction or () if box is not None]
    if prediction is None or len(boxes) < len(prediction):
        return MaskOverlap(0, int(np.count_nonzero(true_mask)), not truth, False)
    predicted_mask = box_mask(boxes, image_size)
    return MaskOverlap(
        intersection=int(np.count_nonzero(predicted_mask & true_mask)),
        union=int(np.count_nonzero(predicted_mask | true_mask)),
        truth_empty=not truth,
        prediction_empty=not prediction,
    )


def item_values(
    completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
) -> dict[str, float]:
    """ "iou" (gIoU's per-item term, MaskOverlap.iou), "empty" (the prediction is a valid `[]`) and "abstain_correct"
    (it answers `[]` exactly when the solution is `[]`). n_acc (gRefCOCO's N-Acc) is "empty" on no-object items;
    beside it, "empty" on items with an object (a blind `[]` guess raises both) and gIoU on items with an object."""
    overlap = mask_overlap(completion, solution, image_size)
    return {
        "iou": overlap.iou,
        "empty": float(overlap.prediction_empty),
        "abstain_correct": float(overlap.prediction_empty == overlap.truth_empty),
    }


def dataset_metrics(
    completions: Sequence[str], solutions: Sequence[str], image_sizes: Sequence[tuple[int, int]]
) -> dict[str, float]:
    """ "ciou": cumulative intersection / cumulative union over the dataset (NaN with no pixels anywhere)."""
    overlaps = [mask_overlap(c, s, size) for c, s, size in zip(completions, solutions, image_sizes)]
    union = sum(overlap.union for overlap in overlaps)
    return {"ciou": sum(overlap.intersection for overlap in overlaps) / union if union else math.nan}
