"""The synthetic world's content: disjoint splits, every category present with balanced answers,
questions answerable and unambiguous, worked replies, pixels where the scene says, a scene's
records. The world on disk is tests/test_world.py."""

import random
import re
from collections import Counter

import pytest

from vlmkit.constants import IMAGE_PLACEHOLDER
from vlmkit.data import synth
from vlmkit.data.synth import (CATEGORIES, COLORS, DIRECTIONS, GRID, LETTERS, POSITIONS, SHAPES, answer_space,
                               chance_accuracy, questions, render, sample_scene, scene_records, split_records)


def test_splits_are_disjoint_and_test_does_not_depend_on_train():
    splits = synth.split_scenes(0, {"train": 400, "val": 100, "test": 200}, 0.35)
    signatures = {name: {s.signature() for s in scenes} for name, scenes in splits.items()}
    assert not signatures["train"] & signatures["test"]
    assert not signatures["train"] & signatures["val"] and not signatures["val"] & signatures["test"]
    bigger = synth.split_scenes(0, {"train": 900, "val": 100, "test": 200}, 0.35)
    assert [s.signature() for s in bigger["test"]] == [s.signature() for s in splits["test"]]


def many_questions(n=3000):
    rng = random.Random(7)
    scenes = [sample_scene(rng, str(i), 0.35) for i in range(n)]
    return scenes, [(scene, qa) for scene in scenes for qa in questions(scene, rng)]


def test_answers_are_balanced_per_category():
    _, qas = many_questions()
    by_category = {}
    for _, qa in qas:
        by_category.setdefault(qa.category, Counter())[qa.answer] += 1
    assert set(by_category) == set(CATEGORIES)
    for category, counts in by_category.items():
        assert set(counts) == set(answer_space(category)), category
        assert min(counts.values()) / max(counts.values()) > 0.5, (category, counts)
    yes = by_category["existence"]["yes"] / sum(by_category["existence"].values())
    assert 0.45 < yes < 0.55


def test_worked_replies_state_true_facts_then_the_answer():
    """Relation and multiple-choice replies find the reference, name the cell, then answer; the
    facts are true of the scene, and every other category answers in a word."""
    scenes, qas = many_questions(1500)
    name = "(" + "|".join(COLORS) + ") (" + "|".join(SHAPES) + ")"
    place = "(" + "|".join(POSITIONS) + ")"
    seen = Counter()
    for scene, qa in qas:
        reply = qa.reply()
        if qa.category not in synth.WORKED:
            assert reply == qa.answer
            continue
        facts, _, final = reply.rpartition(" Answer: ")
        # a multiple-choice reply concludes with the right option's text
        assert final == (qa.choices[LETTERS.index(qa.answer)] if qa.choices else qa.answer)
        assert facts.endswith(".")
        if m := re.fullmatch(rf"The {name} is in the {place}\. (Left of it|Right of it|Above it|Below it), "
                             rf"in the {place}, is an? {name}\.", facts):
            [ref] = [o for o in scene.objects if (o.color, o.shape) == (m[1], m[2])]
            assert POSITIONS[ref.cell] == m[3]
            direction = m[4].split()[0].lower()
            dr, dc, _ = DIRECTIONS[direction]
            row, col = divmod(ref.cell, GRID)
            other = scene.at((row + dr) * GRID + col + dc)
            assert POSITIONS[other.cell] == m[5] and other.name == f"{m[6]} {m[7]}"
            assert qa.answer == other.name or qa.choices[LETTERS.index(qa.answer)] == other.name
            seen["relation"] += 1
        elif m := re.fullmatch(rf"The {name} is in the {place}\.", facts):
            [o] = [o for o in scene.objects if (o.color, o.shape) == (m[1], m[2])]
            assert POSITIONS[o.cell] == m[3] == qa.choices[LETTERS.index(qa.answer)]
            seen["position"] += 1
        elif m := re.fullmatch(rf"(The (\w+)|The shape in the {place}) is (\w+)\.", facts):
            o = scene.at(POSITIONS.index(m[3])) if m[3] else next(o for o in scene.objects if o.shape == m[2])
            assert o.color == m[4] == qa.choices[LETTERS.index(qa.answer)]
            seen["color"] += 1
        else:
            m = re.fullmatch(rf"(The (\w+) object|In the {place}) is a (\w+)\.", facts)
            assert m, facts
            o = scene.at(POSITIONS.index(m[3])) if m[3] else next(o for o in scene.objects if o.color == m[2])
            assert o.shape == m[4] == qa.choices[LETTERS.index(qa.answer)]
            seen["shape"] += 1
    assert min(seen.values()) > 50 and len(seen) == 4, seen


