"""The synthetic world's small-text scenes (data/synth.py, data/world.py): large scenes with a
digit drawn too small to read at the default world's 48 px, drawn deterministically into disjoint
splits, answers balanced and read back from the pixels, the digit illegible once the scene is
shrunk, and the opt-in on disk: the default files untouched, their own QA and benchmark files,
settings and chance in world.json, and a world on disk with other small-text counts refused."""

import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.world_support import assert_default_files_unchanged, digest
from vlmkit.config import load_config
from vlmkit.data import synth
from vlmkit.data.formats import read_records
from vlmkit.data.synth import (CATEGORIES, COLORS, DIGITS, GLYPHS, GRID, IMAGE_SIZE, INK, SMALL_TEXT_CATEGORIES,
                               SMALL_TEXT_CELL_SIZE, SMALL_TEXT_GLYPH, answer_space, chance_accuracy, questions,
                               render, sample_small_text_scene, small_digit_box)
from vlmkit.data.types import Record
from vlmkit.data.world import WorldSpec, generate, prepare_world
from vlmkit.errors import ConfigError
from vlmkit.schema import build

SMALL = dict(n_train=40, n_val=10, n_test=20, text_corpus=False)
SMALL_TEXT = dict(n_train_small_text=30, n_val_small_text=5, n_test_small_text=20)
SCENE_SIDE = SMALL_TEXT_CELL_SIZE * GRID
LEGIBLE_HEIGHT = 3
"""Pixels of glyph height below which a 5x7 digit cannot be read."""


def scenes(n=400, seed=5):
    rng = random.Random(seed)
    return [sample_small_text_scene(rng, str(i)) for i in range(n)]


def read_digit(image: Image.Image, box: tuple[int, int, int, int]) -> str | None:
    """The digit whose 5x7 glyph the ink inside `box` is, sampled at each glyph cell's centre."""
    ink = (np.asarray(image.crop(box).convert("RGB")) == INK).all(axis=-1)
    h, w = ink.shape
    rows = [int((r + 0.5) * h / 7) for r in range(7)]
    cols = [int((c + 0.5) * w / 5) for c in range(5)]
    pattern = tuple("".join("#" if ink[r, c] else " " for c in cols) for r in rows)
    return next((d for d, glyph in GLYPHS.items() if glyph == pattern), None)


# ---------------------------------------------------------------------------------------------
# Content: scenes, answers, pixels
# ---------------------------------------------------------------------------------------------


def test_small_text_splits_are_disjoint_deterministic_and_test_does_not_depend_on_train():
    splits = synth.split_small_text_scenes(0, {"train": 300, "val": 50, "test": 100})
    signatures = {name: {s.signature() for s in drawn} for name, drawn in splits.items()}
    assert not signatures["train"] & signatures["test"] and not signatures["val"] & signatures["test"]
    assert not signatures["train"] & signatures["val"]
    bigger = synth.split_small_text_scenes(0, {"train": 600, "test": 100})
    assert [s.signature() for s in bigger["test"]] == [s.signature() for s in splits["test"]]
    assert splits["test"][0].id == "small_text_test_000000"
    assert synth.split_small_text_scenes(1, {"test": 5})["test"][0].signature() != splits["test"][0].signature()


def test_small_text_scenes_are_large_with_the_digit_in_a_free_cell():
    for scene in scenes(200):
        cell, digit = scene.small_digit.cell, scene.small_digit.digit
        assert digit in DIGITS and scene.digit is None and not scene.written()
        assert cell not in {o.cell for o in scene.objects} and 1 <= len(scene.objects) <= synth.MAX_OBJECTS
        assert render(scene).size == (SCENE_SIDE, SCENE_SIDE)


