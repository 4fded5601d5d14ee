"""Reward verifiers on strings, by task name (verl / EasyR1 style registry), and the reward controls.

Pure Python + numpy/scipy: nothing in this package imports torch, ray or transformers.

Each task verifier is a self-describing module (its docstring states the solution and completion formats and every
component's range) providing `score(completion, solution, *, image_size=None) -> {"thinking_format", "non_repeat",
"answer_format", "accuracy", "overall"}` (overall = the sum of the other four), `parse_solution(solution)`,
`is_success(components)`, `ACCURACY_MAX`, `OVERALL_MAX`, `ANSWER_IS_JSON` and `CANONICAL_KEY_ORDER`.
`score` never raises on the completion's content; a malformed solution or image_size is a ValueError.
Reward controls (align the label, eliminate its thinking reward) live in `controls.py`; metrics in `metrics.py`.
"""

from collections.abc import Mapping
from typing import Any, Protocol

from visurf_ray.rewards import anomaly, count, grounding, gui_point, thinking_format


class Verifier(Protocol):
    """What a task verifier module provides (modules satisfy this protocol structurally)."""

    ACCURACY_MAX: float
    OVERALL_MAX: float
    ANSWER_IS_JSON: bool
    CANONICAL_KEY_ORDER: tuple[str, ...]

    def score(self, completion: str, solution: str, *, image_size: tuple[int, int] | None = None) -> dict[str, float]:
        """Reward components of `completion` against `solution`; image_size is (width, height) in pixels."""
        ...

    def parse_solution(self, solution: str) -> Any:
        """The validated solution; ValueError naming `solution` when malformed."""
        ...

    def is_success(self, components: Mapping[str, float]) -> bool:
        """Whether the scored completion solved its item."""
        ...


VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str, verifier: Verifier) -> Verifier:
    """Add `verifier` to VERIFIERS under `name`; ValueError if the name is taken. Returns the verifier."""
    if name in VERIFIERS:
        raise ValueError(f"verifier {name!r} is already registered")
    VERIFIERS[name] = verifier
    return verifier


for _name, _module in (("grounding", grounding), ("gui_point", gui_point), ("anomaly", anomaly), ("count", count)):
    register_verifier(_name, _module)


def get_verifier(task: str) -> Verifier:
    """The verifier registered as `task`; ValueError naming the unknown task and the known ones."""
    if task not in VERIFIERS:
        raise ValueError(f"unknown task {task!r}; registered verifiers: {sorted(VERIFIERS)}")
    return VERIFIERS[task]


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
    components = get_verifier(task).score(completion, solution, image_size=image_size)
    if strict_format and components["thinking_format"] and not thinking_format.follows_strict_format(completion):
        components["overall"] -= components["thinking_format"]
        components["thinking_format"] = 0.0
    return components