def test_questions_have_unique_correct_answers():
    scenes, qas = many_questions(1500)
    name = "(" + "|".join(COLORS) + ") (" + "|".join(SHAPES) + ")"
    for scene, qa in qas:
        objs = scene.objects
        q = qa.question
        if m := re.fullmatch(r"What color is the (\w+)\?", q):
            [o] = [o for o in objs if o.shape == m[1]]
            assert qa.answer == o.color or qa.category == "multiple_choice"
        elif m := re.fullmatch(r"What color is the shape in the (.+)\?", q):
            assert scene.at(POSITIONS.index(m[1])).color in (qa.answer, *qa.choices)
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
            [o] = [o for o in objs if o.color == m[1]]
            assert o.shape in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"Where is the {name}\?", q):
            [o] = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
            assert POSITIONS[o.cell] in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"What is (directly .+?) the {name}\?", q):
            [o] = [o for o in objs if (o.color, o.shape) == (m[2], m[3])]
            [(dr, dc)] = [(dr, dc) for dr, dc, phrase in DIRECTIONS.values() if phrase == m[1]]
            row, col = divmod(o.cell, GRID)
            other = scene.at((row + dr) * GRID + col + dc)
            assert 0 <= row + dr < GRID and 0 <= col + dc < GRID and other is not None
            assert other.name in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"Is there an? {name}( in the image)?\?", q):
            present = any((o.color, o.shape) == (m[1], m[2]) for o in objs)
            assert qa.answer == ("yes" if present else "no")
        elif qa.category == "count":
            assert qa.answer == str(len(objs))
        elif qa.category == "ocr":
            assert qa.answer == scene.digit
        else:
            assert re.fullmatch(r"What shape is in the (.+)\?", q), q
        if qa.category == "multiple_choice":
            assert len(set(qa.choices)) == 4 and qa.prompt().endswith(f"D. {qa.choices[3]}")
            assert not any(choice in q for choice in qa.choices)  # nothing a blind model could rule out
        else:
            assert not qa.choices and qa.prompt() == q


def test_render_puts_each_object_in_its_cell():
    rng = random.Random(3)
    for i in range(50):
        scene = sample_scene(rng, str(i), 0.5)
        image = render(scene, 48)
        assert image.size == (48, 48) and image.mode == "RGB"
        for cell in range(GRID * GRID):
            row, col = divmod(cell, GRID)
            box = image.crop((col * 16, row * 16, col * 16 + 16, row * 16 + 16))
            colors = {c for _, c in box.getcolors(256)}
            obj = scene.at(cell)
            if obj is not None:
                assert box.getpixel((8, 9)) == COLORS[obj.color]
                assert colors <= {synth.BACKGROUND, COLORS[obj.color]}
            elif cell == scene.digit_cell:
                assert synth.TILE in colors and synth.INK in colors
            else:
                assert colors == {synth.BACKGROUND}


def test_chance_accuracy():
    assert chance_accuracy("existence") == 0.5 and chance_accuracy("multiple_choice") == 0.25
    assert chance_accuracy("relation") == pytest.approx(1 / 24)
    with pytest.raises(KeyError, match="unknown category"):
        chance_accuracy("size")


def test_train_questions_ask_more_of_a_category_without_repeats():
    rng = random.Random(0)
    scenes = [sample_scene(rng, f"s{i}", 0.35) for i in range(300)]
    more = {"color": 3, "relation": 2, "count": 0}
    for scene in scenes:
        asked = questions(scene, random.Random(scene.id), per_category=more)
        by_cat = Counter(qa.category for qa in asked)
        assert by_cat["count"] == 0 and by_cat["color"] <= 3 and by_cat["relation"] <= 2
        assert by_cat["shape"] == 1  # categories not named keep one question
        assert len({qa.question for qa in asked}) == len(asked)
    total = Counter(qa.category for s in scenes for qa in questions(s, random.Random(s.id), per_category=more))
    assert total["color"] > 2.5 * len(scenes)  # nearly every scene has three distinct colour questions


def test_scene_records_group_train_questions_and_keep_one_question_elsewhere():
    scene = next(s for s in synth.split_scenes(0, {"train": 50}, 0.35)["train"] if len(s.objects) >= 4)
    train = scene_records(scene, "train", random.Random(1), turns_per_record=3, per_category={"color": 3})
    assert train.image == f"images/{scene.id}.png" and not train.bench
    assert [len(r["conversations"]) // 2 for r in train.llava][:-1] == [3] * (len(train.llava) - 1)
    assert sum(len(r["conversations"]) // 2 for r in train.llava) == len(train.asked)
    for llava, messages in zip(train.llava, train.messages):
        assert llava["id"] == messages["id"] and llava["image"] == train.image
        assert sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in llava["conversations"]) == 1
        assert [m["content"][0]["text"] for m in messages["messages"]] == [t["value"].replace(
            "\n" + IMAGE_PLACEHOLDER, "") for t in llava["conversations"]]
    test = scene_records(scene, "test", random.Random(1), turns_per_record=3, per_category=None)
    assert [r["id"] for r in test.llava] == [f"{scene.id}-{qa.category}" for qa in test.asked]
    assert [item["id"] for item in test.bench] == [r["id"] for r in test.llava]
    assert all(item["images"] == [test.image] for item in test.bench)


def test_split_records_ask_more_in_train_only():
    scenes = synth.split_scenes(0, {"train": 40, "val": 40}, 0.35)
    more = {"color": 3}
    for split in ("train", "val"):
        records = list(split_records(0, split, scenes[split], turns_per_record=8, train_questions=more))
        colors = sum(qa.category == "color" for r in records for qa in r.asked)
        assert (colors > 2 * len(records)) == (split == "train"), split

