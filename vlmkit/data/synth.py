"""The synthetic visual world: the data of `vlmkit demo`, written in the formats users bring.

A scene is a 3x3 grid of cells on a dark background (48 px images: 16 px cells, so with patch 8
and a 2x2 pixel shuffle every visual token covers exactly one cell). 1-6 cells hold a shape
(circle, square, triangle, cross) in one of six well-separated colours, small or large; some
scenes also hold a digit drawn on a light tile in a free cell (OCR). One object per cell, so
objects never overlap and every position has a name ("top left" ... "bottom right").

Each scene yields a dense caption (adapter alignment) and short-answer questions by category
(answers: one or two words, a digit, yes/no, or an option letter):

    color            What color is the circle? / ... the shape in the top left?
    shape            What shape is the red object? / What shape is in the center?
    count            How many shapes are there?                       (1-6, uniform)
    position         Where is the red circle?                         (9 cell names)
    relation         What is directly to the left of the red circle?  ("blue square")
    existence        Is there a red circle?  balanced yes / no; negatives are POPE-style hard
                     negatives (Li et al. 2023, "Evaluating Object Hallucination in LVLMs"):
                     an absent object that shares its colour or its shape with a present one
    ocr              What number is written in the image?            (0-9)
    multiple_choice  a color / shape / position / relation question with options A-D

and, asked only of reasoning scenes (opt-in, `split_reasoning_scenes`: two digits in one row or
column, a third apart from them, 3-6 shapes), categories that chain several lookups:

    arithmetic        What is the sum of the numbers in the top row?      (0-18, uniform)
    count_attribute   How many red shapes are there? / How many circles are there?  (0-4, uniform)
    chained_relation  What is directly to the left of the shape directly above the red circle?

and, asked only of small-text scenes (opt-in, `split_small_text_scenes`: the 3x3 grid at 192 px,
shapes as usual, a digit drawn 10 px high somewhere in a free cell), beside the default categories:

    small_text        What is the small number in the image?             (0-9, uniform)

A question is asked only when its answer is unique (a reference like "the circle" names one object;
a relation asks for the adjacent cell), and each category's answers are close to uniform, so a
model that does not look at the image stays near chance (`chance_accuracy`).

Relation, multiple-choice and reasoning questions are answered in training with their lookup
steps first (ANSWER_STYLE, QA.reply): "The red circle is in the top middle. Left of it, in the top
left, is a blue square. Answer: blue square"; a multiple-choice reply concludes with the right
option's text. The benchmark file keeps the short answers (the evaluation reads what follows
"Answer:").

A world's `prompt_layout` (PROMPT_LAYOUTS) places the image (or clip) in each record's first user
turn: "image-then-text" (the default, LLaVA's layout: "<image>\nWhat color is the circle?") or
"text-then-image" ("What color is the circle?\n<image>"). With the question first the answer sits
a fixed number of tokens after each cell's visual token, whatever the question's length, so a
small decoder with relative (rotary) positions finds "the top left cell" by a fixed offset; with
the image first the offset varies with every question (docs/training.md measured the difference
on the demo's decoder). Configs whose documented figures were measured with the question first
keep that layout. A world's benchmarks are asked in its layout (`eval.prompts.world_prompt_format`).

Native layout (`layout="native"`, for models that read images at their own size): a scene's grid
is one of NATIVE_GRIDS (2x3 to 4x3 cells, wide, tall and square) at one of NATIVE_CELL_SIZES,
and cells are named by number, "row 2, column 3" (counted from the top left), on every grid, the
3x3 ones included: one rule that every grid shares, where words like "middle" exist only for three
rows. Answers and chance are per grid (`answer_space(category, grid)`). Clips (`Clip`) are a few
frames of a scene in which one or two shapes jump to a free cell, asked `motion_which` ("Which
shape moved?") and `motion_where` ("Where did the red circle move to?"); their records carry the
frames as a video part (VIDEO_PLACEHOLDER, `{"type": "video", "video": [frame paths]}`).

This module is the world's content: scenes (`split_scenes`), reasoning scenes
(`split_reasoning_scenes`), clips (`split_clips`), their pixels (`render`; a clip's frames are
scenes, `Clip.frame`), and their captions and questions as records (`split_records`,
`split_reasoning_records`, `split_clip_records`). Everything is a function of the seed; test, val
and train scenes are disjoint (no scene appears in two splits), and so are reasoning scenes and
clips. Writing the world to disk and training its tokenizer is data/world.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from PIL import Image, ImageDraw

from vlmkit.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 150, 30),
    "yellow": (235, 225, 50),
    "green": (50, 180, 70),
    "blue": (50, 100, 235),
    "purple": (160, 70, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
GRID = 3
IMAGE_SIZE = 48
"""Default image side: 16 px cells, so with patch 8 and a 2x2 pixel shuffle a visual token is a cell."""
MIN_IMAGE_SIZE = 24
"""Smallest image side whose 8 px cells still hold legible objects."""
POSITIONS = ("top left", "top middle", "top right",
             "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # cell index = row * GRID + col
DIGITS = "0123456789"
MAX_DIGIT = 9
"""The largest digit: an arithmetic answer (two digits' sum) is 0 to 2 * MAX_DIGIT."""
MAX_OBJECTS = 6
BACKGROUND = (28, 28, 32)
TILE = (235, 235, 235)
INK = (15, 15, 15)
LETTERS = "ABCD"
DIRECTIONS = {"left": (0, -1, "directly to the left of"), "right": (0, 1, "directly to the right of"),
              "above": (-1, 0, "directly above"), "below": (1, 0, "directly below")}
NEIGHBOUR = {"left": "Left of it", "right": "Right of it", "above": "Above it", "below": "Below it"}
NEXT_NEIGHBOUR = {"left": "Left of that", "right": "Right of that", "above": "Above that", "below": "Below that"}
"""A chained relation's second hop, from the shape the first hop found."""
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
LINE_NAMES = {"row": ("top row", "middle row", "bottom row"),
              "column": ("left column", "middle column", "right column")}
"""The fixed grid's rows and columns in words (other grids number them: "row 2")."""
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
CATEGORIES = ("color", "shape", "count", "position", "relation", "existence", "ocr", "multiple_choice")
MOTION_CATEGORIES = ("motion_which", "motion_where")
"""The questions of a clip (never of a still scene)."""
REASONING_CATEGORIES = ("arithmetic", "count_attribute", "chained_relation")
"""The questions of a reasoning scene (never of the default world's scenes): each chains several
lookups the default categories make one at a time."""
SMALL_TEXT_CATEGORIES = ("small_text",)
"""The question only a small-text scene is asked (it is also asked the default categories)."""
SMALL_TEXT_CELL_SIZE = 64
"""Pixels per cell of a small-text scene: a 192 px image, four times the default world's side."""
SMALL_TEXT_GLYPH = (7, 10)
"""(width, height) in pixels of a small-text scene's digit: a 5x7 glyph scaled by ~1.4, readable
at the scene's size and 2.5 px high once the scene is shrunk to the default 48 px."""
SMALL_TEXT_MARGIN = 2
"""Pixels of light tile around a small-text digit."""
SMALL_TEXT_JITTER = 16
"""Largest offset in pixels, each axis, of a small-text digit from its cell's centre (uniform):
drawn at one place, each digit would shrink to one fixed blob at 48 px, which a linear probe of
a random 48 px tower tells apart (docs/studies/hybrid-encoder.md)."""
MAX_ATTRIBUTE_COUNT = 4
"""count_attribute's answers are 0-4: a reasoning scene holds that many shapes of its counted
colour or shape, drawn uniformly."""
MIN_REASONING_SHAPES = 3
"""Fewest shapes of a reasoning scene: a chained relation needs three in a line or an L."""
LAYOUTS = ("fixed", "native")
"""fixed: 3x3 scenes at the world's image size, cells named in words; native: NATIVE_GRIDS at
NATIVE_CELL_SIZES, cells named by number."""
NATIVE_CELL_SIZES = (16, 28, 32)
"""Pixels per cell of a native scene: one visual token of patch 8 with a 2x2 merge (vlmkit's tiny
towers), of patch 14 (Qwen2-VL, Qwen2.5-VL) and of patch 16 (Qwen3-VL), so each family has scenes
where a token is a cell."""
CLIP_FRAMES = (4, 6, 8)
"""Frames a clip may have: even, since the Qwen-VL video processors merge frames in pairs."""
MAX_MOVERS = 2
"""Shapes that move in one clip (1 or 2, uniformly)."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# 5x7 digit glyphs, drawn on a light tile and scaled to the cell (no font files involved, so the
# pixels are the same on every machine).
GLYPHS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": (" ### ", "#   #", "    #", "  ## ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": (" ### ", "#    ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "    #", " ### "),
}

PromptLayout = Literal["image-then-text", "text-then-image"]
PROMPT_LAYOUTS: tuple[str, ...] = get_args(PromptLayout)
"""Where a record's image (or clip) goes in its first user turn: before its question's text or
after it (recorded in world.json)."""
DEFAULT_PROMPT_LAYOUT: PromptLayout = "image-then-text"
"""LLaVA's layout, the one most data and benchmarks use."""
ANSWER_STYLE = "worked"
"""How relation, multiple-choice and reasoning questions are answered in training: the lookup
steps as short sentences, then "Answer: X" (recorded in world.json)."""
WORKED = ("relation", "multiple_choice") + REASONING_CATEGORIES
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Give a short description of the image.")


# ---------------------------------------------------------------------------------------------
# Grids and scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A scene's cells, `rows` x `cols`, indexed row * cols + col from the top left. The fixed
    world's 3x3 grid names its cells in words (POSITIONS, `named`); every other grid by number,
    "row 1, column 2"."""

    rows: int
    cols: int
    named: bool = False

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    def position(self, cell: int) -> str:
        """The cell's name as an answer: "top left" or "row 1, column 1"."""
        if self.named:
            return POSITIONS[cell]
        row, col = divmod(cell, self.cols)
        return f"row {row + 1}, column {col + 1}"

    def place(self, cell: int) -> str:
        """The cell as it follows "in": "the top left" or "row 1, column 1"."""
        return f"the {POSITIONS[cell]}" if self.named else self.position(cell)

    def positions(self) -> list[str]:
        return [self.position(cell) for cell in range(self.cells)]

    def lines(self) -> list[tuple[str, int]]:
        """Every row, then every column, as (axis, index)."""
        return [("row", r) for r in range(self.rows)] + [("column", c) for c in range(self.cols)]

    def line_cells(self, axis: str, index: int) -> list[int]:
        """The cells of a row or column, in reading order."""
        if axis == "row":
            return [index * self.cols + c for c in range(self.cols)]
        return [r * self.cols + index for r in range(self.rows)]

    def line(self, axis: str, index: int) -> str:
        """A row or column as it follows "in": "the top row" or "row 2"."""
        return f"the {LINE_NAMES[axis][index]}" if self.named else f"{axis} {index + 1}"

    def neighbour(self, cell: int, direction: str) -> int | None:
        """The adjacent cell in `direction` (a key of DIRECTIONS), None past the edge."""
        dr, dc, _ = DIRECTIONS[direction]
        row, col = divmod(cell, self.cols)
        r, c = row + dr, col + dc
        return r * self.cols + c if 0 <= r < self.rows and 0 <= c < self.cols else None


FIXED_GRID = Grid(GRID, GRID, named=True)
NATIVE_GRIDS = (Grid(2, 3), Grid(3, 2), Grid(3, 3), Grid(2, 4), Grid(4, 2), Grid(3, 4), Grid(4, 3))
"""Grids of native scenes (rows x cols): small, square, wide and tall; each holds MAX_OBJECTS."""
LAYOUT_GRIDS = {"fixed": (FIXED_GRID,), "native": NATIVE_GRIDS}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # row * grid.cols + col

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SmallDigit:
    """A digit drawn SMALL_TEXT_GLYPH small in `cell`, its centre (dx, dy) px from the cell's."""

    cell: int
    digit: str
    dx: int = 0
    dy: int = 0


@dataclass
class Scene:
    id: str
    objects: list[Obj]  # in reading order (by cell)
    digit: str | None = None
    digit_cell: int | None = None
    grid: Grid = FIXED_GRID
    cell_size: int | None = None
    """Pixels per cell of a native scene; None: the world's image size / GRID (fixed layout)."""
    extra_digits: tuple[tuple[int, str], ...] = ()
    """(cell, digit) of the digits after the first, in reading order (reasoning scenes only)."""
    counted: tuple[str, str] | None = None
    """What count_attribute asks of a reasoning scene: ("color", "red") or ("shape", "circle"),
    the attribute the sampler drew 0-MAX_ATTRIBUTE_COUNT shapes of, so the answers are uniform."""
    small_digit: SmallDigit | None = None
    """A small-text scene's digit (not among `written`, whose digits fill their cell)."""

    def signature(self) -> tuple:
        objects = tuple((o.shape, o.color, o.size, o.cell) for o in self.objects)
        return objects + (self.digit, self.digit_cell, self.extra_digits, self.grid, self.cell_size, self.small_digit)

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def written(self) -> dict[int, str]:
        """Every digit of the scene by its cell, in reading order."""
        first = {} if self.digit is None else {self.digit_cell: self.digit}
        return dict(sorted({**first, **dict(self.extra_digits)}.items()))

    @property
    def image(self) -> str:
        """Where the scene's image is written, as the records name it (relative to the world)."""
        return f"images/{self.id}.png"


def sample_scene(rng: random.Random, scene_id: str, ocr_fraction: float) -> Scene:
    """A fixed-layout scene: 1-6 objects (uniform count) in distinct cells of the 3x3 grid; a digit
    in a free cell with p=ocr_fraction."""
    n = rng.randint(1, MAX_OBJECTS)
    has_digit = rng.random() < ocr_fraction
    return _fill(rng, scene_id, n, has_digit, FIXED_GRID, None)


def sample_native_scene(rng: random.Random, scene_id: str, ocr_fraction: float) -> Scene:
    """A native-layout scene: a grid of NATIVE_GRIDS at a cell size of NATIVE_CELL_SIZES (uniformly),
    a digit with p=ocr_fraction, and 1-6 objects (uniform count, as many as the free cells allow)."""
    grid, cell_size = _draw_grid(rng, "native")
    has_digit = rng.random() < ocr_fraction
    n = rng.randint(1, min(MAX_OBJECTS, grid.cells - has_digit))
    return _fill(rng, scene_id, n, has_digit, grid, cell_size)


SAMPLERS = {"fixed": sample_scene, "native": sample_native_scene}
"""A layout's scene sampler (LAYOUTS)."""


def _draw_grid(rng: random.Random, layout: str) -> tuple[Grid, int | None]:
    """A scene's grid and cell size: the fixed 3x3 grid (no draw), or a native grid and cell size."""
    if layout == "fixed":
        return FIXED_GRID, None
    return rng.choice(NATIVE_GRIDS), rng.choice(NATIVE_CELL_SIZES)


def sample_reasoning_scene(rng: random.Random, scene_id: str, layout: str = "fixed") -> Scene:
    """A scene of `layout` for the reasoning categories: the digits of `_digit_line`, then
    MIN_REASONING_SHAPES to MAX_OBJECTS shapes in free cells, of which exactly k (uniform over
    0-MAX_ATTRIBUTE_COUNT) have the scene's counted colour or shape (`Scene.counted`) and the
    others do not."""
    grid, cell_size = _draw_grid(rng, layout)
    digits = _digit_line(rng, grid)
    free = [cell for cell in range(grid.cells) if cell not in digits]
    kind = rng.choice(("color", "shape"))
    value = rng.choice(list(COLORS) if kind == "color" else SHAPES)
    k = rng.randint(0, MAX_ATTRIBUTE_COUNT)
    cells = rng.sample(free, rng.randint(max(k, MIN_REASONING_SHAPES), min(MAX_OBJECTS, len(free))))
    objects = sorted((_counted_object(rng, cell, kind, value, i < k) for i, cell in enumerate(cells)),
                     key=lambda o: o.cell)
    (digit_cell, digit), *extra = digits.items()
    return Scene(scene_id, objects, digit, digit_cell, grid, cell_size, extra_digits=tuple(extra),
                 counted=(kind, value))


def sample_small_text_scene(rng: random.Random, scene_id: str) -> Scene:
    """A large scene with a small digit: the fixed 3x3 grid at SMALL_TEXT_CELL_SIZE, 1-6 shapes
    (uniform count) drawn as any scene's, and a digit (uniform) drawn SMALL_TEXT_GLYPH small in a
    free cell up to SMALL_TEXT_JITTER px off its centre, too small to read once the image is
    shrunk to the default world's size."""
    n = rng.randint(1, MAX_OBJECTS)
    scene = _fill(rng, scene_id, n, True, FIXED_GRID, SMALL_TEXT_CELL_SIZE)
    dx, dy = (rng.randint(-SMALL_TEXT_JITTER, SMALL_TEXT_JITTER) for _ in range(2))
    return replace(scene, digit=None, digit_cell=None, small_digit=SmallDigit(scene.digit_cell, scene.digit, dx, dy))


def _digit_line(rng: random.Random, grid: Grid) -> dict[int, str]:
    """Two digits in one row or column (uniformly chosen), their sum uniform over 0-18; and where
    it leaves room for MAX_ATTRIBUTE_COUNT shapes, a third digit in a cell that shares no row or
    column with them, so that line is the only one holding two digits. Cell -> digit, in
    reading order."""
    axis, index = rng.choice(grid.lines())
    first, second = sorted(rng.sample(grid.line_cells(axis, index), 2))
    total = rng.randint(0, 2 * MAX_DIGIT)
    a = rng.randint(max(0, total - MAX_DIGIT), min(MAX_DIGIT, total))
    digits = {first: str(a), second: str(total - a)}
    rows, cols = {cell // grid.cols for cell in digits}, {cell % grid.cols for cell in digits}
    apart = [cell for cell in range(grid.cells) if cell // grid.cols not in rows and cell % grid.cols not in cols]
    if apart and grid.cells - len(digits) - 1 >= MAX_ATTRIBUTE_COUNT:
        digits[rng.choice(apart)] = rng.choice(DIGITS)
    return dict(sorted(digits.items()))


def _counted_object(rng: random.Random, cell: int, kind: str, value: str, counted: bool) -> Obj:
    """A random object in `cell` whose `kind` ("color" or "shape") is `value` when `counted`,
    and any other value when not."""
    def pick(attribute: str, values) -> str:
        if attribute != kind:
            return rng.choice(list(values))
        return value if counted else rng.choice([v for v in values if v != value])

    shape = pick("shape", SHAPES)
    return Obj(shape, pick("color", COLORS), rng.choice(SIZES), cell)


def _fill(rng: random.Random, scene_id: str, n: int, has_digit: bool, grid: Grid, cell_size: int | None) -> Scene:
    """`n` random objects, and the digit when `has_digit`, in distinct random cells of `grid`."""
    cells = rng.sample(range(grid.cells), n + has_digit)
    objects = sorted((Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), c) for c in cells[:n]),
                     key=lambda o: o.cell)
    if has_digit:
        return Scene(scene_id, objects, rng.choice(DIGITS), cells[n], grid, cell_size)
    return Scene(scene_id, objects, grid=grid, cell_size=cell_size)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene; every object stays inside its cell. A fixed scene is image_size square
    (cell = image_size / 3); a native scene is its grid at its own `cell_size` (image_size unused)."""
    grid = scene.grid
    cell = image_size / GRID if scene.cell_size is None else scene.cell_size
    img = Image.new("RGB", (round(cell * grid.cols), round(cell * grid.rows)), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        row, col = divmod(o.cell, grid.cols)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.44 if o.size == "large" else 0.3)
        color = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif o.shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
        else:  # cross
            t = r * 0.36
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=color)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=color)
    for digit_cell, digit in scene.written().items():
        row, col = divmod(digit_cell, grid.cols)
        x0, y0 = col * cell, row * cell
        draw.rectangle((x0 + 1, y0 + 1, x0 + cell - 2, y0 + cell - 2), fill=TILE)
        h = max(7, round(cell * 0.72))
        w = max(5, round(h * 5 / 7))
        mask = _glyph(digit).resize((w, h), Image.BOX)
        img.paste(INK, (round(x0 + (cell - w) / 2), round(y0 + (cell - h) / 2)), mask)
    if scene.small_digit is not None:
        _draw_small_digit(img, draw, scene.small_digit, grid, cell)
    return img


def _glyph(digit: str) -> Image.Image:
    """The digit's 5x7 glyph as a mask (255 = ink)."""
    glyph = Image.new("L", (5, 7))
    glyph.putdata([255 if ch == "#" else 0 for line in GLYPHS[digit] for ch in line])
    return glyph


def small_digit_box(small: SmallDigit, grid: Grid, cell_size: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), exclusive, of a small-text digit's SMALL_TEXT_GLYPH."""
    row, col = divmod(small.cell, grid.cols)
    w, h = SMALL_TEXT_GLYPH
    left = round((col + 0.5) * cell_size + small.dx - w / 2)
    top = round((row + 0.5) * cell_size + small.dy - h / 2)
    return left, top, left + w, top + h


def _draw_small_digit(img: Image.Image, draw: ImageDraw.ImageDraw, small: SmallDigit, grid: Grid,
                      cell_size: float) -> None:
    """A small-text digit, crisp (nearest-neighbour scaled), on a light tile just around it."""
    left, top, right, bottom = small_digit_box(small, grid, cell_size)
    m = SMALL_TEXT_MARGIN
    draw.rectangle((left - m, top - m, right - 1 + m, bottom - 1 + m), fill=TILE)
    img.paste(INK, (left, top), _glyph(small.digit).resize(SMALL_TEXT_GLYPH, Image.NEAREST))


# ---------------------------------------------------------------------------------------------
# Captions and questions
# ---------------------------------------------------------------------------------------------


@dataclass
class QA:
    category: str
    question: str  # without the options of a multiple-choice item
    answer: str  # for multiple choice: the letter
    choices: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    """Sentences that lead to `fact` (a relation first finds its reference object)."""
    fact: str = ""
    """The answer as a sentence ("The circle is red."), the last step of a worked reply."""

    def prompt(self) -> str:
        """The user turn's text as asked in training (options as "A. text" lines, no instruction)."""
        if not self.choices:
            return self.question
        return "\n".join([self.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices)])

    def reply(self) -> str:
        """The assistant turn as trained: the answer itself, or for the categories of WORKED a
        worked reply, "<steps> <fact> Answer: <answer>" (ANSWER_STYLE). A multiple-choice reply
        concludes with the chosen option's text, which the evaluation maps to its letter
        (data.answers.extract_choice): the demo's decoder never learned to read the letter off
        the option lines (docs/data-synthetic.md)."""
        if self.category not in WORKED:
            return self.answer
        final = self.choices[LETTERS.index(self.answer)] if self.choices else self.answer
        return " ".join(self.steps + [self.fact, f"Answer: {final}"])


