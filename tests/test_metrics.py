"""Evaluation metrics (visurf_ray.rewards.metrics): gIoU, cIoU, N-Acc, point accuracy, accuracy, component means,
per-item values and slices, strict format and multi-block completions."""

import json
import math

import numpy as np
import pytest

from visurf_ray import rewards
from visurf_ray.rewards.geometry import box_mask
from visurf_ray.rewards.grounding import mask_overlap
from visurf_ray.rewards.item_metrics import ItemMetric
from visurf_ray.rewards.metrics import evaluate, item_values, solution_slice, summarise
from visurf_ray.rewards.thinking_format import follows_strict_format, follows_thinking_format, is_multi_block


def answer(text: str) -> str:
    return f"<think>r.</think><answer>{text}</answer>"


def objects(*boxes) -> str:
    return json.dumps([{"bbox_2d": list(b), "point_2d": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]} for b in boxes])


def test_box_mask_is_inclusive_and_clipped():
    mask = box_mask([(2, 1, 4.5, 1), (-5, -5, 0, 0), (8, 8, 20, 20)], (10, 10))
    expected = np.zeros((10, 10), dtype=bool)
    expected[1, 2:5] = True  # x 2..4 (4.5 covers column 4 only), y 1
    expected[0, 0] = True  # clipped to the top-left pixel
    expected[8:, 8:] = True  # clipped to the bottom-right corner
    np.testing.assert_array_equal(mask, expected)
    assert box_mask([(20, 20, 30, 30)], (10, 10)).sum() == 0
    with pytest.raises(ValueError, match="image_size"):
        box_mask([], None)


def test_mask_overlap_of_one_sample():
    overlap = mask_overlap(answer(objects((5, 0, 14, 9))), objects((0, 0, 9, 9)), (20, 10))
    assert (overlap.intersection, overlap.union) == (50, 150)
    assert overlap.iou == pytest.approx(1 / 3, abs=1e-15)
    two = mask_overlap(answer(objects((0, 0, 9, 9), (5, 0, 14, 9))), objects((0, 0, 9, 9)), (20, 10))
    assert (two.intersection, two.union) == (100, 150)  # the union of the predicted boxes is one mask
    invalid = mask_overlap(answer('[{"bbox_2d": [9, 0, 0, 9]}]'), objects((0, 0, 9, 9)), (20, 10))
    assert (invalid.intersection, invalid.union, invalid.iou) == (0, 100, 0.0)


def test_grounding_metrics_giou_ciou_n_acc():
    truth = objects((0, 0, 9, 9))
    completions = [
        answer(objects((0, 0, 9, 9))),  # IoU 1: 100 / 100
        answer(objects((5, 0, 14, 9))),  # IoU 1/3: 50 / 150
        answer("[]"),  # correct empty prediction: IoU 1, adds 0 / 0
        answer(objects((0, 0, 4, 9))),  # false positive on an empty truth: IoU 0, adds 0 / 50
        "no answer",  # invalid on an empty truth: IoU 0, not a correct empty prediction
        answer("[]"),  # empty prediction for a non-empty truth: IoU 0, adds 0 / 100
    ]
    solutions = [truth, truth, "[]", "[]", "[]", truth]
    metrics = evaluate("grounding", completions, solutions, [(20, 10)] * 6)
    assert metrics["giou"] == pytest.approx((1 + 1 / 3 + 1 + 0 + 0 + 0) / 6, abs=1e-15)
    assert metrics["ciou"] == pytest.approx((100 + 50) / (100 + 150 + 50 + 100), abs=1e-15)
    assert metrics["n_acc"] == pytest.approx(1 / 3, abs=1e-15)
    # On a 20×10 image the thresholds shrink to 10·20/840 and 30·20/840 px, so (5, 0, 14, 9) earns nothing.
    assert metrics["mean_accuracy"] == pytest.approx((3 + 0 + 3 + 0 + 0 + 0) / 6, abs=1e-15)
    assert metrics["success_rate"] == pytest.approx(2 / 6, abs=1e-15)
    assert metrics["mean_overall"] == pytest.approx(
        np.mean([metrics[f"mean_{n}"] for n in ("thinking_format", "non_repeat", "answer_format", "accuracy")]) * 4
    )


