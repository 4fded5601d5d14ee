"""Loaders of real data on local paths: round trips through parquet and jsonl files written here, bad-row errors that
name the row id and field, and skipping bad rows on request."""

import base64
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visurf_ray.data.benchmark import make_split
from visurf_ray.data.loaders import DataError, load_grefcoco_eval, load_visurf_rows
from visurf_ray.data.prompts import format_problem
from visurf_ray.rewards import get_task, score


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A non-square RGB image, so that swapped width and height show."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def samples():
    """Benchmark samples of every task, plus a 64 x 40 grounding sample."""
    items = make_split("posttrain", 9, seed=2) + make_split("pretrain/count", 2, seed=2)
    wide = noise_image(64, 40, seed=0)
    items.append(
        type(items[0])(
            "wide", "grounding", wide, "Find the noise.", '[{"bbox_2d": [40, 0, 64, 40], "point_2d": [52, 20]}]', 40, 64
        )
    )
    return items


def visurf_row(sample, image) -> dict:
    return {
        "id": sample.id,
        "problem": sample.problem,
        "solution": sample.solution,
        "image": image,
        "img_height": sample.img_height,
        "img_width": sample.img_width,
        "task": sample.task,
    }


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def assert_round_trip(loaded, originals) -> None:
    assert [s.id for s in loaded] == [s.id for s in originals]
    for got, want in zip(loaded, originals):
        assert (got.task, got.problem, got.solution) == (want.task, want.problem, want.solution)
        assert (got.img_width, got.img_height) == (want.img_width, want.img_height)
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image)), got.id
        assert got.content_key() == want.content_key()  # what the model is shown survives the file format
        if got.task == "grounding":
            assert got.meta["no_object"] == (want.solution == "[]")


def test_parquet_round_trip_with_bytes_and_hf_dict_images(tmp_path, samples):
    rows = [visurf_row(s, png_bytes(s.image)) for s in samples]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bytes.parquet")
    result = load_visurf_rows(tmp_path / "bytes.parquet")
    assert result.skipped == []
    assert_round_trip(result.samples, samples)

    rows = [visurf_row(s, {"bytes": png_bytes(s.image), "path": None}) for s in samples]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf.parquet")
    assert_round_trip(load_visurf_rows(tmp_path / "hf.parquet").samples, samples)


def test_jsonl_round_trip_with_base64_and_path_images(tmp_path, samples):
    (tmp_path / "images").mkdir()
    rows = []
    for index, s in enumerate(samples):
        encoded = base64.b64encode(png_bytes(s.image)).decode()
        if index % 3 == 0:
            image = encoded
        elif index % 3 == 1:
            image = f"data:image/png;base64,{encoded}"
        else:
            s.image.save(tmp_path / "images" / f"{index}.png")
            image = f"images/{index}.png"
        rows.append(visurf_row(s, image))
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert_round_trip(load_visurf_rows(tmp_path / "rows.jsonl").samples, samples)

    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "rows.jsonl", rows)
    assert_round_trip(load_visurf_rows(elsewhere / "rows.jsonl", image_root=tmp_path).samples, samples)
    with pytest.raises(DataError, match="field 'image'.*neither a file"):
        load_visurf_rows(elsewhere / "rows.jsonl")


def test_task_defaults_to_grounding_and_integer_ids_become_strings(tmp_path, samples):
    s = samples[-1]
    row = visurf_row(s, {"bytes": png_bytes(s.image), "path": None}) | {"id": 17}
    del row["task"]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "one.parquet")
    (loaded,) = load_visurf_rows(tmp_path / "one.parquet").samples
    assert (loaded.id, loaded.task, loaded.meta) == ("17", "grounding", {"no_object": False})