def test_the_digit_is_drawn_where_the_scene_says_and_reads_back_as_the_answer():
    rng = random.Random(2)
    for scene in scenes(100):
        image = render(scene)
        box = small_digit_box(scene.small_digit, scene.grid, SMALL_TEXT_CELL_SIZE)
        (qa,) = questions(scene, rng, SMALL_TEXT_CATEGORIES)
        assert qa.answer == scene.small_digit.digit == read_digit(image, box)
        # the glyph and its tile stay inside the digit's cell
        row, col = divmod(scene.small_digit.cell, GRID)
        left, top, right, bottom = box
        m = synth.SMALL_TEXT_MARGIN
        assert col * SMALL_TEXT_CELL_SIZE <= left - m and right + m <= (col + 1) * SMALL_TEXT_CELL_SIZE
        assert row * SMALL_TEXT_CELL_SIZE <= top - m and bottom + m <= (row + 1) * SMALL_TEXT_CELL_SIZE
        # no ink outside the glyph's box, and the shapes are drawn as any scene's
        ink = (np.asarray(image) == INK).all(axis=-1)
        assert ink.sum() == ink[top:bottom, left:right].sum() > 0
        for o in scene.objects:
            row, col = divmod(o.cell, GRID)
            centre = (round((col + 0.5) * SMALL_TEXT_CELL_SIZE), round((row + 0.55) * SMALL_TEXT_CELL_SIZE))
            assert image.getpixel(centre) == COLORS[o.color]


def test_the_digit_is_too_small_to_read_at_the_default_size_and_legible_at_full_size():
    scale = IMAGE_SIZE / SCENE_SIDE
    for scene in scenes(50):
        ink_rows = np.flatnonzero((np.asarray(render(scene)) == INK).all(axis=-1).any(axis=1))
        height = ink_rows[-1] - ink_rows[0] + 1
        assert height == SMALL_TEXT_GLYPH[1] >= 7  # every row of the 5x7 glyph has its own pixel
        assert height * scale < LEGIBLE_HEIGHT
    # shrunk to 48 px, two scenes that differ only in their digit differ by a few levels at most,
    # where at full size the glyphs differ in whole strokes
    base = scenes(1)[0]
    images = [render(replace(base, small_digit=replace(base.small_digit, digit=d))) for d in ("3", "8")]
    full = np.abs(np.asarray(images[0], dtype=int) - np.asarray(images[1], dtype=int)).max()
    small = [np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=int) for im in images]
    assert full > 200 and np.abs(small[0] - small[1]).max() < full / 2


def test_small_text_answers_are_balanced_and_every_default_category_but_ocr_is_asked():
    rng = random.Random(4)
    by_category: dict[str, Counter] = {}
    for scene in scenes(2000):
        for qa in questions(scene, rng, SMALL_TEXT_CATEGORIES + CATEGORIES):
            by_category.setdefault(qa.category, Counter())[qa.answer] += 1
    assert set(by_category) == set(SMALL_TEXT_CATEGORIES + CATEGORIES) - {"ocr"}
    counts = by_category["small_text"]
    assert set(counts) == set(answer_space("small_text")) and counts.total() == 2000
    assert min(counts.values()) / max(counts.values()) > 0.75
    assert chance_accuracy("small_text") == pytest.approx(1 / 10)


def test_a_question_only_baseline_stays_at_chance_on_small_text():
    """The best answer for each exact question text on train scenes, scored on test scenes."""
    rng = random.Random(6)
    splits = synth.split_small_text_scenes(0, {"train": 2000, "test": 500})
    asked = {split: [questions(s, rng, SMALL_TEXT_CATEGORIES)[0] for s in drawn] for split, drawn in splits.items()}
    best: dict[str, Counter] = {}
    for qa in asked["train"]:
        best.setdefault(qa.question, Counter())[qa.answer] += 1
    right = sum(best[qa.question].most_common(1)[0][0] == qa.answer for qa in asked["test"])
    assert right / len(asked["test"]) < chance_accuracy("small_text") + 0.05


def test_default_scenes_are_never_asked_small_text():
    rng = random.Random(3)
    assert not any(questions(synth.sample_scene(rng, str(i), 1.0), rng, SMALL_TEXT_CATEGORIES) for i in range(100))


# ---------------------------------------------------------------------------------------------
# On disk: opt-in, files, world.json, reuse
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("plain"), **SMALL)


@pytest.fixture(scope="module")
def with_small_text(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("small_text"), **SMALL, **SMALL_TEXT)


def test_small_text_scenes_leave_the_default_files_as_they_are(plain, with_small_text):
    meta, plain_meta = assert_default_files_unchanged(Path(plain["dir"]), Path(with_small_text["dir"]), 5)
    assert "small_text" not in plain_meta and "small_text" not in plain_meta["categories"]