def answer_space(category: str, grid: Grid = FIXED_GRID) -> list[str]:
    """Every answer a question of `category` can have on `grid` (positions and counts depend on it)."""
    names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    spaces = {
        "color": list(COLORS), "shape": list(SHAPES),
        "count": [str(n) for n in range(1, min(MAX_OBJECTS, grid.cells) + 1)],
        "position": grid.positions(), "relation": names, "existence": ["yes", "no"], "ocr": list(DIGITS),
        "multiple_choice": list(LETTERS), "motion_which": names, "motion_where": grid.positions(),
        "arithmetic": [str(n) for n in range(2 * MAX_DIGIT + 1)],
        "count_attribute": [str(n) for n in range(MAX_ATTRIBUTE_COUNT + 1)], "chained_relation": names,
        "small_text": list(DIGITS),
    }
    if category not in spaces:
        raise KeyError(f"unknown category {category!r}; expected one of "
                       f"{', '.join(CATEGORIES + MOTION_CATEGORIES + REASONING_CATEGORIES + SMALL_TEXT_CATEGORIES)}")
    return spaces[category]


def chance_accuracy(category: str, grid: Grid = FIXED_GRID) -> float:
    """Accuracy of a uniform guess over the category's answers on `grid` (answers are balanced per
    category)."""
    return 1.0 / len(answer_space(category, grid))


