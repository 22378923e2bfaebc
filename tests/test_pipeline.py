"""data/pipeline.py: Record -> Sample with every kind of bad record skipped, counted and named,
truncation vs drop, the max_bad_fraction stop, and visual-token counts that follow the tiles."""

import json
import logging

import pytest
import torch
from PIL import Image

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import read_records
from vlmkit.data.images import ImageProcessor
from vlmkit.data.native_images import NativeImageProcessor
from vlmkit.data.packing import Packer, SourceStream
from vlmkit.data.pipeline import SamplePipeline, TooManyBadRecords
from vlmkit.data.world import generate
from tests.test_images import bomb_png
from tests.test_template import QWEN3_VL_TEMPLATE, qwen_vl_dir, small_config

pytest.importorskip("vlmkit.data.template")
pytest.importorskip("vlmkit.data.tokenizer")

from vlmkit.data.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["What color is the square? The square is red.", "Describe the picture in a few words."] * 30
TPI = 4  # visual tokens per tile


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def chat(image, question="<image>\nWhat color?", answer="Red.", rid="r"):
    row = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        row["image"] = image
    return row


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(root / "wide.png")
    good = (root / "wide.png").read_bytes()
    (root / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "fake.png").write_text("not an image at all")
    (root / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "secret.png").write_bytes(good)
    rows = [
        chat("wide.png", rid="ok1"),
        chat("missing.png", rid="missing"),
        chat("trunc.png", rid="trunc"),
        chat("empty.png", rid="empty"),
        chat("fake.png", rid="fake"),
        chat("bomb.png", rid="bomb"),
        chat("../secret.png", rid="escape"),
        "{broken json",
        {"id": "role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "noasst", "conversations": [{"from": "human", "value": "hi"}]},
        chat("wide.png", question="<image><image> two?", rid="mismatch"),
        chat(None, question="Say it.", answer="Red. " * 200, rid="long"),
        chat(None, question="Describe " * 200, answer="Red.", rid="cut"),
        chat(None, question="Plain text question?", rid="ok2"),
    ]
    path = root / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(path, tok, **kw):
    proc = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, max_tiles=4)
    pipe = SamplePipeline(tok, proc, TPI, max_length=120, max_bad_fraction=1.0, **kw)
    samples = [s for s in map(pipe.encode, read_records(path)) if s is not None]
    return pipe, samples


def test_every_bad_kind_is_counted_and_named(data_dir, tok, caplog):
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        pipe, samples = run(data_dir, tok)
    st = pipe.stats
    assert dict(st.bad) == {"missing_image": 1, "truncated_image": 1, "empty_image": 1, "not_an_image": 1,
                            "image_too_large": 1, "path_escapes_root": 1, "malformed_json": 1, "unknown_role": 1,
                            "no_assistant_turn": 1, "placeholder_mismatch": 1, "no_supervised_tokens": 1}
    assert [s.id for s in samples] == ["ok1", "long", "ok2"]  # good records are never dropped
    assert st.seen == 14 and st.ok == 3 and st.truncated == 2
    assert "d.jsonl:8" in caplog.text and "(record bomb)" in caplog.text
    assert "d.jsonl:2 (record missing)" in st.examples["missing_image"][0]
    assert "14 records, 3 ok, 11 skipped" in pipe.log_summary()


def test_samples_carry_tiles_and_visual_tokens(data_dir, tok):
    _, samples = run(data_dir, tok)
    wide = samples[0]
    assert wide.tiles_per_image == [3] and wide.pixel_values.shape == (3, 3, 16, 16)  # 2x1 grid + thumbnail
    assert wide.input_ids.count(tok.image_token_id) == 3 * TPI
    assert len(wide.labels) == len(wide.input_ids) and any(t != IGNORE_INDEX for t in wide.labels)
    long = samples[1]
    assert len(long) == 120 and long.pixel_values is None and long.modality == "text"


def test_drop_instead_of_truncate(data_dir, tok):
    pipe, samples = run(data_dir, tok, overflow="drop")
    assert [s.id for s in samples] == ["ok1", "ok2"]
    assert pipe.stats.bad["too_long"] == 2 and pipe.stats.truncated == 0


def test_truncation_never_splits_an_image(tmp_path, tok):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(chat("a.png", question="Hello " * 100 + "<image>")) + "\n")
    pipe, samples = run(tmp_path / "d.jsonl", tok)
    assert samples == [] and pipe.stats.bad["too_long"] == 1


