"""Task specs and prompt templates: the one place that says how each task's question is put to the model.

Every problem is the question followed by its task's instruction, which asks for
`<think>...</think><answer>...</answer>` with the task's answer format (the format its reward verifier in
`visurf_ray.rewards` scores). Instructions are short: a 1.5M-parameter model reads them on every step.
Pure Python: imports neither torch, ray nor transformers.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One task: `name` (its reward verifier's name) and `answer_format`, the shape of the answer shown to the model
    (`[...]` stands for pixel coordinates: `[x1, y1, x2, y2]` for a bbox_2d, `[x, y]` for a point_2d)."""

    name: str
    answer_format: str

    @property
    def instruction(self) -> str:
        """The text appended to every question of this task."""
        return f"Reply <think>...</think><answer>{self.answer_format}</answer>."


TASK_SPECS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add `spec` to `TASK_SPECS` under its name."""
    TASK_SPECS[spec.name] = spec
    return spec


register_task(TaskSpec("grounding", '[{"bbox_2d": [...], "point_2d": [...]}] or []'))
register_task(TaskSpec("gui_point", '[{"bbox_2d": [...], "point_2d": [...]}]'))
register_task(TaskSpec("anomaly", '{"defect": true, "bbox_2d": [...]} or {"defect": false}'))
register_task(TaskSpec("count", "\\boxed{n}"))

TASKS: list[str] = list(TASK_SPECS)


def format_problem(task: str, question: str) -> str:
    """The problem text shown to the model: `question` followed by `task`'s instruction."""
    if task not in TASK_SPECS:
        raise ValueError(f"task {task!r} is unknown; expected one of {TASKS}")
    return f"{question} {TASK_SPECS[task].instruction}"
