"""The synthetic world's content: disjoint splits, every category present with balanced answers,
questions answerable and unambiguous, worked replies, pixels where the scene says, a scene's
records. The world on disk is tests/test_world.py."""

import hashlib
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
        assert [m["content"][-1]["text"] for m in messages["messages"]] == [t["value"].replace(
            IMAGE_PLACEHOLDER + "\n", "") for t in llava["conversations"]]
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



def test_the_fixed_world_is_unchanged():
    """The demo's numbers rest on the fixed world: its first test scene, records and pixels as
    they were before native scenes and clips existed, asked question first as then (the whole
    files: tests/test_world.py); the default layout shows the image first."""
    scene = synth.split_scenes(0, {"test": 1}, 0.35)["test"][0]
    records = scene_records(scene, "test", random.Random(0), turns_per_record=8, per_category=None,
                            prompt_layout="text-then-image")
    assert records.caption["conversations"][1]["value"] == (
        "Three shapes: a small red cross in the top right, a small blue cross in the bottom left and a large "
        "blue circle in the bottom middle.")
    question = {"type": "text", "text": "What color is the shape in the bottom left?"}
    image = {"type": "image", "image": "images/test_000000.png"}
    assert records.messages[0] == {"id": "test_000000-color", "messages": [
        {"role": "user", "content": [question, image]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}
    assert records.llava[0]["conversations"][0]["value"] == question["text"] + "\n" + IMAGE_PLACEHOLDER
    image_first = scene_records(scene, "test", random.Random(0), turns_per_record=8, per_category=None)
    assert image_first.messages[0]["messages"][0]["content"] == [image, question]
    assert image_first.llava[0]["conversations"][0]["value"] == IMAGE_PLACEHOLDER + "\n" + question["text"]
    assert image_first.caption["conversations"][0]["value"].startswith(IMAGE_PLACEHOLDER + "\n")
    assert hashlib.sha256(render(scene).tobytes()).hexdigest() == (
        "6757dc182c0676b44aee4bffa2bd5e8dcd1d935e20005c22fa858400a7132486")


# ---------------------------------------------------------------------------------------------
# Native layout: grids of several shapes and cell sizes
# ---------------------------------------------------------------------------------------------

CELL = re.compile(r"row (\d), column (\d)")


def native_questions(n=3000):
    rng = random.Random(11)
    scenes = [synth.sample_native_scene(rng, str(i), 0.35) for i in range(n)]
    return scenes, [(scene, qa) for scene in scenes for qa in questions(scene, rng)]


def cell_of(grid, text):
    """The cell a "row R, column C" names, checked to be on the grid."""
    row, col = (int(x) - 1 for x in CELL.fullmatch(text).groups())
    assert 0 <= row < grid.rows and 0 <= col < grid.cols, (grid, text)
    return row * grid.cols + col


def test_native_scenes_cover_every_grid_and_cell_size_deterministically():
    scenes = synth.split_scenes(4, {"train": 300, "test": 100}, 0.35, layout="native")
    again = synth.split_scenes(4, {"train": 300, "test": 100}, 0.35, layout="native")
    assert [s.signature() for s in scenes["train"]] == [s.signature() for s in again["train"]]
    assert not {s.signature() for s in scenes["train"]} & {s.signature() for s in scenes["test"]}
    train = scenes["train"]
    assert {s.grid for s in train} == set(synth.NATIVE_GRIDS)
    assert {s.cell_size for s in train} == set(synth.NATIVE_CELL_SIZES)
    assert {len(s.objects) for s in train} == set(range(1, synth.MAX_OBJECTS + 1))
    for s in train:
        assert len({o.cell for o in s.objects} | {s.digit_cell} - {None}) == len(s.objects) + (s.digit is not None)
        assert all(0 <= o.cell < s.grid.cells for o in s.objects)
    sizes = {render(s).size for s in train}
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)


def test_native_render_puts_each_object_in_its_cell():
    rng = random.Random(5)
    for i in range(60):
        scene = synth.sample_native_scene(rng, str(i), 0.5)
        image, grid, cell = render(scene), scene.grid, scene.cell_size
        assert image.size == (grid.cols * cell, grid.rows * cell)
        for index in range(grid.cells):
            row, col = divmod(index, grid.cols)
            box = image.crop((col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))
            colors = {c for _, c in box.getcolors(cell * cell)}
            obj = scene.at(index)
            if obj is not None:
                assert box.getpixel((cell // 2, cell // 2 + 1)) == COLORS[obj.color]
                assert colors <= {synth.BACKGROUND, COLORS[obj.color]}
            elif index == scene.digit_cell:
                assert synth.TILE in colors and synth.INK in colors
            else:
                assert colors == {synth.BACKGROUND}


def test_native_questions_have_unique_correct_answers_on_their_grid():
    scenes, qas = native_questions(1500)
    name = "(" + "|".join(COLORS) + ") (" + "|".join(SHAPES) + ")"
    place = r"(row \d, column \d)"
    for scene, qa in qas:
        grid, objs, q = scene.grid, scene.objects, qa.question
        assert "the top" not in q and "middle" not in q and "center" not in q  # numbers on every grid
        if m := re.fullmatch(r"What color is the (\w+)\?", q):
            [o] = [o for o in objs if o.shape == m[1]]
            assert o.color in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"What color is the shape in {place}\?", q):
            assert scene.at(cell_of(grid, m[1])).color in (qa.answer, *qa.choices)
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
            [o] = [o for o in objs if o.color == m[1]]
            assert o.shape in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"What shape is in {place}\?", q):
            assert scene.at(cell_of(grid, m[1])).shape in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"Where is the {name}\?", q):
            [o] = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
            right = qa.answer if not qa.choices else qa.choices[LETTERS.index(qa.answer)]
            assert cell_of(grid, right) == o.cell
            assert all(c in grid.positions() for c in qa.choices)  # options are cells of this grid
        elif m := re.fullmatch(rf"What is (directly .+?) the {name}\?", q):
            [o] = [o for o in objs if (o.color, o.shape) == (m[2], m[3])]
            [direction] = [d for d, (_, _, phrase) in DIRECTIONS.items() if phrase == m[1]]
            other = scene.at(grid.neighbour(o.cell, direction))
            assert other.name in (qa.answer, *qa.choices)
        elif m := re.fullmatch(rf"Is there an? {name}( in the image)?\?", q):
            assert qa.answer == ("yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no")
        elif qa.category == "count":
            assert qa.answer == str(len(objs))
        else:
            assert qa.category == "ocr" and qa.answer == scene.digit, q
        if qa.category == "multiple_choice":
            assert len(set(qa.choices)) == 4 and not any(choice in q for choice in qa.choices)
        else:
            assert qa.answer in answer_space(qa.category, grid)


