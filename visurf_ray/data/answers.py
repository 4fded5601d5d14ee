"""Canonical answer texts of every task, and validation of stored solutions against their image.

The formats are the tasks' (`visurf_ray.rewards.get_task(task).parse_solution` decides validity), so that
every label is itself a full-score answer. Coordinates are pixels; boxes `[x1, y1, x2, y2]` count pixels inclusively,
as the verifiers do. Pure Python plus the verifiers: never torch, ray or transformers.
"""

import json
from collections.abc import Sequence

from visurf_ray.rewards import get_task
from visurf_ray.validation import ValidationError

Coordinates = Sequence[int | float]


DATASET_SEPARATORS = (",", ":")
"""The benchmark writes its solutions as compact JSON (`[{"bbox_2d":[14,28,41,55],...}]`): the dataset's style, which
differs from the spaced style the model writes (`model_style`), as in the paper's example (`[10,100,200,210]` in the
data vs `[10, 100, 200, 210]` from the model). An unaligned label therefore differs from the rollouts in tokens, not
only in its think block."""


def _dump(value) -> str:
    return json.dumps(value, separators=DATASET_SEPARATORS)


def model_style(task: str, solution: str) -> str:
    """`solution` as the base model is taught to write it: JSON with `json.dumps`' default spacing (`", "`, `": "`),
    keys and values unchanged; a non-JSON answer (count) as it is. ValueError for a malformed solution."""
    definition = get_task(task)
    definition.parse_solution(solution)
    return json.dumps(json.loads(solution)) if definition.ANSWER_IS_JSON else solution


class SolutionError(ValidationError):
    """A solution text that its task's verifier rejects, or whose boxes or points leave the image."""


def grounding_answer(objects: Sequence[tuple[Coordinates, Coordinates]]) -> str:
    """`[{"bbox_2d":[x1,y1,x2,y2],"point_2d":[x,y]},...]` (dataset style) for (box, point) pairs in pixels; `[]` if
    none."""
    return _dump([{"bbox_2d": list(box), "point_2d": list(point)} for box, point in objects])


def gui_point_answer(box: Coordinates, point: Coordinates) -> str:
    """`[{"bbox_2d":[x1,y1,x2,y2],"point_2d":[x,y]}]` (dataset style): the target element's box and a click point
    inside it."""
    return grounding_answer([(box, point)])


def anomaly_answer(box: Coordinates | None) -> str:
    """`{"defect":true,"bbox_2d":[x1,y1,x2,y2]}` (dataset style) for a defect's box in pixels, `{"defect":false}` for
    None."""
    return _dump({"defect": False} if box is None else {"defect": True, "bbox_2d": list(box)})


def count_answer(n: int) -> str:
    """`\\boxed{n}`."""
    return f"\\boxed{{{n}}}"


def check_solution(task: str, solution: str, width: int, height: int):
    """Parse `solution` with `task`'s verifier and check that its boxes and points lie in a `width` x `height` image.

    A box needs 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height (an edge may sit on the border, as boxes written
    exclusively do); a point needs 0 <= x <= width and 0 <= y <= height. Returns the verifier's parsed solution (for
    grounding, the list of (box, point) pairs, `[]` for no-object). Raises SolutionError saying what is wrong.
    """
    definition = get_task(task)
    try:
        parsed = definition.parse_solution(solution)
    except ValueError as error:
        raise SolutionError(str(error)) from None
    boxes, points = definition.solution_geometry(parsed)
    for box in boxes:
        if min(box) < 0 or box[2] > width or box[3] > height:
            raise SolutionError(f"bbox_2d {[*box]} lies outside the {width}x{height} image")
    for point in points:
        if min(point) < 0 or point[0] > width or point[1] > height:
            raise SolutionError(f"point_2d {[*point]} lies outside the {width}x{height} image")
    return parsed