GOOD_SOLUTION = '[{"bbox_2d": [14, 14, 41, 41], "point_2d": [28, 28]}]'
BAD_ROWS = [
    ("missing problem", {"problem": None}, "problem", "is missing"),
    ("missing image", {"image": None}, "image", "is missing"),
    ("undecodable image", {"image": base64.b64encode(b"not an image").decode()}, "image", "cannot be decoded"),
    ("missing image file", {"image": "nowhere/x.png"}, "image", "neither a file"),
    ("image size", {"img_width": 100}, "image", "is 112x112 px but img_width x img_height is 100x112"),
    ("height not a number", {"img_height": "tall"}, "img_height", "positive integer"),
    ("solution not JSON", {"solution": '[{"bbox_2d": [1, 2'}, "solution", "JSON"),
    ("solution wrong keys", {"solution": '[{"box": [1, 2, 3, 4]}]'}, "solution", "bbox_2d and point_2d"),
    (
        "box outside",
        {"solution": '[{"bbox_2d": [90, 14, 120, 41], "point_2d": [100, 28]}]'},
        "solution",
        "bbox_2d .* outside the 112x112 image",
    ),
    (
        "negative box",
        {"solution": '[{"bbox_2d": [-3, 14, 20, 41], "point_2d": [5, 28]}]'},
        "solution",
        "outside the 112x112 image",
    ),
    (
        "point outside its box",
        {"solution": '[{"bbox_2d": [14, 14, 41, 41], "point_2d": [80, 28]}]'},
        "solution",
        "point_2d must be .* inside bbox_2d",
    ),
    ("unknown task", {"task": "ocr"}, "task", "'ocr' is not one of"),
    ("count solution", {"task": "count", "solution": "\\boxed{"}, "solution", "balanced"),
]


def good_row(row_id: str, image: Image.Image) -> dict:
    return {
        "id": row_id,
        "problem": format_problem("grounding", "Find the square."),
        "solution": GOOD_SOLUTION,
        "image": base64.b64encode(png_bytes(image)).decode(),
        "img_height": 112,
        "img_width": 112,
    }


