"""Hand-written cases for the reward verifiers (visurf_ray.rewards): one section per task, plus format rewards."""

import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from visurf_ray import rewards
from visurf_ray.rewards import anomaly, count, grounding, gui_point, non_repeat, thinking_format
from visurf_ray.rewards.answer import extract_answer, is_finite_number, parse_json_answer


def wrap(answer: str, reasoning: str = "some reasoning.") -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def objects(*pairs) -> str:
    return json.dumps([{"bbox_2d": list(box), "point_2d": list(point)} for box, point in pairs])


ROOT = Path(__file__).resolve().parents[1]
BOX_A, POINT_A = (10, 20, 110, 220), (50, 60)
BOX_B, POINT_B = (400, 400, 500, 450), (450, 420)
BOX_C, POINT_C = (600, 100, 700, 300), (650, 200)


# ---- shared parsing -----------------------------------------------------------------------------------------------


def test_extract_answer_takes_last_complete_block():
    assert extract_answer("<answer>1</answer> text <answer> 2 </answer>") == "2"
    assert extract_answer("<answer>x<answer>y</answer>") == "y"
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("no tags") is None
    assert extract_answer("</answer><answer>") is None


def test_parse_json_answer_rejects_non_finite_and_scalars():
    assert parse_json_answer('[{"a": 1}]') == [{"a": 1}]
    assert parse_json_answer('{"a": 1.5}') == {"a": 1.5}
    for text in ["[NaN]", "[Infinity]", "[-Infinity]", "[1e999]", "3", '"s"', "[1,", None, "[" * 100_000, "1" * 5000]:
        assert parse_json_answer(text) is None


def test_is_finite_number():
    assert is_finite_number(3) and is_finite_number(-2.5)
    for value in [True, float("nan"), float("inf"), 10**400, "3", None, [1]]:
        assert not is_finite_number(value)


def test_non_string_completion_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="completion"):
        grounding.score(None, "[]")


# ---- thinking format and non-repeat ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>r</think><answer>a</answer>", 1.0),
        ("  \n<think>r</think>\n\n<answer>a</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>r</think> x <answer>a</answer>", 0.0),
        ("<answer>a</answer>", 0.0),
        ("<think>r</think><answer>a</answer> trailing", 0.0),
        ("prefix <think>r</think><answer>a</answer>", 0.0),
        ("<think>r<answer>a</answer>", 0.0),
        ("<think>r</think><answer>a", 0.0),
        ("<think></think><answer>", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),
    ],
)
def test_thinking_format_cases(completion, expected):
    assert thinking_format.score(completion) == {"thinking_format": expected, "overall": expected}
    assert expected == float(bool(re.fullmatch(thinking_format.THINKING_FORMAT_PATTERN, completion, re.DOTALL)))


def test_non_repeat_counts_repeats_over_all_sentences():
    sentence = "The red circle is on the left"
    assert non_repeat.score(f"{sentence}. {sentence}.")["non_repeat"] == 1.0  # one repeat is tolerated
    assert non_repeat.score(f"{sentence}. {sentence}! {sentence}?")["non_repeat"] == 0.0
    other = "the blue square is above it"
    assert non_repeat.score(f"{sentence}. {other}; {sentence}\n{other}.")["non_repeat"] == 0.0
    assert non_repeat.count_repeats(f"{sentence}.  {sentence.upper()}.\n  the   RED circle is on the left") == 2


def test_non_repeat_ignores_short_fragments_and_the_final_answer():
    assert non_repeat.score("Yes. Yes. Yes. Ok. Ok. 1. 1. 1.")["non_repeat"] == 1.0
    repeated = "the box is here. " * 5
    assert non_repeat.score(wrap(repeated.strip(), reasoning="fine."))["non_repeat"] == 1.0
    assert non_repeat.score(wrap("[]", reasoning=repeated))["non_repeat"] == 0.0


# ---- grounding -------------------------------------------------------------------------------------------------------