def layout_chance(category: str, layout: str) -> float:
    """Chance of a category over a layout's scenes: the mean over its grids, which are drawn
    uniformly. A blind model does as well by always answering what every grid has (e.g. "row 1,
    column 1"), so this is also the blind baseline's expected score."""
    grids = LAYOUT_GRIDS[layout]
    return sum(chance_accuracy(category, g) for g in grids) / len(grids)


def layout_answers(category: str, layout: str) -> list[str]:
    """Every answer a question of `category` can have on any grid of `layout`, in a fixed order."""
    return list(dict.fromkeys(a for grid in LAYOUT_GRIDS[layout] for a in answer_space(category, grid)))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Dense caption: how many shapes, each in reading order with size, colour and place; the digit."""
    n = len(scene.objects)
    grid = scene.grid
    parts = [f"{article(o.size)} {o.size} {o.color} {o.shape} in {grid.place(o.cell)}" for o in scene.objects]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listed}."
    if scene.digit is not None:
        text += f" The number {scene.digit} is written in {grid.place(scene.digit_cell)}."
    return text


def _unique(scene: Scene, key) -> list[Obj]:
    """Objects whose key (shape, colour, or colour+shape) no other object shares."""
    keys = [key(o) for o in scene.objects]
    return [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]


def _ask_attribute(scene: Scene, rng: random.Random, attribute: str, other: str, by_other: str,
                   by_place: str, fact: str) -> QA:
    """Ask an object's `attribute` (color or shape), naming the object by its `other` attribute
    when that is unique in the scene (half of the time), else by its place. `fact` states the
    answer: "{the object} is {value}"."""
    named = _unique(scene, lambda o: getattr(o, other))
    if named and rng.random() < 0.5:
        o = rng.choice(named)
        ref = by_other.format(getattr(o, other))
    else:
        o = rng.choice(scene.objects)
        ref = by_place.format(scene.grid.place(o.cell))
    value = getattr(o, attribute)
    return QA(attribute, f"What {attribute} is {ref}?", value, fact=fact.format(ref[0].upper() + ref[1:], value))


def ask_color(scene: Scene, rng: random.Random) -> QA:
    return _ask_attribute(scene, rng, "color", "shape", "the {}", "the shape in {}", "{} is {}.")


def ask_shape(scene: Scene, rng: random.Random) -> QA:
    return _ask_attribute(scene, rng, "shape", "color", "the {} object", "in {}", "{} is a {}.")


def ask_count(scene: Scene, rng: random.Random) -> QA:
    q = rng.choice(("How many shapes are there?", "How many shapes are in the image?"))
    return QA("count", q, str(len(scene.objects)))


def ask_position(scene: Scene, rng: random.Random) -> QA | None:
    named = _unique(scene, lambda o: o.name)
    if not named:
        return None
    o = rng.choice(named)
    return QA("position", f"Where is the {o.name}?", scene.grid.position(o.cell),
              fact=f"The {o.name} is in {scene.grid.place(o.cell)}.")


def relations(scene: Scene) -> list[tuple[Obj, str, Obj]]:
    """(reference, direction, answer) for every uniquely named object with an adjacent neighbour."""
    out = []
    for o in _unique(scene, lambda o: o.name):
        for direction in DIRECTIONS:
            cell = scene.grid.neighbour(o.cell, direction)
            if cell is not None and (other := scene.at(cell)) is not None:
                out.append((o, direction, other))
    return out


def ask_relation(scene: Scene, rng: random.Random) -> QA | None:
    found = relations(scene)
    if not found:
        return None
    ref, direction, other = rng.choice(found)
    # Worked: find the reference, name the neighbouring cell, then read it: three lookups a small
    # decoder makes one token at a time instead of composing them inside one forward pass.
    return QA("relation", f"What is {DIRECTIONS[direction][2]} the {ref.name}?", other.name,
              steps=[f"The {ref.name} is in {scene.grid.place(ref.cell)}."],
              fact=_found(NEIGHBOUR[direction], other, scene.grid))


def _found(lead: str, obj: Obj, grid: Grid) -> str:
    """A worked reply's step that names a neighbour: "Left of it, in the top left, is a blue square."."""
    return f"{lead}, in {grid.place(obj.cell)}, is {article(obj.name)} {obj.name}."


