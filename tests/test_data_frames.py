"""The model's 840×840 frame and each image's own: a non-square image resized for the model, its solution scaled into
the model's frame, and the model's answer mapped back to the image's frame before it is scored."""

import json

import numpy as np
import pytest
from PIL import Image

from visurf_ray.config import load_config
from visurf_ray.data.frames import IMAGE_FRAME, in_image_frame, to_model_frame
from visurf_ray.data.sample import Sample
from visurf_ray.rewards import score
from visurf_ray.train.data import eval_sets, train_dataset

WIDTH, HEIGHT, SIDE = 300, 150, 840  # x factor 840 / 300 = 2.8, y factor 840 / 150 = 5.6


def wide_sample(solution: str, task: str = "grounding") -> Sample:
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Sample("wide", task, Image.fromarray(pixels), "Find the noise.", solution, HEIGHT, WIDTH, {"slice": "seen"})


def answer(text: str) -> str:
    return f"<think>It is on the left.</think><answer>{text}</answer>"


def test_a_non_square_image_round_trips_through_the_model_frame():
    truth = '[{"bbox_2d":[30,15,120,60],"point_2d":[75,37]}]'
    resized = to_model_frame(wide_sample(truth), SIDE)
    assert resized.image.size == (SIDE, SIDE) and (resized.img_width, resized.img_height) == (SIDE, SIDE)
    assert resized.solution == '[{"bbox_2d":[84,84,336,336],"point_2d":[210,207]}]'  # 37 · 5.6 = 207.2
    assert resized.meta == {"slice": "seen", IMAGE_FRAME: {"width": WIDTH, "height": HEIGHT, "solution": truth}}

    # the model's label-perfect answer, in its own frame, scores full accuracy in the image's frame
    completion, solution, size = in_image_frame(resized, answer(json.dumps(json.loads(resized.solution))))
    assert (solution, size) == (truth, (WIDTH, HEIGHT))
    assert json.loads(completion.split("<answer>")[1].split("</answer>")[0]) == json.loads(truth)
    assert completion.startswith("<think>It is on the left.</think><answer>")
    assert score("grounding", completion, solution, image_size=size)["accuracy"] == 3.0

    # 28 model pixels right and 28 down are 10 and 5 of the image's: per-axis factors, rounded to whole pixels
    shifted, _, _ = in_image_frame(resized, answer('[{"bbox_2d": [112, 112, 364, 364], "point_2d": [238, 235]}]'))
    assert json.loads(shifted.split("<answer>")[1].split("</answer>")[0]) == [
        {"bbox_2d": [40, 20, 130, 65], "point_2d": [85, 42]}
    ]
    # scored in the image's frame, thresholds scaled by 300 / 840: IoU 0.66 counts; the corners' mean error 7.5 px
    # (threshold 3.6) and the point's 11.2 px (threshold 10.7) do not
    assert score("grounding", shifted, truth, image_size=(WIDTH, HEIGHT))["accuracy"] == 1.0


def test_answers_that_are_not_json_or_samples_not_resized_are_scored_as_they_are():
    count = to_model_frame(wide_sample("\\boxed{3}", task="count"), SIDE)
    assert count.solution == "\\boxed{3}"
    assert in_image_frame(count, answer("\\boxed{3}")) == (answer("\\boxed{3}"), "\\boxed{3}", (WIDTH, HEIGHT))
    anomaly = to_model_frame(wide_sample('{"defect":true,"bbox_2d":[0,0,150,75]}', task="anomaly"), SIDE)
    assert anomaly.solution == '{"defect":true,"bbox_2d":[0,0,420,420]}'
    malformed = answer('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": "left"}')  # not JSON: left alone
    assert in_image_frame(anomaly, malformed)[0] == malformed
    original = wide_sample('[{"bbox_2d":[30,15,120,60],"point_2d":[75,37]}]')
    assert in_image_frame(original, answer("[]")) == (answer("[]"), original.solution, (WIDTH, HEIGHT))
    with pytest.raises(ValueError, match="side must be an int >= 1"):
        to_model_frame(original, 0)


def test_data_image_side_resizes_training_and_evaluation_samples():
    benchmark = load_config(overrides=["steps=1", "data.prompts_per_step=2", "data.eval_size=1"])
    assert all(IMAGE_FRAME not in s.meta for s in train_dataset(benchmark))  # the tiny benchmark: 112×112 as stored
    resized = load_config(overrides=["steps=1", "data.prompts_per_step=2", "data.eval_size=1", "data.image_side=840"])
    for samples in (train_dataset(resized), *eval_sets(resized).values()):
        assert {s.image.size for s in samples} == {(SIDE, SIDE)}
        assert {(s.meta[IMAGE_FRAME]["width"], s.meta[IMAGE_FRAME]["height"]) for s in samples} == {(112, 112)}