def test_native_answers_are_balanced_per_category_and_grid():
    _, qas = native_questions()
    by_category = {}
    for scene, qa in qas:
        key = (qa.category, scene.grid.name) if qa.category == "position" else qa.category
        by_category.setdefault(key, Counter())[qa.answer] += 1
    for key, counts in by_category.items():
        grid = synth.Grid(*map(int, key[1].split("x"))) if isinstance(key, tuple) else synth.FIXED_GRID
        assert set(counts) == set(answer_space(key[0] if isinstance(key, tuple) else key, grid)), key
        assert min(counts.values()) / max(counts.values()) > 0.4, (key, counts)


def test_chance_is_computed_for_the_grid_asked():
    wide = synth.Grid(3, 4)
    assert chance_accuracy("position", wide) == pytest.approx(1 / 12)
    assert chance_accuracy("position") == pytest.approx(1 / 9) and chance_accuracy("color", wide) == 1 / 6
    assert answer_space("position", synth.Grid(2, 3))[-1] == "row 2, column 3"
    assert synth.layout_chance("position", "fixed") == chance_accuracy("position")
    mean = sum(1 / g.cells for g in synth.NATIVE_GRIDS) / len(synth.NATIVE_GRIDS)
    assert synth.layout_chance("position", "native") == pytest.approx(mean)
    assert chance_accuracy("motion_which") == pytest.approx(1 / 24)
    assert chance_accuracy("motion_where", wide) == pytest.approx(1 / 12)


# ---------------------------------------------------------------------------------------------
# Clips: shapes that move
# ---------------------------------------------------------------------------------------------


def many_clips(layout, n=2000):
    rng = random.Random(13)
    return [synth.sample_clip(rng, f"c{i}", 0.35, layout) for i in range(n)]


def changed_cells(before, after, grid, cell):
    """Cells whose pixels differ between two rendered frames."""
    out = []
    for index in range(grid.cells):
        row, col = divmod(index, grid.cols)
        box = (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)
        if before.crop(box).tobytes() != after.crop(box).tobytes():
            out.append(index)
    return out