def ask_existence(scene: Scene, rng: random.Random) -> QA:
    """Balanced yes / no. A "no" asks about an absent object sharing a colour or a shape with a
    present one (POPE's adversarial negatives), falling back to any absent object."""
    present = {o.name for o in scene.objects}
    if rng.random() < 0.5:
        name, answer = rng.choice(sorted(present)), "yes"
    else:
        colors = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        every = [f"{c} {s}" for c in COLORS for s in SHAPES]
        hard = [n for n in every if n not in present and (n.split()[0] in colors or n.split()[1] in shapes)]
        name, answer = rng.choice(hard or [n for n in every if n not in present]), "no"
    q = rng.choice((f"Is there {article(name)} {name}?", f"Is there {article(name)} {name} in the image?"))
    return QA("existence", q, answer)


def ask_ocr(scene: Scene, rng: random.Random) -> QA | None:
    if scene.digit is None:
        return None
    q = rng.choice(("What number is written in the image?", "Which digit is shown in the image?"))
    return QA("ocr", q, scene.digit)


def ask_small_text(scene: Scene, rng: random.Random) -> QA | None:
    """The small-text scene's digit (answered in a word, like ocr)."""
    if scene.small_digit is None:
        return None
    q = rng.choice(("What is the small number in the image?", "Which digit is printed in small type?"))
    return QA("small_text", q, scene.small_digit.digit)


