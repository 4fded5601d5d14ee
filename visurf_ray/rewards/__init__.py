"""The tasks, by name (verl / EasyR1 style registry): one self-describing module per task, and the reward controls.

Pure Python + numpy/scipy: nothing in this package imports torch, ray or transformers.

A task is one module that carries everything about it (`Task`): the answer format its prompts ask for, the reward
verifier (`score(completion, solution, *, image_size=None) -> {"thinking_format", "non_repeat", "answer_format",
"accuracy", "overall"}`, overall = the sum of the other four; `parse_solution`, `is_success`), its evaluation (per-item
values, the metrics over them and the headline one, dataset-level metrics, the slice of an item), and the geometry of
its solutions. Adding a task is one module and one `register_task` line below. `score` never raises on the
completion's content; a malformed solution or image_size is a ValueError.
Reward controls (align the label, eliminate its thinking reward) live in `controls.py`; the evaluation that uses the
tasks' metrics in `metrics.py`.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from visurf_ray.rewards import anomaly, count, grounding, gui_point, thinking_format
from visurf_ray.rewards.geometry import Box, Point
from visurf_ray.rewards.item_metrics import ItemMetric
from visurf_ray.validation import ValidationError, require


class Task(Protocol):
    """What a task module provides (modules satisfy this protocol structurally; `register_task` checks it).

    NAME: the task's name (`Sample.task`). ANSWER_FORMAT: the answer's shape shown in the prompt's instruction.
    ACCURACY_MAX / OVERALL_MAX: the largest accuracy component and overall reward. ANSWER_IS_JSON: the answer is JSON
    (else plain text, possibly wrapped in ANSWER_WRAPPER = (open, close), e.g. `\\boxed{…}`; None for JSON tasks).
    CANONICAL_KEY_ORDER: the keys a JSON answer writes first. ABSTAIN_ANSWER: the answer "nothing matches" whose
    log-prob the trainer's evaluation reports per item, or None. METRICS: reported item-mean metrics by name;
    HEADLINE: the one reported as "score".
    """

    @property
    def NAME(self) -> str: ...

    @property
    def ANSWER_FORMAT(self) -> str: ...

    @property
    def ACCURACY_MAX(self) -> float: ...

    @property
    def OVERALL_MAX(self) -> float: ...

    @property
    def ANSWER_IS_JSON(self) -> bool: ...

    @property
    def ANSWER_WRAPPER(self) -> tuple[str, str] | None: ...

    @property
    def CANONICAL_KEY_ORDER(self) -> tuple[str, ...]: ...

    @property
    def ABSTAIN_ANSWER(self) -> str | None: ...

    @property
    def METRICS(self) -> Mapping[str, ItemMetric]: ...

    @property
    def HEADLINE(self) -> str: ...

    def score(self, completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
        """Reward components of `completion` against `solution`; image_size is (width, height) in pixels."""
        ...

    def parse_solution(self, solution: str) -> Any:
        """The validated solution; ValueError naming `solution` when malformed."""
        ...

    def is_success(self, components: Mapping[str, float]) -> bool:
        """Whether the scored completion solved its item."""
        ...

    def parse_prediction(self, completion: str) -> Any:
        """The task's reading of any completion's answer (its module says the form); for a plain-answer task (not
        ANSWER_IS_JSON), None when the completion has no usable answer."""
        ...

    def item_values(
        self, completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
    ) -> dict[str, float]:
        """The task's own per-item values (those its METRICS average), given the item's reward components."""
        ...

    def dataset_metrics(
        self, completions: Sequence[str], solutions: Sequence[str], image_sizes: Sequence[tuple[int, int]]
    ) -> dict[str, float]:
        """Metrics that are not item means (e.g. grounding's cIoU); {} if none."""
        ...

    def solution_geometry(self, parsed: Any) -> tuple[list[Box], list[Point]]:
        """(boxes, points) in pixels of a parsed solution."""
        ...

    def solution_slice(self, parsed: Any) -> str:
        """The evaluation slice of an item from its parsed solution alone."""
        ...


TASK_MEMBERS = tuple(name for name in vars(Task) if not name.startswith("_"))
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add the task module `task` to TASKS under its NAME; ValueError naming what is missing or taken. Returns it."""
    missing = [name for name in TASK_MEMBERS if not hasattr(task, name)]
    require(not missing, f"task {getattr(task, 'NAME', task)!r}", f"lacks {missing} (see visurf_ray.rewards.Task)")
    require(task.NAME not in TASKS, f"task {task.NAME!r}", "is already registered")
    require(
        task.HEADLINE in task.METRICS, f"headline {task.HEADLINE!r} of task {task.NAME!r}", "is not one of its METRICS"
    )
    TASKS[task.NAME] = task
    return task


register_task(grounding)
register_task(gui_point)
register_task(anomaly)
register_task(count)


def get_task(name: str) -> Task:
    """The task registered as `name`; ValueError naming the unknown task and the known ones."""
    if name not in TASKS:
        raise ValidationError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


def score(
    task: str,
    completion: str,
    solution: str,
    *,
    image_size: tuple[int, int] | None = None,
    strict_format: bool = False,
) -> dict[str, float]:
    """Reward components of `completion` (any string) against `solution` with the `task` verifier.

    image_size: (width, height) in pixels of the image the model saw, or None for 840×840.
    strict_format: thinking_format is `thinking_format.follows_strict_format` (exactly one think and one answer
        block) instead of the paper's regex; `overall` is recomputed.
    """
    components = get_task(task).score(completion, solution, image_size=image_size)
    if strict_format and components["thinking_format"] and not thinking_format.follows_strict_format(completion):
        components["overall"] -= components["thinking_format"]
        components["thinking_format"] = 0.0
    return components
