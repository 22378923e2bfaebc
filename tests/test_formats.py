"""data/formats.py: every reader, malformed rows named by file:line, image roots, auto-detection."""

import base64
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.data.formats import BadRecord, detect_format, image_ref, read_records
from vlmkit.data.pipeline import check_record
from vlmkit.data.types import Record
from vlmkit.data.world import generate
from vlmkit.errors import BadRecordError, ConfigError


def png(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_llava_json_and_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    rows = [
        {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "2", "image": "a.png", "conversations": [{"from": "human", "value": "No placeholder"},
                                                          {"from": "gpt", "value": "Ok."}]},
        {"id": "3", "conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "hi"},
                                      {"from": "assistant", "value": "hello"}]},
        {"id": "4", "image": ["a.png", "a.png"], "conversations": [{"from": "human", "value": "two"},
                                                                     {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.json", "d.jsonl"):
        assert detect_format(tmp_path / name) == "llava"
        recs = list(read_records(tmp_path / name))
        assert all(isinstance(r, Record) for r in recs)
        assert recs[0].images[0].path == (tmp_path / "a.png").resolve()
        assert recs[0].messages[0].role == "user" and recs[0].messages[1].role == "assistant"
        assert recs[1].messages[0].content == "<image>\nNo placeholder"  # LLaVA prepends it
        assert [m.role for m in recs[2].messages] == ["system", "user", "assistant"] and recs[2].images == []
        assert recs[3].messages[0].content.count("<image>") == 2
        assert recs[0].kind == "chat" and recs[0].source == "d"


def test_malformed_lines_are_named_and_reading_goes_on(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "{not json",
        {"conversations": [{"from": "robot", "value": "a"}]},
        {"conversations": "nope"},
        [1, 2],
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
    ])
    items = list(read_records(path, "llava"))
    assert [type(i).__name__ for i in items] == ["Record", "BadRecord", "BadRecord", "BadRecord", "BadRecord", "Record"]
    assert items[1].reason == "malformed_json" and items[1].where == f"{path}:2"
    assert items[2].reason == "unknown_role" and "robot" in items[2].message
    assert items[3].reason == "malformed_record" and items[4].reason == "malformed_record"
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"b": ')
    (bad,) = list(read_records(tmp_path / "broken.json", "llava"))
    assert bad.reason == "malformed_json" and bad.where.endswith("broken.json:2")


def test_image_paths_must_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.png").write_bytes(png())
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "ok.png").write_bytes(png())
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    rows = [{"image": p, "conversations": turns} for p in
            ("ok.png", "../outside.png", str(tmp_path / "outside.png"), "link.png", str(root / "ok.png"))]
    items = list(read_records(write_jsonl(tmp_path / "r.jsonl", rows), root=root))
    assert [getattr(i, "reason", "ok") for i in items] == ["ok", "path_escapes_root", "path_escapes_root",
                                                           "path_escapes_root", "ok"]


def test_image_ref_is_one_rule_for_every_kind_of_reference(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a b.png").write_bytes(png())
    inside = (root / "a b.png").resolve()
    assert image_ref(png(), root).data == png()
    assert image_ref({"bytes": png(), "path": None}, root).data == png()
    assert image_ref({"bytes": None, "path": "a b.png"}, root).path == inside
    assert image_ref("a b.png", root).path == inside
    assert image_ref(str(inside), root).path == inside
    assert image_ref("file://" + str(inside).replace(" ", "%20"), root).path == inside
    assert image_ref("data:image/png;base64," + base64.b64encode(png()).decode(), root).data == png()
    assert image_ref("data:text/plain,a%20b", root).data == b"a b"
    for value, reason in [("../x.png", "path_escapes_root"), ("/etc/passwd", "path_escapes_root"),
                          ("file:///etc/passwd", "path_escapes_root"), ("https://x/y.png", "remote_image"),
                          ("data:image/png;base64,!!", "malformed_record"), ("", "malformed_record"),
                          (42, "malformed_record"), ({"bytes": None, "path": None}, "malformed_record")]:
        with pytest.raises(BadRecordError) as caught:
            image_ref(value, root)
        assert caught.value.reason == reason, value


def test_messages_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "Color?"}]},
                      {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                                   {"type": "image_url", "image_url": {"url": data_url}}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
        {"messages": [{"role": "tool", "content": "x"}]},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    assert detect_format(path) == "messages"
    a, b, c, d = read_records(path)
    assert a.messages[0].content == "<image>\nColor?" and a.images[0].path.name == "a.png"
    assert b.messages[0].content == "Look\n<image>" and b.images[0].data == png()
    assert b.messages[1].content == "Red."
    assert c.reason == "remote_image" and d.reason == "unknown_role"


def test_text_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": ""}, {"text": "again"}])
    assert detect_format(path) == "text"
    items = list(read_records(path))
    assert items[0].kind == "text" and items[0].text == "hello world" and items[0].modality == "text"
    assert items[1].reason == "empty_text" and items[2].text == "again"


def test_parquet_and_hf_dataset_dir(tmp_path):
    (tmp_path / "p.png").write_bytes(png((0, 255, 0)))
    table = pa.table({
        "image": [{"bytes": png(), "path": None}, {"bytes": None, "path": "p.png"}, {"bytes": None, "path": None}],
        "caption": ["a red square", "a green square", "nothing"],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    a, b, c = read_records(tmp_path / "d.parquet")
    assert a.kind == "caption" and a.images[0].data == png() and a.messages[1].content == "a red square"
    assert b.images[0].path == (tmp_path / "p.png").resolve()
    assert isinstance(c, BadRecord) and c.where.endswith("d.parquet#2")
    # A datasets.save_to_disk directory: IPC stream .arrow files plus json metadata.
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{}")
    (ds / "state.json").write_text("{}")
    rows = pa.table({"image": [png()], "text": ["raw bytes caption"]})
    with pa.ipc.new_stream(ds / "data-00000-of-00001.arrow", rows.schema) as w:
        w.write_table(rows)
    assert detect_format(ds) == "hf_dataset"
    (rec,) = read_records(ds)
    assert rec.kind == "caption" and rec.images[0].data == png()
    conv = pa.table({"conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]})
    pq.write_table(conv, tmp_path / "conv.parquet")
    (rec,) = read_records(tmp_path / "conv.parquet")
    assert rec.kind == "chat" and rec.messages[1].content == "yo"


def test_webdataset_shards(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("s/0001.jpg", png())
        add("s/0001.txt", b"a red square")
        add("s/0002.png", png())
        add("s/0002.json", json.dumps({"caption": "json caption"}).encode())
        add("s/0003.png", png())
        add("s/0004.txt", b"text only")
    assert detect_format(shard) == "webdataset" and detect_format(tmp_path) == "webdataset"
    a, b, c, d = read_records(tmp_path)
    assert a.id == "s/0001" and a.messages[1].content == "a red square" and a.images[0].data == png()
    assert b.messages[1].content == "json caption"
    assert c.reason == "no_caption" and c.where.endswith("s/0003")
    assert d.kind == "text" and d.text == "text only"


def test_format_override_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "weird.data", [{"text": "x"}])
    with pytest.raises(ConfigError, match="cannot tell"):
        list(read_records(path))
    (rec,) = read_records(path, "text", kind="text", source="lang")
    assert rec.source == "lang"
    with pytest.raises(ConfigError, match="does not exist"):
        list(read_records(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="unknown data format"):
        list(read_records(path, "csv"))


# ---- videos: messages parts, LLaVA's "video" key, the root rule on frames -----------------------

def write_frames(directory, n=4):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"{i:02d}.png").write_bytes(png((40 * i, 0, 0)))
    return [f"{directory.name}/{i:02d}.png" for i in range(n)]


def test_video_parts_and_llava_video_key(tmp_path):
    frames = write_frames(tmp_path / "clip")
    (tmp_path / "a.png").write_bytes(png())
    question = [{"type": "text", "text": "Which moves?"}]
    rows = [
        {"id": "parts", "messages": [{"role": "user", "content": [{"type": "video", "video": frames},
                                                                   {"type": "image", "image": "a.png"}, *question]},
                                     {"role": "assistant", "content": "the circle"}]},
        {"id": "url", "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip"}},
                                                                 *question]},
                                   {"role": "assistant", "content": "the circle"}]},
        {"id": "llava", "video": frames, "conversations": [{"from": "human", "value": "<video>\nWhich moves?"},
                                                           {"from": "gpt", "value": "the circle"}]},
        {"id": "several", "video": [frames, frames[:2]], "conversations": [{"from": "human", "value": "Which?"},
                                                                          {"from": "gpt", "value": "the circle"}]},
    ]
    parts, url, llava, several = list(read_records(write_jsonl(tmp_path / "v.jsonl", rows)))
    frame_paths = [(tmp_path / f).resolve() for f in frames]
    assert [ref.path for ref in parts.videos[0]] == frame_paths and parts.images[0].path == (tmp_path / "a.png")
    assert parts.messages[0].content == "<video>\n<image>\nWhich moves?" and parts.modality == "image"
    assert url.videos[0].path == (tmp_path / "clip").resolve()  # a frame directory (or a video file) by path
    assert [ref.path for ref in llava.videos[0]] == frame_paths and llava.messages[0].content.count("<video>") == 1
    assert [len(v) for v in several.videos] == [4, 2]
    assert several.messages[0].content == "<video>\n<video>\nWhich?"  # placeholders prepended, as for images