def ask_arithmetic(scene: Scene, rng: random.Random) -> QA | None:
    """The sum of the two digits of a row or column that holds exactly two (a reasoning scene has
    one such line), worked: each digit's cell, then the digit read there, then the sum."""
    written = scene.written()
    grid = scene.grid
    pairs = [line for line in grid.lines() if sum(cell in written for cell in grid.line_cells(*line)) == 2]
    if not pairs:
        return None
    axis, index = rng.choice(pairs)
    first, second = (cell for cell in grid.line_cells(axis, index) if cell in written)
    a, b = written[first], written[second]
    line = grid.line(axis, index)
    q = rng.choice((f"What is the sum of the numbers in {line}?", f"What do the numbers in {line} add up to?"))
    total = str(int(a) + int(b))
    # Each digit is read at a cell the reply has just named, the per-cell lookup the default
    # categories teach, rather than "holds 6 and 9" in one step.
    read = f"{line[0].upper()}{line[1:]}: {grid.place(first)} holds {a}, {grid.place(second)} holds {b}."
    return QA("arithmetic", q, total, steps=[read], fact=f"{a} + {b} = {total}.")


def ask_count_attribute(scene: Scene, rng: random.Random) -> QA | None:
    """How many shapes have the scene's counted colour or shape (`Scene.counted`), worked: the
    places of those shapes, then their number."""
    if scene.counted is None:
        return None
    kind, value = scene.counted
    noun = f"{value} shapes" if kind == "color" else PLURALS[value]
    matching = [o for o in scene.objects if getattr(o, kind) == value]
    q = rng.choice((f"How many {noun} are there?", f"How many {noun} are in the image?"))
    places = "; ".join(scene.grid.place(o.cell) for o in matching) or "none"
    return QA("count_attribute", q, str(len(matching)), fact=f"{noun[0].upper()}{noun[1:]}: {places}.")


