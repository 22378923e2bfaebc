"""`vlmkit data inspect` (--json report, with and without a tokenizer) and `vlmkit data synth`."""

import json

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.cli import clip_counts


def write_data(tmp_path):
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "a.png")
    (tmp_path / "t.png").write_text("text, not pixels")
    turns = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "Blue."}]
    rows = [json.dumps({"id": str(i), "image": "a.png", "conversations": turns}) for i in range(30)]
    rows += ["{oops", json.dumps({"id": "bad", "image": "t.png", "conversations": turns}),
             json.dumps({"id": "esc", "image": "../x.png", "conversations": turns})]
    (tmp_path / "chat.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in range(1, 41)))
    return [str(tmp_path / "chat.jsonl"), str(tmp_path / "text.jsonl")]


def inspect_json(capsys, *args):
    assert main(["data", "inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_byte_lengths(tmp_path, capsys):
    paths = write_data(tmp_path)
    report = inspect_json(capsys, *paths, "--budget", "512", "--tokens-per-image", "16", "--image-size", "32")
    assert report["records"] == 73 and report["ok"] == 70
    assert report["bad"] == {"malformed_json": 1, "not_an_image": 1, "path_escapes_root": 1}
    assert report["modality"] == {"image": 30, "text": 40}
    assert report["tokenizer"] == "bytes"
    assert sum(report["text_tokens"]["histogram"].values()) == 70
    assert report["text_tokens"]["max"] == len("word " * 40)
    assert 0.5 < report["packing_efficiency"] <= 1.0 and report["packs"] >= 2


def test_inspect_with_a_tokenizer(tmp_path, capsys):
    pytest.importorskip("vlmkit.data.template")
    from vlmkit.data.tokenizer import Tokenizer

    paths = write_data(tmp_path)
    Tokenizer.train(["Color? Blue. word word word"] * 20, vocab_size=300).save(tmp_path / "tok")
    report = inspect_json(capsys, *paths, "--tokenizer", str(tmp_path / "tok"), "--budget", "256",
                          "--tokens-per-image", "16", "--image-size", "32")
    assert report["ok"] == 70 and report["tokenizer"] == str(tmp_path / "tok")
    assert report["text_tokens"]["max"] < len("word " * 40)  # BPE merges bytes
    assert main(["data", "inspect", *paths, "--budget", "256"]) == 0
    text = capsys.readouterr().out
    assert "bad malformed_json: 1" in text and "packing at budget 256" in text


def test_synth_writes_the_world(tmp_path, capsys):
    pytest.importorskip("vlmkit.data.synth")
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--scenes", "8", "--image-size", "32"]) == 0
    capsys.readouterr()
    report = inspect_json(capsys, str(tmp_path / "w" / "qa_train.json"), "--image-size", "32")
    assert report["records"] >= 8 and report["bad"] == {} and report["modality"] == {"image": report["ok"]}


def test_synth_native_layout_with_clips(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["data", "synth", "--out", str(out), "--scenes", "4", "--layout", "native", "--clips", "2,1,1"]) == 0
    capsys.readouterr()
    world = json.loads((out / "world.json").read_text())
    assert world["layout"] == "native" and "clips" in world
    assert [len(json.loads((out / f"clips_{split}.json").read_text())) > 0 for split in ("train", "val", "test")] \
        == [True] * 3
    frames = sorted((out / "clips").iterdir())
    assert [f.name.split("_clip_")[0] for f in frames] == ["test", "train", "train", "val"]


@pytest.mark.parametrize("value, counts", [("3", (3, 3, 3)), ("4,0,2", (4, 0, 2))])
def test_clip_counts(value, counts):
    assert clip_counts(value) == counts


@pytest.mark.parametrize("value", ["x", "1,2", "-1", "1,2,-3"])
def test_clip_counts_refuse_bad_values(value, capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", "unused", "--clips", value])
    assert "--clips" in capsys.readouterr().err
