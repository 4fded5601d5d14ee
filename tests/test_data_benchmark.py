"""The offline benchmark: determinism, split contents, held-out disjointness, and answers that match their images.

Answers are checked two ways: every solution gets its verifier's full score, and an independent decoder reads the
scene back from the pixels and re-derives the answer from the question.
"""

import dataclasses
import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visurf_ray.data import benchmark
from visurf_ray.data.benchmark import (
    BACKGROUND,
    CELL,
    COLOURS,
    DIGIT_MASKS,
    IMAGE_SIZE,
    OBJECT_SIZE,
    SEEN_COLOURS,
    SHAPE_MASKS,
    TEXTURE_PERIOD,
    UNSEEN_COLOUR,
    iter_split,
    make_split,
    make_stratified_split,
    split_names,
    split_slices,
    target_text,
    text_corpus,
)
from visurf_ray.data.prompts import format_problem
from visurf_ray.data.sample import Sample
from visurf_ray.rewards import TASKS, get_task, score

COLOUR_NAMES = {rgb: name for name, rgb in COLOURS.items()}


def pixels(sample: Sample) -> np.ndarray:
    return np.asarray(sample.image)


def fingerprint(sample: Sample) -> tuple:
    return sample.problem, sample.solution, sample.image.tobytes()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Sample]]:
    return {name: make_split(name, 240, seed=0) for name in split_names()}


