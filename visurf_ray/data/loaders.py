"""Loaders for real data on local paths: ViSurf training rows and gRefCOCO-style evaluation rows -> `Sample`s.

Imports pyarrow, PIL and the standard library: never torch, ray or transformers.

Files are parquet (`.parquet`) or JSON lines (`.jsonl`, one object per line, blank lines ignored). An image cell is
raw encoded bytes (PNG, JPEG, ...), a `{"bytes": ..., "path": ...}` dict as Hugging Face `datasets` writes it, a
base64 string (optionally a `data:image/...;base64,` URI), or a path, relative to `image_root` (default: the data
file's folder). Images are converted to RGB.

Every row is validated; a bad row raises `DataError` naming the file, the row id (or `#index` when the id itself is
missing) and the field, unless `skip_bad=True`, in which case it is left out and listed in `LoadResult.skipped` (its
length is the count; a warning is logged with it). Coordinates are pixels of the stored image: a box
`[x1, y1, x2, y2]` needs 0 <= x1 <= x2 <= img_width and 0 <= y1 <= y2 <= img_height, a point `[x, y]` lies inside
the image and inside its own box.
"""

import base64
import binascii
import io
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visurf_ray.data.answers import SolutionError, check_solution, grounding_answer
from visurf_ray.data.prompts import format_problem
from visurf_ray.data.sample import Sample
from visurf_ray.rewards import TASKS
from visurf_ray.validation import ValidationError, check_choice

logger = logging.getLogger(__name__)

VISURF_FIELDS = ("id", "problem", "solution", "image", "img_height", "img_width")


class DataError(ValidationError):
    """A bad row: `path` of the file, `row_id` (the row's id, or `#index`), `field` and `reason`."""

    def __init__(self, path: str, row_id: str, field: str, reason: str):
        super().__init__(f"{path}: row {row_id}, field {field!r}: {reason}")
        self.path, self.row_id, self.field, self.reason = path, row_id, field, reason


@dataclass(frozen=True)
class LoadResult:
    """Loaded `samples` in file order and the `skipped` rows as (row_id, field, reason) (only with skip_bad)."""

    samples: list[Sample]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


class _RowError(ValidationError):
    """A bad value in the row being loaded (`field`, `reason`); `_load` turns it into a DataError naming the row."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


def _read_rows(path: Path) -> Iterator[tuple[int, dict | _RowError]]:
    """(index, row) per row of a parquet or jsonl file; a jsonl line that is not a JSON object gives a _RowError."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            rows = (line for line in lines if line.strip())
            for index, line in enumerate(rows):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield index, _RowError("row", f"is not valid JSON ({error.msg})")
                    continue
                yield index, row if isinstance(row, dict) else _RowError("row", "is not a JSON object")
    else:
        raise ValidationError(f"path {str(path)!r} must end in .parquet or .jsonl")


def _required(row: dict, name: str):
    value = row.get(name)
    if value is None:
        raise _RowError(name, "is missing")
    return value


def _positive_int(row: dict, name: str) -> int:
    value = _required(row, name)
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value <= 0:
        raise _RowError(name, f"must be a positive integer (pixels), got {value!r}")
    return int(value)


def _text(row: dict, name: str) -> str:
    value = _required(row, name)
    if not isinstance(value, str) or not value.strip():
        raise _RowError(name, f"must be a non-empty string, got {value!r:.80}")
    return value


