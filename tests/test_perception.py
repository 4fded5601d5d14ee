"""Perception checks (visurf_ray.train.perception): the concept items, the features, the probe; and, on the cached
base model (slow), whether each beyond-knowledge slice's concept is visible to it before any post-training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visurf_ray.models.policy import load_policy
from visurf_ray.train.perception import (
    CONCEPTS,
    DECIDING,
    PROBE_THRESHOLD,
    Accuracy,
    binding_outcomes,
    binding_share,
    concept_samples,
    count_question,
    emptied,
    perception_checks,
    probe_accuracy,
    probe_features,
    reading_questions,
    reading_share,
    selection_accuracies,
    selection_questions,
    two_object_queries,
)


def test_concept_items_are_balanced_and_labelled_by_their_meta():
    samples, labels = concept_samples(CONCEPTS["no_object"], 12)
    assert labels.tolist() == [1] * 12 + [0] * 12
    for sample, label in zip(samples, labels):
        assert sample.meta["question"].startswith("Find the ") and sample.meta["attribute"] != "purple"
        assert (sample.solution == "[]") == bool(label)
    samples, labels = concept_samples(CONCEPTS["anomaly"], 5)
    assert [s.meta["slice"] for s in samples] == ["clean"] * 5 + ["defect"] * 5 and labels.sum() == 5


def test_count_question_asks_for_the_grounding_querys_look_or_every_shape_on_the_same_image():
    samples, _ = concept_samples(CONCEPTS["no_object"], 1)
    for sample in samples:
        asked, every = count_question(sample), count_question(sample, look=False)
        assert f"How many {sample.meta['attribute']} {sample.meta['shape']}s are there?" in asked.problem
        assert "How many shapes are there?" in every.problem and sample.meta["shape"] not in every.problem
        assert asked.task == every.task == "count" and asked.image is every.image is sample.image


def test_emptied_asks_the_same_question_on_an_empty_image():
    from visurf_ray.data.benchmark import BACKGROUND, iter_split

    present = concept_samples(CONCEPTS["no_object"], 2)[0][2:]
    for sample in present:
        empty = emptied(sample)
        assert empty.problem == sample.problem and empty.solution == "[]" and empty.id != sample.id
        assert (np.asarray(empty.image) == np.array(BACKGROUND)).all() and empty.image.size == sample.image.size
        assert empty.meta["slice"] == "empty_image" and empty.meta["objects"] == 0 and empty.meta["scene"] == []
        assert sample.meta["objects"] >= 1 and sample.meta["slice"] == "seen"  # the original is untouched
        assert count_question(empty).problem == count_question(sample).problem
    item = next(iter_split("eval/grounding", 0, where=lambda m: m["slice"] == "empty_image"))
    assert np.array_equal(np.asarray(item.image), np.asarray(emptied(present[0]).image))


def _answer(box: list[int]) -> str:
    return f'<think></think><answer>[{{"bbox_2d": {box}, "point_2d": [0, 0]}}]</answer>'


def test_query_binding_counts_finds_of_the_asked_object_among_finds_of_either():
    samples = two_object_queries(4)
    asked, other, mixed = [], [], []
    for sample in samples:
        assert sample.meta["objects"] == 2 and sample.solution != "[]"
        scene = sample.meta["scene"]
        target = [o for o in scene if (o["colour"], o["shape"]) == (sample.meta["attribute"], sample.meta["shape"])]
        assert len(target) == 1
        distractor = next(o for o in scene if o is not target[0])
        asked.append(_answer(target[0]["bbox_2d"]))
        other.append(_answer(distractor["bbox_2d"]))
        (x1, _, x2, _), (_, y1, _, y2) = target[0]["bbox_2d"], distractor["bbox_2d"]
        mixed.append(_answer([x1, y1, x2, y2]))  # the asked object's columns, the other's rows
    assert binding_outcomes(samples, asked) == {"asked": 4, "other": 0, "mixed": 0, "none": 0}
    assert binding_share(binding_outcomes(samples, asked)).value == 1.0
    assert binding_share(binding_outcomes(samples, other)).value == 0.0
    assert binding_share(binding_outcomes(samples, asked[:2] + other[2:])).value == 0.5
    missing = ["<answer>[]</answer>", "no answer", _answer([0, 0, 3, 3]), asked[3]]
    outcomes = binding_outcomes(samples, missing)
    assert outcomes == {"asked": 1, "other": 0, "mixed": 0, "none": 3}
    assert binding_share(outcomes).value == 1.0  # only the one answer that finds an object counts
    assert np.isnan(binding_share(binding_outcomes(samples[:1], missing[:1])).value)
    apart = [  # objects in different rows and columns: the phantom is neither of them
        i
        for i, s in enumerate(samples)
        if len({o["bbox_2d"][0] for o in s.meta["scene"]}) == 2 and len({o["bbox_2d"][1] for o in s.meta["scene"]}) == 2
    ]
    assert apart and binding_outcomes([samples[i] for i in apart], [mixed[i] for i in apart])["mixed"] == len(apart)
    with pytest.raises(ValueError, match="two-object"):
        binding_outcomes(concept_samples(CONCEPTS["anomaly"], 1)[0][:1], asked[:1])


def test_query_reading_checks_that_the_think_names_the_asked_look():
    questions = reading_questions(30)
    assert {q.meta["form"] for q in questions} == {"colour", "shape", "colour_shape"}
    taught = [f"<think>{q.meta['think']}</think><answer>{q.solution}</answer>" for q in questions]
    assert reading_share(questions, taught).value == 1.0  # the pretraining targets name the asked look
    wrong = ["<think>I count 1 blue triangle.</think><answer>\\boxed{1}</answer>"] * len(questions)
    assert reading_share(questions, wrong).value == np.mean(["How many blue triangles" in q.problem for q in questions])
    assert reading_share(questions[:2], ["no think", "<think>I count two red circles.</think>"]).value == 0.0
    with pytest.raises(ValueError, match="How many"):
        reading_share(concept_samples(CONCEPTS["anomaly"], 1)[0][:1], taught[:1])


def test_accuracy_is_the_mean_of_group_shares_with_their_binomial_interval():
    balanced = Accuracy.of(np.array([True] * 270 + [False] * 30), np.array([True] * 150 + [False] * 150))
    assert balanced.groups == ((270, 300), (150, 300)) and balanced.value == pytest.approx(0.7, abs=1e-15)
    variance = (0.9 * 0.1 / 300 + 0.5 * 0.5 / 300) / 4
    assert balanced.half_width == pytest.approx(1.959964 * np.sqrt(variance), rel=1e-12)
    assert Accuracy(((5, 5),)).half_width == 0.0 and np.isnan(Accuracy(()).value)
    assert str(Accuracy(((3, 4),))) == "0.750 ± 0.424"
    assert balanced.as_dict() == {
        "value": balanced.value,
        "half_width": balanced.half_width,
        "groups": [[270, 300], [150, 300]],
    }
    assert Accuracy(()).as_dict() == {"value": None, "half_width": None, "groups": []}  # JSON has no NaN
    with pytest.raises(ValueError, match=r"Accuracy.groups .*3/2"):
        Accuracy(((3, 2),))


def test_probe_reads_a_separable_concept_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 50)
    separable = rng.normal(size=(100, 20)) + labels[:, None] * 3.0
    assert probe_accuracy(separable, labels).value == 1.0
    assert abs(probe_accuracy(rng.normal(size=(100, 20)), labels).value - 0.5) < 0.15
    classes = np.arange(120) % 4  # balanced accuracy over 4 classes: one group each
    separable = rng.normal(size=(120, 20)) + np.eye(4)[classes] @ rng.normal(size=(4, 20)) * 4.0
    assert probe_accuracy(separable, classes).value == 1.0 and len(probe_accuracy(separable, classes).groups) == 4
    assert abs(probe_accuracy(rng.normal(size=(120, 20)), classes).value - 0.25) < 0.15


def test_selection_questions_ask_for_a_colour_whose_count_the_scene_holds():
    questions = selection_questions(40)
    assert {q.meta["form"] for q in questions} == {"colour"} and len(questions) == 40
    for question in questions:
        colour = question.meta["question"].split()[2]
        assert question.meta["question"] == f"How many {colour} shapes are there?"
        assert question.meta["count"] == sum(o["colour"] == colour for o in question.meta["scene"])
        assert question.meta["objects"] == len(question.meta["scene"])


def test_selection_by_objects_is_what_the_number_of_objects_says_about_presence(small_policy_dir):
    questions = selection_questions(60)
    results = selection_accuracies(load_policy(small_policy_dir), questions)
    # images with no object never hold the asked colour: the object count alone is above chance
    assert 0.5 < results["by_objects"].value <= 1.0
    assert {name: len(accuracy.groups) for name, accuracy in results.items()} == {
        "asked": 4,
        "colours": 8,
        "answer": 2,
        "by_objects": 2,
    }


def test_features_and_checks_run_on_a_small_policy(small_policy_dir):
    policy = load_policy(small_policy_dir)
    samples, _ = concept_samples(CONCEPTS["anomaly"], 3)
    features = probe_features(policy, samples)
    hidden = policy.model.config.text_config.hidden_size
    assert features["prompt"].shape == (6, hidden) and features["image"].shape[0] == 6
    results = perception_checks(policy, per_class=10, per_look=5, max_new_tokens=4)
    probes = {
        "no_object_prompt",
        "no_object_count_answer",
        "no_object_count_think",
        "no_object_image_per_look",
        "empty_image_prompt",
        "empty_image_all_answer",
        "empty_image_all_think",
        "empty_image_count_answer",
        "empty_image_count_think",
        "anomaly_image",
        "anomaly_prompt",
    }
    selection = {f"query_selection_{name}" for name in ("asked", "colours", "answer", "by_objects")}
    diagnostics = {"query_binding", "query_binding_mixed", "query_reading"} | selection
    assert set(results) == probes | diagnostics and set(DECIDING.values()) <= probes
    assert all(0.0 <= results[name].value <= 1.0 for name in selection)
    assert len(results["query_selection_asked"].groups) == 4  # one per pretraining colour
    assert len(results["query_selection_colours"].groups) == 8  # present / absent per colour
    assert all(0.0 <= results[name].value <= 1.0 for name in probes)
    assert np.isnan(results["query_binding"].value)  # 4 tokens cannot hold a box: no answer finds an object
    # nor a phantom box, nor a look after a count
    assert results["query_binding_mixed"].value == 0.0 and results["query_reading"].value == 0.0


def test_perception_cli_prints_and_writes_every_check_with_the_verdicts(small_policy_dir, tmp_path, capsys):
    from experiments.perception import main

    path = tmp_path / "perception.json"
    argv = ["--model", str(small_policy_dir), "--per-class", "10", "--per-look", "5", "--max-new-tokens", "4"]
    results = main([*argv, "--json", str(path)])
    written = json.loads(path.read_text())
    assert written["checks"].keys() == results.keys() and written["visible"].keys() == DECIDING.keys()
    assert written["checks"]["anomaly_image"]["value"] == pytest.approx(results["anomaly_image"].value)
    assert written["visible"]["anomaly"] == (results["anomaly_image"].value >= PROBE_THRESHOLD)
    assert f"anomaly: {'visible' if written['visible']['anomaly'] else 'NOT visible'}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def base_model_checks():
    from visurf_ray.train.pretrain import ensure_base_model

    return perception_checks(load_policy(ensure_base_model()), per_class=300)


ABSENCE_NOT_SEEN = (
    "the tiny base model does not see whether the asked look is among other objects: asked 'How many <colour> "
    "<shape>s are there?' on the no-object images, its answer is 0 at chance (balanced accuracy 0.495 < 0.8, the "
    "default recipe of session 12), so this gRefCOCO-like slice cannot show ViSurf's effect. Why (query_binding 0.499, "
    "chance 0.5): it finds *an* object without reading which one was asked and reads a box's columns and rows from "
    "different objects (phantom boxes 0.30), although its thinks now name the asked look (query_reading 0.64); where "
    "it writes a count it knows which colour was asked (query_selection_asked 1.00) but whether that colour is there "
    "only as well as the number of objects says (0.666 vs 0.668): it does not select objects by the question, and "
    "training at this size learns it only in part (README); every base-model change tried left it at chance"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "concept",
    [
        "anomaly",  # a linear probe on the image tokens tells clean from defective textures (recipe 7: 0.845 ± 0.027)
        "empty_image",  # "How many shapes are there?": 0 on the empty image, not 0 beside it (recipe 7: 1.000)
        pytest.param("no_object", marks=pytest.mark.xfail(strict=True, reason=ABSENCE_NOT_SEEN)),
    ],
)
def test_each_beyond_knowledge_concept_is_visible_to_the_base_model(base_model_checks, concept):
    """The deciding check of each concept (`DECIDING`) reaches the threshold on the cached base model. The expected
    failures are strict, so that a base model that passes makes its mark go."""
    assert base_model_checks[DECIDING[concept]].value >= PROBE_THRESHOLD
