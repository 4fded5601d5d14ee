"""Reward controls (visurf_ray.rewards.controls): aligning the label to the rollouts' style, eliminating its thinking
reward."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visurf_ray import rewards
from visurf_ray.rewards.answer import extract_answer
from visurf_ray.rewards.controls import (
    AnswerStyle,
    canonical_style,
    detect_style,
    eliminate_thinking_reward,
    label_completion,
    serialize_answer,
)

SOLUTION = '[{"bbox_2d": [10, 20, 110, 220], "point_2d": [50, 60]}, {"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3]}]'


def rollout(answer: str, separator: str = "\n") -> str:
    return f"<think>I look at the image.</think>{separator}<answer>{answer}</answer>"


COMPACT = rollout('[{"point_2d":[5.0,6.0],"bbox_2d":[1.0,2.0,8.0,9.0]}]')
SPACED = rollout('[{"bbox_2d": [1, 2, 8, 9], "point_2d": [5, 6]}]', separator="")


def test_align_reproduces_the_dominant_rollout_style():
    style = detect_style("grounding", [COMPACT, SPACED, COMPACT, "<answer>not json</answer>", "garbage"])
    assert style == AnswerStyle(
        item_separator=",",
        key_separator=":",
        key_order=("point_2d", "bbox_2d"),
        decimals=1,
        think_answer_separator="\n",
    )
    label = label_completion("grounding", SOLUTION, [COMPACT, SPACED, COMPACT], align=True)
    assert label == (
        "<think></think>\n<answer>"
        '[{"point_2d":[50.0,60.0],"bbox_2d":[10.0,20.0,110.0,220.0]},{"point_2d":[2.0,3.0],"bbox_2d":[1.0,2.0,3.0,4.0]}]'
        "</answer>"
    )
    assert detect_style("grounding", [SPACED, SPACED, COMPACT]) == AnswerStyle(
        key_order=("bbox_2d", "point_2d"), decimals=0
    )


def test_aligned_label_matches_a_rollout_with_the_same_content_token_for_token():
    answer = '[{"bbox_2d":[1,2,8,9],"point_2d":[5,6]}]'
    rollouts = [rollout(answer, separator="\n\n")] * 3
    label = label_completion("grounding", '[{"bbox_2d": [1, 2, 8, 9], "point_2d": [5, 6]}]', rollouts, align=True)
    assert label == rollouts[0].replace("I look at the image.", "")


def test_detect_style_falls_back_to_canonical_field_by_field():
    assert detect_style("grounding", []) == canonical_style("grounding")
    assert detect_style("grounding", ["no answer", "<answer>[1,</answer>"]) == canonical_style("grounding")
    assert canonical_style("anomaly") == AnswerStyle(key_order=("defect", "bbox_2d"))
    # `[]` votes only on the think/answer separator; a rollout mixing decimals abstains on numbers.
    style = detect_style("grounding", [rollout("[]", " "), rollout('[{"bbox_2d": [1, 2.5, 3, 4]}]', " ")])
    assert style == AnswerStyle(key_order=("bbox_2d",), think_answer_separator=" ")


def test_detect_style_ties_go_to_the_first_seen_value():
    assert detect_style("grounding", [COMPACT, SPACED]).item_separator == ","
    assert detect_style("grounding", [SPACED, COMPACT]).item_separator == ", "


def test_align_never_changes_a_value():
    solution = '[{"bbox_2d": [10.25, 20, 110.5, 220], "point_2d": [50.125, 60]}]'
    style = AnswerStyle(item_separator=",", key_separator=":", decimals=1)
    assert (
        serialize_answer("grounding", solution, style)
        == '[{"bbox_2d":[10.25,20.0,110.5,220.0],"point_2d":[50.125,60.0]}]'
    )
    integer_style = AnswerStyle(decimals=0)
    text = serialize_answer("grounding", solution, integer_style)
    assert text == '[{"bbox_2d": [10.25, 20, 110.5, 220], "point_2d": [50.125, 60]}]'
    assert json.loads(text) == json.loads(solution)


def test_align_for_anomaly_and_count():
    anomaly_rollouts = [rollout('{"bbox_2d":[1,2,3,4],"defect":true}')] * 2
    assert label_completion("anomaly", '{"defect": true, "bbox_2d": [5, 6, 7, 8]}', anomaly_rollouts, align=True) == (
        '<think></think>\n<answer>{"bbox_2d":[5,6,7,8],"defect":true}</answer>'
    )
    assert label_completion("anomaly", '{"defect": false}', anomaly_rollouts, align=True).endswith(
        '<answer>{"defect":false}</answer>'
    )
    boxed = [rollout("\\boxed{4}"), rollout("\\boxed{2}", ""), rollout("7")]
    assert label_completion("count", "3", boxed, align=True) == "<think></think>\n<answer>\\boxed{3}</answer>"
    assert label_completion("count", "\\boxed{3}", [rollout("5")], align=True) == "<think></think>\n<answer>3</answer>"


def test_raw_label_is_the_solution_verbatim_without_thinking():
    assert label_completion("grounding", SOLUTION, [COMPACT], align=False) == f"<answer>{SOLUTION}</answer>"
    with pytest.raises(ValueError, match="solution"):
        label_completion("grounding", "[{}]", [COMPACT], align=False)


def test_label_with_a_reasoning_trace_puts_it_in_the_think_block():
    aligned = label_completion("grounding", SOLUTION, [SPACED], align=True, reasoning="It is at column 1, row 2.")
    assert aligned == label_completion("grounding", SOLUTION, [SPACED], align=True).replace(
        "<think></think>", "<think>It is at column 1, row 2.</think>"
    )
    raw = label_completion("grounding", SOLUTION, [SPACED], align=False, reasoning="r")
    assert raw == f"<think>r</think><answer>{SOLUTION}</answer>"
    assert rewards.score("grounding", raw, SOLUTION)["thinking_format"] == 1.0
    with pytest.raises(ValueError, match="reasoning"):
        label_completion("grounding", SOLUTION, [SPACED], align=True, reasoning=["r"])


def test_eliminate_thinking_reward_zeroes_only_the_thinking_part():
    label = label_completion("grounding", SOLUTION, [COMPACT], align=True)
    components = rewards.score("grounding", label, SOLUTION)
    assert components["thinking_format"] == 1.0 and components["overall"] == 6.0
    original = dict(components)
    eliminated = eliminate_thinking_reward(components)
    assert components == original  # not mutated
    assert eliminated == {**components, "thinking_format": 0.0, "overall": 5.0}
    raw = rewards.score("grounding", label_completion("grounding", SOLUTION, [], align=False), SOLUTION)
    assert eliminate_thinking_reward(raw) == raw  # the raw label has no thinking block to begin with
    with pytest.raises(ValueError, match="thinking_format"):
        eliminate_thinking_reward({"overall": 1.0})


def test_answer_style_validates_its_fields():
    for bad in [{"item_separator": ";"}, {"key_separator": ":\n"}, {"decimals": -1}, {"think_answer_separator": "x"}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            AnswerStyle(**bad)
    with pytest.raises(ValueError, match=r"completions\[1\]"):
        detect_style("grounding", [COMPACT, None])


ROLLOUT_STYLES = st.builds(
    AnswerStyle,
    item_separator=st.sampled_from([",", ", ", ",  "]),
    key_separator=st.sampled_from([":", ": "]),
    key_order=st.sampled_from([("bbox_2d", "point_2d"), ("point_2d", "bbox_2d")]),
    decimals=st.none() | st.integers(0, 3),
    think_answer_separator=st.sampled_from(["", "\n", " "]),
)


def objects(integral_points: bool):
    """Grounding solutions with up to 3 objects; points are ints or arbitrary floats inside their boxes."""
    rows = st.tuples(
        st.integers(0, 400), st.integers(0, 400), st.integers(0, 100), st.integers(0, 100), st.floats(0, 1)
    )
    point = (lambda v: round(v)) if integral_points else (lambda v: v)
    return st.lists(rows, max_size=3).map(
        lambda rows: json.dumps(
            [
                {"bbox_2d": [x, y, x + w, y + h], "point_2d": [point(x + w * f), point(y + h * f)]}
                for x, y, w, h, f in rows
            ]
        )
    )


@settings(max_examples=100, deadline=None, derandomize=True)
@given(style=ROLLOUT_STYLES, rollout_solution=objects(integral_points=True), solution=objects(integral_points=False))
def test_detected_style_round_trips_and_aligned_labels_keep_their_values(style, rollout_solution, solution):
    written = serialize_answer("grounding", rollout_solution, style)
    rollouts = [f"<think>r</think>{style.think_answer_separator}<answer>{written}</answer>"] * 3
    detected = detect_style("grounding", rollouts)
    assert serialize_answer("grounding", rollout_solution, detected) == written
    assert detected.think_answer_separator == style.think_answer_separator
    label = label_completion("grounding", solution, rollouts, align=True)
    assert json.loads(extract_answer(label)) == json.loads(solution)
    components = rewards.score("grounding", label, solution)
    assert components["accuracy"] == 3.0 and components["answer_format"] == 1.0
    assert eliminate_thinking_reward(components)["overall"] == rewards.get_task("grounding").OVERALL_MAX - 1.0


ROLLOUT_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "[", "]", "{", "}", ",", ", ", ":", ": ", '"bbox_2d"',
                  '"point_2d"', '"defect"', "true", "1", "2.50", "1e3", "\\boxed{", "}", "\n", " ", "x"]  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    task=st.sampled_from(sorted(rewards.TASKS)),
    rollouts=st.lists(
        st.text(max_size=40) | st.lists(st.sampled_from(ROLLOUT_PIECES), max_size=30).map("".join), max_size=5
    ),
)
def test_align_never_raises_on_garbage_rollouts_and_keeps_full_accuracy(task, rollouts):
    solution = {
        "grounding": '[{"bbox_2d": [1, 2, 30, 40], "point_2d": [5.5, 6]}]',
        "gui_point": '[{"bbox_2d": [1, 2, 30, 40], "point_2d": [5.5, 6]}]',
        "anomaly": '{"defect": true, "bbox_2d": [1, 2, 30, 40]}',
        "count": "12",
    }[task]
    label = label_completion(task, solution, rollouts, align=True)
    components = rewards.score(task, label, solution)
    assert components["accuracy"] == rewards.get_task(task).ACCURACY_MAX and components["answer_format"] == 1.0