def test_grounding_perfect_answer_scores_maximum():
    solution = objects((BOX_A, POINT_A))
    assert grounding.score(wrap(solution), solution) == {
        "thinking_format": 1.0,
        "non_repeat": 1.0,
        "answer_format": 1.0,
        "accuracy": 3.0,
        "overall": 6.0,
    }
    assert grounding.OVERALL_MAX == 6.0 and grounding.is_success(grounding.score(wrap(solution), solution))


def test_grounding_multi_object_permutations_score_the_same():
    truth = [(BOX_A, POINT_A), (BOX_B, POINT_B), (BOX_C, POINT_C)]
    solution = objects(*truth)
    for order in itertools.permutations(truth):
        assert grounding.score(wrap(objects(*order)), solution)["accuracy"] == 3.0


def test_grounding_divides_by_the_larger_count():
    two = objects((BOX_A, POINT_A), (BOX_B, POINT_B))
    one = objects((BOX_A, POINT_A))
    assert grounding.score(wrap(two), one)["accuracy"] == 1.5
    assert grounding.score(wrap(one), two)["accuracy"] == 1.5
    assert not grounding.is_success(grounding.score(wrap(objects((BOX_C, POINT_C))), two))


def test_grounding_components_iou_l1_point_separately():
    solution = objects((BOX_A, POINT_A))
    shifted = (BOX_A[0] + 15, BOX_A[1], BOX_A[2] + 15, BOX_A[3])  # IoU 86/116, mean L1 7.5 px
    assert grounding.score(wrap(objects((shifted, POINT_A))), solution)["accuracy"] == 3.0
    far = (BOX_A[0] + 25, BOX_A[1], BOX_A[2] + 25, BOX_A[3])  # IoU 76/126 > 0.5, mean L1 12.5 px
    assert grounding.score(wrap(objects((far, (90, 100)))), solution)["accuracy"] == 1.0  # point 56.6 px away
    assert grounding.score(wrap(objects((far, (76, 86)))), solution)["accuracy"] == 1.0  # point 36.8 px away
    assert grounding.score(wrap(objects((far, (60, 70)))), solution)["accuracy"] == 2.0  # point 14.1 px away
    beyond = (BOX_A[0] + 45, BOX_A[1], BOX_A[2] + 45, BOX_A[3])  # IoU 56/146 < 0.5, mean L1 22.5 px
    assert grounding.score(wrap(objects((beyond, (60, 70)))), solution)["accuracy"] == 1.0  # point only


def test_grounding_point_must_lie_inside_the_predicted_box():
    solution = objects((BOX_A, (15, 60)))
    outside = grounding.score(wrap(objects((BOX_A, (5, 60)))), solution)  # 10 px from the true point, left of x1
    assert (outside["answer_format"], outside["accuracy"]) == (1.0, 2.0)
    assert grounding.score(wrap(objects((BOX_A, (12, 60)))), solution)["accuracy"] == 3.0


def test_grounding_thresholds_scale_with_image_size():
    solution = objects((BOX_A, POINT_A))
    shifted = (BOX_A[0] + 30, BOX_A[1], BOX_A[2] + 30, BOX_A[3])  # mean L1 15 px
    answer = wrap(objects((shifted, POINT_A)))
    assert grounding.score(answer, solution)["accuracy"] == 2.0
    assert grounding.score(answer, solution, image_size=(840, 840))["accuracy"] == 2.0
    assert grounding.score(answer, solution, image_size=(1000, 1680))["accuracy"] == 3.0  # threshold 20 px
    assert grounding.score(answer, solution, image_size=(420, 300))["accuracy"] == 2.0  # threshold 5 px
    near_point = wrap(objects((BOX_A, (POINT_A[0] + 20, POINT_A[1]))))
    assert grounding.score(near_point, solution)["accuracy"] == 3.0
    assert grounding.score(near_point, solution, image_size=(420, 420))["accuracy"] == 2.0  # threshold 15 px