def chained_relations(scene: Scene) -> list[tuple[Obj, str, Obj, str, Obj]]:
    """(reference, first direction, middle, second direction, answer) for every relation of
    `relations` whose middle shape has a neighbour other than the reference."""
    out = []
    for ref, first, middle in relations(scene):
        for second in DIRECTIONS:
            cell = scene.grid.neighbour(middle.cell, second)
            if second != OPPOSITE[first] and cell is not None and (end := scene.at(cell)) is not None:
                out.append((ref, first, middle, second, end))
    return out


def ask_chained_relation(scene: Scene, rng: random.Random) -> QA | None:
    """What is next to the shape next to a named shape, worked as two relation hops."""
    found = chained_relations(scene)
    if not found:
        return None
    ref, first, middle, second, end = rng.choice(found)
    grid = scene.grid
    # The middle shape's cell is named, not the shape: what it is does not matter, and the reply
    # stays within the benchmark's reply budget (eval/runner.py's REPLY_TOKENS).
    return QA("chained_relation", f"What is {DIRECTIONS[second][2]} the shape {DIRECTIONS[first][2]} the {ref.name}?",
              end.name, steps=[f"The {ref.name} is in {grid.place(ref.cell)}.",
                               f"{NEIGHBOUR[first]} is {grid.place(middle.cell)}."],
              fact=_found(NEXT_NEIGHBOUR[second], end, grid))


def ask_choice(scene: Scene, rng: random.Random) -> QA | None:
    """An open question of another category, with its answer and three distractors as options."""
    asker = rng.choice((ask_color, ask_shape, ask_position, ask_relation))
    qa = asker(scene, rng)
    if qa is None:
        qa = ask_color(scene, rng)
    # Never offer what the question itself names (the reference of a relation): a blind model
    # could rule it out.
    wrong = [a for a in answer_space(qa.category, scene.grid) if a != qa.answer and a not in qa.question]
    if qa.category == "relation":  # prefer distractors that are in the scene
        near = sorted({o.name for o in scene.objects if o.name in wrong})
        rng.shuffle(near)
        rest = [a for a in wrong if a not in near]
        distractors = near[:3] + rng.sample(rest, 3 - len(near[:3]))
    else:
        distractors = rng.sample(wrong, 3)
    letter = rng.randrange(4)
    choices = distractors[:letter] + [qa.answer] + distractors[letter:]
    return QA("multiple_choice", qa.question, LETTERS[letter], choices, steps=qa.steps, fact=qa.fact)


ASKERS = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position,
          "relation": ask_relation, "existence": ask_existence, "ocr": ask_ocr, "multiple_choice": ask_choice,
          "arithmetic": ask_arithmetic, "count_attribute": ask_count_attribute,
          "chained_relation": ask_chained_relation, "small_text": ask_small_text}


def questions(scene: Scene, rng: random.Random, categories: Iterable[str] = CATEGORIES,
              per_category: dict[str, int] | None = None) -> list[QA]:
    """Up to `per_category[c]` distinct questions of each category c (default one; a category is
    skipped when the scene cannot answer it, and asks fewer when it runs out of distinct questions).
    No question repeats another of the same scene word for word (so a multiple-choice question never
    wraps an open question already asked)."""
    out: list[QA] = []
    for category in categories:
        want = 1 if per_category is None else per_category.get(category, 1)
        for _ in range(want):
            qa = _new_question(category, scene, rng, out)
            if qa is None:
                break
            out.append(qa)
    return out


def _new_question(category: str, scene: Scene, rng: random.Random, asked: list[QA]) -> QA | None:
    """A question of `category` whose text is not in `asked` (4 draws), or None when the scene
    cannot answer the category or keeps repeating itself."""
    for _ in range(4):
        qa = ASKERS[category](scene, rng)
        if qa is None:
            return None
        if all(qa.question != other.question for other in asked):
            return qa
    return None


# ---------------------------------------------------------------------------------------------
# Clips: shapes that move
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One shape's jump from cell `start` to the free cell `end`, where frame `frame` first shows it."""

    start: int
    end: int
    frame: int


@dataclass
class Clip:
    """`n_frames` frames of `scene` (the first frame) in which each move of `moves` (in the order
    they happen, never two at once) takes one shape to a cell free in every frame."""

    id: str
    scene: Scene
    moves: list[Move]
    n_frames: int

    def signature(self) -> tuple:
        return self.scene.signature() + tuple((m.start, m.end, m.frame) for m in self.moves) + (self.n_frames,)

    def mover(self, move: Move) -> Obj:
        return self.scene.at(move.start)

    def frame(self, t: int) -> Scene:
        """The scene frame `t` shows: every move of a frame <= t made."""
        moved = {m.start: m.end for m in self.moves if m.frame <= t}
        objects = sorted((replace(o, cell=moved.get(o.cell, o.cell)) for o in self.scene.objects),
                         key=lambda o: o.cell)
        return replace(self.scene, id=f"{self.id}_{t:02d}", objects=objects)

    def frame_paths(self) -> list[str]:
        """Where the frames are written, as the records name them (relative to the world)."""
        return [f"clips/{self.id}/{t:02d}.png" for t in range(self.n_frames)]


def sample_clip(rng: random.Random, clip_id: str, ocr_fraction: float, layout: str = "fixed") -> Clip:
    """A scene of `layout` with 1-MAX_MOVERS of its shapes (uniformly many, then uniformly chosen)
    jumping to distinct free cells at distinct frames; a scene without enough shapes or free
    cells is drawn again."""
    while True:
        scene = SAMPLERS[layout](rng, clip_id, ocr_fraction)
        n_movers = rng.randint(1, MAX_MOVERS)
        taken = {o.cell for o in scene.objects} | {scene.digit_cell}
        free = [cell for cell in range(scene.grid.cells) if cell not in taken]
        if len(scene.objects) >= n_movers and len(free) >= n_movers:
            break
    n_frames = rng.choice(CLIP_FRAMES)
    movers = rng.sample(scene.objects, n_movers)
    ends = rng.sample(free, n_movers)
    frames = sorted(rng.sample(range(1, n_frames), n_movers))
    return Clip(clip_id, scene, [Move(o.cell, end, t) for o, end, t in zip(movers, ends, frames)], n_frames)


