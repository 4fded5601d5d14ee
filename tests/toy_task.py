"""A toy task for tests/test_tasks.py: "is the asked thing in the image?", answered `yes` or `no`.

Everything a task needs, in one module (the protocol `visurf_ray.rewards.Task`), registered with one line.
"""

from collections.abc import Mapping, Sequence

from visurf_ray.rewards.answer import extract_answer, require_str
from visurf_ray.rewards.components import FORMAT_MAX, accuracy_at_least_half, task_components
from visurf_ray.rewards.geometry import Box, Point, validate_image_size
from visurf_ray.rewards.item_metrics import ItemMetric

NAME = "presence"
ANSWER_FORMAT = "yes or no"
ACCURACY_MAX = 1.0
OVERALL_MAX = FORMAT_MAX + ACCURACY_MAX
ANSWER_IS_JSON = False
ANSWER_WRAPPER = None
CANONICAL_KEY_ORDER: tuple[str, ...] = ()
ABSTAIN_ANSWER = "no"
METRICS = {"accuracy": ItemMetric("correct"), "accuracy_absent": ItemMetric("correct", (("absent",),))}
HEADLINE = "accuracy"
ANSWERS = ("yes", "no")


def parse_solution(solution: str) -> str:
    if require_str(solution, "solution").strip() not in ANSWERS:
        raise ValueError(f"solution must be 'yes' or 'no', got {solution[:50]!r}")
    return solution.strip()


def parse_prediction(completion: str) -> str | None:
    answer = extract_answer(completion)
    return answer if answer in ANSWERS else None


def score(completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
    truth = parse_solution(solution)
    validate_image_size(image_size)
    answer = parse_prediction(completion)
    return task_components(completion, float(answer is not None), float(answer == truth))


def is_success(components: Mapping[str, float]) -> bool:
    return accuracy_at_least_half(components, ACCURACY_MAX)


def item_values(
    completion: str, solution: str, image_size: tuple[int, int], components: Mapping[str, float]
) -> dict[str, float]:
    return {"correct": components["accuracy"]}


def dataset_metrics(
    completions: Sequence[str], solutions: Sequence[str], image_sizes: Sequence[tuple[int, int]]
) -> dict[str, float]:
    return {"yes_rate": sum(parse_prediction(c) == "yes" for c in completions) / len(completions)}


def solution_geometry(parsed: str) -> tuple[list[Box], list[Point]]:
    return [], []


def solution_slice(parsed: str) -> str:
    return "present" if parsed == "yes" else "absent"