def test_grounding_no_object_rules():
    assert grounding.score(wrap("[]"), "[]")["accuracy"] == 3.0
    assert grounding.score(wrap(" [ ] "), "[]")["overall"] == 6.0
    false_positive = grounding.score(wrap(objects((BOX_A, POINT_A))), "[]")
    assert false_positive["accuracy"] == 0.0 and false_positive["answer_format"] == 1.0
    missed = grounding.score(wrap("[]"), objects((BOX_A, POINT_A)))
    assert missed["accuracy"] == 0.0 and missed["answer_format"] == 1.0
    assert grounding.score("<think>r</think>", "[]")["accuracy"] == 0.0
    assert grounding.score(wrap("none"), "[]")["accuracy"] == 0.0


def test_grounding_swapped_corners_are_malformed():
    solution = objects((BOX_A, POINT_A))
    swapped = (BOX_A[2], BOX_A[1], BOX_A[0], BOX_A[3])
    components = grounding.score(wrap(objects((swapped, POINT_A))), solution)
    assert components["answer_format"] == 0.5
    assert components["accuracy"] == 0.0
    with pytest.raises(ValueError, match="solution item 0: bbox_2d"):
        grounding.parse_solution(objects((swapped, POINT_A)))


def test_grounding_answer_format_per_item():
    solution = objects((BOX_A, POINT_A))
    answer = json.dumps(
        [{"bbox_2d": list(BOX_A)}, {"point_2d": [1, 2, 3]}, "x", {"bbox_2d": [1, 2], "point_2d": [1, 2]}]
    )
    components = grounding.score(wrap(answer), solution)
    assert components["answer_format"] == (0.5 + 0 + 0 + 0.5) / 4
    assert components["accuracy"] == 2.0 / 4  # the box-only item matches with IoU and L1
    assert grounding.score(wrap(json.dumps({"bbox_2d": list(BOX_A)})), solution)["answer_format"] == 0.0
    assert grounding.score(wrap("[{bbox_2d: 1}]"), solution)["answer_format"] == 0.0
    extra_keys = json.dumps([{"bbox_2d": list(BOX_A), "point_2d": list(POINT_A), "label": "cat"}])
    assert grounding.score(wrap(extra_keys), solution)["overall"] == 6.0


def _pair_reward(pred, true, scale):
    (pb, pp), (tb, tp) = pred, true
    inter = max(0, min(pb[2], tb[2]) - max(pb[0], tb[0]) + 1) * max(0, min(pb[3], tb[3]) - max(pb[1], tb[1]) + 1)
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
    iou = inter / (area(pb) + area(tb) - inter)
    l1 = sum(abs(a - b) for a, b in zip(pb, tb)) / 4
    distance = ((pp[0] - tp[0]) ** 2 + (pp[1] - tp[1]) ** 2) ** 0.5
    inside = pb[0] <= pp[0] <= pb[2] and pb[1] <= pp[1] <= pb[3]
    return (iou > 0.5) + (l1 < 10 * scale) + (distance < 30 * scale and inside)


def test_grounding_matching_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):

        def random_object():
            x, y = rng.uniform(0, 60), rng.uniform(0, 60)
            box = (x, y, x + rng.uniform(10, 60), y + rng.uniform(10, 60))
            return box, (rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3]))

        truth = [random_object() for _ in range(rng.randint(1, 4))]
        prediction = [random_object() for _ in range(rng.randint(1, 4))]
        big, small = (prediction, truth) if len(prediction) >= len(truth) else (truth, prediction)
        best = 0
        for chosen in itertools.permutations(range(len(big)), len(small)):
            pairs = [(big[i], small[k]) for k, i in enumerate(chosen)]
            pairs = pairs if big is prediction else [(p, t) for t, p in pairs]
            best = max(best, sum(_pair_reward(p, t, 0.5) for p, t in pairs))
        expected = best / len(big)
        score = grounding.score(wrap(objects(*prediction)), objects(*truth), image_size=(420, 100))["accuracy"]
        assert score == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("solution", "message"),
    [
        ("", "JSON array"),
        ("{}", "JSON array"),
        ('[{"bbox_2d": [1, 2, 3, 4]}]', "keys bbox_2d and point_2d"),
        ('[{"bbox_2d": [1, 2, 3, 4], "point_2d": [2, 3], "x": 1}]', "keys bbox_2d and point_2d"),
        ('[{"bbox_2d": [1, 2, 3], "point_2d": [2, 3]}]', "bbox_2d"),
        ('[{"bbox_2d": [1, 2, 3, 4], "point_2d": [9, 9]}]', "point_2d must be"),
        ('[{"bbox_2d": [1, 2, 3, NaN], "point_2d": [2, 3]}]', "JSON array"),
    ],
)
def test_grounding_rejects_malformed_solutions(solution, message):
    with pytest.raises(ValueError, match=message):
        grounding.score(wrap("[]"), solution)


