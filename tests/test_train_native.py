"""`vlmkit train` on a native-resolution model (vlmkit/configs/native.yaml on a tiny native world
with clips): it trains end to end into a final model that loads and answers, a run stopped inside
a stage and resumed ends with bit-for-bit the weights of an uninterrupted one, a pack's loss is
the sum of its samples' losses alone (each equal to the unpacked HF-style call's), an alignment
stage trains the tower's merger only, and a Qwen2-VL directory trains as `model.pretrained`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.serving_support import build_qwen2_vl_dir
from tests.train_support import Stopped, assert_same_weights, kept_thread_count, prepared_world, stop_after
from vlmkit.api import VLM
from vlmkit.config import ModelSpec, load_config
from vlmkit.constants import IGNORE_INDEX, IMAGE_PAD, VIDEO_PAD
from vlmkit.data.packing import SourceStream, collate
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.world import TOKENIZER_DIR
from vlmkit.errors import ConfigError
from vlmkit.train.loop import build_model, train
from vlmkit.train.stages import NATIVE_ADAPTER_PARTS, apply_freezing

pytestmark = pytest.mark.slow

WORLD = ["world.n_train=40", "world.n_test=6", "world.n_train_clips=16", "world.n_test_clips=4",
         "world.vocab_size=400"]
# One thread (bitwise resume needs the same count in both runs); short stages, with a checkpoint
# inside the last one (global step 7) and one at each stage end (1, 3, 5, 9).
SHORT = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=1", "stages.1.steps=2",
         "stages.2.steps=2", "stages.3.steps=4", "stages.3.save_every=2", "stages.0.token_budget=512",
         "stages.1.token_budget=512", "stages.2.token_budget=512", "stages.3.token_budget=512"]
STEPS = 9


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("native-world"), "native", WORLD)


def config(world: Path):
    return load_config("native", [*WORLD, f"world.dir={world}", *SHORT])


@pytest.fixture(scope="module")
def reference(world, one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native-run")
    train(config(world), out)
    return out


def test_native_world_tokenizer_has_the_qwen_vl_tokens(world):
    tok = Tokenizer.load(world / TOKENIZER_DIR)
    assert tok.template == "qwen_vl"
    assert (tok.image_token, tok.video_token) == (IMAGE_PAD, VIDEO_PAD)
    model = build_model(config(world))
    assert model.config.is_native
    assert (model.config.image_token_id, model.config.video_token_id) == (tok.image_token_id, tok.video_token_id)


def test_native_run_ends_in_a_model_that_answers(reference, world):
    final = reference / "final"
    model = VLM.from_pretrained(final)
    assert model.config.is_native
    meta = json.loads((final / "vlmkit.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["language", "align", "joint", "sft"]
    lines = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if not r.get("eval")]
    assert [r["global_step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any("loss/clips" in r for r in steps)  # video packs were trained on
    image = Image.open(sorted((world / "images").iterdir())[0]).convert("RGB")
    answer = model.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": "What is it?"}]}],
                            max_new_tokens=4)
    assert isinstance(answer, str)


@pytest.mark.parametrize("stopped_after", [5, 7, 8])  # a stage end, a checkpoint inside sft, past it
def test_stopped_native_run_resumes_bitwise(world, reference, monkeypatch, tmp_path, stopped_after):
    stop_after(monkeypatch, stopped_after)
    with pytest.raises(Stopped):
        train(config(world), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "final").exists()
    train(config(world), tmp_path, resume=True)
    assert_same_weights(load_file(str(reference / "final" / "model.safetensors")),
                        load_file(str(tmp_path / "final" / "model.safetensors")))


def _samples(model, path: Path, format: str, n: int) -> list:
    stream = SourceStream(path, format, kind="chat", loop=False, shuffle_block=1)
    pipeline = SamplePipeline(model.tokenizer, model.image_processor(), model.config.tokens_per_tile,
                              max_length=1024, name=path.stem)
    out = []
    for _, item in stream.iter_from():
        out.append(pipeline.encode(item))
        if len(out) == n:
            return out


def test_packed_native_loss_is_the_sum_of_each_samples_loss(world):
    cfg = config(world)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Scenes from LLaVA JSON, clips from messages JSONL (video parts): both readers feed a pack.
    scenes, clips = _samples(model, world / "qa_train.json", "llava", 2), _samples(model, world / "clips_train.jsonl",
                                                                                   "messages", 2)
    samples = [s for pair in zip(scenes, clips) for s in pair]
    pack = collate(samples, budget=4096)
    assert pack.image_grid_thw is not None and pack.video_grid_thw is not None

    def loss_sum(batch):
        out = model.pack_loss(batch)
        return out.loss_sum, out.num_targets

    def unpacked_loss_sum(batch):  # the HF-style call: its own M-RoPE positions, no packing
        logits = model(batch.input_ids[None], batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                       pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
                       second_per_grid_ts=batch.second_per_grid_ts)[0]
        return torch.nn.functional.cross_entropy(logits[:-1], batch.labels[1:], ignore_index=IGNORE_INDEX,
                                                 reduction="sum")

    with torch.no_grad():
        packed, targets = loss_sum(pack)
        singles = [collate([s], budget=4096) for s in samples]
        alone = [loss_sum(b) for b in singles]
        for batch, (single, _) in zip(singles, alone):
            torch.testing.assert_close(single, unpacked_loss_sum(batch), rtol=1e-5, atol=1e-5)
    assert int(targets) == sum(int(n) for _, n in alone)
    torch.testing.assert_close(packed, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)


def test_alignment_trains_the_native_merger_only(world):
    cfg = config(world)
    model = build_model(cfg)
    counts = apply_freezing(model, cfg.stages[1])  # align: adapter_lr only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[1] in NATIVE_ADAPTER_PARTS for n in trainable)
    assert counts["adapter"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts["vision"] == counts["llm"] == 0
    total = sum(p.numel() for p in model.parameters())
    counts = apply_freezing(model, cfg.stages[0].__class__(vision_lr=1.0, adapter_lr=1.0, llm_lr=1.0))
    assert sum(counts.values()) == total  # every parameter belongs to one module


def test_a_qwen2_vl_directory_trains_as_pretrained(world, one_thread, tmp_path):
    hf_dir = build_qwen2_vl_dir(tmp_path / "qwen2_vl")
    stage = {"token_budget": 1024, "steps": 1}
    cfg = load_config({
        "model": {"pretrained": str(hf_dir)},
        "data": {"qa": {"path": str(world / "qa_train.json"), "format": "llava", "kind": "chat"},
                 "clips": {"path": str(world / "clips_train.json"), "format": "llava", "kind": "chat"}},
        "stages": [{"name": "align", "adapter_lr": 1.0e-3, **stage},
                   {"name": "sft", "llm_lr": 1.0e-3, "adapter_lr": 0, "mixture": {"clips": 1.0}, **stage}],
        "num_threads": 1, "progress": False, "tensorboard": False})
    before = VLM.load(hf_dir)
    final = train(cfg, tmp_path / "run")
    model = VLM.from_pretrained(final)
    assert model.native_processor_config() == before.native_processor_config()  # the directory's settings
    after = dict(model.named_parameters())
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, after[n])}
    assert changed and all(n.startswith(("vision.merger", "llm.")) for n in changed)


def test_model_processor_gives_small_images_more_tokens_and_the_model_keeps_it(world, tmp_path):
    # the family's own sizing (native.yaml sets its own floor, 56 x 84 pixels)
    default = build_model(load_config("native", [*WORLD, f"world.dir={world}", *SHORT, "model.processor=null"]))
    assert default.native_processor_config().min_pixels == 56 * 56
    sized = build_model(load_config("native", [*WORLD, f"world.dir={world}", *SHORT,
                                               "model.processor={min_pixels: 7056, video_min_pixels: 7056}"]))
    assert (sized.native_processor_config().min_pixels, sized.native_processor_config().video_min_pixels) == (7056, 7056)
    # At 84 x 84 pixels or more every scene and clip frame pair takes 9 visual tokens or more; the
    # family's 56 x 56 leaves the smallest scenes fewer.
    fewest = {}
    for name, model in (("default", default), ("sized", sized)):
        samples = (_samples(model, world / "qa_train.json", "llava", 20)
                   + _samples(model, world / "clips_train.jsonl", "messages", 8))
        grids = [g for s in samples for g in (s.image_grid_thw, s.video_grid_thw) if g is not None]
        fewest[name] = min(h * w // 4 for grid in grids for _, h, w in grid.tolist())
    assert fewest["default"] < 9 <= fewest["sized"]
    sized.save_pretrained(tmp_path / "sized")
    assert VLM.from_pretrained(tmp_path / "sized").native_processor_config() == sized.native_processor_config()


def test_model_processor_on_a_model_that_tiles_is_a_config_error(world):
    cfg = config(world)
    cfg.model = ModelSpec(config=load_config("tiny").model.config, processor={"min_pixels": 7056})
    with pytest.raises(ConfigError, match="native-resolution"):
        build_model(cfg)
