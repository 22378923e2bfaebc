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

A question is asked only when its answer is unique (a reference like "the circle" names one object;
a relation asks for the adjacent cell), and each category's answers are close to uniform, so a
model that does not look at the image stays near chance (`chance_accuracy`).

Relation and multiple-choice questions are answered in training with their lookup steps first
(ANSWER_STYLE, QA.reply): "The red circle is in the top middle. Left of it, in the top left, is a
blue square. Answer: blue square"; a multiple-choice reply concludes with the right option's text.
The benchmark file keeps the short answers (the evaluation reads what follows "Answer:").

Every record asks its (first) question first and shows the image after it: "What color is the
circle?\n<image>". The answer then sits a fixed number of tokens after each cell's visual token,
whatever the question's length, so a small decoder with relative (rotary) positions finds "the
top left cell" by a fixed offset. With the image first the offset varies with every question, and
the demo's 4-layer decoder learned position-based categories far more slowly (measured in
docs/training.md). The benchmark prompt for this world (`eval.prompts.SYNTH_PROMPTS`) does the same.

This module is the world's content: scenes (`split_scenes`), their pixels (`render`), and their
captions and questions as records (`split_records`). Everything is a function of the seed; test,
val and train scenes are disjoint (no scene appears in two splits). Writing the world to disk and
training its tokenizer is data/world.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from vlmkit.constants import IMAGE_PLACEHOLDER

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
MAX_OBJECTS = 6
BACKGROUND = (28, 28, 32)
TILE = (235, 235, 235)
INK = (15, 15, 15)
LETTERS = "ABCD"
DIRECTIONS = {"left": (0, -1, "directly to the left of"), "right": (0, 1, "directly to the right of"),
              "above": (-1, 0, "directly above"), "below": (1, 0, "directly below")}
NEIGHBOUR = {"left": "Left of it", "right": "Right of it", "above": "Above it", "below": "Below it"}
CATEGORIES = ("color", "shape", "count", "position", "relation", "existence", "ocr", "multiple_choice")
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

PROMPT_LAYOUT = "text-then-image"
"""Where a record's image goes: after its first question's text (recorded in world.json)."""
ANSWER_STYLE = "worked"
"""How relation and multiple-choice questions are answered in training: the lookup steps as short
sentences, then "Answer: X" (recorded in world.json)."""
WORKED = ("relation", "multiple_choice")
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Give a short description of the image.")


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # row * GRID + col

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    id: str
    objects: list[Obj]  # in reading order (by cell)
    digit: str | None = None
    digit_cell: int | None = None

    def signature(self) -> tuple:
        return tuple((o.shape, o.color, o.size, o.cell) for o in self.objects) + (self.digit, self.digit_cell)

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)