def test_image_size_accepts_integer_pairs_only():
    assert grounding.score(wrap("[]"), "[]", image_size=(np.int64(640), np.int32(480)))["accuracy"] == 3.0
    for image_size in [(0, 10), (10,), "840x840", (840.0, 840), (True, 3)]:
        with pytest.raises(ValueError, match="image_size"):
            grounding.score(wrap("[]"), "[]", image_size=image_size)


# ---- gui_point -------------------------------------------------------------------------------------------------------

GUI_SOLUTION = objects(((100, 200, 180, 240), (140, 220)))


@pytest.mark.parametrize(
    ("answer", "answer_format", "accuracy"),
    [
        (GUI_SOLUTION, 1.0, 1.0),
        ('[{"point_2d": [100, 240]}]', 1.0, 1.0),  # edges count as inside
        ('[{"point_2d": [99.5, 220]}]', 1.0, 0.0),
        ('[{"point_2d": [150, 230], "bbox_2d": [1, 2]}]', 0.0, 1.0),
        ('[{"point_2d": [150, 230]}, {"point_2d": [150, 230]}]', 0.0, 0.0),
        ('{"point_2d": [150, 230]}', 0.0, 0.0),
        ('[{"point_2d": [150]}]', 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_gui_point_cases(answer, answer_format, accuracy):
    components = gui_point.score(wrap(answer), GUI_SOLUTION)
    assert (components["answer_format"], components["accuracy"]) == (answer_format, accuracy)
    assert gui_point.is_success(components) == (accuracy == 1.0)


def test_gui_point_rejects_malformed_solutions():
    for solution in ['{"bbox_2d": [1, 2, 3, 4]}', "[]", objects(((1, 2, 3, 4), (9, 9))), GUI_SOLUTION[:-1]]:
        with pytest.raises(ValueError, match="solution"):
            gui_point.score(wrap("[]"), solution)


# ---- anomaly ---------------------------------------------------------------------------------------------------------

DEFECT = '{"defect": true, "bbox_2d": [100, 100, 200, 200]}'


@pytest.mark.parametrize(
    ("answer", "solution", "answer_format", "accuracy"),
    [
        (DEFECT, DEFECT, 1.0, 2.0),
        ('{"defect": true, "bbox_2d": [110, 105, 205, 210]}', DEFECT, 1.0, 2.0),
        ('{"defect": true, "bbox_2d": [300, 300, 400, 400]}', DEFECT, 1.0, 1.0),
        ('{"defect": true}', DEFECT, 1.0, 1.0),
        ('{"defect": false}', DEFECT, 1.0, 0.0),
        ('{"defect": false}', '{"defect": false}', 1.0, 2.0),
        (DEFECT, '{"defect": false}', 1.0, 0.0),
        ('{"defect": false, "bbox_2d": [1, 1, 2, 2]}', '{"defect": false}', 0.0, 2.0),
        ('{"defect": true}', '{"defect": true}', 1.0, 2.0),
        (DEFECT, '{"defect": true}', 1.0, 2.0),
        ('{"defect": "yes", "bbox_2d": [100, 100, 200, 200]}', DEFECT, 0.0, 0.0),
        ('[{"defect": true}]', DEFECT, 0.0, 0.0),
        ('{"defect": true, "bbox_2d": [200, 100, 100, 200]}', DEFECT, 0.0, 1.0),
    ],
)
def test_anomaly_cases(answer, solution, answer_format, accuracy):
    components = anomaly.score(wrap(answer), solution)
    assert (components["answer_format"], components["accuracy"]) == (answer_format, accuracy)
    assert anomaly.is_success(components) == (accuracy >= 1.0)


def test_anomaly_rejects_malformed_solutions():
    for solution in [
        '{"defect": "yes"}',
        '{"defect": false, "bbox_2d": [1, 2, 3, 4]}',
        '{"defect": true, "x": 1}',
        "[]",
    ]:
        with pytest.raises(ValueError, match="solution"):
            anomaly.score(wrap("{}"), solution)


# ---- count / math ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "solution", "answer_format", "accuracy"),
    [
        ("\\boxed{3}", "3", 1.0, 1.0),
        ("3", "3", 1.0, 1.0),
        (" 3.0 ", "3", 1.0, 1.0),
        ("+3", "\\boxed{3}", 1.0, 1.0),
        ("$1,024$", "1024", 1.0, 1.0),
        ("The answer is \\boxed{7}.", "7", 1.0, 1.0),
        ("\\boxed{2} then \\boxed{4}", "4", 1.0, 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
        ("b.", "B", 1.0, 1.0),
        ("4", "3", 1.0, 0.0),
        ("3.5", "3", 1.0, 0.0),
        ("1e0", "1", 1.0, 0.0),
        ("\\boxed{3", "3", 0.0, 0.0),
        ("\\boxed{}", "3", 0.0, 0.0),
        ("   ", "3", 0.0, 0.0),
    ],
)
def test_count_cases(answer, solution, answer_format, accuracy):
    components = count.score(wrap(answer), solution)
    assert (components["answer_format"], components["accuracy"]) == (answer_format, accuracy)


def test_count_missing_answer_and_bad_solutions():
    assert count.score("<think>3</think> 3", "3")["overall"] == 1.0  # non_repeat only
    for solution in ["", " $ ", "\\boxed{3", "<answer>3</answer>", "3</answer>"]:
        with pytest.raises(ValueError, match="solution"):
            count.score(wrap("3"), solution)


# ---- every accepted solution, wrapped, scores the maximum; registry -------------------------------------------------

ACCEPTED = {
    "grounding": ["[]", objects((BOX_A, POINT_A), (BOX_B, POINT_B)), '[{"bbox_2d":[1.5,2,3,4.25],"point_2d":[2,3]}]'],
    "gui_point": [GUI_SOLUTION, '[{"point_2d": [5, 5], "bbox_2d": [5, 5, 5, 5]}]'],
    "anomaly": [DEFECT, '{"defect": false}', '{"defect": true}', '{"bbox_2d": [1, 1, 1, 1], "defect": true}'],
    "count": ["3", "\\boxed{12}", "-0.5", "A", "x. x. x. x."],
}


@pytest.mark.parametrize(("task", "solution"), [(t, s) for t, solutions in ACCEPTED.items() for s in solutions])
def test_wrapped_solution_scores_the_maximum(task, solution):
    verifier = rewards.get_task(task)
    components = rewards.score(task, wrap(solution), solution, image_size=(320, 240))
    assert components["overall"] == verifier.OVERALL_MAX
    assert components["accuracy"] == verifier.ACCURACY_MAX
    assert verifier.is_success(components)


def test_registry():
    assert set(rewards.TASKS) == {"grounding", "gui_point", "anomaly", "count"}
    assert rewards.get_task("count") is count
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        rewards.get_task("ocr")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_task(count)
    with pytest.raises(ValueError, match="accuracy"):
        grounding.is_success({"overall": 1.0})


def test_rewards_package_imports_no_heavy_library():
    code = (
        "import sys, visurf_ray.rewards.metrics, visurf_ray.rewards.controls\n"
        "print(sorted({'torch', 'ray', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
