"""The synthetic world's reasoning categories (data/synth.py, data/world.py): reasoning scenes
drawn deterministically into disjoint splits, answers balanced and verifiably right (recomputed
here from the scene, and from the pixels for the digits), worked replies that state true facts,
and the opt-in on disk: the default files untouched, their own QA and benchmark files, records
mixed into the QA files on request, settings and chance in world.json, and a world on disk with
other reasoning settings refused."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.world_support import assert_default_files_unchanged, digest
from vlmkit.constants import IMAGE_PLACEHOLDER
from vlmkit.data import synth
from vlmkit.data.formats import read_records
from vlmkit.data.synth import (COLORS, DIRECTIONS, FIXED_GRID, MAX_ATTRIBUTE_COUNT, NATIVE_GRIDS, PLURALS,
                               REASONING_CATEGORIES, SHAPES, Grid, Scene, answer_space, chance_accuracy, questions,
                               render, sample_reasoning_scene)
from vlmkit.data.types import Record
from vlmkit.data.world import WorldSpec, generate, prepare_world, tokenizer_texts
from vlmkit.errors import ConfigError
from vlmkit.schema import build

SMALL = dict(n_train=60, n_val=20, n_test=30, text_corpus=False)
REASONING = dict(n_train_reasoning=40, n_val_reasoning=6, n_test_reasoning=30)
NAME = "(" + "|".join(COLORS) + ") (" + "|".join(SHAPES) + ")"


def reasoning_questions(layout="fixed", n=3000):
    rng = random.Random(11)
    scenes = [sample_reasoning_scene(rng, str(i), layout) for i in range(n)]
    return [(scene, qa) for scene in scenes for qa in questions(scene, rng, REASONING_CATEGORIES)]


# ---------------------------------------------------------------------------------------------
# Content: scenes, answers, replies, pixels
# ---------------------------------------------------------------------------------------------


def test_reasoning_splits_are_disjoint_deterministic_and_test_does_not_depend_on_train():
    splits = synth.split_reasoning_scenes(0, {"train": 300, "val": 50, "test": 100})
    signatures = {name: {s.signature() for s in scenes} for name, scenes in splits.items()}
    assert not signatures["train"] & signatures["test"] and not signatures["val"] & signatures["test"]
    assert not signatures["train"] & signatures["val"]
    bigger = synth.split_reasoning_scenes(0, {"train": 600, "test": 100})
    assert [s.signature() for s in bigger["test"]] == [s.signature() for s in splits["test"]]
    assert splits["test"][0].id == "reasoning_test_000000"
    assert synth.split_reasoning_scenes(1, {"test": 5})["test"][0].signature() != splits["test"][0].signature()


@pytest.mark.parametrize("layout", ["fixed", "native"])
def test_reasoning_answers_are_balanced_and_every_category_is_asked(layout):
    by_category = {}
    for _, qa in reasoning_questions(layout):
        by_category.setdefault(qa.category, Counter())[qa.answer] += 1
    assert set(by_category) == set(REASONING_CATEGORIES)
    for category, counts in by_category.items():
        assert set(counts) == set(answer_space(category)), category
        assert min(counts.values()) / max(counts.values()) > 0.5, (category, counts)
    # a chained relation is not always there; the other two are asked of every scene
    assert by_category["arithmetic"].total() == by_category["count_attribute"].total() == 3000
    assert by_category["chained_relation"].total() > 1500


def test_chance_of_the_reasoning_categories():
    assert chance_accuracy("arithmetic") == pytest.approx(1 / 19)
    assert chance_accuracy("count_attribute") == pytest.approx(1 / (MAX_ATTRIBUTE_COUNT + 1))
    assert chance_accuracy("chained_relation") == pytest.approx(1 / 24)
    assert synth.layout_chance("arithmetic", "native") == pytest.approx(1 / 19)


def line_of(grid: Grid, words: str) -> list[int]:
    """The cells of "the top row" / "row 2" / "the left column" / "column 3"."""
    if m := re.fullmatch(r"(row|column) (\d)", words):
        axis, index = m[1], int(m[2]) - 1
    else:
        m = re.fullmatch(r"the (\w+) (row|column)", words)
        axis = m[2]
        index = ["top", "middle", "bottom"].index(m[1]) if axis == "row" else ["left", "middle", "right"].index(m[1])
    size = grid.cols if axis == "row" else grid.rows
    return [index * grid.cols + k if axis == "row" else k * grid.cols + index for k in range(size)]


def cell_of(grid: Grid, place: str) -> int:
    return grid.positions().index(place.removeprefix("the "))


def step(scene: Scene, cell: int, phrase: str) -> int | None:
    [(dr, dc)] = [(dr, dc) for dr, dc, words in DIRECTIONS.values() if words == phrase]
    row, col = divmod(cell, scene.grid.cols)
    r, c = row + dr, col + dc
    return r * scene.grid.cols + c if 0 <= r < scene.grid.rows and 0 <= c < scene.grid.cols else None


@pytest.mark.parametrize("layout", ["fixed", "native"])
def test_reasoning_answers_are_right_and_worked_replies_state_true_facts(layout):
    """Each answer recomputed from the scene by reading the question's own words; each worked
    reply's facts checked against the scene, then its conclusion against the answer."""
    place = r"(the [a-z ]+?|row \d, column \d)"
    for scene, qa in reasoning_questions(layout, 1500):
        grid, written = scene.grid, scene.written()
        facts, _, final = qa.reply().rpartition(" Answer: ")
        assert final == qa.answer and not qa.choices
        if qa.category == "arithmetic":
            m = re.fullmatch(r"What (?:is the sum of the numbers in (.+)|do the numbers in (.+) add up to)\?",
                             qa.question)
            cells = line_of(grid, m[1] or m[2])
            digits = [written[c] for c in cells if c in written]
            assert len(digits) == 2 and qa.answer == str(int(digits[0]) + int(digits[1]))
            # the asked line is the only one holding two digits, so "the numbers in it" are those two
            assert sum(sum(c in written for c in grid.line_cells(*line)) == 2 for line in grid.lines()) == 1
            a, b = digits
            f = re.fullmatch(rf"(?:The|Row|Column) [^:]+: {place} holds {a}, {place} holds {b}\. "
                             rf"{a} \+ {b} = {qa.answer}\.", facts)
            assert f, facts
            assert [cell_of(grid, f[1]), cell_of(grid, f[2])] == [c for c in cells if c in written]
        elif qa.category == "count_attribute":
            m = re.fullmatch(r"How many (?:(\w+) shapes|(\w+)) are (?:there|in the image)\?", qa.question)
            if m[1]:
                matching = [o for o in scene.objects if o.color == m[1]]
                noun = f"{m[1]} shapes"
            else:
                [shape] = [s for s, plural in PLURALS.items() if plural == m[2]]
                matching = [o for o in scene.objects if o.shape == shape]
                noun = m[2]
            assert qa.answer == str(len(matching))
            listed = facts.removeprefix(f"{noun[0].upper()}{noun[1:]}: ").removesuffix(".")
            assert listed == ("none" if not matching else "; ".join(grid.place(o.cell) for o in matching))
        else:
            m = re.fullmatch(rf"What is (directly .+?) the shape (directly .+?) the {NAME}\?", qa.question)
            [ref] = [o for o in scene.objects if (o.color, o.shape) == (m[3], m[4])]
            middle = scene.at(step(scene, ref.cell, m[2]))
            end = scene.at(step(scene, middle.cell, m[1]))
            assert end.cell != ref.cell and qa.answer == end.name
            f = re.fullmatch(rf"The {NAME} is in {place}\. (\w+)(?: of)? it is {place}\. "
                             rf"(\w+)(?: of)? that, in {place}, is an? {NAME}\.", facts)
            assert f, facts
            assert (f[1], f[2]) == (ref.color, ref.shape) and cell_of(grid, f[3]) == ref.cell
            assert DIRECTIONS[f[4].lower()][2] == m[2] and cell_of(grid, f[5]) == middle.cell
            assert DIRECTIONS[f[6].lower()][2] == m[1] and cell_of(grid, f[7]) == end.cell
            assert f"{f[8]} {f[9]}" == end.name