@pytest.mark.parametrize(("case", "change", "field", "reason"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_error_names_row_and_field(tmp_path, case, change, field, reason):
    image = noise_image(112, 112, seed=1)
    write_jsonl(tmp_path / "rows.jsonl", [good_row("ok-1", image), good_row("bad-1", image) | change])
    with pytest.raises(DataError, match=f"row bad-1, field '{field}': .*{reason}") as caught:
        load_visurf_rows(tmp_path / "rows.jsonl")
    assert (caught.value.row_id, caught.value.field) == ("bad-1", field)
    assert str(tmp_path / "rows.jsonl") in str(caught.value)


def test_bad_ids_and_lines(tmp_path):
    image = noise_image(112, 112, seed=1)
    write_jsonl(tmp_path / "dup.jsonl", [good_row("a", image), good_row("a", image)])
    with pytest.raises(DataError, match="row a, field 'id': repeats"):
        load_visurf_rows(tmp_path / "dup.jsonl")
    write_jsonl(tmp_path / "noid.jsonl", [good_row("a", image), good_row("b", image) | {"id": None}])
    with pytest.raises(DataError, match="row #1, field 'id'"):
        load_visurf_rows(tmp_path / "noid.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(good_row("a", image)) + "\n\n{not json\n")
    with pytest.raises(DataError, match="row #1, field 'row': is not valid JSON"):
        load_visurf_rows(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="must end in .parquet or .jsonl"):
        load_visurf_rows(tmp_path / "rows.csv")


def test_parquet_bad_row_names_row_and_field(tmp_path):
    row = good_row("p-1", noise_image(112, 112, seed=1))
    row["image"] = b"\x89PNG truncated"
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row p-1, field 'image': cannot be decoded"):
        load_visurf_rows(tmp_path / "bad.parquet")


def test_skip_bad_leaves_bad_rows_out_and_reports_them(tmp_path, caplog):
    image = noise_image(112, 112, seed=1)
    rows = [
        good_row("g-1", image),
        good_row("b-1", image) | {"solution": "not json"},
        good_row("b-2", image) | {"img_width": 64},
        good_row("g-2", image) | {"solution": "[]"},
        good_row("b-3", image) | {"problem": None},
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="visurf_ray.data.loaders"):
        result = load_visurf_rows(tmp_path / "rows.jsonl", skip_bad=True)
    assert [s.id for s in result.samples] == ["g-1", "g-2"]
    assert [s.meta["no_object"] for s in result.samples] == [False, True]
    assert [(row_id, field) for row_id, field, _ in result.skipped] == [
        ("b-1", "solution"),
        ("b-2", "image"),
        ("b-3", "problem"),
    ]
    assert "skipped 3 bad rows of 5" in caplog.text


def grefcoco_row(row_id: str, image: Image.Image, **fields) -> dict:
    return {
        "id": row_id,
        "image": base64.b64encode(png_bytes(image)).decode(),
        "img_height": image.height,
        "img_width": image.width,
        **fields,
    }


def test_grefcoco_rows_become_grounding_samples_with_no_object_flags(tmp_path):
    image = noise_image(80, 60, seed=3)
    rows = [
        grefcoco_row("r-1", image, sentence="the left dog", bboxes=[[0, 10, 30, 50]]),
        grefcoco_row("r-2", image, sentence="a purple cat", bboxes=[]),
        grefcoco_row("r-3", image, problem="Find both.", bboxes="[[0, 0, 10, 10], [40, 20, 80, 60]]"),
        grefcoco_row("r-4", image, sentence="the dog", bboxes=[[0, 10, 30, 50]], points=[[5, 12]]),
    ]
    write_jsonl(tmp_path / "grefcoco.jsonl", rows)
    result = load_grefcoco_eval(tmp_path / "grefcoco.jsonl")
    loaded = {s.id: s for s in result.samples}
    assert loaded["r-1"].problem == format_problem("grounding", 'Find "the left dog".')
    assert json.loads(loaded["r-1"].solution) == [{"bbox_2d": [0, 10, 30, 50], "point_2d": [15, 30]}]
    assert loaded["r-2"].solution == "[]" and loaded["r-2"].meta == {"no_object": True}
    assert loaded["r-3"].problem == "Find both."
    assert json.loads(loaded["r-3"].solution)[1] == {"bbox_2d": [40, 20, 80, 60], "point_2d": [60, 40]}
    assert json.loads(loaded["r-4"].solution)[0]["point_2d"] == [5, 12]
    for s in result.samples:
        assert (s.task, s.img_width, s.img_height) == ("grounding", 80, 60)
        assert np.array_equal(np.asarray(s.image), np.asarray(image))
        label = f"<think>x</think><answer>{s.solution}</answer>"
        assert (
            score("grounding", label, s.solution, image_size=(80, 60))["overall"] == get_task("grounding").OVERALL_MAX
        )

    write_jsonl(tmp_path / "xywh.jsonl", [grefcoco_row("c-1", image, sentence="dog", bboxes=[[10, 5, 20, 30]])])
    (coco,) = load_grefcoco_eval(tmp_path / "xywh.jsonl", box_format="xywh").samples
    assert json.loads(coco.solution) == [{"bbox_2d": [10, 5, 30, 35], "point_2d": [20, 20]}]


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"sentence": "dog", "bboxes": [[0, 0, 90, 10]]}, "bboxes", "outside the 80x60 image"),
        ({"sentence": "dog", "bboxes": [[0, 0, 10]]}, "bboxes", "lists of 4 finite numbers"),
        ({"sentence": "dog", "bboxes": "[[0, 0"}, "bboxes", "not valid JSON"),
        ({"sentence": "dog", "bboxes": [[0, 0, 10, 10]], "points": [[20, 5]]}, "points", "outside its box"),
        ({"sentence": "dog", "bboxes": [[0, 0, 10, 10]], "points": []}, "points", "0 points for 1 boxes"),
        ({"bboxes": []}, "problem", "give 'problem' or 'sentence'"),
        ({"sentence": "dog"}, "bboxes", "is missing"),
    ],
)
def test_grefcoco_bad_rows_name_row_and_field(tmp_path, fields, field, reason):
    image = noise_image(80, 60, seed=3)
    write_jsonl(tmp_path / "g.jsonl", [grefcoco_row("g-9", image, **fields)])
    with pytest.raises(DataError, match=f"row g-9, field '{field}': .*{reason}"):
        load_grefcoco_eval(tmp_path / "g.jsonl")
    assert load_grefcoco_eval(tmp_path / "g.jsonl", skip_bad=True).skipped[0][:2] == ("g-9", field)
    with pytest.raises(ValueError, match="box_format"):
        load_grefcoco_eval(tmp_path / "g.jsonl", box_format="cxcywh")
