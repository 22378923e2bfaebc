"""evaluate() on benchmark rows with a video: the synthetic world's test clips on a tiny native
model (gen and ppl, with the blind baseline), blank videos, and a LLaVA-shaped model's bad row."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.serving_support import build_qwen2_vl_dir
from tests.test_eval_runner import tiny_vlm, tokenizer, write_bench  # noqa: F401 (tokenizer: a fixture)
from vlmkit.api import VLM
from vlmkit.cli import main
from vlmkit.data.world import generate
from vlmkit.eval.benchmarks import read_benchmark
from vlmkit.eval.prompts import chat_messages, world_prompt_format
from vlmkit.eval.runner import blank_video, evaluate, evaluate_with_blind

CLIP_ROWS = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The test clips' benchmark file of a small native world (two questions a clip)."""
    out = tmp_path_factory.mktemp("world")
    files = generate(out, layout="native", n_train=0, n_val=0, n_test=0, n_test_clips=2, text_corpus=False)
    return files["test_clips"]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return build_qwen2_vl_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def native_model(native_dir):
    return VLM.load(native_dir)


def test_a_video_row_is_asked_with_its_video_part(clips):
    item = read_benchmark(clips).items[0]
    fmt = world_prompt_format(Path(clips).parent)
    content = chat_messages(item, [], fmt, list_options=True, videos=item.videos)[0]["content"]
    assert [part["type"] for part in content] == ["video", "text"]  # as the world's training data asks
    assert content[0]["video"] == item.videos[0] and len(item.videos[0]) > 1


def test_blank_video_keeps_the_frame_count_and_size_at_the_processor_mean(clips, native_model):
    video = read_benchmark(clips).items[0].videos[0]
    config = native_model.native_processor_config()
    blank = blank_video(video, config.mean)
    frame = Image.open(video[0].path)
    assert len(blank) == len(video) and {b.size for b in blank} == {frame.size}
    processor = native_model.image_processor()
    seen, blind = processor.video(video), processor.video(blank)
    assert blind.grid_thw == seen.grid_thw
    # the mean rounds to 8-bit: within one grey level of zero after normalisation
    assert blind.pixel_values.abs().max() < 1 / 255 / min(config.std)
    assert seen.pixel_values.abs().max() > 1


@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_the_world_clips_evaluate_on_a_native_model_with_their_blind_baseline(clips, native_model, mode):
    results = evaluate_with_blind(native_model, clips, mode=mode, max_new_tokens=3, progress=False)
    for result in results.values():
        assert result.benchmark == "synth_clips"
        assert result.summary["n"] == CLIP_ROWS and not result.bad_rows
    if mode == "ppl":  # the video reaches the model: blanking its frames moves the options' scores
        seen = [row.scores for row in results["model"].rows]
        blind = [row.scores for row in results["blind"].rows]
        assert not torch.allclose(torch.tensor(seen), torch.tensor(blind))


@pytest.mark.parametrize("mode", ["gen", "ppl"])
@pytest.mark.parametrize("blind", [False, True])
def test_a_video_row_on_an_image_only_model_is_a_bad_row(tmp_path, tokenizer, mode, blind):  # noqa: F811
    (tmp_path / "clip").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 50, 50)).save(tmp_path / "clip" / f"{i}.png")
    path = write_bench(tmp_path, [
        {"id": "still", "images": ["img/red.png"], "question": "What colour is it?", "answer": "red"},
        {"id": "clip", "video": ["clip/0.png", "clip/1.png"], "question": "What colour is it?", "answer": "red"},
        {"id": "other", "images": ["img/blue.png"], "question": "What colour is it?", "answer": "blue"},
    ])
    result = evaluate(tiny_vlm(tokenizer), path, mode=mode, blind=blind, max_new_tokens=2, progress=False)
    assert result.summary["n"] == 2
    assert [(b.id, b.index, b.reason) for b in result.bad_rows] == [("clip", 1, "unexpected_video")]
    assert json.loads(json.dumps(result.to_dict()))["bad_rows"]["count"] == 1


def test_cli_evaluates_the_world_clips_on_a_native_model(clips, native_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(native_dir), "--bench", str(clips), "--mode", "ppl", "--blind", "--json",
                 "--no-progress", "--out", str(tmp_path / "report")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["benchmark"], report["blind"], report["n"]) == ("synth_clips", True, CLIP_ROWS)
    assert report["bad_rows"]["count"] == 0
