"""Box and point geometry shared by the verifiers and the evaluation metrics (pixel units throughout).

Pure numpy: must not import torch, ray or transformers.

Conventions (the authors' reward code, Seg-Zero / VisionReasoner):
- A box is `[x1, y1, x2, y2]` in pixels of the image the model sees, with x1 <= x2 and y1 <= y2. Swapped corners
  (x2 < x1 or y2 < y1) are malformed, not normalised: the policy must learn the one documented format.
- Boxes cover integer pixel positions inclusively, so a box's area is (x2 - x1 + 1) * (y2 - y1 + 1) and a
  degenerate box (x1 == x2) covers one pixel column. This matches the masks rendered by `box_mask`.
- Coordinates are finite numbers with |value| <= MAX_COORDINATE; larger values are no image's pixel coordinates and
  would overflow the area arithmetic.
- Pixel thresholds are given at the paper's 840×840 input and scale with max(width, height) / 840.
"""

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from visurf_ray.rewards.answer import is_finite_number
from visurf_ray.validation import ValidationError

REFERENCE_IMAGE_SIDE = 840
"""Image side (pixels) at which the paper's pixel thresholds are stated."""
BBOX_L1_THRESHOLD = 10.0
"""Mean absolute corner error (pixels at 840×840) below which a predicted box earns its L1 reward."""
POINT_DISTANCE_THRESHOLD = 30.0
"""Euclidean distance (pixels at 840×840) below which a predicted point earns its point reward."""
IOU_THRESHOLD = 0.5
"""IoU above which a predicted box earns its IoU reward."""
MAX_COORDINATE = 1e6
"""Largest accepted |coordinate| in pixels."""

Box = tuple[float, float, float, float]
Point = tuple[float, float]


def validate_image_size(image_size: object) -> tuple[int, int] | None:
    """`image_size` as (width, height) in pixels, or None; ValueError unless None or two positive integers."""
    if image_size is None:
        return None
    if (
        not isinstance(image_size, tuple | list)
        or len(image_size) != 2
        or not all(isinstance(side, Integral) and not isinstance(side, bool) and int(side) > 0 for side in image_size)
    ):
        raise ValidationError(
            f"image_size must be None or (width, height), two positive ints in pixels, got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def pixel_scale(image_size: tuple[int, int] | None) -> float:
    """Factor applied to the 840-pixel thresholds: max(width, height) / 840, or 1.0 when image_size is None."""
    size = validate_image_size(image_size)
    return 1.0 if size is None else max(size) / REFERENCE_IMAGE_SIDE


def _is_coordinate(value: object) -> bool:
    return is_finite_number(value) and abs(value) <= MAX_COORDINATE


def as_box(value: object) -> Box | None:
    """`value` as a box (x1, y1, x2, y2) in pixels if it is a list of 4 valid coordinates with x1<=x2, y1<=y2."""
    if not isinstance(value, list) or len(value) != 4 or not all(_is_coordinate(v) for v in value):
        return None
    x1, y1, x2, y2 = (float(v) for v in value)
    return (x1, y1, x2, y2) if x1 <= x2 and y1 <= y2 else None


def as_point(value: object) -> Point | None:
    """`value` as a point (x, y) in pixels if it is a list of 2 valid coordinates, else None."""
    if not isinstance(value, list) or len(value) != 2 or not all(_is_coordinate(v) for v in value):
        return None
    return float(value[0]), float(value[1])


def point_in_box(point: Point, box: Box) -> bool:
    """Whether `point` (x, y) lies inside `box` (x1, y1, x2, y2), edges included (pixels)."""
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of valid boxes under the inclusive-pixel convention. boxes_a: [M, 4], boxes_b: [N, 4] -> [M, N]."""
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0, 0.0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0, 0.0, None)
    intersection = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
    area_b = (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
    return intersection / (area_a + area_b - intersection)


def box_iou(box_a: Box, box_b: Box) -> float:
    """IoU of two valid boxes (inclusive-pixel convention), in [0, 1]."""
    return float(iou_matrix(np.array([box_a]), np.array([box_b]))[0, 0])


def l1_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise mean absolute corner difference in pixels. boxes_a: [M, 4], boxes_b: [N, 4] -> [M, N]."""
    return np.abs(boxes_a[:, None, :] - boxes_b[None, :, :]).mean(axis=2)


def distance_matrix(points_a: np.ndarray, points_b: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distance in pixels. points_a: [M, 2], points_b: [N, 2] -> [M, N]."""
    return np.linalg.norm(points_a[:, None, :] - points_b[None, :, :], axis=2)


def box_mask(boxes: Sequence[Box], image_size: tuple[int, int]) -> np.ndarray:
    """Union of `boxes` rendered on the pixel grid: bool [height, width] for image_size (width, height).

    Pixel (row r, column c) is covered by a box when x1 <= c <= x2 and y1 <= r <= y2; parts outside the image are
    clipped away.
    """
    size = validate_image_size(image_size)
    if size is None:
        raise ValidationError("image_size is required to render box masks")
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        col_start, col_stop = max(math.ceil(x1), 0), min(math.floor(x2), width - 1) + 1
        row_start, row_stop = max(math.ceil(y1), 0), min(math.floor(y2), height - 1) + 1
        if col_start < col_stop and row_start < row_stop:
            mask[row_start:row_stop, col_start:col_stop] = True
    return mask