def test_too_many_bad_records_stops_with_examples(data_dir, tok):
    proc = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3)
    pipe = SamplePipeline(tok, proc, TPI, max_bad_fraction=0.2, min_records=5, name="mydata")
    items = iter(read_records(data_dir))
    with pytest.raises(TooManyBadRecords, match=r"source 'mydata': \d+ of 5 records are unusable.*missing_image"):
        for item in items:
            pipe.encode(item)


@pytest.mark.parametrize("max_pixel_bytes", [0, 256 << 20])  # tiles redone at pack time / kept in the buffer
def test_packs_of_real_samples_redo_pixels_and_resume(tmp_path, tok, max_pixel_bytes):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    rows = []
    for i in range(24):
        Image.new("RGB", (32 + 16 * (i % 3), 32), colors[i % 4]).save(tmp_path / f"{i}.png")
        rows.append(json.dumps(chat(f"{i}.png", answer="Red. " * (i % 5 + 1), rid=str(i))))
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    proc = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, max_tiles=4)

    def packer():
        stream = SourceStream(tmp_path / "d.jsonl", seed=3, shuffle_block=8)
        return Packer(stream, SamplePipeline(tok, proc, TPI, max_length=200), 200, buffer_size=8,
                      max_pixel_bytes=max_pixel_bytes)

    direct = SamplePipeline(tok, proc, TPI)
    alone = {s.id: s for s in map(direct.encode, read_records(tmp_path / "d.jsonl"))}
    a = packer()
    first = a.next_pack()
    kept = [e.sample.pixel_values is not None for e in a.buffer]
    assert all(kept) if max_pixel_bytes else not any(kept)
    want = torch.cat([alone[i].pixel_values for i in first.sample_ids])
    assert torch.equal(first.pixel_values, want)
    assert first.tiles_per_image == [n for i in first.sample_ids for n in alone[i].tiles_per_image]
    assert int((first.input_ids == tok.image_token_id).sum()) == first.pixel_values.shape[0] * TPI
    cursor = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_pack() for _ in range(6)]
    b = packer()
    b.load_state_dict(cursor)
    for want_pack, got in zip(expected, (b.next_pack() for _ in range(6))):
        assert got.sample_ids == want_pack.sample_ids and torch.equal(got.pixel_values, want_pack.pixel_values)


def test_native_samples_carry_grids_and_pack_in_order(tmp_path):
    """A native-resolution pipeline (Qwen3-VL's format) on the world's clips and scenes: each sample's
    visual tokens match its grids, and the packs carry the grids in sample order."""
    generate(tmp_path / "w", n_train=3, n_val=1, n_test=1, layout="native", n_train_clips=3, text_corpus=False)
    qwen = Tokenizer.load(qwen_vl_dir(tmp_path / "tok", QWEN3_VL_TEMPLATE))
    processor = NativeImageProcessor(small_config("qwen3_vl"))
    merge = processor.config.merge_size ** 2
    pipe = SamplePipeline(qwen, processor, 0, max_length=4096, max_bad_fraction=0.0)
    for name in ("clips_train.jsonl", "qa_train.json"):
        items = list(read_records(tmp_path / "w" / name))
        samples = [pipe.encode(item) for item in items]
        for sample in samples:
            images = 0 if sample.image_grid_thw is None else int(sample.image_grid_thw.prod(-1).sum()) // merge
            videos = 0 if sample.video_grid_thw is None else int(sample.video_grid_thw.prod(-1).sum()) // merge
            assert sample.input_ids.count(qwen.image_token_id) == images
            assert sample.input_ids.count(qwen.video_token_id) == videos
            assert (videos > 0) == (name.startswith("clips")) and len(sample.second_per_grid_ts) == (videos > 0)
        packs = list(Packer(SourceStream(tmp_path / "w" / name, shuffle_block=1, loop=False), pipe, budget=4096))
        grids = torch.cat([b.video_grid_thw if name.startswith("clips") else b.image_grid_thw for b in packs])
        expected = torch.cat([s.video_grid_thw if name.startswith("clips") else s.image_grid_thw for s in samples])
        assert torch.equal(grids, expected)
    assert pipe.stats.num_bad == 0
