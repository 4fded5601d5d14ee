"""The offline benchmark: procedural images and questions for every task, deterministic by seed, no files needed.

Imports numpy and PIL only: never torch, ray or transformers.

Every image is `IMAGE_SIZE` x `IMAGE_SIZE` = 112 x 112 RGB pixels, a grid of 8 x 8 cells of `CELL` = 14 px (one
vision patch each). Every object (shape, button, defect) fills a block of 2 x 2 cells placed on the 14-px grid, so
every box is `[14 c, 14 r, 14 c + 27, 14 r + 27]` (first and last pixel, inclusive as the verifiers count boxes) and
every point is `[14 c + 14, 14 r + 14]`, the block's centre (pixels, column c and row r of the block's top-left cell
in 0..6). This is what a 1.5M-parameter Qwen2.5-VL can learn in minutes on a CPU: objects aligned
to the patch grid, few colours and shapes, short answers (see `BACKGROUND` and `models.tiny.TinyVLMSpec`). Shapes and
buttons lie on a background of `BACKGROUND`, the image processor's mean colour, which normalises to zero: background
patches embed to zero vectors, so the tiny model's image tokens carry only the objects (see `BACKGROUND`).

Item kinds (`KINDS`, registered with `register_kind`; each answer is in its task's verifier format, see prompts.py):
- grounding_single: 1-3 shapes, colour x shape unique per image; "Find the red circle." -> one box and point.
- grounding_multi: 2-4 shapes, 2-3 of them share the queried colour or shape; "Find all red shapes." -> every match,
  in reading order (top to bottom, then left to right).
- grounding_none: 1-3 shapes; the queried colour x shape (or colour, for "Find all ... shapes.") is absent -> `[]`.
  Half of the single-object queries name a colour and a shape that are each present on other objects.
- grounding_empty: the same queries on an empty image (background only) -> `[]`. The tiny base model cannot tell
  whether *the asked* look is among other objects (it does not bind the query to the image, see
  `visurf_ray.train.perception`); that nothing is there is simpler (count pretraining shows empty images), and its
  grounding prompt's state separates empty images, though its count answers do not pass the deciding check (README,
  "Perception checks"); grounding_none stays as the gRefCOCO-like slice.
- gui_point: a window (title bar on row 0) with 2-4 grey buttons labelled with distinct digits 1-9; "Click the button
  labelled 3." -> that button's box and centre (the verifier accepts any point inside the box).
- anomaly_defect / anomaly_clean: a periodic texture (stripes, checks or dots) on the background colour with /
  without one defect (a scratch, a stain or a hole) inside a 2 x 2-cell block; "Is there a defect in this texture?"
  -> `{"defect": true, "bbox_2d": ...}` / `{"defect": false}`. Textures are periodic with period `TEXTURE_PERIOD` =
  10 px (shifted by 0-9 px), so only the defect breaks the period.
- count: 0-6 shapes (repeats allowed; an empty image one time in seven); how many of a shape, of a colour, of a
  colour × shape ("How many red circles are there?", half of them about a look that is absent: the base model learns
  to *see* that a colour × shape is not in the image, which grounding's no-object queries ask, while `[]` stays
  untaught), in all, or of two shapes together (simple visual arithmetic) -> `\\boxed{n}`, n in 0..6.
  `meta` holds the question's "form", the answer "count", "objects" and the "scene" (as grounding's).

Splits (`make_split(name, n, seed)`, `iter_split(name, seed)`):
- "pretrain": what the base model learns. Colours red, green, blue, yellow only; grounding_single 35%,
  grounding_multi 15%, gui_point 15%, anomaly_defect 15%, count 20%. It never shows purple, never asks for an absent
  object and never shows a texture without a defect: the base model never answers `[]` or `{"defect": false}`.
- "posttrain": the post-training mix. Adds the unseen colour purple (one of five colours, anywhere: targets and
  distractors), no-object queries and defect-free textures: grounding_single 20%, grounding_multi 15%,
  grounding_none 10%, grounding_empty 10%, gui_point 15%, anomaly_defect 15%, anomaly_clean 15%. Count is not
  post-trained.
- "pretrain/<task>", "posttrain/<task>": the items of one task of that mix, in the same proportions (e.g. a
  grounding-only base model from "pretrain/grounding").
- "eval/<task>" for every task: held-out items of that task, drawn like "posttrain" for post-trained tasks and like
  "pretrain" for the others (count). `meta["slice"]` names the item's evaluation slice: grounding "seen" (the query
  names a pretraining colour or none), "unseen_attribute" (it names purple), "no_object" (other objects are there)
  or "empty_image"; anomaly "clean" or "defect"; gui_point and count "all". `meta` also holds "kind"; for
  grounding "no_object", "attribute" (the queried colour or None), "shape" (the queried shape or None),
  "unseen_attribute", "unseen_in_image", "objects" and "scene" (every object's colour, shape and bbox_2d).
Solutions are compact JSON, the dataset's style (`answers.DATASET_SEPARATORS`); pretraining targets write them in
the model's spaced style (`target_text`), so the raw label and the model's answers differ in tokens as in the paper.
- "retained/<task>" for `RETAINED_TASKS` (count): held-out items of pretrain tasks that post-training does not train
  on, to measure forgetting.
Held-out means content-disjoint, not only a different seed stream: every item's scene (question and layout) hashes
into one of `HELDOUT_BUCKETS` buckets; eval and retained splits keep only bucket 0 and training splits never do.
(Empty images differ only by their question: 4 of the 20 empty-image questions are held out.)

Each item `i` of split `name` with seed `seed` is drawn from `numpy.random.default_rng([seed, stream(name), i])`,
so `make_split(name, n, seed)` is the first n items of `iter_split(name, seed)` and ids are `"{name}/{seed}/{i}"`.
Every item carries `meta["think"]`, the templated reasoning used in pretraining targets (`target_text`).
"""

