"""How each task's question is put to the model: the question followed by its task's instruction.

The instruction asks for `<think>...</think><answer>...</answer>` with the task's answer format (`ANSWER_FORMAT` of its
module in `visurf_ray.rewards`, the format its verifier scores). Instructions are short: a 1.5M-parameter model reads
them on every step. Pure Python: imports neither torch, ray nor transformers.
"""

from visurf_ray.rewards import get_task


def instruction(task: str) -> str:
    """The text appended to every question of `task`; ValueError naming an unknown task."""
    return f"Reply <think>...</think><answer>{get_task(task).ANSWER_FORMAT}</answer>."


def format_problem(task: str, question: str) -> str:
    """The problem text shown to the model: `question` followed by `task`'s instruction."""
    return f"{question} {instruction(task)}"
