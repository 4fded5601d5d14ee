"""Evaluation metrics the paper reports, computed from completions and solutions (strings).

Pure numpy: must not import torch, ray or transformers.

Every metric but cIoU is a mean of per-item values over items and slices (`ItemMetric`), so that an analysis can
bootstrap it over items: `item_values(task, ...)` gives each item's values, `summarise(task, rows, slices)` the
reported metrics (`reported_metrics(task)`: COMMON_METRICS and the task's own), "score" = the task's headline, and
`evaluate(task, completions, solutions, image_sizes, slices)` both at once plus cIoU:
- grounding: "giou" (mean per-sample IoU; headline) and "giou_object" / "giou_seen" / "giou_unseen_attribute" (on
  items with an object, by slice), "n_acc" (correct empty predictions / empty ground truths) beside
  "empty_rate_object" (valid `[]` predictions on items with an object), and "ciou" (cumulative intersection /
  cumulative union, pixels). A sample's IoU compares the union masks of the predicted
  and true boxes rendered on its image grid (`geometry.box_mask`); an empty prediction for an empty ground truth
  counts IoU 1, an empty prediction for a non-empty one (or the reverse) 0. A prediction is invalid when its answer is
  missing, is not a JSON array, or has an item without a valid bbox_2d: its IoU is 0, it adds nothing to the
  cumulative intersection and the true area to the cumulative union, and it is not a correct empty prediction.
  Boxes are masks here (the paper turns boxes and points into masks with SAM2; box masks are our stand-in).
- gui_point: "point_accuracy" (fraction of predicted points inside the target box).
- anomaly: "balanced_accuracy" (headline: the mean of "accuracy_clean" and "accuracy_defect"; a constant answer
  scores 0.5) and "accuracy" (fraction whose predicted defect presence matches; a missing answer counts wrong).
- count: "accuracy" (fraction exactly right after normalisation).
A ratio with an empty denominator (cIoU with no pixels anywhere, N-Acc with no empty ground truth) is NaN.
Slices: grounding "seen", "unseen_attribute" (or "object") and "no_object"; anomaly "clean" and "defect"; else "all".
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from visurf_ray.rewards import anomaly, get_verifier, grounding, score, thinking_format
from visurf_ray.rewards.components import COMPONENT_NAMES
from visurf_ray.rewards.geometry import REFERENCE_IMAGE_SIDE, box_mask, validate_image_size

DEFAULT_IMAGE_SIZE = (REFERENCE_IMAGE_SIDE, REFERENCE_IMAGE_SIDE)
"""(width, height) in pixels used when a sample's image size is not given: the paper's 840×840 input."""

SLICE_ALL = "all"
"""The slice of an item of a task without slices (gui_point, count)."""
NO_OBJECT, CLEAN, DEFECT = "no_object", "clean", "defect"
OBJECT_SLICES = ("seen", "unseen_attribute", "object")
"""Grounding slices whose items have at least one true object: the query names a pretraining attribute ("seen"), the
post-training-only colour ("unseen_attribute"), or, for rows without that information, just "object"."""


@dataclass(frozen=True)
class ItemMetric:
    """A metric that is a mean of per-item values, so that it can be bootstrapped over items.

    value: the per-item value it averages (`item_values`). parts: slice sets; the metric is the mean over parts of the
    mean of `value` over the items whose slice is in the part (None: every item). One part is a (slice) mean; the two
    parts (clean,), (defect,) make balanced accuracy. Items whose value is NaN (not measured) are left out; NaN when
    a part has no items left.
    """

    value: str
    parts: tuple[tuple[str, ...] | None, ...] = (None,)

    def compute(self, values: Sequence[float], slices: Sequence[str]) -> float:
        """The metric of N items: values and slices are [N]."""
        values, slices = np.asarray(values, dtype=np.float64), np.asarray(slices, dtype=object)
        means = []
        for part in self.parts:
            chosen = ~np.isnan(values) if part is None else np.isin(slices, part) & ~np.isnan(values)
            if not chosen.any():
                return math.nan
            means.append(values[chosen].mean())
        return float(np.mean(means))


ItemValues = Callable[[str, str, tuple[int, int], Mapping[str, float]], dict[str, float]]


@dataclass(frozen=True)
class TaskMetrics:
    """How one task is evaluated: `item_values(completion, solution, image_size, components)` gives each item's
    values; `metrics` are the means reported over items and slices (besides the common ones, COMMON_METRICS);
    `headline` names the paper's main number, reported as "score"."""

    item_values: ItemValues
    metrics: Mapping[str, ItemMetric]
    headline: str