def sample_scene(rng: random.Random, scene_id: str, ocr_fraction: float) -> Scene:
    """1-6 objects (uniform count) in distinct cells; a digit in a free cell with p=ocr_fraction."""
    n = rng.randint(1, MAX_OBJECTS)
    has_digit = rng.random() < ocr_fraction
    cells = rng.sample(range(GRID * GRID), n + has_digit)
    objects = sorted((Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), c) for c in cells[:n]),
                     key=lambda o: o.cell)
    if has_digit:
        return Scene(scene_id, objects, rng.choice(DIGITS), cells[n])
    return Scene(scene_id, objects)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene; every object stays inside its cell (cell = image_size / 3)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    for o in scene.objects:
        row, col = divmod(o.cell, GRID)
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
    if scene.digit is not None:
        row, col = divmod(scene.digit_cell, GRID)
        x0, y0 = col * cell, row * cell
        draw.rectangle((x0 + 1, y0 + 1, x0 + cell - 2, y0 + cell - 2), fill=TILE)
        glyph = Image.new("L", (5, 7))
        glyph.putdata([255 if ch == "#" else 0 for line in GLYPHS[scene.digit] for ch in line])
        h = max(7, round(cell * 0.72))
        w = max(5, round(h * 5 / 7))
        mask = glyph.resize((w, h), Image.BOX)
        img.paste(INK, (round(x0 + (cell - w) / 2), round(y0 + (cell - h) / 2)), mask)
    return img


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
        (eval.extract.extract_choice): the demo's decoder never learned to read the letter off
        the option lines (docs/data-synthetic.md)."""
        if self.category not in WORKED:
            return self.answer
        final = self.choices[LETTERS.index(self.answer)] if self.choices else self.answer
        return " ".join(self.steps + [self.fact, f"Answer: {final}"])


def answer_space(category: str) -> list[str]:
    """Every answer a question of `category` can have."""
    spaces = {
        "color": list(COLORS), "shape": list(SHAPES), "count": [str(n) for n in range(1, MAX_OBJECTS + 1)],
        "position": list(POSITIONS), "relation": [f"{c} {s}" for c in COLORS for s in SHAPES],
        "existence": ["yes", "no"], "ocr": list(DIGITS), "multiple_choice": list(LETTERS),
    }
    if category not in spaces:
        raise KeyError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return spaces[category]


def chance_accuracy(category: str) -> float:
    """Accuracy of a uniform guess over the category's answers (answers are balanced per category)."""
    return 1.0 / len(answer_space(category))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Dense caption: how many shapes, each in reading order with size, colour and place; the digit."""
    n = len(scene.objects)
    parts = [f"{article(o.size)} {o.size} {o.color} {o.shape} in the {POSITIONS[o.cell]}" for o in scene.objects]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listed}."
    if scene.digit is not None:
        text += f" The number {scene.digit} is written in the {POSITIONS[scene.digit_cell]}."
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
        ref = by_place.format(POSITIONS[o.cell])
    value = getattr(o, attribute)
    return QA(attribute, f"What {attribute} is {ref}?", value, fact=fact.format(ref[0].upper() + ref[1:], value))


def ask_color(scene: Scene, rng: random.Random) -> QA:
    return _ask_attribute(scene, rng, "color", "shape", "the {}", "the shape in the {}", "{} is {}.")


def ask_shape(scene: Scene, rng: random.Random) -> QA:
    return _ask_attribute(scene, rng, "shape", "color", "the {} object", "in the {}", "{} is a {}.")


def ask_count(scene: Scene, rng: random.Random) -> QA:
    q = rng.choice(("How many shapes are there?", "How many shapes are in the image?"))
    return QA("count", q, str(len(scene.objects)))


def ask_position(scene: Scene, rng: random.Random) -> QA | None:
    named = _unique(scene, lambda o: o.name)
    if not named:
        return None
    o = rng.choice(named)
    return QA("position", f"Where is the {o.name}?", POSITIONS[o.cell],
              fact=f"The {o.name} is in the {POSITIONS[o.cell]}.")


def relations(scene: Scene) -> list[tuple[Obj, str, Obj]]:
    """(reference, direction, answer) for every uniquely named object with an adjacent neighbour."""
    out = []
    for o in _unique(scene, lambda o: o.name):
        row, col = divmod(o.cell, GRID)
        for direction, (dr, dc, _) in DIRECTIONS.items():
            r, c = row + dr, col + dc
            if 0 <= r < GRID and 0 <= c < GRID and (other := scene.at(r * GRID + c)) is not None:
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
              steps=[f"The {ref.name} is in the {POSITIONS[ref.cell]}."],
              fact=f"{NEIGHBOUR[direction]}, in the {POSITIONS[other.cell]}, is "
                   f"{article(other.name)} {other.name}.")


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


def ask_choice(scene: Scene, rng: random.Random) -> QA | None:
    """An open question of another category, with its answer and three distractors as options."""
    asker = rng.choice((ask_color, ask_shape, ask_position, ask_relation))
    qa = asker(scene, rng)
    if qa is None:
        qa = ask_color(scene, rng)
    # Never offer what the question itself names (the reference of a relation): a blind model
    # could rule it out.
    wrong = [a for a in answer_space(qa.category) if a != qa.answer and a not in qa.question]
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
          "relation": ask_relation, "existence": ask_existence, "ocr": ask_ocr, "multiple_choice": ask_choice}


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
# Splits and records
# ---------------------------------------------------------------------------------------------

SPLITS = ("test", "val", "train")
"""In the order their scenes are drawn: a later split resamples any scene an earlier one holds."""


def split_scenes(seed: int, counts: dict[str, int], ocr_fraction: float) -> dict[str, list[Scene]]:
    """Scenes per split, each split from its own seeded stream; a later split resamples any scene
    an earlier one holds, so test scenes do not depend on the size of train."""
    seen: set[tuple] = set()
    out = {}
    for split in SPLITS:
        rng = random.Random(f"vlmkit-synth/{seed}/{split}/scenes")
        scenes = []
        while len(scenes) < counts.get(split, 0):
            scene = sample_scene(rng, f"{split}_{len(scenes):06d}", ocr_fraction)
            if scene.signature() not in seen:
                seen.add(scene.signature())
                scenes.append(scene)
        out[split] = scenes
    return out


@dataclass
class SceneRecords:
    """One scene's records, in every format the world is written in."""

    image: str
    """The scene's image, as the records name it (relative to the world's directory)."""
    asked: list[QA]
    """Its questions, in the order they were asked."""
    caption: dict
    """LLaVA JSON: a caption instruction, then the dense caption."""
    llava: list[dict]
    """LLaVA JSON records of its questions: a train scene's in conversations of up to
    `turns_per_record` questions, any other split's one question a record."""
    messages: list[dict]
    """The same records as messages JSONL (OpenAI-style content parts)."""
    bench: list[dict]
    """The test split's questions as generic benchmark JSONL items (empty in other splits)."""