def ask_motion_which(clip: Clip, rng: random.Random) -> QA:
    """Which shape moved (one mover), or which moved first / last (two)."""
    if len(clip.moves) == 1:
        question = rng.choice(("Which shape moved?", "Which shape moves in the video?"))
        return QA("motion_which", question, clip.mover(clip.moves[0]).name)
    order = rng.choice(("first", "last"))
    move = clip.moves[0] if order == "first" else clip.moves[-1]
    return QA("motion_which", f"Which shape moved {order}?", clip.mover(move).name)


def ask_motion_where(clip: Clip, rng: random.Random) -> QA | None:
    """Where a mover went, asked of a mover no other shape of the clip shares its name with."""
    names = [o.name for o in clip.scene.objects]
    named = [m for m in clip.moves if names.count(clip.mover(m).name) == 1]
    if not named:
        return None
    move = rng.choice(named)
    name, grid = clip.mover(move).name, clip.scene.grid
    return QA("motion_where", f"Where did the {name} move to?", grid.position(move.end),
              fact=f"The {name} moved from {grid.place(move.start)} to {grid.place(move.end)}.")


MOTION_ASKERS = {"motion_which": ask_motion_which, "motion_where": ask_motion_where}


def clip_questions(clip: Clip, rng: random.Random) -> list[QA]:
    """One question of each motion category the clip can answer."""
    asked = (MOTION_ASKERS[category](clip, rng) for category in MOTION_CATEGORIES)
    return [qa for qa in asked if qa is not None]


# ---------------------------------------------------------------------------------------------
# Splits and records
# ---------------------------------------------------------------------------------------------

SPLITS = ("test", "val", "train")
"""In the order their scenes are drawn: a later split resamples any scene an earlier one holds."""


def split_scenes(seed: int, counts: dict[str, int], ocr_fraction: float,
                 layout: str = "fixed") -> dict[str, list[Scene]]:
    """Scenes of `layout` per split, each split from its own seeded stream; a later split resamples
    any scene an earlier one holds, so test scenes do not depend on the size of train."""
    sample = SAMPLERS[layout]
    return _disjoint_splits(seed, counts, "scenes",
                            lambda rng, index, split: sample(rng, f"{split}_{index:06d}", ocr_fraction))


def split_reasoning_scenes(seed: int, counts: dict[str, int], layout: str = "fixed") -> dict[str, list[Scene]]:
    """Reasoning scenes (`sample_reasoning_scene`) per split, drawn as `split_scenes` draws scenes
    (own streams, disjoint splits); their ids, "reasoning_{split}_{index}", name their images apart
    from the scenes'."""
    return _disjoint_splits(seed, counts, "reasoning",
                            lambda rng, index, split: sample_reasoning_scene(rng, f"reasoning_{split}_{index:06d}",
                                                                             layout))


def split_small_text_scenes(seed: int, counts: dict[str, int]) -> dict[str, list[Scene]]:
    """Small-text scenes (`sample_small_text_scene`) per split, drawn as `split_scenes` draws scenes
    (own streams, disjoint splits); ids "small_text_{split}_{index}"."""
    return _disjoint_splits(seed, counts, "small-text",
                            lambda rng, index, split: sample_small_text_scene(rng, f"small_text_{split}_{index:06d}"))


def split_clips(seed: int, counts: dict[str, int], ocr_fraction: float, layout: str = "fixed") -> dict[str, list[Clip]]:
    """Clips per split, drawn as `split_scenes` draws scenes (own streams, disjoint splits)."""
    return _disjoint_splits(seed, counts, "clips",
                            lambda rng, index, split: sample_clip(rng, f"{split}_clip_{index:06d}", ocr_fraction,
                                                                  layout))


def _disjoint_splits(seed: int, counts: dict[str, int], stream: str, draw) -> dict[str, list]:
    """`draw(rng, index, split)` until each split of SPLITS has its count, skipping anything whose
    signature an earlier draw holds."""
    seen: set[tuple] = set()
    out = {}
    for split in SPLITS:
        rng = random.Random(f"vlmkit-synth/{seed}/{split}/{stream}")
        drawn = []
        while len(drawn) < counts.get(split, 0):
            item = draw(rng, len(drawn), split)
            if item.signature() not in seen:
                seen.add(item.signature())
                drawn.append(item)
        out[split] = drawn
    return out


@dataclass
class SceneRecords:
    """One scene's records, in every format the world is written in."""

    image: str
    """The scene's image, as the records name it (relative to the world's directory)."""
    asked: list[QA]
    """Its questions, in the order they were asked."""
    caption: dict | None
    """LLaVA JSON: a caption instruction, then the dense caption (None: a reasoning scene, whose
    records are its questions only)."""
    llava: list[dict]
    """LLaVA JSON records of its questions: a train scene's in conversations of up to
    `turns_per_record` questions, any other split's one question a record."""
    messages: list[dict]
    """The same records as messages JSONL (OpenAI-style content parts)."""
    bench: list[dict]
    """The test split's questions as generic benchmark JSONL items (empty in other splits)."""


