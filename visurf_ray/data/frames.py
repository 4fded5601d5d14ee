"""The model's image frame and the image's own: resize every image to a fixed square before the model sees it (the
authors' 840×840), and map predictions back to each image's own frame before evaluation scores them.

The authors' evaluation (Seg-Zero / VisionReasoner) resizes each image to 840×840, lets the model answer in that frame
and scales its boxes and points by (width / 840, height / 840), rounded to whole pixels, before comparing them with the
dataset's own. Their training data is stored in the 840 frame already, so here a resized training sample carries its
solution scaled into the model's frame (the label and the rollouts' rewards live in the frame the model sees).

Pure Python plus PIL and the verifiers' answer parsing: never torch, ray or transformers.
"""

import dataclasses
import json
import math

from PIL import Image

from visurf_ray.data.answers import DATASET_SEPARATORS
from visurf_ray.data.sample import Sample
from visurf_ray.rewards.answer import find_answer_span, is_finite_number, parse_json_answer
from visurf_ray.validation import check_int

IMAGE_FRAME = "image_frame"
"""`Sample.meta` key of a resized sample: {"width", "height", "solution"} of the stored image (pixels, its solution)."""
COORDINATE_KEYS = ("bbox_2d", "point_2d")
"""JSON keys whose values are pixel coordinates [x, y, ...] (boxes [x1, y1, x2, y2], points [x, y])."""


def _whole_pixel(value: float) -> int:
    """The authors' rounding of a scaled coordinate: int(value + 0.5) for the non-negative coordinates of an image."""
    return math.floor(value + 0.5)


def _scaled_coordinates(value, x_factor: float, y_factor: float):
    """[x, y, ...] scaled by (x_factor, y_factor) and rounded to whole pixels; anything else unchanged."""
    if not isinstance(value, list) or len(value) % 2 or not all(is_finite_number(v) for v in value):
        return value
    return [_whole_pixel(v * (x_factor if i % 2 == 0 else y_factor)) for i, v in enumerate(value)]


def scale_answer(value, x_factor: float, y_factor: float):
    """A parsed JSON answer with every `bbox_2d` / `point_2d` (at any depth) scaled by (x_factor, y_factor) and
    rounded to whole pixels; other keys and values, and malformed coordinate lists, unchanged."""
    if isinstance(value, list):
        return [scale_answer(v, x_factor, y_factor) for v in value]
    if isinstance(value, dict):
        return {
            key: _scaled_coordinates(v, x_factor, y_factor)
            if key in COORDINATE_KEYS
            else scale_answer(v, x_factor, y_factor)
            for key, v in value.items()
        }
    return value


def to_model_frame(sample: Sample, side: int) -> Sample:
    """`sample` as the model sees it: its image resized to side × side pixels (bilinear, as the authors resize), its
    solution scaled into that frame (a non-JSON solution, e.g. a count, unchanged) and the stored image's size and
    solution kept in `meta[IMAGE_FRAME]` for `in_image_frame`. side: pixels, >= 1."""
    check_int("side", side, low=1, note="(pixels)")
    width, height = sample.img_width, sample.img_height
    parsed = parse_json_answer(sample.solution)
    solution = sample.solution
    if parsed is not None:
        solution = json.dumps(scale_answer(parsed, side / width, side / height), separators=DATASET_SEPARATORS)
    frame = {"width": width, "height": height, "solution": sample.solution}
    return dataclasses.replace(
        sample,
        image=sample.image.resize((side, side), Image.Resampling.BILINEAR),
        solution=solution,
        img_width=side,
        img_height=side,
        meta={**sample.meta, IMAGE_FRAME: frame},
    )


def in_image_frame(sample: Sample, completion: str) -> tuple[str, str, tuple[int, int]]:
    """(completion, solution, image_size (width, height)) to score `completion` in the stored image's own frame: for a
    sample made by `to_model_frame`, the coordinates of the completion's last answer block mapped back (a block that
    is not a JSON answer unchanged) with the stored solution and size; any other sample's as they are."""
    frame = sample.meta.get(IMAGE_FRAME)
    if frame is None:
        return completion, sample.solution, (sample.img_width, sample.img_height)
    span = find_answer_span(completion)
    parsed = None if span is None else parse_json_answer(completion[span[0] : span[1]].strip())
    if span is not None and parsed is not None:
        mapped = scale_answer(parsed, frame["width"] / sample.img_width, frame["height"] / sample.img_height)
        completion = f"{completion[: span[0]]}{json.dumps(mapped)}{completion[span[1] :]}"
    return completion, frame["solution"], (frame["width"], frame["height"])
