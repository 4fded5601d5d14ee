"""Adding a task is one module and one registration line: a toy task (tests/toy_task.py) registered with
`register_task` is prompted, scored, aligned, evaluated with its own metrics and slices, and loaded from rows."""

from __future__ import annotations

import json
import types

import pytest
import toy_task
from PIL import Image

from visurf_ray import rewards
from visurf_ray.data.answers import check_solution, model_style
from visurf_ray.data.loaders import load_visurf_rows
from visurf_ray.data.prompts import format_problem
from visurf_ray.rewards.controls import label_completion
from visurf_ray.rewards.metrics import evaluate


@pytest.fixture
def presence_task():
    rewards.register_task(toy_task)
    yield toy_task
    del rewards.TASKS[toy_task.NAME]


def answer(text: str) -> str:
    return f"<think>I look.</think><answer>{text}</answer>"


def test_a_registered_task_is_prompted_scored_and_evaluated_through_its_module(presence_task):
    assert format_problem("presence", "Is there a red circle?") == (
        "Is there a red circle? Reply <think>...</think><answer>yes or no</answer>."
    )
    assert rewards.score("presence", answer("yes"), "yes")["overall"] == presence_task.OVERALL_MAX
    assert check_solution("presence", "no", 10, 10) == "no" and model_style("presence", "no") == "no"
    assert label_completion("presence", "no", [answer("yes")], align=True) == "<think></think><answer>no</answer>"
    metrics = evaluate("presence", [answer("yes"), answer("yes"), answer("no"), "nothing"], ["yes", "no", "no", "no"])
    assert metrics["accuracy"] == 0.5 and metrics["score"] == 0.5
    assert metrics["accuracy_absent"] == pytest.approx(1 / 3) and metrics["yes_rate"] == 0.5


def test_a_registered_task_loads_from_rows(presence_task, tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    row = {"id": 1, "problem": "Is it there?", "solution": "yes", "image": "a.png", "img_height": 6, "img_width": 8}
    (tmp_path / "rows.jsonl").write_text(json.dumps({**row, "task": "presence"}) + "\n")
    [sample] = load_visurf_rows(tmp_path / "rows.jsonl").samples
    assert sample.task == "presence" and sample.solution == "yes"


def test_registration_names_what_a_task_module_lacks():
    incomplete = types.ModuleType("incomplete")
    incomplete.NAME = "incomplete"
    with pytest.raises(ValueError, match=r"lacks \[.*'ANSWER_FORMAT'.*'score'"):
        rewards.register_task(incomplete)
    assert "incomplete" not in rewards.TASKS
    with pytest.raises(ValueError, match="unknown task 'presence'"):
        format_problem("presence", "Is it there?")