def test_small_text_files_and_world_json(with_small_text):
    root = Path(with_small_text["dir"])
    meta = json.loads((root / "world.json").read_text())
    assert meta["small_text"] == {"image_size": SCENE_SIDE, "glyph": list(SMALL_TEXT_GLYPH)}
    assert meta["categories"]["small_text"] == {"answers": list(DIGITS), "chance": pytest.approx(0.1)}
    counts = meta["counts"]["small_text"]
    assert {split: counts[split]["scenes"] for split in counts} == {"train": 30, "val": 5, "test": 20}
    items = [json.loads(line) for line in open(with_small_text["test_small_text"])]
    assert len(items) == counts["test"]["records"] == sum(counts["test"]["questions"].values())
    assert counts["test"]["questions"]["small_text"] == 20
    for item in items:
        assert item["answer"] in answer_space(item["category"]) or "choices" in item
        image = Image.open(root / item["images"][0])
        assert image.size == (SCENE_SIDE, SCENE_SIDE)
    for key in ("qa_small_text_train", "qa_small_text_val", "qa_small_text_test", "qa_small_text_train_messages"):
        records = list(read_records(with_small_text[key]))
        assert records and all(isinstance(r, Record) for r in records), key


def test_the_small_text_benchmark_reads_with_the_eval_reader(with_small_text):
    benchmarks = pytest.importorskip("vlmkit.eval.benchmarks")
    bench = benchmarks.read_benchmark(with_small_text["test_small_text"])
    assert not bench.bad_rows and "small_text" in {item.category for item in bench.items}


def test_generate_with_small_text_is_deterministic(with_small_text, tmp_path):
    again = generate(tmp_path, **SMALL, **SMALL_TEXT)
    for key in ("qa_small_text_train", "test_small_text", "world"):
        assert digest(again[key]) == digest(with_small_text[key]), key
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == \
        sorted(p.name for p in (Path(with_small_text["dir"]) / "images").iterdir())


def test_bad_small_text_settings_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="small-text"):
        generate(tmp_path, **SMALL, n_val_small_text=-1)
    with pytest.raises(ConfigError, match="n_test_small_text"):
        WorldSpec(n_test_small_text=-2)


def spec_for(files, **small_text):
    """The run's world settings of a fixture's world (SMALL), with `small_text`'s counts."""
    return WorldSpec(dir=files["dir"], n_train=40, n_val=10, n_test=20, vocab_size=300, **small_text)


def test_world_spec_reads_the_small_text_counts():
    spec = build(WorldSpec, {"n_train_small_text": 500, "n_test_small_text": 50}, "world")
    assert spec.small_text_counts == {"train": 500, "val": 0, "test": 50}


def test_a_world_with_the_same_small_text_counts_is_reused_and_others_are_refused(with_small_text, plain):
    before = digest(with_small_text["world"])
    assert prepare_world(spec_for(with_small_text, **SMALL_TEXT), progress=False) == Path(with_small_text["dir"])
    assert digest(with_small_text["world"]) == before
    with pytest.raises(ConfigError, match=re.escape("n_train_small_text: 30 on disk, 0 in the config")):
        prepare_world(spec_for(with_small_text), progress=False)
    with pytest.raises(ConfigError, match=re.escape("n_test_small_text: 0 on disk, 3 in the config")):
        prepare_world(spec_for(plain, n_test_small_text=3), progress=False)


def test_the_study_configs_load_and_differ_only_in_the_vision_side():
    """docs/studies/hybrid-encoder's two arms: the same run but for the SAM branch (hybrid) or
    the MLP adapter (low resolution)."""
    root = Path(__file__).resolve().parent.parent / "docs" / "studies" / "hybrid-encoder"
    raw = {arm: yaml.safe_load((root / f"{arm}.yaml").read_text()) for arm in ("hybrid", "lowres")}
    for arm in raw:
        load_config(root / f"{arm}.yaml")
    assert raw["hybrid"]["model"]["config"].pop("high_res_vision")["image_size"] == SCENE_SIDE
    assert raw["lowres"]["model"]["config"].pop("adapter")["kind"] == "mlp"
    assert raw["hybrid"] == raw["lowres"]
    assert raw["hybrid"]["world"]["n_test_small_text"] > 0