def split_records(seed: int, split: str, scenes: list[Scene], *, turns_per_record: int,
                  train_questions: dict[str, int] | None) -> Iterator[SceneRecords]:
    """The records of each scene of a split, in order, from the split's own seeded question stream.
    `train_questions` (per category, default one) applies to the train split only."""
    rng = random.Random(f"vlmkit-synth/{seed}/{split}/questions")
    for scene in scenes:
        yield scene_records(scene, split, rng, turns_per_record=turns_per_record,
                            per_category=train_questions if split == "train" else None)


def scene_records(scene: Scene, split: str, rng: random.Random, *, turns_per_record: int,
                  per_category: dict[str, int] | None) -> SceneRecords:
    """A scene's caption, its questions, and its records (every split draws a caption instruction,
    so a split's question stream does not depend on whether its captions are written)."""
    image = f"images/{scene.id}.png"
    caption_record = _llava(f"{scene.id}-cap", image, [(rng.choice(CAPTION_PROMPTS), caption(scene))])
    asked = questions(scene, rng, per_category=per_category)
    if split == "train":
        shuffled = list(asked)
        rng.shuffle(shuffled)
        starts = range(0, len(shuffled), turns_per_record)
        groups = [(f"{scene.id}-{k}", shuffled[i:i + turns_per_record]) for k, i in enumerate(starts)]
    else:
        groups = [(f"{scene.id}-{qa.category}", [qa]) for qa in asked]
    llava, messages = [], []
    for rid, group in groups:
        turns = [(qa.prompt(), qa.reply()) for qa in group]
        llava.append(_llava(rid, image, turns))
        messages.append(_messages(rid, image, turns))
    bench = [_bench_item(scene, image, qa) for qa in asked] if split == "test" else []
    return SceneRecords(image, asked, caption_record, llava, messages, bench)


def _llava(rid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{q}\n{IMAGE_PLACEHOLDER}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv}


def _messages(rid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    msgs = []
    for i, (q, a) in enumerate(turns):
        parts = [{"type": "text", "text": q}] + ([{"type": "image", "image": image}] if i == 0 else [])
        msgs.append({"role": "user", "content": parts})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return {"id": rid, "messages": msgs}


def _bench_item(scene: Scene, image: str, qa: QA) -> dict:
    item = {"id": f"{scene.id}-{qa.category}", "images": [image], "question": qa.question, "answer": qa.answer,
            "category": qa.category}
    if qa.choices:
        item["choices"] = qa.choices
    return item