TASK_METRICS: dict[str, TaskMetrics] = {}


def register_task_metrics(task: str, metrics: Mapping[str, ItemMetric], headline: str):
    """Decorator registering an item-values function for `task` with its reported `metrics` and `headline` metric."""

    def wrap(function: ItemValues) -> ItemValues:
        if task in TASK_METRICS:
            raise ValueError(f"metrics for task {task!r} are already registered")
        if headline not in metrics:
            raise ValueError(f"headline {headline!r} of task {task!r} is not one of its metrics {sorted(metrics)}")
        TASK_METRICS[task] = TaskMetrics(function, dict(metrics), headline)
        return function

    return wrap


COMMON_METRICS = {
    **{f"mean_{name}": ItemMetric(name) for name in (*COMPONENT_NAMES, "overall")},
    "success_rate": ItemMetric("success"),
    "strict_format_rate": ItemMetric("strict_format"),
    "multi_block_rate": ItemMetric("multi_block"),
}
"""Reported for every task: each reward component's mean, the success rate, the share of completions in the strict
format (exactly one think and one answer block) and the share with repeated think/answer tags."""


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


@register_task_metrics(
    "grounding",
    {
        "giou": ItemMetric("iou"),
        "giou_object": ItemMetric("iou", (OBJECT_SLICES,)),
        "giou_seen": ItemMetric("iou", (("seen",),)),
        "giou_unseen_attribute": ItemMetric("iou", (("unseen_attribute",),)),
        "n_acc": ItemMetric("empty", ((NO_OBJECT,),)),
        "empty_rate_object": ItemMetric("empty", (OBJECT_SLICES,)),
        "logp_empty_no_object": ItemMetric("logp_empty", ((NO_OBJECT,),)),
        "logp_empty_object": ItemMetric("logp_empty", (OBJECT_SLICES,)),
    },
    headline="giou",
)
def grounding_values(completion, solution, image_size, components) -> dict[str, float]:
    """ "iou" (gIoU's per-item term, MaskOverlap.iou) and "empty" (the prediction is a valid `[]`). n_acc (gRefCOCO's
    N-Acc) is "empty" on no-object items; beside it, "empty" on items with an object (a blind `[]` guess raises both)
    and gIoU on items with an object. "logp_empty" (log π(`[]`) after the model's own `<answer>`, nats) needs the
    model: the trainer's evaluation adds it (`train.evaluate.empty_answer_logprobs`); without it those metrics are
    not reported."""
    overlap = mask_overlap(completion, solution, image_size)
    return {"iou": overlap.iou, "empty": float(overlap.prediction_empty)}


@register_task_metrics("gui_point", {"point_accuracy": ItemMetric("hit")}, headline="point_accuracy")
def gui_point_values(completion, solution, image_size, components) -> dict[str, float]:
    """ "hit": the predicted point lies inside the target box."""
    return {"hit": components["accuracy"]}


@register_task_metrics(
    "anomaly",
    {
        "accuracy": ItemMetric("correct"),
        "accuracy_clean": ItemMetric("correct", ((CLEAN,),)),
        "accuracy_defect": ItemMetric("correct", ((DEFECT,),)),
        "balanced_accuracy": ItemMetric("correct", ((CLEAN,), (DEFECT,))),
    },
    headline="balanced_accuracy",
)
def anomaly_values(completion, solution, image_size, components) -> dict[str, float]:
    """ "correct": the predicted defect presence is right (a missing answer counts wrong). Balanced accuracy is the
    mean of the clean and defect accuracies: a constant answer scores 0.5 whatever the defect share."""
    return {"correct": float(anomaly.parse_prediction(completion)[0] == anomaly.parse_solution(solution)[0])}


@register_task_metrics("count", {"accuracy": ItemMetric("correct")}, headline="accuracy")
def count_values(completion, solution, image_size, components) -> dict[str, float]:
    """ "correct": the answer is exactly right after normalisation."""
    return {"correct": components["accuracy"]}


