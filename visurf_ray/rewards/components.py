"""Assembly of a task verifier's reward components and the shared success rule.

Pure Python: must not import torch, ray or transformers.

Every task verifier returns the same four components, which add up to `overall`:
`thinking_format` (0/1, thinking_format.py), `non_repeat` (0/1, non_repeat.py), `answer_format` (task-specific,
in [0, 1]) and `accuracy` (task-specific, in [0, ACCURACY_MAX]).
"""

from collections.abc import Mapping

from visurf_ray.rewards import non_repeat, thinking_format
from visurf_ray.validation import require

COMPONENT_NAMES = ("thinking_format", "non_repeat", "answer_format", "accuracy")
FORMAT_MAX = 3.0
"""Largest thinking_format + non_repeat + answer_format; a task's OVERALL_MAX is FORMAT_MAX + its ACCURACY_MAX."""


def task_components(completion: str, answer_format: float, accuracy: float) -> dict[str, float]:
    """The four named components of `completion` (any string) plus their sum as "overall"."""
    components = {
        "thinking_format": thinking_format.score(completion)["thinking_format"],
        "non_repeat": non_repeat.score(completion)["non_repeat"],
        "answer_format": float(answer_format),
        "accuracy": float(accuracy),
    }
    components["overall"] = sum(components.values())
    return components


def accuracy_at_least_half(components: Mapping[str, float], accuracy_max: float) -> bool:
    """The success rule of every task: components["accuracy"] >= accuracy_max / 2.

    Grounding (max 3) succeeds with e.g. IoU > 0.5 and box L1 below threshold on every object; 0/1 tasks succeed
    exactly when correct. A group whose members all fail is an "all-fail group".
    """
    require("accuracy" in components, "components", f"has no 'accuracy' entry (keys: {sorted(components)})")
    return components["accuracy"] >= accuracy_max / 2