def test_reasoning_scenes_have_the_promised_layout():
    rng = random.Random(5)
    for i in range(500):
        scene = sample_reasoning_scene(rng, str(i), "native" if i % 2 else "fixed")
        grid, written = scene.grid, scene.written()
        assert scene.grid == FIXED_GRID if i % 2 == 0 else scene.grid in NATIVE_GRIDS
        occupied = [o.cell for o in scene.objects] + list(written)
        assert len(set(occupied)) == len(occupied)  # one thing a cell
        assert synth.MIN_REASONING_SHAPES <= len(scene.objects) <= synth.MAX_OBJECTS
        # a 3x3 scene always has a third digit; a smaller grid, only where it leaves room for the
        # counted shapes and a cell apart from the two exists
        assert len(written) == 3 if grid == FIXED_GRID else len(written) in (2, 3)
        assert grid.cells - len(written) >= MAX_ATTRIBUTE_COUNT
        assert scene.counted[0] in ("color", "shape")


def test_reasoning_scenes_draw_every_digit_where_the_scene_says():
    """A digit cell of a reasoning scene is pixel for pixel that digit alone in that cell."""
    rng = random.Random(9)
    for i in range(40):
        scene = sample_reasoning_scene(rng, str(i))
        image = render(scene, 48)
        for cell, digit in scene.written().items():
            alone = render(Scene("alone", [], digit, cell), 48)
            row, col = divmod(cell, 3)
            box = (col * 16, row * 16, col * 16 + 16, row * 16 + 16)
            assert image.crop(box).tobytes() == alone.crop(box).tobytes()
        for o in scene.objects:
            row, col = divmod(o.cell, 3)
            assert image.getpixel((col * 16 + 8, row * 16 + 9)) == COLORS[o.color]