def _decode_image(data: bytes, origin: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise _RowError("image", f"cannot be decoded as an image from {origin} ({error})") from None


def _is_file(path: Path) -> bool:
    """Whether `path` names an existing file; False for strings that cannot be paths (too long, NUL bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _image(row: dict, image_root: Path) -> Image.Image:
    """The row's image as RGB, from bytes, an HF `{"bytes", "path"}` dict, a base64 string or a path."""
    value = _required(row, "image")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise _RowError("image", "is a dict with neither 'bytes' nor 'path'")
    if isinstance(value, bytes | bytearray):
        return _decode_image(bytes(value), "bytes")
    if not isinstance(value, str) or not value:
        raise _RowError("image", f"must be bytes, a dict, a base64 string or a path, got {type(value).__name__}")
    file = image_root / value
    if _is_file(file):
        return _decode_image(file.read_bytes(), f"file {str(file)!r}")
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _RowError("image", f"is neither a file under {str(image_root)!r} nor base64 data: {value:.80}") from None
    return _decode_image(data, "base64 string")


def _checked_image(row: dict, image_root: Path, width: int, height: int) -> Image.Image:
    image = _image(row, image_root)
    if image.size != (width, height):
        raise _RowError(
            "image", f"is {image.size[0]}x{image.size[1]} px but img_width x img_height is {width}x{height}"
        )
    return image


def _row_id(row: dict, index: int) -> str:
    value = row.get("id")
    return f"#{index}" if value is None or isinstance(value, bool) or not isinstance(value, str | int) else str(value)


def _load(path, skip_bad: bool, image_root, make_sample: Callable[[dict, str, Path], Sample]) -> LoadResult:
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples, skipped, seen = [], [], set()
    for index, row in _read_rows(path):
        row_id = f"#{index}" if isinstance(row, _RowError) else _row_id(row, index)
        try:
            if isinstance(row, _RowError):
                raise row
            if row_id.startswith("#"):
                raise _RowError("id", f"must be a string or integer, got {row.get('id')!r}")
            if row_id in seen:
                raise _RowError("id", "repeats an earlier row's id")
            samples.append(make_sample(row, row_id, root))
            seen.add(row_id)
        except _RowError as error:
            if not skip_bad:
                raise DataError(str(path), row_id, error.field, error.reason) from None
            skipped.append((row_id, error.field, error.reason))
    if skipped:
        logger.warning("%s: skipped %d bad rows of %d", path, len(skipped), len(skipped) + len(samples))
    return LoadResult(samples, skipped)


def _visurf_sample(row: dict, row_id: str, image_root: Path) -> Sample:
    for name in VISURF_FIELDS:
        _required(row, name)
    task = row.get("task") or "grounding"
    if task not in TASKS:
        raise _RowError("task", f"{task!r} is not one of {list(TASKS)}")
    width, height = _positive_int(row, "img_width"), _positive_int(row, "img_height")
    problem, solution = _text(row, "problem"), _text(row, "solution")
    try:
        parsed = check_solution(task, solution, width, height)
    except SolutionError as error:
        raise _RowError("solution", str(error)) from None
    image = _checked_image(row, image_root, width, height)
    meta = {"no_object": parsed == []} if task == "grounding" else {}
    return Sample(row_id, task, image, problem, solution, height, width, meta)


def load_visurf_rows(path, *, skip_bad: bool = False, image_root=None) -> LoadResult:
    """Load rows in the format of the ViSurf training set.

    Columns: `id` (str or int), `problem` (the prompt text, used verbatim), `solution` (answer text in the task's
    format; for grounding the JSON list `[{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y]}, ...]` or `[]`, pixels),
    `image` (see the module docstring), `img_height`, `img_width` (pixels, must equal the decoded image's size),
    optional `task` (a registered task name, default "grounding"). Other columns are ignored.

    path: a .parquet or .jsonl file. skip_bad: leave bad rows out (listed in `skipped`) instead of raising
    `DataError`. image_root: folder that relative image paths start from (default: the file's folder).
    Returns a LoadResult; grounding samples carry `meta["no_object"]`.
    """
    return _load(path, skip_bad, image_root, _visurf_sample)


def _number(value) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _number_lists(row: dict, name: str, length: int, shape: str) -> list[list[int | float]]:
    """The row's list (or JSON text of a list) of `length`-number lists; `shape` names the inner list for errors."""
    value = _required(row, name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _RowError(name, f"is a string that is not valid JSON ({error.msg})") from None
    if not isinstance(value, list) or not all(
        isinstance(item, list)
        and len(item) == length
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in item)
        for item in value
    ):
        raise _RowError(name, f"must be a list of {shape} lists of {length} finite numbers, got {value!r:.120}")
    return [[_number(v) for v in item] for item in value]


def _grefcoco_sample(row: dict, row_id: str, image_root: Path, box_format: str) -> Sample:
    width, height = _positive_int(row, "img_width"), _positive_int(row, "img_height")
    if row.get("problem") is not None:
        problem = _text(row, "problem")
    elif row.get("sentence") is not None:
        problem = format_problem("grounding", f'Find "{_text(row, "sentence").strip()}".')
    else:
        raise _RowError("problem", "is missing (give 'problem' or 'sentence')")
    boxes = _number_lists(row, "bboxes", 4, "[x1, y1, x2, y2]")
    if box_format == "xywh":
        boxes = [[x, y, _number(x + w), _number(y + h)] for x, y, w, h in boxes]
    if row.get("points") is not None:
        points = _number_lists(row, "points", 2, "[x, y]")
        if len(points) != len(boxes):
            raise _RowError("points", f"has {len(points)} points for {len(boxes)} boxes")
        for (x, y), (x1, y1, x2, y2) in zip(points, boxes):
            if not (x1 <= x <= x2 and y1 <= y <= y2):
                raise _RowError("points", f"point {[x, y]} lies outside its box {[x1, y1, x2, y2]}")
    else:
        points = [[_number((x1 + x2) / 2), _number((y1 + y2) / 2)] for x1, y1, x2, y2 in boxes]
    solution = grounding_answer(list(zip(boxes, points)))
    try:
        check_solution("grounding", solution, width, height)
    except SolutionError as error:
        raise _RowError("bboxes", str(error)) from None
    image = _checked_image(row, image_root, width, height)
    return Sample(row_id, "grounding", image, problem, solution, height, width, {"no_object": not boxes})


def load_grefcoco_eval(path, *, skip_bad: bool = False, image_root=None, box_format: str = "xyxy") -> LoadResult:
    """Load a gRefCOCO-style evaluation file as grounding Samples, no-object rows included.

    Columns: `id` (str or int), `image` (see the module docstring), `img_height`, `img_width` (pixels, must equal
    the decoded image's size), `problem` (prompt text, used verbatim) or `sentence` (the referring expression,
    turned into `Find "<sentence>".` plus the grounding instruction), `bboxes` (list, or JSON text of a list, of
    boxes in pixels; empty for a no-object expression), optional `points` (one [x, y] per box; default: box centres).

    box_format: "xyxy" ([x1, y1, x2, y2]) or "xywh" (COCO's [x, y, width, height]). skip_bad and image_root as in
    `load_visurf_rows`. Samples carry the solution `[{"bbox_2d": ..., "point_2d": ...}, ...]` (or `[]`) and
    `meta["no_object"]`.
    """
    check_choice("box_format", box_format, ("xyxy", "xywh"))
    return _load(path, skip_bad, image_root, lambda row, row_id, root: _grefcoco_sample(row, row_id, root, box_format))