def decode_shapes(image: np.ndarray) -> list[tuple[str, str, int, int]]:
    """(colour, shape, col, row) of every shape drawn on a 2 x 2-cell block, found from the pixels alone."""
    foreground = (image != np.array(BACKGROUND)).any(axis=-1)
    found = []
    for row, col in itertools.product(range(IMAGE_SIZE // CELL - 1), repeat=2):
        rows, cols = slice(row * CELL, row * CELL + OBJECT_SIZE), slice(col * CELL, col * CELL + OBJECT_SIZE)
        for shape, mask in SHAPE_MASKS.items():
            if np.array_equal(foreground[rows, cols], mask):
                colours = np.unique(image[rows, cols][mask], axis=0)
                if len(colours) == 1:
                    found.append((COLOUR_NAMES[tuple(int(v) for v in colours[0])], shape, col, row))
    return found


def expected_objects(found) -> list[dict]:
    """The grounding answer of the decoded objects in reading order."""
    ordered = sorted(found, key=lambda f: (f[3], f[2]))
    return [
        {"bbox_2d": [c * CELL, r * CELL, c * CELL + OBJECT_SIZE - 1, r * CELL + OBJECT_SIZE - 1],
         "point_2d": [c * CELL + OBJECT_SIZE // 2, r * CELL + OBJECT_SIZE // 2]}
        for _, _, c, r in ordered
    ]  # fmt: skip


def test_same_seed_gives_identical_samples_and_other_seeds_differ():
    for name in ("pretrain", "posttrain", "eval/grounding", "retained/count"):
        first, again = make_split(name, 30, seed=3), make_split(name, 30, seed=3)
        assert [s.id for s in first] == [s.id for s in again]
        assert [fingerprint(s) for s in first] == [fingerprint(s) for s in again]
        assert [s.meta for s in first] == [s.meta for s in again]
        other = make_split(name, 30, seed=4)
        assert sum(fingerprint(a) != fingerprint(b) for a, b in zip(first, other)) >= 25


def test_make_split_is_a_prefix_of_the_endless_stream():
    stream = iter_split("posttrain", 7)
    streamed = list(itertools.islice(stream, 25))
    assert [fingerprint(s) for s in make_split("posttrain", 10, 7)] == [fingerprint(s) for s in streamed[:10]]
    assert [s.id for s in streamed[:3]] == ["posttrain/7/0", "posttrain/7/1", "posttrain/7/2"]
    assert next(stream).id == "posttrain/7/25"


def test_where_filters_before_rendering_and_keeps_stream_ids():
    unfiltered = list(itertools.islice(iter_split("pretrain", 2), 60))
    wanted = [s for s in unfiltered if s.meta["kind"] == "count"]
    seen = []
    filtered = iter_split("pretrain", 2, where=lambda meta: seen.append(meta["kind"]) or meta["kind"] == "count")
    kept = list(itertools.islice(filtered, len(wanted)))
    assert [s.id for s in kept] == [s.id for s in wanted]
    assert [fingerprint(s) for s in kept] == [fingerprint(s) for s in wanted]
    assert [s.meta for s in kept] == [s.meta for s in wanted]
    assert seen == [s.meta["kind"] for s in unfiltered[: int(wanted[-1].id.rsplit("/", 1)[1]) + 1]]


def test_every_solution_scores_the_verifier_maximum(splits):
    assert set(benchmark.BENCHMARK_TASKS) == set(TASKS)
    for samples in splits.values():
        for s in samples:
            top = get_task(s.task).OVERALL_MAX
            size = (s.img_width, s.img_height)
            assert score(s.task, f"<think>x</think><answer>{s.solution}</answer>", s.solution, image_size=size)[
                "overall"
            ] == pytest.approx(top), s.id
            assert score(s.task, target_text(s), s.solution, image_size=size)["overall"] == pytest.approx(top), s.id


def test_images_prompts_and_boxes_follow_the_grid(splits):
    for samples in splits.values():
        for s in samples:
            assert s.image.mode == "RGB" and s.image.size == (IMAGE_SIZE, IMAGE_SIZE)
            assert s.problem == format_problem(s.task, s.meta["question"])
            answer = json.loads(s.solution) if s.task != "count" else []
            items = answer if isinstance(answer, list) else [answer]
            for item in items:
                if "bbox_2d" not in item:
                    continue
                x1, y1, x2, y2 = item["bbox_2d"]
                assert x1 % CELL == 0 and y1 % CELL == 0, s.id
                assert (x2 - x1, y2 - y1) == (OBJECT_SIZE - 1, OBJECT_SIZE - 1), s.id
                assert 0 <= x1 and x2 < IMAGE_SIZE and 0 <= y1 and y2 < IMAGE_SIZE, s.id
                if "point_2d" in item:
                    assert item["point_2d"] == [x1 + OBJECT_SIZE // 2, y1 + OBJECT_SIZE // 2], s.id


def test_grounding_answers_match_the_decoded_scene(splits):
    checked = 0
    for s in itertools.chain(splits["posttrain"], splits["pretrain"], splits["eval/grounding"]):
        if s.task != "grounding":
            continue
        found = decode_shapes(pixels(s))
        assert len(found) == s.meta["objects"], s.id
        assert len({(c, sh) for c, sh, _, _ in found}) == len(found) or s.meta["kind"] != "grounding_single"
        question = s.meta["question"]
        if m := re.fullmatch(r"Find the (\w+) (\w+)\.", question):
            targets = [f for f in found if f[:2] == (m[1], m[2])]
        elif m := re.fullmatch(r"Find all (\w+) shapes\.", question):
            targets = [f for f in found if f[0] == m[1]]
        else:
            m = re.fullmatch(r"Find all (\w+)s\.", question)
            targets = [f for f in found if f[1] == m[1]]
        assert json.loads(s.solution) == expected_objects(targets), s.id
        assert s.meta["no_object"] == (not targets)
        checked += 1
    assert checked > 200


def test_count_answers_match_the_decoded_scene(splits):
    for s in itertools.chain(splits["pretrain"], splits["eval/count"], splits["retained/count"]):
        if s.task != "count":
            continue
        found = decode_shapes(pixels(s))
        question = s.meta["question"]
        if question == "How many shapes are there?":
            expected = len(found)
        elif m := re.fullmatch(r"How many (\w+)s and (\w+)s are there\?", question):
            expected = sum(f[1] in (m[1], m[2]) for f in found)
        elif m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
            expected = sum(f[0] == m[1] for f in found)
        elif m := re.fullmatch(r"How many (\w+) (\w+)s are there\?", question):
            expected = sum(f[0] == m[1] and f[1] == m[2] for f in found)
        else:
            m = re.fullmatch(r"How many (\w+)s are there\?", question)
            expected = sum(f[1] == m[1] for f in found)
        assert s.solution == f"\\boxed{{{expected}}}", s.id
        assert len(found) == s.meta["objects"], s.id


def test_gui_answer_box_holds_the_requested_digit(splits):
    for s in itertools.chain(splits["posttrain"], splits["eval/gui_point"]):
        if s.task != "gui_point":
            continue
        label = re.fullmatch(r"Click the button labelled (\d)\.", s.meta["question"])[1]
        (item,) = json.loads(s.solution)
        x1, y1, x2, y2 = item["bbox_2d"]
        black = (pixels(s)[y1 : y2 + 1, x1 : x2 + 1] == 0).all(axis=-1)
        rows, cols = np.flatnonzero(black.any(axis=1)), np.flatnonzero(black.any(axis=0))
        glyph = black[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert glyph.shape == DIGIT_MASKS[label].shape and (glyph == DIGIT_MASKS[label]).all(), s.id
        assert y1 >= CELL, "buttons stay below the title bar"


def test_anomaly_only_the_defect_breaks_the_texture_period(splits):
    shift = 3 * TEXTURE_PERIOD  # a whole number of periods, wider than a defect
    seen = set()
    for s in itertools.chain(splits["posttrain"], splits["eval/anomaly"], splits["pretrain"]):
        if s.task != "anomaly":
            continue
        image = pixels(s)
        broken = (image[:, :-shift] != image[:, shift:]).any(axis=-1)  # pixel column c against column c + shift
        answer = json.loads(s.solution)
        seen.add(answer["defect"])
        if not answer["defect"]:
            assert not broken.any(), s.id
            continue
        x1, y1, x2, y2 = answer["bbox_2d"]
        rows, cols = np.flatnonzero(broken.any(axis=1)), np.flatnonzero(broken.any(axis=0))
        assert rows.size and y1 <= rows.min() and rows.max() <= y2, s.id
        allowed = set(range(x1, x2 + 1)) | set(range(x1 - shift, x2 - shift + 1))
        assert set(cols.tolist()) <= allowed, s.id
    assert seen == {True, False}


def test_anomaly_textures_sit_on_the_background_colour_with_a_period_off_the_patch_grid():
    assert TEXTURE_PERIOD % CELL and CELL % TEXTURE_PERIOD
    for sample in make_split("eval/anomaly", 20, seed=0):
        colours = {tuple(c) for c in pixels(sample).reshape(-1, 3)}
        assert BACKGROUND in colours


def test_shape_and_digit_masks_are_distinct_and_inside_their_block():
    masks = list(SHAPE_MASKS.values())
    assert all(m.shape == (OBJECT_SIZE, OBJECT_SIZE) and m.sum() > 100 for m in masks)
    assert all(not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any() for m in masks)
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert len({m.tobytes() for m in DIGIT_MASKS.values()}) == 10


def test_posttrain_adds_no_object_queries_the_unseen_colour_and_clean_textures(splits):
    pre, post = splits["pretrain"], splits["posttrain"]
    purple = np.array(COLOURS[UNSEEN_COLOUR], dtype=np.uint8)

    def shows_purple(s: Sample) -> bool:
        return bool((pixels(s) == purple).all(axis=-1).any())

    assert any(s.meta.get("no_object") for s in post) and any(s.solution == "[]" for s in post)
    assert any(s.meta.get("attribute") == UNSEEN_COLOUR for s in post)
    assert any(UNSEEN_COLOUR in s.problem for s in post) and any(shows_purple(s) for s in post)
    assert any(s.solution == '{"defect":false}' for s in post)
    assert {s.task for s in post} == {"grounding", "gui_point", "anomaly"}

    assert not any(s.meta.get("no_object") or s.solution == "[]" for s in pre)
    assert not any(UNSEEN_COLOUR in s.problem or UNSEEN_COLOUR in s.meta["think"] or shows_purple(s) for s in pre)
    assert not any(s.solution == '{"defect":false}' for s in pre)
    assert {s.task for s in pre} == set(TASKS)
    assert {s.meta.get("attribute") for s in pre} <= {*SEEN_COLOURS, None}


def test_empty_image_items_show_only_background_and_count_pretraining_shows_empty_images(splits):
    empty = [s for s in splits["posttrain"] + splits["eval/grounding"] if s.meta["kind"] == "grounding_empty"]
    assert len(empty) > 10
    for s in empty:
        assert (pixels(s) == np.array(BACKGROUND)).all() and s.meta["objects"] == 0 and s.meta["scene"] == []
        assert s.solution == "[]" and s.meta["no_object"] and s.meta["slice"] == "empty_image"
        assert re.fullmatch(r"Find (the \w+ \w+|all \w+ shapes)\.", s.meta["question"])
    assert np.array_equal(np.asarray(benchmark.empty_image()), pixels(empty[0]))
    held_out = [s for s in empty if s.id.startswith("eval/")]
    assert len({s.content_key() for s in held_out}) == len({s.problem for s in held_out}) <= 4  # 4 questions repeat
    speck = pixels(empty[0]).copy()
    speck[0, 0] = 0
    assert dataclasses.replace(empty[0], image=Image.fromarray(speck)).content_key() != empty[0].content_key()
    counted_empty = [s for s in splits["pretrain"] if s.task == "count" and s.meta["objects"] == 0]
    assert counted_empty and all(s.meta["count"] == 0 for s in counted_empty)
    assert not any(s.task == "grounding" and s.meta["objects"] == 0 for s in splits["pretrain"])


def test_eval_and_retained_splits_hold_their_task_and_slices(splits):
    for task in TASKS:
        assert {s.task for s in splits[f"eval/{task}"]} == {task}
    assert {s.meta["kind"] for s in splits["eval/grounding"]} == {
        "grounding_single",
        "grounding_multi",
        "grounding_none",
        "grounding_empty",
    }
    assert any(s.meta["attribute"] == UNSEEN_COLOUR for s in splits["eval/grounding"])
    assert {s.meta["kind"] for s in splits["eval/anomaly"]} == {"anomaly_defect", "anomaly_clean"}
    assert {s.task for s in splits["retained/count"]} == {"count"}
    assert not any(UNSEEN_COLOUR in s.problem for s in splits["retained/count"] + splits["eval/count"])
    assert {s.task for s in splits["pretrain/grounding"]} == {"grounding"}


def test_held_out_items_never_appear_in_training_splits():
    training = {fingerprint(s) for name in ("pretrain", "posttrain") for s in make_split(name, 2500, seed=0)}
    held_out = [s for task in TASKS for s in make_split(f"eval/{task}", 150, seed=0)]
    held_out += make_split("retained/count", 150, seed=0)
    assert not training & {fingerprint(s) for s in held_out}
    train_ids = {s.id for name in ("pretrain", "posttrain") for s in make_split(name, 50, seed=0)}
    assert not train_ids & {s.id for s in held_out}
    # The single-object scene space is small (training repeats its scenes), yet eval never shows one of them.
    singles = [fingerprint(s) for s in make_split("pretrain/grounding", 2500, seed=1) if s.meta["objects"] == 1]
    assert len(set(singles)) < len(singles)
    assert not set(singles) & {fingerprint(s) for s in held_out}


def test_text_corpus_covers_every_word_and_number():
    corpus = text_corpus(seed=0, n=400)
    assert corpus == text_corpus(seed=0, n=400)
    vocabulary = set(" ".join(corpus).split())
    assert {str(i) for i in range(IMAGE_SIZE + 1)} <= vocabulary
    fresh = [s for name in ("pretrain", "posttrain") for s in make_split(name, 300, seed=11)]
    words = set(re.findall(r"[A-Za-z]+", " ".join(f"{s.problem} {target_text(s)}" for s in fresh)))
    assert words <= set(re.findall(r"[A-Za-z]+", " ".join(corpus)))
    assert all("<think>" in t and "</answer>" in t for t in corpus[:-1])


def test_generation_is_fast():
    import time

    start = time.perf_counter()
    make_split("pretrain", 1000, seed=5)
    assert time.perf_counter() - start < 3.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="split name 'nope'"):
        make_split("nope", 3, 0)
    with pytest.raises(ValueError, match="posttrain/count"):
        make_split("posttrain/count", 3, 0)
    with pytest.raises(ValueError, match="seed"):
        make_split("pretrain", 3, -1)
    with pytest.raises(ValueError, match="n must be"):
        make_split("pretrain", -1, 0)
    with pytest.raises(ValueError, match="task 'ocr'"):
        format_problem("ocr", "Read it.")
    loaded = Sample("row-1", "count", make_split("pretrain", 1, 0)[0].image, "q", "\\boxed{1}", 112, 112, {})
    with pytest.raises(ValueError, match="row-1.*meta\\['think'\\]"):
        target_text(loaded)
    with pytest.raises(ValueError, match="112x112 px but img_width x img_height is 100x112"):
        Sample("bad", "count", loaded.image, "q", "\\boxed{1}", 112, 100, {})


def test_kinds_are_registered_under_their_task():
    assert {kind.task for kind in benchmark.KINDS.values()} == set(TASKS)
    assert set(benchmark.PRETRAIN.kinds) | set(benchmark.POSTTRAIN.kinds) == set(benchmark.KINDS)
    assert benchmark.RETAINED_TASKS == ("count",) and "count" not in benchmark.POSTTRAIN_TASKS


def test_every_item_carries_its_evaluation_slice():
    expected = {
        "eval/grounding": ("seen", "unseen_attribute", "no_object", "empty_image"),
        "eval/anomaly": ("defect", "clean"),
        "eval/gui_point": ("all",),
        "retained/count": ("all",),
        "pretrain/grounding": ("seen",),
    }
    for name, slices in expected.items():
        assert split_slices(name) == slices
        for sample in make_split(name, 60, seed=0):
            meta = sample.meta
            assert meta["slice"] in slices
            if sample.task == "grounding":
                absent = "no_object" if meta["objects"] else "empty_image"
                want = absent if meta["no_object"] else "unseen_attribute" if meta["unseen_attribute"] else "seen"
                assert meta["slice"] == want and (sample.solution == "[]") == meta["no_object"]
            if sample.task == "anomaly":
                assert meta["slice"] == ("clean" if sample.solution == '{"defect":false}' else "defect")


def test_stratified_eval_split_has_equal_slices_in_stream_order():
    items = make_stratified_split("eval/grounding", 7, seed=0)
    assert Counter(s.meta["slice"] for s in items) == {
        "seen": 7,
        "unseen_attribute": 7,
        "no_object": 7,
        "empty_image": 7,
    }
    stream = {s.id: s for s in make_split("eval/grounding", 200, seed=0)}
    indices = [int(s.id.rsplit("/", 1)[1]) for s in items]
    assert indices == sorted(indices) and all(fingerprint(stream[s.id]) == fingerprint(s) for s in items)


def test_solutions_are_in_the_dataset_style_and_targets_in_the_models():
    for sample in make_split("posttrain", 40, seed=0):
        if sample.task == "count":
            continue
        assert ", " not in sample.solution and ": " not in sample.solution
        target_answer = target_text(sample).split("<answer>")[1].removesuffix("</answer>")
        assert target_answer == json.dumps(json.loads(sample.solution))