@pytest.mark.parametrize("video, reason", [
    (["clip/00.png", "../outside.png"], "path_escapes_root"),
    ("../elsewhere", "path_escapes_root"),
    (["https://example.com/f.png"], "remote_image"),
    ([], "malformed_record"),
    (7, "malformed_record"),
])
def test_video_frames_follow_the_root_rule(tmp_path, video, reason):
    write_frames(tmp_path / "clip")
    rows = [{"id": "v", "messages": [{"role": "user", "content": [{"type": "video", "video": video}]},
                                     {"role": "assistant", "content": "x"}]},
            {"id": "l", "video": video, "conversations": [{"from": "human", "value": "<video>"},
                                                          {"from": "gpt", "value": "x"}]}]
    items = list(read_records(write_jsonl(tmp_path / "v.jsonl", rows)))
    assert [(type(i), i.reason) for i in items] == [(BadRecord, reason)] * 2


def test_the_worlds_clips_read_without_bad_records(tmp_path):
    generate(tmp_path, n_train=2, n_val=1, n_test=1, layout="native", n_train_clips=3, n_val_clips=1,
             n_test_clips=2, text_corpus=False)
    for split, clips in (("train", 3), ("val", 1), ("test", 2)):
        for name in (f"clips_{split}.json", f"clips_{split}.jsonl"):
            items = list(read_records(tmp_path / name))
            bad = [str(i) for i in items if isinstance(i, BadRecord)]
            assert items and not bad, bad
            clip_dirs = {i.videos[0][0].path.parent.name for i in items}
            assert clip_dirs == {f"{split}_clip_{k:06d}" for k in range(clips)}
            for record in items:
                check_record(record)  # one <video> per clip, no image
                assert all(ref.path.is_file() for ref in record.videos[0])
