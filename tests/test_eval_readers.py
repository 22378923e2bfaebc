"""Benchmark readers on files the tests write, malformed rows included; CircularEval rotations."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from vlmkit.eval.benchmarks import BenchmarkError, circular_items, read_benchmark


def png_bytes(color=(255, 0, 0), format="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=format)
    return buf.getvalue()


def b64(color=(255, 0, 0)) -> str:
    return base64.b64encode(png_bytes(color)).decode()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_mmbench_tsv(tmp_path):
    path = tmp_path / "mmbench_dev.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["0", "What colour?", "nan", "red", "blue", "green", "nan", "B", "color", b64()],
        ["1", "Which shape?", "A hint.", "circle", "square", "nan", "nan", "A", "shape", "0"],  # image of row 0
        ["2", "Broken answer", "nan", "x", "y", "nan", "nan", "Z", "shape", b64()],
        ["3", "", "nan", "x", "y", "nan", "nan", "A", "shape", b64()],
        ["4", "No image", "nan", "x", "y", "z", "w", "D", "other", "nan"],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    bench = read_benchmark(path)
    assert [it.id for it in bench.items] == ["0", "1", "4"]
    first, second, third = bench.items
    assert first.choices == ["red", "blue", "green"] and first.answer == "B" and first.kind == "choice"
    assert first.hint == "" and first.category == "color"
    assert first.images[0].data == png_bytes()
    assert second.hint == "A hint." and second.images[0].data == png_bytes()  # resolved reference
    assert third.images == [] and third.answer == "D" and len(third.choices) == 4
    assert [(b.index, b.id, b.reason) for b in bench.bad_rows] == [
        (2, "2", "answer_not_in_choices"), (3, "3", "missing_question")]


def test_pope_jsonl_with_image_root(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    path = tmp_path / "pope_adversarial.jsonl"
    write_jsonl(path, [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.png", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": "missing.png", "text": "Is there a car?", "label": "no"},
        "{not json",
        {"question_id": 5, "image": "a.png", "label": "no"},
    ])
    bench = read_benchmark(path, image_root=images)
    assert [it.id for it in bench.items] == ["1", "2"]
    assert [it.kind for it in bench.items] == ["yesno", "yesno"]
    assert [it.answer for it in bench.items] == ["yes", "no"]
    assert bench.items[0].images[0].path == (images / "a.png").resolve()
    assert [(b.index, b.reason) for b in bench.bad_rows] == [
        (2, "missing_image"), (3, "bad_json"), (4, "missing_question")]
    assert bench.bad_rows[0].id == "3"


def test_scienceqa_and_seed_style_jsonl(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    path = tmp_path / "sqa.jsonl"
    write_jsonl(path, [
        {"id": "q1", "image": "img.png", "question": "Which is a mammal?", "choices": ["frog", "whale"],
         "answer": 1, "subject": "biology", "hint": "Think of lungs."},
        {"id": "q2", "question": "Text only?", "choices": ["yes", "no", "maybe"], "answer": 7},
        {"question_id": "s1", "image": "img.png", "question": "Colour?", "choice_a": "red", "choice_b": "blue",
         "choice_c": "green", "choice_d": "pink", "answer": "C", "question_type_id": 3},
        {"id": "q4", "question": "By text", "choices": ["cat", "dog"], "answer": "dog"},
        {"id": "q5", "question": "Choices not a list", "choices": "cat,dog", "answer": "A"},
    ])
    bench = read_benchmark(path)
    q1, s1, q4 = bench.items
    assert q1.answer == "B" and q1.category == "biology" and q1.hint == "Think of lungs." and q1.images
    assert q1.answer_index == 1
    assert s1.choices == ["red", "blue", "green", "pink"] and s1.answer == "C"
    assert q4.answer == "B" and q4.images == []
    assert [(b.id, b.reason) for b in bench.bad_rows] == [("q2", "answer_out_of_range"), ("q5", "bad_choices")]


def test_generic_jsonl_base64_and_data_url(tmp_path):
    path = tmp_path / "bench.jsonl"
    write_jsonl(path, [
        {"id": "g1", "images": [b64((0, 255, 0))], "question": "How many circles?", "answer": "3",
         "category": "count"},
        {"id": "g2", "images": ["data:image/png;base64," + b64((0, 0, 255))], "question": "Colour?",
         "choices": ["red", "blue"], "answer": "blue", "category": "color"},
        {"id": "g3", "images": [], "question": "Text only", "answer": "yes"},
        {"id": "g4", "images": [42], "question": "Bad image field", "answer": "x"},
        ["not", "an", "object"],
    ])
    bench = read_benchmark(path)
    g1, g2, g3 = bench.items
    assert g1.kind == "open" and g1.answer == "3" and g1.images[0].data == png_bytes((0, 255, 0))
    assert g2.kind == "choice" and g2.answer == "B" and g2.images[0].data == png_bytes((0, 0, 255))
    assert g3.kind == "yesno" and g3.category == "all"
    assert [(b.index, b.reason) for b in bench.bad_rows] == [(3, "bad_image_field"), (4, "not_an_object")]


def test_image_paths_must_stay_under_the_image_root(tmp_path):
    """Benchmark files follow the data files' rule (data/formats.py's image_ref): an image path that
    leaves the image root (`..`, an absolute path elsewhere, a symlink out) makes the row bad."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(png_bytes())
    (root / "in.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    images = ["in.png", "../outside.png", str(tmp_path / "outside.png"), "link.png", str(root / "in.png"),
              "sub/../in.png"]
    path = tmp_path / "bench.jsonl"
    write_jsonl(path, [{"id": f"r{i}", "image": image, "question": "Is it red?", "answer": "yes"}
                       for i, image in enumerate(images)])
    bench = read_benchmark(path, image_root=root)
    assert [it.id for it in bench.items] == ["r0", "r4", "r5"]
    assert all(it.images[0].path == (root / "in.png").resolve() for it in bench.items)
    assert [(b.index, b.id, b.reason) for b in bench.bad_rows] == [
        (1, "r1", "path_escapes_root"), (2, "r2", "path_escapes_root"), (3, "r3", "path_escapes_root")]
    assert "outside the image root" in bench.bad_rows[0].message
    # Without image_root the root is the file's folder, tmp_path: outside.png is inside it there.
    default_root = read_benchmark(path)
    assert [it.id for it in default_root.items] == ["r2", "r4"]
    assert [b.reason for b in default_root.bad_rows if b.index in (1, 3)] == ["path_escapes_root", "missing_image"]