def test_grounding_metrics_undefined_ratios_are_nan_and_default_grid_is_840():
    metrics = evaluate("grounding", [answer("[]")], ["[]"])
    assert metrics["giou"] == 1.0 and metrics["n_acc"] == 1.0 and math.isnan(metrics["ciou"])
    full = evaluate("grounding", [answer(objects((0, 0, 839, 839)))], [objects((0, 0, 2000, 2000))])
    assert full["giou"] == 1.0 and math.isnan(full["n_acc"])  # the true box is clipped to the 840×840 grid


def test_point_accuracy_anomaly_accuracy_and_count_accuracy():
    gui_solution = json.dumps([{"bbox_2d": [10, 10, 20, 20], "point_2d": [15, 15]}])
    gui = evaluate(
        "gui_point", [answer('[{"point_2d": [12, 19]}]'), answer('[{"point_2d": [21, 15]}]')], [gui_solution] * 2
    )
    assert gui["point_accuracy"] == 0.5
    defect = '{"defect": true, "bbox_2d": [0, 0, 10, 10]}'
    anomaly_completions = [answer('{"defect": true, "bbox_2d": [50, 50, 60, 60]}'), answer('{"defect": false}'), "none"]
    anomaly = evaluate("anomaly", anomaly_completions, [defect, '{"defect": false}', '{"defect": false}'])
    assert anomaly["accuracy"] == pytest.approx(2 / 3, abs=1e-15)  # presence only: a wrong box still counts right
    assert anomaly["mean_accuracy"] == pytest.approx((1 + 2 + 0) / 3, abs=1e-15)
    count = evaluate("count", [answer("\\boxed{3}"), answer("4"), answer("3.0")], ["3", "3", "3"])
    assert count["accuracy"] == pytest.approx(2 / 3, abs=1e-15)


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        evaluate("count", [], [])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate("count", ["a", "b"], ["3"])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate("count", ["a"], ["3"], [None, None])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate("ocr", ["a"], ["3"])
    with pytest.raises(ValueError, match="sample 1: solution"):
        evaluate("grounding", ["a", "b"], ["[]", "[{}]"])
    with pytest.raises(ValueError, match="sample 0: image_size"):
        evaluate("grounding", ["a"], ["[]"], [(0, 0)])


def test_item_metric_means_over_slices_and_parts():
    values, slices = [1.0, 0.0, 1.0, 1.0, math.nan], ["clean", "clean", "defect", "defect", "defect"]
    assert ItemMetric("v").compute(values, slices) == pytest.approx(3 / 4)  # NaN items are left out
    assert ItemMetric("v", (("clean",),)).compute(values, slices) == 0.5
    assert ItemMetric("v", (("clean",), ("defect",))).compute(values, slices) == pytest.approx(0.75)
    assert math.isnan(ItemMetric("v", (("no_object",),)).compute(values, slices))


def test_anomaly_balanced_accuracy_gives_a_constant_answer_one_half():
    solutions = ['{"defect":true,"bbox_2d":[0,0,9,9]}'] * 5 + ['{"defect":false}'] * 3
    always_defect = evaluate("anomaly", [answer('{"defect": true}')] * 8, solutions)
    assert always_defect["accuracy"] == 5 / 8 and always_defect["balanced_accuracy"] == 0.5
    assert (always_defect["accuracy_defect"], always_defect["accuracy_clean"]) == (1.0, 0.0)
    assert always_defect["score"] == always_defect["balanced_accuracy"]


