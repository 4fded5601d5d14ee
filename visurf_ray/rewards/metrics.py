"""Evaluation metrics the paper reports, computed from completions and solutions (strings).

Pure numpy: must not import torch, ray or transformers.

`evaluate(task, completions, solutions, image_sizes)` returns the task's metrics plus the mean of every reward
component ("mean_<component>") and "success_rate" (fraction of `is_success`):
- grounding: "giou" (mean per-sample IoU), "ciou" (cumulative intersection / cumulative union, pixels) and
  "n_acc" (correct empty predictions / empty ground truths). A sample's IoU compares the union masks of the predicted
  and true boxes rendered on its image grid (`geometry.box_mask`); an empty prediction for an empty ground truth
  counts IoU 1, an empty prediction for a non-empty one (or the reverse) 0. A prediction is invalid when its answer is
  missing, is not a JSON array, or has an item without a valid bbox_2d: its IoU is 0, it adds nothing to the
  cumulative intersection and the true area to the cumulative union, and it is not a correct empty prediction.
  Boxes are masks here (the paper turns boxes and points into masks with SAM2; box masks are our stand-in).
- gui_point: "point_accuracy" (fraction of predicted points inside the target box).
- anomaly: "accuracy" (fraction whose predicted defect presence matches; a missing answer counts wrong).
- count: "accuracy" (fraction exactly right after normalisation).
A ratio with an empty denominator (cIoU with no pixels anywhere, N-Acc with no empty ground truth) is NaN.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from visurf_ray.rewards import anomaly, get_verifier, grounding
from visurf_ray.rewards.components import COMPONENT_NAMES
from visurf_ray.rewards.geometry import REFERENCE_IMAGE_SIDE, box_mask, validate_image_size

DEFAULT_IMAGE_SIZE = (REFERENCE_IMAGE_SIDE, REFERENCE_IMAGE_SIDE)
"""(width, height) in pixels used when a sample's image size is not given: the paper's 840×840 input."""

TaskMetrics = Callable[[Sequence[str], Sequence[str], Sequence[tuple[int, int]], Sequence[Mapping[str, float]]], dict]
TASK_METRICS: dict[str, TaskMetrics] = {}


def register_task_metrics(task: str) -> Callable[[TaskMetrics], TaskMetrics]:
    """Decorator registering a function (completions, solutions, image_sizes, components) -> metrics for `task`."""

    def wrap(function: TaskMetrics) -> TaskMetrics:
        if task in TASK_METRICS:
            raise ValueError(f"metrics for task {task!r} are already registered")
        TASK_METRICS[task] = function
        return function

    return wrap


@dataclass(frozen=True)
class MaskOverlap:
    """Pixel overlap of one grounding sample's predicted and true box masks.

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
    """Overlap of the predicted and true box masks of one grounding sample on its image grid.

    completion: any string; solution: a grounding solution; image_size: (width, height) in pixels.
    """
    truth = [box for box, _ in grounding.parse_solution(solution)]
    prediction = grounding.parse_prediction(completion)
    true_mask = box_mask(truth, image_size)
    if prediction is None or any(box is None for box, _ in prediction):
        return MaskOverlap(0, int(np.count_nonzero(true_mask)), not truth, False)
    predicted_mask = box_mask([box for box, _ in prediction], image_size)
    return MaskOverlap(
        intersection=int(np.count_nonzero(predicted_mask & true_mask)),
        union=int(np.count_nonzero(predicted_mask | true_mask)),
        truth_empty=not truth,
        prediction_empty=not prediction,
    )


@register_task_metrics("grounding")
def grounding_metrics(completions, solutions, image_sizes, components) -> dict[str, float]:
    """{"giou", "ciou", "n_acc"} over N samples; image_sizes: N (width, height) pairs in pixels."""
    overlaps = [mask_overlap(c, s, size) for c, s, size in zip(completions, solutions, image_sizes)]
    union = sum(overlap.union for overlap in overlaps)
    empty_truths = [overlap for overlap in overlaps if overlap.truth_empty]
    return {
        "giou": float(np.mean([overlap.iou for overlap in overlaps])),
        "ciou": sum(overlap.intersection for overlap in overlaps) / union if union else math.nan,
        "n_acc": float(np.mean([o.prediction_empty for o in empty_truths])) if empty_truths else math.nan,
    }


@register_task_metrics("gui_point")
def gui_point_metrics(completions, solutions, image_sizes, components) -> dict[str, float]:
    """{"point_accuracy"}: fraction of the N predicted points inside their target boxes."""
    return {"point_accuracy": float(np.mean([c["accuracy"] for c in components]))}


@register_task_metrics("anomaly")
def anomaly_metrics(completions, solutions, image_sizes, components) -> dict[str, float]:
    """{"accuracy"}: fraction of the N samples whose predicted defect presence is right."""
    hits = [anomaly.parse_prediction(c)[0] == anomaly.parse_solution(s)[0] for c, s in zip(completions, solutions)]
    return {"accuracy": float(np.mean(hits))}


@register_task_metrics("count")
def count_metrics(completions, solutions, image_sizes, components) -> dict[str, float]:
    """{"accuracy"}: fraction of the N answers exactly right after normalisation."""
    return {"accuracy": float(np.mean([c["accuracy"] for c in components]))}


def evaluate(
    task: str,
    completions: Sequence[str],
    solutions: Sequence[str],
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> dict[str, float]:
    """Metrics of a dataset of N completions against N solutions for `task` (see the module docstring).

    image_sizes: N (width, height) pairs in pixels, entries or the whole argument None for 840×840. Raises ValueError
    for N = 0, mismatched lengths, an unknown task, or a malformed solution or image size (naming its index).
    """
    verifier = get_verifier(task)
    if len(completions) == 0:
        raise ValueError("completions is empty: no metrics to compute")
    sizes = [None] * len(completions) if image_sizes is None else list(image_sizes)
    if not len(completions) == len(solutions) == len(sizes):
        raise ValueError(
            f"completions, solutions and image_sizes differ in length: {len(completions)}, {len(solutions)}, "
            f"{len(sizes)}"
        )
    components = []
    for index, (completion, solution, size) in enumerate(zip(completions, solutions, sizes)):
        try:
            components.append(verifier.score(completion, solution, image_size=size))
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from error
    metrics = {f"mean_{name}": float(np.mean([c[name] for c in components])) for name in (*COMPONENT_NAMES, "overall")}
    metrics["success_rate"] = float(np.mean([verifier.is_success(c) for c in components]))
    if task in TASK_METRICS:
        grid_sizes = [DEFAULT_IMAGE_SIZE if size is None else validate_image_size(size) for size in sizes]
        metrics.update(TASK_METRICS[task](completions, solutions, grid_sizes, components))
    return metrics
