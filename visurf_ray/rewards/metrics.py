"""Evaluation metrics the paper reports, computed from completions and solutions (strings).

Pure numpy: must not import torch, ray or transformers.

Every metric but the dataset-level ones (grounding's cIoU) is a mean of per-item values over items and slices
(`ItemMetric`), so that an analysis can bootstrap it over items: `item_values(task, ...)` gives each item's values,
`summarise(task, rows, slices)` the reported metrics (`reported_metrics(task)`: COMMON_METRICS and the task's own
METRICS), "score" = the task's HEADLINE, and `evaluate(task, completions, solutions, image_sizes, slices)` both at once
plus the task's `dataset_metrics`. Each task's metrics and slices are defined in its module (`visurf_ray.rewards`).
A ratio with an empty denominator (cIoU with no pixels anywhere, N-Acc with no empty ground truth) is NaN.
"""

from collections.abc import Mapping, Sequence

from visurf_ray.rewards import get_task, score, thinking_format
from visurf_ray.rewards.components import COMPONENT_NAMES
from visurf_ray.rewards.geometry import REFERENCE_IMAGE_SIDE, validate_image_size
from visurf_ray.rewards.item_metrics import ItemMetric
from visurf_ray.validation import ValidationError, require

DEFAULT_IMAGE_SIZE = (REFERENCE_IMAGE_SIDE, REFERENCE_IMAGE_SIDE)
"""(width, height) in pixels used when a sample's image size is not given: the paper's 840×840 input."""


COMMON_METRICS = {
    **{f"mean_{name}": ItemMetric(name) for name in (*COMPONENT_NAMES, "overall")},
    "success_rate": ItemMetric("success"),
    "strict_format_rate": ItemMetric("strict_format"),
    "multi_block_rate": ItemMetric("multi_block"),
}
"""Reported for every task: each reward component's mean, the success rate, the share of completions in the strict
format (exactly one think and one answer block) and the share with repeated think/answer tags."""


def solution_slice(task: str, solution: str) -> str:
    """The slice an item of `task` belongs to when its data says nothing more (the task's `solution_slice`, e.g.
    grounding "no_object" / "object", anomaly "clean" / "defect", else "all"). ValueError for a malformed solution."""
    definition = get_task(task)
    return definition.solution_slice(definition.parse_solution(solution))


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
    values (its `item_values`). Raises ValueError for N = 0, mismatched lengths, an unknown task, or a malformed
    solution or image size (naming its index)."""
    definition = get_task(task)
    require(len(completions) > 0, "completions", "is empty: no metrics to compute")
    sizes = [None] * len(completions) if image_sizes is None else list(image_sizes)
    require(
        len(completions) == len(solutions) == len(sizes),
        "completions, solutions and image_sizes",
        f"differ in length: {len(completions)}, {len(solutions)}, {len(sizes)}",
    )
    rows = []
    for index, (completion, solution, size) in enumerate(zip(completions, solutions, sizes)):
        try:
            components = score(task, completion, solution, image_size=size, strict_format=strict_format)
            grid = validate_image_size(size) or DEFAULT_IMAGE_SIZE
            row = {
                **components,
                "success": float(definition.is_success(components)),
                "strict_format": float(thinking_format.follows_strict_format(completion)),
                "multi_block": float(thinking_format.is_multi_block(completion)),
            }
            row.update(definition.item_values(completion, solution, grid, components))
        except ValueError as error:
            raise ValidationError(f"sample {index}: {error}") from error
        rows.append(row)
    return rows


def reported_metrics(task: str) -> dict[str, ItemMetric]:
    """Every item-mean metric reported for `task`: COMMON_METRICS plus the task's own METRICS."""
    return {**COMMON_METRICS, **get_task(task).METRICS}


def summarise(task: str, rows: Sequence[Mapping[str, float]], slices: Sequence[str]) -> dict[str, float]:
    """The reported metrics of `task` (reported_metrics, plus "score" = its headline) from N items' `item_values`
    rows and their N slices. NaN where a metric's slice has no items; metrics of values the rows lack are left out."""
    require(len(rows) == len(slices), "rows and slices", f"differ in length: {len(rows)} and {len(slices)}")
    metrics = {
        name: metric.compute([row[metric.value] for row in rows], slices)
        for name, metric in reported_metrics(task).items()
        if rows and metric.value in rows[0]
    }
    metrics["score"] = metrics[get_task(task).HEADLINE]
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
    sizes = [DEFAULT_IMAGE_SIZE if size is None else size for size in (image_sizes or [None] * len(rows))]
    return {**summarise(task, rows, slices), **get_task(task).dataset_metrics(completions, solutions, sizes)}