def split_records(seed: int, split: str, scenes: list[Scene], *, turns_per_record: int,
                  train_questions: dict[str, int] | None,
                  prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> Iterator[SceneRecords]:
    """The records of each scene of a split, in order, from the split's own seeded question stream.
    `train_questions` (per category, default one) applies to the train split only."""
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/questions")
    for scene in scenes:
        yield scene_records(scene, split, rng, turns_per_record=turns_per_record,
                            per_category=train_questions if split == "train" else None, prompt_layout=prompt_layout)


def scene_records(scene: Scene, split: str, rng: random.Random, *, turns_per_record: int,
                  per_category: dict[str, int] | None,
                  prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> SceneRecords:
    """A scene's caption, its questions, and its records (every split draws a caption instruction,
    so a split's question stream does not depend on whether its captions are written)."""
    caption_record = _llava(f"{scene.id}-cap", scene.image, [(rng.choice(CAPTION_PROMPTS), caption(scene))],
                            prompt_layout=prompt_layout)
    asked = questions(scene, rng, per_category=per_category)
    llava, messages, bench = _qa_records(scene.id, split, "image", scene.image, asked, rng, turns_per_record,
                                         prompt_layout)
    return SceneRecords(scene.image, asked, caption_record, llava, messages, bench)


def split_reasoning_records(seed: int, split: str, scenes: list[Scene], *, turns_per_record: int,
                            categories: Iterable[str] = REASONING_CATEGORIES,
                            prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> Iterator[SceneRecords]:
    """The records of each reasoning scene of a split: one question of each of `categories` the
    scene can answer, grouped as a scene's are, from the split's own seeded stream; no caption."""
    return _question_records(f"vlmkit-synth/{seed}/{split}/reasoning-questions", split, scenes,
                             turns_per_record=turns_per_record, categories=tuple(categories),
                             prompt_layout=prompt_layout)


def split_small_text_records(seed: int, split: str, scenes: list[Scene], *, turns_per_record: int,
                             prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> Iterator[SceneRecords]:
    """The records of each small-text scene of a split: its small_text question and one of each
    default category it can answer (never ocr: it has no full-cell digit), grouped as a scene's
    are, from the split's own seeded stream; no caption."""
    return _question_records(f"vlmkit-synth/{seed}/{split}/small-text-questions", split, scenes,
                             turns_per_record=turns_per_record, categories=SMALL_TEXT_CATEGORIES + CATEGORIES,
                             prompt_layout=prompt_layout)


def _question_records(stream: str, split: str, scenes: list[Scene], *, turns_per_record: int,
                      categories: tuple[str, ...], prompt_layout: PromptLayout) -> Iterator[SceneRecords]:
    """Each scene's questions of `categories` as records without a caption, from the seeded `stream`."""
    rng = random.Random(stream)
    for scene in scenes:
        asked = questions(scene, rng, categories)
        llava, messages, bench = _qa_records(scene.id, split, "image", scene.image, asked, rng, turns_per_record,
                                             prompt_layout)
        yield SceneRecords(scene.image, asked, None, llava, messages, bench)


@dataclass
class ClipRecords:
    """One clip's records: as SceneRecords, with the frames as a video part and no caption."""

    frames: list[str]
    """The clip's frame images, in order, as the records name them (relative to the world)."""
    asked: list[QA]
    llava: list[dict]
    """LLaVA JSON with the frames under "video" and VIDEO_PLACEHOLDER in the first turn."""
    messages: list[dict]
    """Messages JSONL with a {"type": "video", "video": [frame paths]} part."""
    bench: list[dict]
    """Benchmark JSONL items with the frames under "video" (test split only)."""


def split_clip_records(seed: int, split: str, clips: list[Clip], *, turns_per_record: int,
                       prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> Iterator[ClipRecords]:
    """The records of each clip of a split, in order, from the split's own seeded stream."""
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/clip-questions")
    for clip in clips:
        yield clip_records(clip, split, rng, turns_per_record=turns_per_record, prompt_layout=prompt_layout)


def clip_records(clip: Clip, split: str, rng: random.Random, *, turns_per_record: int,
                 prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> ClipRecords:
    """A clip's motion questions and their records (grouped as a scene's are)."""
    frames = clip.frame_paths()
    asked = clip_questions(clip, rng)
    llava, messages, bench = _qa_records(clip.id, split, "video", frames, asked, rng, turns_per_record, prompt_layout)
    return ClipRecords(frames, asked, llava, messages, bench)


VISUAL_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}
"""A visual kind (the records' key and content-part type) -> its placeholder in LLaVA text."""


def _qa_records(item_id: str, split: str, kind: str, visual, asked: list[QA], rng: random.Random,
                turns_per_record: int, prompt_layout: PromptLayout) -> tuple[list[dict], list[dict], list[dict]]:
    """(LLaVA records, messages records, benchmark items) of the questions about one image or clip
    (`kind` "image": `visual` is its path; "video": the list of frame paths). A train item's
    questions are shuffled into conversations of up to `turns_per_record`; any other split's are
    one a record, and the test split's are also benchmark items."""
    if split == "train":
        shuffled = list(asked)
        rng.shuffle(shuffled)
        starts = range(0, len(shuffled), turns_per_record)
        groups = [(f"{item_id}-{k}", shuffled[i:i + turns_per_record]) for k, i in enumerate(starts)]
    else:
        groups = [(f"{item_id}-{qa.category}", [qa]) for qa in asked]
    llava, messages = [], []
    for rid, group in groups:
        turns = [(qa.prompt(), qa.reply()) for qa in group]
        llava.append(_llava(rid, visual, turns, kind, prompt_layout))
        messages.append(_messages(rid, visual, turns, kind, prompt_layout))
    bench = [_bench_item(item_id, kind, visual, qa) for qa in asked] if split == "test" else []
    return llava, messages, bench


def visual_after_text(prompt_layout: PromptLayout) -> bool:
    """Whether the layout puts the image (or clip) after the question's text."""
    return prompt_layout == "text-then-image"


def _first_turn(text, visual, prompt_layout: PromptLayout) -> list:
    """The first user turn's text and visual (placeholders or content parts) in the layout's order."""
    return [text, visual] if visual_after_text(prompt_layout) else [visual, text]


def _llava(rid: str, visual, turns: list[tuple[str, str]], kind: str = "image",
           prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> dict:
    """A LLaVA JSON record: the visual's placeholder in the first user turn, on its own line."""
    conv = []
    for i, (q, a) in enumerate(turns):
        human = "\n".join(_first_turn(q, VISUAL_PLACEHOLDERS[kind], prompt_layout)) if i == 0 else q
        conv.append({"from": "human", "value": human})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, kind: visual, "conversations": conv}


def _messages(rid: str, visual, turns: list[tuple[str, str]], kind: str = "image",
              prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT) -> dict:
    """A messages JSONL record (OpenAI-style content parts): the visual part in the first user turn."""
    msgs = []
    for i, (q, a) in enumerate(turns):
        text = {"type": "text", "text": q}
        parts = _first_turn(text, {"type": kind, kind: visual}, prompt_layout) if i == 0 else [text]
        msgs.append({"role": "user", "content": parts})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return {"id": rid, "messages": msgs}


def _bench_item(item_id: str, kind: str, visual, qa: QA) -> dict:
    """A benchmark item: an image under "images" (a list, the generic benchmark JSONL), a clip's
    frames under "video"."""
    media = {"images": [visual]} if kind == "image" else {"video": visual}
    item = {"id": f"{item_id}-{qa.category}", **media, "question": qa.question, "answer": qa.answer,
            "category": qa.category}
    if qa.choices:
        item["choices"] = qa.choices
    return item