def test_blind_empty_answers_show_beside_n_acc():
    truth = objects((0, 0, 9, 9))
    solutions, slices = [truth, truth, "[]", "[]"], ["seen", "unseen_attribute", "no_object", "no_object"]
    blind = evaluate("grounding", [answer("[]")] * 4, solutions, [(20, 10)] * 4, slices)
    assert blind["n_acc"] == 1.0 and blind["empty_rate_object"] == 1.0 and blind["giou_object"] == 0.0
    assert blind["abstain_balanced_accuracy"] == 0.5  # a blind guess discriminates nothing, whatever its rate
    assert (blind["giou_seen"], blind["giou_unseen_attribute"], blind["giou"]) == (0.0, 0.0, 0.5)
    assert [solution_slice("grounding", s) for s in solutions] == ["object", "object", "no_object", "no_object"]
    assert solution_slice("anomaly", '{"defect":false}') == "clean" and solution_slice("count", "3") == "all"


def test_n_acc_counts_no_object_items_among_objects_and_on_empty_images_apart():
    truth = objects((0, 0, 9, 9))
    solutions, slices = (
        [truth, "[]", "[]", "[]", "[]"],
        ["seen", "no_object", "no_object", "empty_image", "empty_image"],
    )
    completions = [answer(truth), answer("[]"), answer(truth), answer("[]"), answer("[]")]
    metrics = evaluate("grounding", completions, solutions, [(20, 10)] * 5, slices)
    assert metrics["n_acc"] == 0.5 and metrics["n_acc_empty_image"] == 1.0 and metrics["empty_rate_object"] == 0.0
    assert (metrics["abstain_balanced_accuracy"], metrics["abstain_balanced_accuracy_empty_image"]) == (0.75, 1.0)
    assert math.isnan(
        evaluate("grounding", completions[:3], solutions[:3], [(20, 10)] * 3, slices[:3])["n_acc_empty_image"]
    )


def test_item_values_carry_components_and_task_values_and_summarise_agrees():
    truth = objects((0, 0, 9, 9))
    completions = [answer(objects((0, 0, 9, 9))), "<think></think><answer>[]</think><answer>" + truth + "</answer>"]
    rows = item_values("grounding", completions, [truth, truth], [(20, 10)] * 2)
    assert rows[0]["iou"] == 1.0 and rows[0]["empty"] == 0.0 and rows[0]["multi_block"] == 0.0
    assert rows[1]["iou"] == 1.0 and rows[1]["multi_block"] == 1.0 and rows[1]["strict_format"] == 0.0
    assert rows[1]["thinking_format"] == 1.0  # the paper's regex spans the inner tags
    summary = summarise("grounding", rows, ["seen", "seen"])
    assert summary["multi_block_rate"] == 0.5 and summary["strict_format_rate"] == 0.5 and summary["giou"] == 1.0
    strict = item_values("grounding", completions, [truth, truth], [(20, 10)] * 2, strict_format=True)
    assert strict[1]["thinking_format"] == 0.0 and strict[1]["overall"] == rows[1]["overall"] - 1


@pytest.mark.parametrize(
    "completion, paper, strict, multi",
    [
        ("<think>a</think><answer>[]</answer>", True, True, False),
        ("<think></think><answer>x</think><answer>[]</answer>", True, False, True),
        ("<think>a</think><think>b</think><answer>[]</answer>", True, False, True),
        ("<answer>[]</answer>", False, False, False),
        ("<think>a</think><answer>[]</answer><answer>[]</answer>", True, False, True),
    ],
)
def test_strict_format_requires_one_think_and_one_answer_block(completion, paper, strict, multi):
    assert follows_thinking_format(completion) == paper
    assert follows_strict_format(completion) == strict
    assert is_multi_block(completion) == multi
    scored = rewards.score("grounding", completion, "[]", strict_format=True)
    assert scored["thinking_format"] == float(strict)
    assert scored["overall"] == sum(v for k, v in scored.items() if k != "overall")