def test_clip_frames_show_each_move_and_nothing_else():
    for clip in many_clips("native", 150):
        grid, cell = clip.scene.grid, clip.scene.cell_size
        frames = [render(clip.frame(t)) for t in range(clip.n_frames)]
        assert clip.n_frames in synth.CLIP_FRAMES and 1 <= len(clip.moves) <= synth.MAX_MOVERS
        assert len({m.frame for m in clip.moves}) == len(clip.moves)  # never two at once
        moves_at = {m.frame: m for m in clip.moves}
        for t in range(1, clip.n_frames):
            changed = changed_cells(frames[t - 1], frames[t], grid, cell)
            if t in moves_at:
                move = moves_at[t]
                assert sorted(changed) == sorted((move.start, move.end))
                mover = clip.mover(move)
                assert frames[t - 1].getpixel(((move.start % grid.cols + 0.5) * cell,
                                               (move.start // grid.cols + 0.5) * cell + 1)) == COLORS[mover.color]
                assert frames[t].getpixel(((move.end % grid.cols + 0.5) * cell,
                                           (move.end // grid.cols + 0.5) * cell + 1)) == COLORS[mover.color]
            else:
                assert changed == []
        first, last = clip.frame(0), clip.frame(clip.n_frames - 1)
        assert {(o.name, o.size) for o in first.objects} == {(o.name, o.size) for o in last.objects}
        moved = {m.start for m in clip.moves}
        assert [o.cell for o in first.objects if o.cell not in moved] == \
            [o.cell for o in last.objects if o.cell not in {m.end for m in clip.moves}]


def test_motion_questions_are_answerable_from_the_first_and_last_frames():
    rng = random.Random(2)
    for clip in many_clips("native", 600):
        first, last = clip.frame(0), clip.frame(clip.n_frames - 1)
        # what a viewer sees: the shapes whose cell is empty at the end, and the cells newly filled
        left = [o for o in first.objects if last.at(o.cell) is None]
        arrived = [o for o in last.objects if first.at(o.cell) is None]
        assert len(left) == len(arrived) == len(clip.moves)
        for qa in synth.clip_questions(clip, rng):
            if qa.question in ("Which shape moved?", "Which shape moves in the video?"):
                [o] = left
                assert qa.answer == o.name
            elif m := re.fullmatch(r"Which shape moved (first|last)\?", qa.question):
                # the one that leaves its cell earlier (first) or later (last), frame by frame
                gone_at = {o.cell: next(t for t in range(clip.n_frames) if clip.frame(t).at(o.cell) is None)
                           for o in left}
                ordered = sorted(left, key=lambda o: gone_at[o.cell])
                assert qa.answer == (ordered[0] if m[1] == "first" else ordered[-1]).name
            else:
                m = re.fullmatch(r"Where did the (\w+ \w+) move to\?", qa.question)
                assert m and qa.category == "motion_where"
                [o] = [o for o in first.objects if o.name == m[1]]  # the name is unique in the clip
                [end] = [a for a in arrived if a.name == m[1]]
                assert qa.answer == clip.scene.grid.position(end.cell) and o.cell != end.cell


def test_motion_answers_are_balanced():
    rng = random.Random(3)
    for layout in ("fixed", "native"):
        by_category = {}
        for clip in many_clips(layout, 3000):
            for qa in synth.clip_questions(clip, rng):
                grid = clip.scene.grid
                key = (qa.category, grid.name) if qa.category == "motion_where" else qa.category
                by_category.setdefault(key, Counter())[qa.answer] += 1
        assert {k if isinstance(k, str) else k[0] for k in by_category} == set(synth.MOTION_CATEGORIES)
        for key, counts in by_category.items():
            if isinstance(key, tuple) and sum(counts.values()) < 200:
                continue  # too few questions on this grid to tell
            grid = synth.Grid(*map(int, key[1].split("x")), named=layout == "fixed") if isinstance(key, tuple) \
                else synth.FIXED_GRID
            category = key[0] if isinstance(key, tuple) else key
            assert set(counts) == set(answer_space(category, grid)), (layout, key)
            assert min(counts.values()) / max(counts.values()) > 0.4, (layout, key, counts)


def test_clip_records_carry_the_frames_as_a_video():
    clips = synth.split_clips(0, {"train": 20, "test": 20}, 0.35, layout="native")
    assert not {c.signature() for c in clips["train"]} & {c.signature() for c in clips["test"]}
    again = synth.split_clips(0, {"train": 20, "test": 20}, 0.35, layout="native")
    assert [c.signature() for c in again["train"]] == [c.signature() for c in clips["train"]]
    for split in ("train", "test"):
        for clip, rec in zip(clips[split], synth.split_clip_records(0, split, clips[split], turns_per_record=8)):
            assert rec.frames == [f"clips/{clip.id}/{t:02d}.png" for t in range(clip.n_frames)]
            for llava, messages in zip(rec.llava, rec.messages):
                assert llava["video"] == rec.frames and "image" not in llava
                conv = llava["conversations"]
                assert conv[0]["value"].startswith(synth.VIDEO_PLACEHOLDER + "\n")
                assert sum(turn["value"].count(synth.VIDEO_PLACEHOLDER) for turn in conv) == 1
                first = messages["messages"][0]["content"]
                assert first == [{"type": "video", "video": rec.frames},
                                 {"type": "text", "text": conv[0]["value"].split("\n", 1)[1]}]
            assert bool(rec.bench) == (split == "test")
            assert all(item["video"] == rec.frames and "images" not in item for item in rec.bench)
            if split == "train":
                assert len(rec.llava) == 1  # both questions in one conversation