def test_default_scenes_are_never_asked_reasoning_questions():
    rng = random.Random(3)
    scenes = [synth.sample_scene(rng, str(i), 1.0) for i in range(200)]
    assert not any(questions(s, rng, ("arithmetic", "count_attribute")) for s in scenes)


# ---------------------------------------------------------------------------------------------
# On disk: opt-in, files, world.json, reuse
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("plain"), **SMALL)


@pytest.fixture(scope="module")
def apart(tmp_path_factory):
    """Reasoning scenes in their own files only."""
    return generate(tmp_path_factory.mktemp("apart"), **SMALL, **REASONING)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Reasoning scenes in their own files and mixed into the QA files."""
    return generate(tmp_path_factory.mktemp("mixed"), **SMALL, **REASONING, reasoning_in_qa=True)


def test_reasoning_scenes_leave_the_default_files_as_they_are(plain, apart):
    meta, plain_meta = assert_default_files_unchanged(Path(plain["dir"]), Path(apart["dir"]), 7)
    assert {k: v for k, v in meta.items() if k != "reasoning"} != plain_meta  # counts, categories, files grow


def test_reasoning_files_and_world_json(apart):
    root = Path(apart["dir"])
    meta = json.loads((root / "world.json").read_text())
    assert meta["reasoning"] == {"categories": list(REASONING_CATEGORIES), "in_qa": False}
    for category in REASONING_CATEGORIES:
        assert meta["categories"][category] == {"answers": answer_space(category),
                                                "chance": pytest.approx(chance_accuracy(category))}
    counts = meta["counts"]["reasoning"]
    assert {split: counts[split]["scenes"] for split in counts} == {"train": 40, "val": 6, "test": 30}
    items = [json.loads(line) for line in open(apart["test_reasoning"])]
    assert len(items) == counts["test"]["records"] == sum(counts["test"]["questions"].values())
    assert {i["category"] for i in items} == set(REASONING_CATEGORIES)
    for item in items:
        assert set(item) == {"id", "images", "question", "answer", "category"}
        assert item["answer"] in answer_space(item["category"]) and (root / item["images"][0]).is_file()
    assert {k: str(root / v) for k, v in meta["files"].items()} == {k: apart[k] for k in meta["files"]}
    for key in ("qa_reasoning_train", "qa_reasoning_val", "qa_reasoning_test", "qa_reasoning_train_messages"):
        records = list(read_records(apart[key]))
        assert records and all(isinstance(r, Record) for r in records), key
    train = json.loads(Path(apart["qa_reasoning_train"]).read_text())
    assert sum(len(r["conversations"]) // 2 for r in train) == sum(counts["train"]["questions"].values())
    assert len(train) == 40  # up to turns_per_record (8) questions about one image a record


def test_the_reasoning_benchmark_reads_with_the_eval_reader(apart):
    benchmarks = pytest.importorskip("vlmkit.eval.benchmarks")
    bench = benchmarks.read_benchmark(apart["test_reasoning"])
    assert not bench.bad_rows and {item.kind for item in bench.items} == {"open"}
    assert {item.category for item in bench.items} == set(REASONING_CATEGORIES)


def test_reasoning_in_qa_spreads_the_records_through_the_qa_files(plain, apart, mixed):
    for split in ("train", "val", "test"):
        base = json.loads((Path(plain["dir"]) / f"qa_{split}.json").read_text())
        extra = json.loads((Path(apart["dir"]) / f"qa_reasoning_{split}.json").read_text())
        both = json.loads((Path(mixed["dir"]) / f"qa_{split}.json").read_text())
        assert [r for r in both if not r["id"].startswith("reasoning_")] == base
        placed = [i for i, r in enumerate(both) if r["id"].startswith("reasoning_")]
        assert [both[i] for i in placed] == extra
        assert placed[0] < len(both) / 4 and placed[-1] > 3 * len(both) / 4, split  # spread, not appended
        messages = [json.loads(line)["id"] for line in open(Path(mixed["dir"]) / f"qa_{split}.jsonl")]
        assert messages == [r["id"] for r in both]
    lines = {name: open(path).read().splitlines() for name, path in
             (("mixed", mixed["test"]), ("plain", plain["test"]), ("reasoning", apart["test_reasoning"]))}
    assert sorted(lines["mixed"]) == sorted(lines["plain"] + lines["reasoning"])
    assert digest(mixed["test_reasoning"]) == digest(apart["test_reasoning"])
    assert digest(Path(mixed["dir"]) / "captions_train.json") == digest(Path(plain["dir"]) / "captions_train.json")
    assert json.loads((Path(mixed["dir"]) / "world.json").read_text())["reasoning"]["in_qa"] is True


def test_reasoning_apart_leaves_the_tokenizer_texts_as_they_were(plain, apart, mixed):
    """Apart, the world trains the tokenizer of the world without them (a model trained there
    keeps its ids); mixed into the QA files, their turns are read once, with the QA."""
    assert list(tokenizer_texts(apart["dir"])) == list(tokenizer_texts(plain["dir"]))
    texts = Counter(tokenizer_texts(mixed["dir"]))
    records = json.loads(Path(mixed["qa_reasoning_train"]).read_text())
    turns = Counter(t["value"].replace(IMAGE_PLACEHOLDER, "") for r in records for t in r["conversations"])
    assert all(texts[turn] == n for turn, n in turns.items() if turn.startswith("The "))  # replies, once each


def test_generate_with_reasoning_is_deterministic(mixed, tmp_path):
    again = generate(tmp_path, **SMALL, **REASONING, reasoning_in_qa=True)
    for name in ("qa_train.json", "synth.jsonl", "qa_reasoning_train.json", "synth_reasoning.jsonl", "world.json"):
        assert digest(Path(mixed["dir"]) / name) == digest(Path(again["dir"]) / name), name
    for image in sorted((Path(mixed["dir"]) / "images").glob("reasoning_*"))[::5]:
        assert digest(image) == digest(Path(again["dir"]) / "images" / image.name)


def test_bad_reasoning_settings_fail_clearly(tmp_path):
    for bad in (dict(n_train_reasoning=-1), dict(reasoning_categories=["sum"]), dict(reasoning_categories=[]),
                dict(reasoning_categories=["arithmetic", "arithmetic"])):
        with pytest.raises(ConfigError, match="reasoning"):
            generate(tmp_path, **SMALL, **bad)
    with pytest.raises(ConfigError, match="reasoning_categories"):
        build(WorldSpec, {"reasoning_categories": ["relation"]}, "world")
    with pytest.raises(ConfigError, match="n_test_reasoning"):
        WorldSpec(n_test_reasoning=-2)


def test_world_spec_reads_the_reasoning_settings():
    spec = build(WorldSpec, {"n_train_reasoning": 500, "n_test_reasoning": 50,
                             "reasoning_categories": ["arithmetic"], "reasoning_in_qa": True}, "world")
    assert spec.reasoning_counts == {"train": 500, "val": 0, "test": 50}
    assert spec.reasoning_categories == ["arithmetic"] and spec.reasoning_in_qa
    assert WorldSpec().reasoning_categories == list(REASONING_CATEGORIES) and not WorldSpec().reasoning_in_qa


def spec_for(files, **reasoning):
    """The run's world settings of a fixture's world (SMALL), with `reasoning`'s settings."""
    return WorldSpec(dir=files["dir"], n_train=60, n_val=20, n_test=30, vocab_size=300, **reasoning)


def test_a_world_with_the_same_reasoning_settings_is_reused(apart):
    before = digest(apart["world"])
    assert prepare_world(spec_for(apart, **REASONING), progress=False) == Path(apart["dir"])
    assert digest(apart["world"]) == before


@pytest.mark.parametrize("change, message", [
    (dict(n_train_reasoning=0, n_test_reasoning=0), "n_train_reasoning: 40 on disk, 0 in the config"),
    (dict(REASONING, reasoning_in_qa=True), "reasoning_in_qa: False on disk, True in the config"),
    (dict(REASONING, reasoning_categories=["arithmetic"]),
     "reasoning_categories: ['arithmetic', 'count_attribute', 'chained_relation'] on disk, ['arithmetic']"),
])
def test_a_world_with_other_reasoning_settings_is_refused(apart, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare_world(spec_for(apart, **change), progress=False)


def test_a_world_without_reasoning_scenes_is_refused_for_a_spec_with_them(plain):
    with pytest.raises(ConfigError) as err:
        prepare_world(spec_for(plain, n_test_reasoning=3), progress=False)
    assert "n_test_reasoning: 0 on disk, 3 in the config" in str(err.value)
    assert "reasoning_categories: None on disk" in str(err.value)