def solution_slice(task: str, solution: str) -> str:
    """The slice an item of `task` belongs to when its data says nothing more: grounding "no_object" (`[]`) or
    "object", anomaly "clean" or "defect", otherwise "all". ValueError for a malformed solution."""
    verifier = get_verifier(task)
    if task == "grounding":
        return NO_OBJECT if not verifier.parse_solution(solution) else "object"
    if task == "anomaly":
        return DEFECT if verifier.parse_solution(solution)[0] else CLEAN
    return SLICE_ALL


def item_values(
    task: str,
    completions: Sequence[str],
    solutions: Sequence[str],
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
    *,
    strict_format: bool = False,
) -> list[dict[str, float]]:
    """Per-item values of N completions against N solutions for `task`: every reward component and "overall"
    (scored with `strict_format` as in training), "success", "strict_format", "multi_block", and the task's own
    values (TASK_METRICS). Raises ValueError for N = 0, mismatched lengths, an unknown task, or a malformed solution
    or image size (naming its index)."""
    verifier = get_verifier(task)
    if len(completions) == 0:
        raise ValueError("completions is empty: no metrics to compute")
    sizes = [None] * len(completions) if image_sizes is None else list(image_sizes)
    if not len(completions) == len(solutions) == len(sizes):
        raise ValueError(
            f"completions, solutions and image_sizes differ in length: {len(completions)}, {len(solutions)}, "
            f"{len(sizes)}"
        )
    task_values = TASK_METRICS[task].item_values if task in TASK_METRICS else None
    rows = []
    for index, (completion, solution, size) in enumerate(zip(completions, solutions, sizes)):
        try:
            components = score(task, completion, solution, image_size=size, strict_format=strict_format)
            grid = DEFAULT_IMAGE_SIZE if size is None else validate_image_size(size)
            row = {
                **components,
                "success": float(verifier.is_success(components)),
                "strict_format": float(thinking_format.follows_strict_format(completion)),
                "multi_block": float(thinking_format.is_multi_block(completion)),
            }
            if task_values is not None:
                row.update(task_values(completion, solution, grid, components))
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from error
        rows.append(row)
    return rows


def reported_metrics(task: str) -> dict[str, ItemMetric]:
    """Every item-mean metric reported for `task`: COMMON_METRICS plus the task's own."""
    own = TASK_METRICS[task].metrics if task in TASK_METRICS else {}
    return {**COMMON_METRICS, **own}


def summarise(task: str, rows: Sequence[Mapping[str, float]], slices: Sequence[str]) -> dict[str, float]:
    """The reported metrics of `task` (reported_metrics, plus "score" = its headline) from N items' `item_values`
    rows and their N slices. NaN where a metric's slice has no items; metrics of values the rows lack are left out."""
    if len(rows) != len(slices):
        raise ValueError(f"rows and slices differ in length: {len(rows)} and {len(slices)}")
    metrics = {
        name: metric.compute([row[metric.value] for row in rows], slices)
        for name, metric in reported_metrics(task).items()
        if rows and metric.value in rows[0]
    }
    if task in TASK_METRICS:
        metrics["score"] = metrics[TASK_METRICS[task].headline]
    return metrics


def evaluate(
    task: str,
    completions: Sequence[str],
    solutions: Sequence[str],
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
    slices: Sequence[str] | None = None,
) -> dict[str, float]:
    """Metrics of a dataset of N completions against N solutions for `task` (see the module docstring).

    image_sizes: N (width, height) pairs in pixels, entries or the whole argument None for 840×840. slices: the N
    items' slices (default: `solution_slice`). Raises ValueError for N = 0, mismatched lengths, an unknown task, or a
    malformed solution or image size (naming its index).
    """
    rows = item_values(task, completions, solutions, image_sizes)
    if slices is None:
        slices = [solution_slice(task, solution) for solution in solutions]
    metrics = summarise(task, rows, slices)
    if task == "grounding":
        sizes = [DEFAULT_IMAGE_SIZE if size is None else size for size in (image_sizes or [None] * len(rows))]
        overlaps = [mask_overlap(c, s, size) for c, s, size in zip(completions, solutions, sizes)]
        union = sum(overlap.union for overlap in overlaps)
        metrics["ciou"] = sum(overlap.intersection for overlap in overlaps) / union if union else math.nan
    return metrics
