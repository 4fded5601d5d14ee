"""Property-based fuzz of the reward verifiers: never raise on any completion, stay in range, labels score the max."""

import json
import math
import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from visurf_ray import rewards
from visurf_ray.rewards import non_repeat, thinking_format
from visurf_ray.rewards.components import COMPONENT_NAMES

FUZZ = settings(max_examples=150, deadline=None, derandomize=True)
TASKS = sorted(rewards.TASKS)

coordinate = st.one_of(st.integers(0, 2000), st.floats(0, 2000, allow_nan=False).map(lambda v: round(v, 2)))


@st.composite
def box_and_point(draw):
    x1, y1 = draw(coordinate), draw(coordinate)
    x2, y2 = x1 + draw(coordinate), y1 + draw(coordinate)
    fraction = st.floats(0, 1)
    point = [x1 + (x2 - x1) * draw(fraction), y1 + (y2 - y1) * draw(fraction)]
    return [x1, y1, x2, y2], [min(max(p, low), high) for p, low, high in zip(point, (x1, y1), (x2, y2))]


@st.composite
def solutions(draw, task):
    """Valid solution strings of `task`, in varied JSON spacing and key order."""
    if task == "count":
        answer = draw(st.one_of(st.integers(-(10**6), 10**6).map(str), st.sampled_from(["A", "yes", "\\frac{1}{2}"])))
        return f"\\boxed{{{answer}}}" if draw(st.booleans()) else answer
    if task == "anomaly":
        value = {"defect": draw(st.booleans())}
        if value["defect"] and draw(st.booleans()):
            value["bbox_2d"] = draw(box_and_point())[0]
    else:
        size = (0, 4) if task == "grounding" else (1, 1)
        pairs = draw(st.lists(box_and_point(), min_size=size[0], max_size=size[1]))
        value = [dict(draw(st.permutations([("bbox_2d", box), ("point_2d", point)]))) for box, point in pairs]
    separators = draw(st.sampled_from([(", ", ": "), (",", ":"), (",  ", ":")]))
    return json.dumps(value, separators=separators)


JSON_PIECES = [
    "[", "]", "{", "}", ",", ":", '"bbox_2d"', '"point_2d"', '"defect"', "true", "false", "null", "NaN", "Infinity",
    "-Infinity", "1e999", "-0", "3", "840.5", "9" * 5000, "[1, 2, 3, 4]", "[5, 5]", "\\boxed{", "\\boxed{3}", "ü", "🙂",
    "\x00", "<think>", "</think>", "<answer>", "</answer>", ". ", "\n", "the same sentence again", " ",
]  # fmt: skip
garbage = st.lists(st.sampled_from(JSON_PIECES), max_size=40).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["bbox_2d", "point_2d", "defect", "x"]), children, max_size=3)
    ),
    max_leaves=20,
)
completions = st.one_of(
    st.text(max_size=200),
    garbage,
    garbage.map(lambda text: f"<think>{text}</think><answer>{text}</answer>"),
    json_values.map(lambda value: f"<think>r</think><answer>{json.dumps(value)}</answer>"),
)
image_sizes = st.none() | st.tuples(st.integers(1, 4000), st.integers(1, 4000))


def check_components(task, components):
    verifier = rewards.get_task(task)
    assert set(components) == {*COMPONENT_NAMES, "overall"}
    assert components["thinking_format"] in (0.0, 1.0) and components["non_repeat"] in (0.0, 1.0)
    assert 0.0 <= components["answer_format"] <= 1.0
    assert 0.0 <= components["accuracy"] <= verifier.ACCURACY_MAX
    assert components["overall"] == sum(components[name] for name in COMPONENT_NAMES)
    assert 0.0 <= components["overall"] <= verifier.OVERALL_MAX
    assert all(math.isfinite(value) for value in components.values())


@FUZZ
@given(data=st.data(), task=st.sampled_from(TASKS), completion=completions, image_size=image_sizes)
def test_any_completion_scores_in_range(data, task, completion, image_size):
    solution = data.draw(solutions(task))
    check_components(task, rewards.score(task, completion, solution, image_size=image_size))


@FUZZ
@given(data=st.data(), task=st.sampled_from(TASKS), image_size=image_sizes, reasoning=st.text(max_size=50))
def test_wrapped_solution_scores_the_maximum(data, task, image_size, reasoning):
    solution = data.draw(solutions(task))
    reasoning = reasoning.replace("<", "")  # keep the tags unambiguous
    completion = f"<think>{reasoning}.</think><answer>{solution}</answer>"
    components = rewards.score(task, completion, solution, image_size=image_size)
    verifier = rewards.get_task(task)
    assert components["accuracy"] == verifier.ACCURACY_MAX and components["answer_format"] == 1.0
    assert components["thinking_format"] == 1.0
    assert verifier.is_success(components)


@FUZZ
@given(task=st.sampled_from(TASKS), solution=st.one_of(st.text(max_size=60), garbage))
def test_any_solution_is_accepted_or_a_value_error(task, solution):
    try:
        components = rewards.score(task, "<answer>[]</answer>", solution)
    except ValueError as error:
        assert "solution" in str(error)
    else:
        check_components(task, components)


@FUZZ
@given(
    st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "\u2003"]), max_size=14)
)
def test_linear_thinking_format_matches_the_documented_regex(pieces):
    completion = "".join(pieces)
    documented = re.fullmatch(thinking_format.THINKING_FORMAT_PATTERN, completion, re.DOTALL) is not None
    assert thinking_format.follows_thinking_format(completion) == documented


def test_huge_and_adversarial_completions_finish_quickly():
    adversarial = [
        "<think>" + "</think><answer>" * 20_000 + "x",
        "<think>" + "a. " * 100_000 + "</think><answer>" + "[" * 50_000 + "</answer>",
        "<answer>" + json.dumps([{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}] * 5_000) + "</answer>",
        "<answer>\\boxed{" + "{" * 100_000 + "</answer>",
        "🙂" * 300_000,
    ]
    start = time.perf_counter()
    for completion in adversarial:
        for task in TASKS:
            solution = '{"defect": true}' if task == "anomaly" else ("3" if task == "count" else "[]")
            solution = '[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]' if task == "gui_point" else solution
            check_components(task, rewards.score(task, completion, solution))
        non_repeat.score(completion)
    assert time.perf_counter() - start < 20.0