def test_bare_base64_that_looks_like_an_absolute_path(tmp_path):
    """A JPEG's base64 starts with "/9j/": not an image path outside the root but an image."""
    jpeg = png_bytes(format="JPEG")
    value = base64.b64encode(jpeg).decode()
    assert value.startswith("/")
    path = tmp_path / "bench.jsonl"
    write_jsonl(path, [{"id": "j", "images": [value], "question": "Colour?", "answer": "red"},
                       {"id": "remote", "images": ["https://example.com/a.png"], "question": "?", "answer": "x"}])
    bench = read_benchmark(path)
    assert [it.images[0].data for it in bench.items] == [jpeg]
    assert [(b.id, b.reason) for b in bench.bad_rows] == [("remote", "remote_image")]


def test_json_list_and_errors(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    bench = read_benchmark(path)
    assert bench.items[0].id == "0" and bench.items[0].answer == "a"
    with pytest.raises(BenchmarkError, match="does not exist"):
        read_benchmark(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkError, match="unknown benchmark format"):
        read_benchmark(tmp_path / "x.csv")


def test_circular_rotations():
    from vlmkit.eval.benchmarks import BenchItem

    item = BenchItem(id="q", question="?", answer="A", kind="choice", choices=["w", "x", "y", "z"])
    other = BenchItem(id="o", question="?", answer="yes", kind="yesno")
    rotated = circular_items([item, other])
    assert [r.id for r in rotated] == ["q@0", "q@1", "q@2", "q@3", "o"]
    assert [r.choices for r in rotated[:4]] == [list("wxyz"), list("xyzw"), list("yzwx"), list("zwxy")]
    # The gold option "w" follows its rotation: A, D, C, B.
    assert [r.answer for r in rotated[:4]] == ["A", "D", "C", "B"]
    assert all(r.choices[r.answer_index] == "w" for r in rotated[:4])
    assert {r.source_id for r in rotated[:4]} == {"q"} and [r.rotation for r in rotated[:4]] == [0, 1, 2, 3]


def test_video_rows_follow_the_image_root_rule_frame_by_frame(tmp_path):
    """`video` / `videos` hold frames, a frame directory or a video file, each under the image root;
    a frame outside the root or missing makes the row bad, the rest of the file is still read."""
    root = tmp_path / "media"
    (root / "clip").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "clip" / f"{i:02d}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    frames = ["clip/00.png", "clip/01.png"]
    path = tmp_path / "bench.jsonl"
    write_jsonl(path, [
        {"id": "frames", "video": frames, "question": "Which moved?", "answer": "red"},
        {"id": "dir", "videos": "clip", "images": ["clip/00.png"], "question": "Moved?", "answer": "yes"},
        {"id": "two", "videos": [frames, frames[::-1]], "question": "Same?", "answer": "no"},
        {"id": "escapes", "video": ["clip/00.png", "../outside.png"], "question": "Moved?", "answer": "no"},
        {"id": "missing", "video": ["clip/00.png", "clip/02.png"], "question": "Moved?", "answer": "no"},
        {"id": "gone", "video": "nowhere.mp4", "question": "Moved?", "answer": "no"},
    ])
    bench = read_benchmark(path, image_root=root)
    by_id = {item.id: item for item in bench.items}
    assert list(by_id) == ["frames", "dir", "two"]
    assert [frame.path for frame in by_id["frames"].videos[0]] == [(root / f).resolve() for f in frames]
    assert by_id["dir"].videos[0].path == (root / "clip").resolve() and len(by_id["dir"].images) == 1
    assert len(by_id["two"].videos) == 2 and by_id["frames"].images == []
    assert [(b.id, b.reason) for b in bench.bad_rows] == [
        ("escapes", "path_escapes_root"), ("missing", "missing_video"), ("gone", "missing_video")]