import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from PIL import Image

from visurf_ray.data.answers import anomaly_answer, count_answer, grounding_answer, gui_point_answer, model_style
from visurf_ray.data.prompts import format_problem
from visurf_ray.data.sample import Sample
from visurf_ray.validation import ValidationError, check_int, require

IMAGE_SIZE = 112
CELL = 14
GRID = IMAGE_SIZE // CELL
OBJECT_CELLS = 2
OBJECT_SIZE = OBJECT_CELLS * CELL
MAX_CELL_INDEX = GRID - OBJECT_CELLS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 195, 30),
    "purple": (150, 50, 190),
}
SEEN_COLOURS = ("red", "green", "blue", "yellow")
UNSEEN_COLOUR = "purple"
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (123, 117, 104)
"""The Qwen2.5-VL image processor's mean colour (OpenAI CLIP's mean × 255, rounded), which it normalises to ~0.

A data-design choice measured on the tiny model (the vision tower's patch embedding has no bias, so a background
patch embeds to ~0 and only objects reach the language model): on a white background, or with position-dependent
background tints, the column/row digits of 1-object grounding stayed at chance (1.95 nats) for 300-1,550 steps (the
vision features collapsed into a constant the language model used as an attention sink); on this background, with
the tiny model's per-token vision windows, they fell to 1.3 nats within 200 steps (the object's offset inside its
image token), and with its M-RoPE settings to 0.75 nats in 300 steps (which of the 4 x 4 tokens holds it too)."""
HELDOUT_BUCKETS = 8
RETAINED_TASKS = ("count",)
MAX_COUNT = 6
T = TypeVar("T")


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean masks [OBJECT_SIZE, OBJECT_SIZE] of each shape, with a 3-px margin inside its 2 x 2-cell block."""
    yy, xx = np.mgrid[0:OBJECT_SIZE, 0:OBJECT_SIZE] + 0.5
    centre, margin = OBJECT_SIZE / 2, 3
    square = (yy > margin) & (yy < OBJECT_SIZE - margin) & (xx > margin) & (xx < OBJECT_SIZE - margin)
    circle = (yy - centre) ** 2 + (xx - centre) ** 2 <= (centre - margin) ** 2
    height = OBJECT_SIZE - 2 * margin
    half_width = (yy - margin) / height * (centre - margin)
    triangle = (yy > margin) & (yy < OBJECT_SIZE - margin) & (np.abs(xx - centre) <= half_width)
    return {"square": square, "circle": circle, "triangle": triangle}


SHAPE_MASKS = _shape_masks()

# 3 x 5 bitmap digits, drawn 3x larger (9 x 15 px) on the buttons.
_DIGIT_ROWS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}
DIGIT_MASKS = {
    digit: np.kron(np.array([[c == "1" for c in row] for row in rows]), np.ones((3, 3), dtype=bool))
    for digit, rows in _DIGIT_ROWS.items()
}


@dataclass(frozen=True)
class Placed:
    """One object on the grid: `col`, `row` index its top-left cell (0..MAX_CELL_INDEX); `shape` is a shape name, a
    button's digit label or a defect kind."""

    col: int
    row: int
    colour: str = ""
    shape: str = ""

    @property
    def box(self) -> list[int]:
        """[x1, y1, x2, y2]: the block's first and last pixel columns and rows (boxes are inclusive, as the
        verifiers count them)."""
        x1, y1 = CELL * self.col, CELL * self.row
        return [x1, y1, x1 + OBJECT_SIZE - 1, y1 + OBJECT_SIZE - 1]

    @property
    def pixels(self) -> tuple[slice, slice]:
        """(rows, columns) slices of the block's pixels, for indexing an [H, W, 3] image."""
        y1, x1 = CELL * self.row, CELL * self.col
        return slice(y1, y1 + OBJECT_SIZE), slice(x1, x1 + OBJECT_SIZE)

    @property
    def point(self) -> list[int]:
        """[x, y] of the block's centre in pixels."""
        return [CELL * self.col + OBJECT_SIZE // 2, CELL * self.row + OBJECT_SIZE // 2]

    @property
    def where(self) -> str:
        """The block's place in words, as the think texts say it."""
        return f"column {self.col}, row {self.row}"


@dataclass(frozen=True)
class Draft:
    """A drawn item before rendering: `key` identifies its content (question and layout) for held-out bucketing;
    `render()` returns the image, uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""

    question: str
    solution: str
    think: str
    key: str
    render: Callable[[], np.ndarray]
    meta: Mapping = field(default_factory=dict)


KindGenerator = Callable[[np.random.Generator, tuple[str, ...]], Draft]


@dataclass(frozen=True)
class Kind:
    """An item kind: the task its items belong to and its generator `(rng, colours) -> Draft`."""

    task: str
    generate: KindGenerator


KINDS: dict[str, Kind] = {}


def register_kind(name: str, task: str):
    """Register a generator `(rng, colours) -> Draft` of items of `task` under the kind `name`."""

    def wrap(generator: KindGenerator) -> KindGenerator:
        KINDS[name] = Kind(task, generator)
        return generator

    return wrap


# ---- layout and drawing -----------------------------------------------------------------------------------------


def _reading_order(objects: list[Placed]) -> list[Placed]:
    return sorted(objects, key=lambda o: (o.row, o.col))


def _free_blocks(rng: np.random.Generator, n: int, first_row: int = 0) -> list[tuple[int, int]]:
    """n non-overlapping 2 x 2-cell blocks at rows >= first_row, as (col, row) of their top-left cells, each drawn
    uniformly among the free ones."""
    positions = MAX_CELL_INDEX + 1
    free = np.ones((positions, positions), dtype=bool)  # [row, col] of a block's top-left cell
    free[:first_row] = False
    blocks = []
    for _ in range(n):
        row, col = divmod(int(rng.choice(np.flatnonzero(free))), positions)
        free[
            max(row - OBJECT_CELLS + 1, 0) : row + OBJECT_CELLS, max(col - OBJECT_CELLS + 1, 0) : col + OBJECT_CELLS
        ] = False
        blocks.append((col, row))
    return blocks


def _place(rng: np.random.Generator, looks: list[tuple[str, str]]) -> list[Placed]:
    """Place objects with the given (colour, shape) looks on free blocks, in random order."""
    blocks = _free_blocks(rng, len(looks))
    return [Placed(col, row, colour, shape) for (col, row), (colour, shape) in zip(blocks, looks)]


def _draw_shapes(objects: list[Placed]) -> np.ndarray:
    """Shapes on the background: uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)
    for o in objects:
        image[o.pixels][SHAPE_MASKS[o.shape]] = COLOURS[o.colour]
    return image


def empty_image() -> Image.Image:
    """The background alone: the image of every "empty_image" item."""
    return Image.fromarray(_draw_shapes([]))


def _scene_key(question: str, objects: list[Placed]) -> str:
    """What the item shows and asks, independent of how it was drawn: equal keys mean equal items."""
    return f"{question}|" + ";".join(f"{o.colour} {o.shape} {o.col} {o.row}" for o in _reading_order(objects))


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _distinct_looks(rng: np.random.Generator, colours: tuple[str, ...], n: int) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs."""
    pool = [(c, s) for c in colours for s in SHAPES]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def _grounding_meta(kind: str, colour: str | None, shape: str | None, objects: list[Placed], no_object: bool) -> dict:
    unseen = colour == UNSEEN_COLOUR
    return {
        "kind": kind,
        "slice": ("no_object" if objects else "empty_image") if no_object else "unseen_attribute" if unseen else "seen",
        "attribute": colour,
        "shape": shape,
        "unseen_attribute": unseen,
        "unseen_in_image": any(o.colour == UNSEEN_COLOUR for o in objects),
        "no_object": no_object,
        "objects": len(objects),
        "scene": [{"colour": o.colour, "shape": o.shape, "bbox_2d": o.box} for o in objects],
    }


def _join_places(objects: list[Placed]) -> str:
    return "; ".join(o.where for o in _reading_order(objects))


# ---- item kinds -------------------------------------------------------------------------------------------------


@register_kind("grounding_single", "grounding")
def grounding_single(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    looks = _distinct_looks(rng, colours, int(rng.integers(1, 4)))
    objects = _place(rng, looks)
    target = objects[0]
    question = f"Find the {target.colour} {target.shape}."
    return Draft(
        question=question,
        solution=grounding_answer([(target.box, target.point)]),
        think=f"The {target.colour} {target.shape} is at {target.where}.",
        key=_scene_key(question, objects),
        render=lambda: _draw_shapes(objects),
        meta=_grounding_meta("grounding_single", target.colour, target.shape, objects, no_object=False),
    )


@register_kind("grounding_multi", "grounding")
def grounding_multi(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    n_match = int(rng.integers(2, 4))
    if rng.random() < 0.5:
        colour, shape = _pick(rng, colours), None
        shapes = rng.choice(len(SHAPES), size=n_match, replace=False)
        matches = [(colour, SHAPES[s]) for s in shapes]
        question, noun = f"Find all {colour} shapes.", f"{colour} shapes"
    else:
        colour, shape = None, _pick(rng, SHAPES)
        chosen = rng.choice(len(colours), size=n_match, replace=False)
        matches = [(colours[c], shape) for c in chosen]
        question, noun = f"Find all {shape}s.", f"{shape}s"
    others = [(c, s) for c in colours for s in SHAPES if c != colour and s != shape]
    looks = matches + [others[i] for i in rng.choice(len(others), size=int(rng.integers(0, 2)), replace=False)]
    objects = _place(rng, looks)
    targets = [o for o in objects if o.colour == colour or o.shape == shape]
    return Draft(
        question=question,
        solution=grounding_answer([(o.box, o.point) for o in _reading_order(targets)]),
        think=f"The {noun} are at {_join_places(targets)}.",
        key=_scene_key(question, objects),
        render=lambda: _draw_shapes(objects),
        meta=_grounding_meta("grounding_multi", colour, shape, objects, no_object=False),
    )


def _no_object_draft(rng: np.random.Generator, colours: tuple[str, ...], n_objects: int, kind: str) -> Draft:
    """A query for a look (or a colour) that none of `n_objects` distinct shapes has -> `[]`."""
    looks = _distinct_looks(rng, colours, n_objects)
    present_colours = {c for c, _ in looks}
    if rng.random() < 0.25 and len(present_colours) < len(colours):
        colour, shape = _pick(rng, sorted(set(colours) - present_colours)), None
        question, think = f"Find all {colour} shapes.", f"There are no {colour} shapes."
    else:
        absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in looks]
        confusable = [(c, s) for c, s in absent if c in present_colours and any(s == t for _, t in looks)]
        colour, shape = _pick(rng, confusable if confusable and rng.random() < 0.5 else absent)
        question, think = f"Find the {colour} {shape}.", f"There is no {colour} {shape}."
    objects = _place(rng, looks)
    return Draft(
        question=question,
        solution=grounding_answer([]),
        think=think,
        key=_scene_key(question, objects),
        render=lambda: _draw_shapes(objects),
        meta=_grounding_meta(kind, colour, shape, objects, no_object=True),
    )


@register_kind("grounding_none", "grounding")
def grounding_none(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    return _no_object_draft(rng, colours, int(rng.integers(1, 4)), "grounding_none")


@register_kind("grounding_empty", "grounding")
def grounding_empty(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    return _no_object_draft(rng, colours, 0, "grounding_empty")


BUTTON_FILL = (200, 200, 205)
BUTTON_BORDER = (70, 70, 80)
TITLE_BAR = (60, 90, 150)


def _draw_window(buttons: list[Placed]) -> np.ndarray:
    """A window (filled with the background colour) with a title bar and bordered buttons with black digits: uint8
    [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)
    image[: CELL // 2] = TITLE_BAR
    digit_h, digit_w = DIGIT_MASKS["0"].shape
    top, left = (OBJECT_SIZE - digit_h) // 2, (OBJECT_SIZE - digit_w) // 2
    for b in buttons:
        block = image[b.pixels]
        block[1:-1, 1:-1] = BUTTON_BORDER
        block[3:-3, 3:-3] = BUTTON_FILL
        block[top : top + digit_h, left : left + digit_w][DIGIT_MASKS[b.shape]] = (0, 0, 0)
    return image


@register_kind("gui_point", "gui_point")
def gui_point(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    """Buttons below the title bar keep their digit label in `Placed.shape`; `colours` are not used by this kind."""
    labels = [str(d) for d in rng.choice(np.arange(1, 10), size=int(rng.integers(2, 5)), replace=False)]
    blocks = _free_blocks(rng, len(labels), first_row=1)
    buttons = [Placed(col, row, shape=label) for (col, row), label in zip(blocks, labels)]
    target = buttons[0]
    question = f"Click the button labelled {target.shape}."
    return Draft(
        question=question,
        solution=gui_point_answer(target.box, target.point),
        think=f"Button {target.shape} is at {target.where}.",
        key=f"{question}|" + ";".join(f"{b.shape} {b.col} {b.row}" for b in _reading_order(buttons)),
        render=lambda: _draw_window(buttons),
        meta={"kind": "gui_point", "slice": "all", "label": target.shape, "buttons": len(buttons)},
    )


TEXTURES = ("stripes", "checks", "dots")
DEFECTS = ("scratch", "stain", "hole")
TEXTURE_PERIOD = 10
"""Texture period in pixels: not the 14-px patch size, so that patches see the pattern at different phases.

Measured on the earlier textures (period 14 px, light colours far from the processor's mean): a texture repeated
every patch with a large constant colour gave 16 nearly identical image tokens whatever the defect, and a linear probe
on the base model's image tokens told clean from defective textures at 0.65 (chance 0.5). Textures now sit on the
background colour (their light colour is `BACKGROUND`, which normalises to zero), so the pattern and the defect are
what the vision tower encodes."""
TEXTURE_PALETTES = (
    (BACKGROUND, (175, 160, 130)),
    (BACKGROUND, (80, 95, 120)),
    (BACKGROUND, (100, 140, 90)),
)
DEFECT_COLOUR = (40, 30, 25)


def _defect_masks() -> dict[str, np.ndarray]:
    """Boolean masks [OBJECT_SIZE, OBJECT_SIZE] of each defect inside its 2 x 2-cell block."""
    yy, xx = np.mgrid[0:OBJECT_SIZE, 0:OBJECT_SIZE] + 0.5
    hole = np.zeros((OBJECT_SIZE, OBJECT_SIZE), dtype=bool)
    hole[3:-3, 3:-3] = True
    return {
        "scratch": np.abs(yy - xx) < 2.5,
        "stain": (yy - OBJECT_SIZE / 2) ** 2 + (xx - OBJECT_SIZE / 2) ** 2 <= 9**2,
        "hole": hole,
    }


DEFECT_MASKS = _defect_masks()
_ROWS, _COLUMNS = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


@dataclass(frozen=True)
class Texture:
    """A periodic texture of period `TEXTURE_PERIOD` px: `pattern` in TEXTURES, stripes `vertical` or not, a palette
    index, and a phase shift (`shift_x`, `shift_y` in 0..TEXTURE_PERIOD-1 px) so that the pattern is not tied to the
    grid. Equal
    textures have equal fields (shifts that change nothing are zeroed or folded), so items' keys identify images."""

    pattern: str
    vertical: bool
    palette: int
    shift_x: int
    shift_y: int

    @property
    def name(self) -> str:
        return f"vertical {self.pattern}" if self.pattern == "stripes" and self.vertical else self.pattern


def _draw_texture(texture: Texture, defect: Placed | None) -> np.ndarray:
    """The texture as uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]; a stain or scratch is dark, a hole is the palette's mean."""
    light, dark = (np.array(c, dtype=np.uint8) for c in TEXTURE_PALETTES[texture.palette])
    period = TEXTURE_PERIOD
    xx, yy, half = _COLUMNS + texture.shift_x, _ROWS + texture.shift_y, period // 2
    if texture.pattern == "stripes":
        dark_pixels = ((xx if texture.vertical else yy) // half) % 2 == 1
    elif texture.pattern == "checks":
        dark_pixels = (xx // half + yy // half) % 2 == 1
    else:
        dark_pixels = ((xx % period) - half + 0.5) ** 2 + ((yy % period) - half + 0.5) ** 2 <= 6.25
    image = np.where(dark_pixels[..., None], dark, light)
    if defect is not None:
        fill = (light.astype(np.int16) + dark) // 2 if defect.shape == "hole" else DEFECT_COLOUR
        image[defect.pixels][DEFECT_MASKS[defect.shape]] = fill
    return image


def _anomaly(rng: np.random.Generator, kind: str, with_defect: bool) -> Draft:
    pattern, vertical = _pick(rng, TEXTURES), bool(rng.random() < 0.5)
    period = TEXTURE_PERIOD
    palette, shift_x, shift_y = (int(rng.integers(size)) for size in (len(TEXTURE_PALETTES), period, period))
    if pattern == "stripes":  # a stripe's shift along its own direction changes nothing
        shift_x, shift_y = (shift_x, 0) if vertical else (0, shift_y)
    elif pattern == "checks" and shift_y >= period // 2:  # checks shifted by half a period on both axes look the same
        shift_x, shift_y = (shift_x + period // 2) % period, shift_y - period // 2
    texture = Texture(pattern, vertical and pattern == "stripes", palette, shift_x, shift_y)
    defect = None
    if with_defect:
        (col, row), defect_kind = _free_blocks(rng, 1)[0], _pick(rng, DEFECTS)
        defect = Placed(col, row, shape=defect_kind)
    question = "Is there a defect in this texture?"
    if defect is None:
        think = f"The {texture.name} are regular."
    else:
        think = f"The {texture.name} have a {defect.shape} at {defect.where}."
    return Draft(
        question=question,
        solution=anomaly_answer(None if defect is None else defect.box),
        think=think,
        key=f"{question}|{texture}|" + (f"{defect.shape} {defect.col} {defect.row}" if defect else "none"),
        render=lambda: _draw_texture(texture, defect),
        meta={
            "kind": kind,
            "slice": "clean" if defect is None else "defect",
            "texture": texture.pattern,
            "defect": defect.shape if defect else None,
        },
    )


@register_kind("anomaly_defect", "anomaly")
def anomaly_defect(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    """A texture with one defect; `colours` are not used by this kind."""
    return _anomaly(rng, "anomaly_defect", with_defect=True)


@register_kind("anomaly_clean", "anomaly")
def anomaly_clean(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    """A texture without a defect; `colours` are not used by this kind."""
    return _anomaly(rng, "anomaly_clean", with_defect=False)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@register_kind("count", "count")
def count(rng: np.random.Generator, colours: tuple[str, ...]) -> Draft:
    looks = [(_pick(rng, colours), _pick(rng, SHAPES)) for _ in range(int(rng.integers(0, MAX_COUNT + 1)))]
    objects = _place(rng, looks)
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    form = _pick(rng, ("shape", "colour", "all", "sum", "colour_shape"))
    if form == "colour_shape":  # half name a look that is present (if any is), half a random (mostly absent) one
        if objects and rng.random() < 0.5:
            colour, shape = (o := _pick(rng, objects)).colour, o.shape
        else:
            colour, shape = _pick(rng, colours), _pick(rng, SHAPES)
        target = f"{colour} {shape}"
        answer = sum(o.colour == colour and o.shape == shape for o in objects)
        question, think = f"How many {target}s are there?", f"I count {_plural(answer, target)}."
    elif form == "shape":
        shape = _pick(rng, SHAPES)
        answer = shape_counts[shape]
        question, think = f"How many {shape}s are there?", f"I count {_plural(answer, shape)}."
    elif form == "colour":
        colour = _pick(rng, colours)
        answer = sum(o.colour == colour for o in objects)
        question, think = f"How many {colour} shapes are there?", f"I count {_plural(answer, colour + ' shape')}."
    elif form == "all":
        answer = len(objects)
        question, think = "How many shapes are there?", f"I count {_plural(answer, 'shape')}."
    else:
        first, second = (SHAPES[i] for i in sorted(rng.choice(len(SHAPES), size=2, replace=False)))
        answer = shape_counts[first] + shape_counts[second]
        question = f"How many {first}s and {second}s are there?"
        think = (
            f"I count {_plural(shape_counts[first], first)} and {_plural(shape_counts[second], second)}, "
            f"{answer} in all."
        )
    return Draft(
        question=question,
        solution=count_answer(answer),
        think=think,
        key=_scene_key(question, objects),
        render=lambda: _draw_shapes(objects),
        meta={
            "kind": "count",
            "slice": "all",
            "form": form,
            "count": answer,
            "objects": len(objects),
            "scene": [{"colour": o.colour, "shape": o.shape, "bbox_2d": o.box} for o in objects],
        },
    )


# ---- splits -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """A split's recipe: item kinds with their probabilities, the colour palette, and whether it is held out."""

    kinds: Mapping[str, float]
    colours: tuple[str, ...]
    heldout: bool = False


PRETRAIN = Mix(
    {"grounding_single": 0.35, "grounding_multi": 0.15, "gui_point": 0.15, "anomaly_defect": 0.15, "count": 0.2},
    SEEN_COLOURS,
)
POSTTRAIN = Mix(
    {
        "grounding_single": 0.2,
        "grounding_multi": 0.15,
        "grounding_none": 0.1,
        "grounding_empty": 0.1,
        "gui_point": 0.15,
        "anomaly_defect": 0.15,
        "anomaly_clean": 0.15,
    },
    (*SEEN_COLOURS, UNSEEN_COLOUR),
)
BENCHMARK_TASKS = tuple(dict.fromkeys(kind.task for kind in KINDS.values()))
"""The tasks the benchmark has items of, in the order their kinds are registered."""
POSTTRAIN_TASKS = tuple(sorted({KINDS[kind].task for kind in POSTTRAIN.kinds}))


def split_names() -> list[str]:
    """Every valid split name."""
    names = ["pretrain", "posttrain"]
    names += [f"pretrain/{t}" for t in BENCHMARK_TASKS if any(KINDS[k].task == t for k in PRETRAIN.kinds)]
    names += [f"posttrain/{t}" for t in POSTTRAIN_TASKS]
    return names + [f"eval/{t}" for t in BENCHMARK_TASKS] + [f"retained/{t}" for t in RETAINED_TASKS]


def split_mix(name: str) -> Mix:
    """The recipe of split `name` (see the module docstring); ValueError naming the split if unknown."""
    if name not in split_names():
        raise ValidationError(f"split name {name!r} is unknown; expected one of {split_names()}")
    prefix, _, task = name.partition("/")
    if prefix in ("pretrain", "posttrain"):
        source, heldout = (PRETRAIN if prefix == "pretrain" else POSTTRAIN), False
    else:
        source, heldout = (POSTTRAIN if prefix == "eval" and task in POSTTRAIN_TASKS else PRETRAIN), True
    if not task:
        return source
    return Mix({k: p for k, p in source.kinds.items() if KINDS[k].task == task}, source.colours, heldout)


def _stream(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def _is_heldout(key: str) -> bool:
    return hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % HELDOUT_BUCKETS == 0


def iter_split(name: str, seed: int, where: Callable[[Mapping], bool] | None = None) -> Iterator[Sample]:
    """Endless stream of split `name`'s items for `seed` (a non-negative int); item i is the same in every call.

    where: keep only items whose meta (as `Sample.meta`) it accepts, called as each item is drawn and before its
    image is rendered (cheap filtering); kept items keep their ids, i.e. their index in the unfiltered stream.
    """
    mix = split_mix(name)
    check_int("seed", seed, low=0)
    kinds = list(mix.kinds)
    weights = np.array([mix.kinds[k] for k in kinds], dtype=np.float64)
    weights /= weights.sum()
    stream = _stream(name)
    for index in itertools.count():
        rng = np.random.default_rng([seed, stream, index])
        while True:
            kind = kinds[rng.choice(len(kinds), p=weights)]
            draft = KINDS[kind].generate(rng, mix.colours)
            if _is_heldout(draft.key) == mix.heldout:
                break
        meta = {**draft.meta, "question": draft.question, "think": draft.think}
        if where is not None and not where(meta):
            continue
        yield Sample(
            id=f"{name}/{seed}/{index}",
            task=KINDS[kind].task,
            image=Image.fromarray(draft.render()),
            problem=format_problem(KINDS[kind].task, draft.question),
            solution=draft.solution,
            img_height=IMAGE_SIZE,
            img_width=IMAGE_SIZE,
            meta=meta,
        )


KIND_SLICES = {
    "grounding_single": ("seen", "unseen_attribute"),
    "grounding_multi": ("seen", "unseen_attribute"),
    "grounding_none": ("no_object",),
    "grounding_empty": ("empty_image",),
    "gui_point": ("all",),
    "anomaly_defect": ("defect",),
    "anomaly_clean": ("clean",),
    "count": ("all",),
}
"""The evaluation slices (`meta["slice"]`) each kind's items can fall in ("unseen_attribute" only with purple)."""


def split_slices(name: str) -> tuple[str, ...]:
    """The slices the items of split `name` fall in, in a fixed order."""
    mix = split_mix(name)
    slices = {s for kind in mix.kinds for s in KIND_SLICES[kind]}
    if UNSEEN_COLOUR not in mix.colours:
        slices.discard("unseen_attribute")
    order = [s for kind in KINDS for s in KIND_SLICES[kind]]
    return tuple(sorted(slices, key=order.index))


def make_stratified_split(name: str, per_slice: int, seed: int) -> list[Sample]:
    """The first `per_slice` items of each slice of split `name` (`split_slices`), in stream order (ids as in
    `iter_split`): an evaluation set whose rare slices (no-object, unseen colour, clean textures) are as large as the
    common ones, so that each slice's metric has the same precision."""
    check_int("per_slice", per_slice, low=0)
    wanted = dict.fromkeys(split_slices(name), per_slice)

    def needed(meta: Mapping) -> bool:
        if wanted[meta["slice"]] == 0:
            return False
        wanted[meta["slice"]] -= 1
        return True

    return list(itertools.islice(iter_split(name, seed, where=needed), per_slice * len(wanted)))


def make_split(name: str, n: int, seed: int) -> list[Sample]:
    """The first `n` items of `iter_split(name, seed)`; each image is IMAGE_SIZE x IMAGE_SIZE RGB."""
    check_int("n", n, low=0)
    return list(itertools.islice(iter_split(name, seed), n))


def target_text(sample: Sample) -> str:
    """The pretraining target `<think>{meta["think"]}</think><answer>{solution in the model's style}</answer>` of a
    benchmark sample (`answers.model_style`: the spaced JSON the base model learns to write)."""
    require(
        "think" in sample.meta,
        f"sample {sample.id!r}",
        "has no meta['think']: only benchmark samples have a pretraining target",
    )
    return f"<think>{sample.meta['think']}</think><answer>{model_style(sample.task, sample.solution)}</answer>"


def text_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Texts to train the tokenizer on: `n` problems with their targets (half pretrain, half posttrain, which
    together contain every kind), then one line with every number 0..IMAGE_SIZE and every word the generators use."""
    half = n // 2
    texts = [f"{s.problem}\n{target_text(s)}" for s in make_split("pretrain", n - half, seed)]
    texts += [f"{s.problem}\n{target_text(s)}" for s in make_split("posttrain", half, seed)]
    words = [*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *TEXTURES, *DEFECTS, "vertical"]
    texts.append(" ".join([*words, *(str(i) for i in range(IMAGE_SIZE + 1))]))
    return texts
