"""LLaVA-OneVision checkpoints (transformers' `LlavaOnevisionForConditionalGeneration`) in vlmkit: a
tiny random model (a SigLIP tower of 4 x 4 patches per tile, a Qwen2 decoder, canvases of up to 3
tiles a side, pooling past one tile's patches so that larger images are pooled) saved with a
ChatML tokenizer, OneVision's chat template and its processor configs. Checked against
transformers: the image processor's tiles, the processor's prompt ids, logits on a padded batch of
a text-only row, rows with one image of several sizes (tiled) and a row with two images (not
tiled), cached greedy decoding and the export round trip; plus the packed loss, the vlmkit
checkpoint and the refusals."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from tests.hf_vlm_support import (assert_logits_close, check_checkpoint_round_trip, check_packed_loss, edited_copy,
                                  image_parts, randomized, sample_images, tensor_names, without_video_processor)
from tests.tokenizer_support import hf_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.constants import IM_END, IM_START, IMAGE_TOKEN
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.anyres import AnyResImageProcessor
from vlmkit.data.messages import read_conversation
from vlmkit.data.packing import collate
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.prompt import build_prompt
from vlmkit.data.types import Record
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams
from vlmkit.models.anyres import AnyResGeometry
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.onevision import check_onevision_exportable, onevision_config

# The template transformers' conversion script gives OneVision checkpoints: a message's images
# first, each on its own line, then its texts.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", IM_START, IM_END, IMAGE_TOKEN, "<video>"]
TILE, PATCH = 32, 8
TOKENS_PER_TILE = (TILE // PATCH) ** 2
CANVASES = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 96]]
POOLING = "anyres_max_1"
TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048)
VISION = dict(model_type="siglip_vision_model", hidden_size=32, num_attention_heads=2, intermediate_size=48,
              num_hidden_layers=3, image_size=TILE, patch_size=PATCH, vision_use_head=False)
NEW_TOKENS = 6


def _is_scale(name: str, p) -> bool:
    return p.dim() == 1 and "norm" in name and name.endswith("weight")


def _image_processor(path=None):
    if path is not None:
        return transformers.LlavaOnevisionImageProcessorPil.from_pretrained(path)
    return transformers.LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                        image_grid_pinpoints=CANVASES, image_mean=[0.5, 0.4, 0.3],
                                                        image_std=[0.2, 0.3, 0.4])


def save_onevision(path):
    """A tiny random OneVision saved in `path` with tokenizer and processor configs; the model."""
    hf_dir(path, SPECIALS, {"eos_token": IM_END, "pad_token": "<|endoftext|>", "bos_token": None,
                            "chat_template": ONEVISION_TEMPLATE})
    _image_processor().save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(dict(
        processor_class="LlavaOnevisionProcessor", num_image_tokens=TOKENS_PER_TILE,
        vision_feature_select_strategy="full", vision_aspect_ratio=POOLING)))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = transformers.LlavaOnevisionConfig(
        vision_config=VISION, text_config={**TEXT, "vocab_size": len(tok)}, image_grid_pinpoints=CANVASES,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_aspect_ratio=POOLING)
    model = randomized(transformers.LlavaOnevisionForConditionalGeneration(config), _is_scale)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, its directory)."""
    path = tmp_path_factory.mktemp("onevision")
    return save_onevision(path), path


def _reference_processor(path):
    with without_video_processor():
        return transformers.LlavaOnevisionProcessor(
            image_processor=_image_processor(path), tokenizer=transformers.AutoTokenizer.from_pretrained(path),
            video_processor=None, num_image_tokens=TOKENS_PER_TILE, vision_feature_select_strategy="full",
            chat_template=ONEVISION_TEMPLATE, vision_aspect_ratio=POOLING)


@pytest.fixture(scope="module")
def pair(saved):
    """(transformers model, vlmkit's import of its directory, the directory, its processor)."""
    ref, path = saved
    return ref, VLM.from_hf(path), path, _reference_processor(path)


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# Conversations in LLaVA's order (a message's images before its text), as OneVision's template writes them.
CONVERSATIONS = [
    lambda im: [{"role": "user", "content": [*image_parts(im[:1]), _text("What color is it?")]}],
    lambda im: [{"role": "user", "content": [*image_parts(im[2:3]), _text("Describe the image.")]}],
    lambda im: [{"role": "user", "content": [*image_parts(im[:2]), _text("Which is larger?")]}],
    lambda im: [{"role": "user", "content": [*image_parts(im[3:]), _text("How many shapes?")]},
                {"role": "assistant", "content": [_text("There are three shapes.")]},
                {"role": "user", "content": [_text("And now?")]}],
]


# A message's text before, between and around its images: OneVision's template moves the images first.
TEXT_FIRST = [
    lambda im: [{"role": "user", "content": [_text("What color is it?"), *image_parts(im[:1])]}],
    lambda im: [{"role": "user", "content": [_text("Look: "), *image_parts(im[2:3]), _text("what is it?")]}],
    lambda im: [{"role": "user", "content": [*image_parts(im[:1]), _text("Which is larger,"), *image_parts(im[1:2])]},
                {"role": "assistant", "content": [_text("The first.")]},
                {"role": "user", "content": [_text("And this one?"), *image_parts(im[3:])]}],
]


def _images(conversation) -> list:
    return [p["image"] for m in conversation for p in m["content"] if p["type"] == "image"]


def _reference_batch(processor, conversations):
    texts = [processor.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in conversations]
    images = [_images(c) for c in conversations]
    return processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)


def _prompt(ours, conversation):
    return build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)


# --- processor: tiles, token counts and prompts -------------------------------------------------------


def test_tiles_equal_the_image_processor(pair):
    """data/anyres.py gives transformers' image processor's tiles (base tile first, then the best
    canvas' tiles; an image among several: its padded square alone) for images wider, taller,
    smaller and larger than a tile, and the token counts its processor writes."""
    _, ours, _, processor = pair
    mine = ours.image_processor()
    assert isinstance(mine, AnyResImageProcessor)
    rng = np.random.default_rng(1)
    sizes = [(40, 90), (32, 32), (70, 24), (64, 64), (5, 300), (300, 7), (1, 1), (33, 31), (97, 64), (64, 97)]
    for h, w in sizes:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        alone = processor.image_processor(images=[[image]], return_tensors="pt")
        tiles = mine(image)
        assert tiles.shape[0] == alone["pixel_values"].shape[1] == ours.anyres_geometry.tiles(h, w), (h, w)
        torch.testing.assert_close(tiles, alone["pixel_values"][0], rtol=0, atol=1e-6)
        among = processor.image_processor(images=[[image, image]], return_tensors="pt")
        torch.testing.assert_close(mine(image, tiled=False), among["pixel_values"][0, :1], rtol=0, atol=1e-6)
        for tiled in (True, False):
            expected = processor._get_number_of_features(h, w, TILE, TILE) if tiled else TOKENS_PER_TILE + 1
            assert mine.tokens(image, tiled) == expected, (h, w, tiled)


def test_pooling_is_exercised():
    """The test model's budget of one tile pools a 2 x 2 image (8 x 8 patches -> 4 x 4) and leaves a
    one-tile image alone, and the geometry's counts say so."""
    geometry = AnyResGeometry(TILE, TILE // PATCH, tuple(map(tuple, CANVASES)), 1)
    assert geometry.tokens(64, 64) == 16 + 4 * 5 and geometry.tokens(32, 32) == 16 + 4 * 5
    assert AnyResGeometry(TILE, TILE // PATCH, tuple(map(tuple, CANVASES)), 9).tokens(64, 64) == 16 + 8 * 9


def test_prompts_equal_the_processor(pair):
    """build_prompt (what generate, chat, serve and eval use) gives the processor's ids, pixels and
    image layouts for one image, two images and a conversation of two turns."""
    _, ours, _, processor = pair
    assert ours.tokenizer.template == "chatml" and ours.tokenizer.image_token == IMAGE_TOKEN
    for make in CONVERSATIONS:
        assert_prompt_equals_the_processor(ours, processor, make(sample_images()))


def test_text_before_images_equals_the_processor(pair):
    """A message's text before, between and after its images: the processor's ids (its template
    writes each message's images first, each on its own line, then the texts side by side)."""
    _, ours, _, processor = pair
    assert ours.tokenizer.visuals_first
    for make in TEXT_FIRST:
        assert_prompt_equals_the_processor(ours, processor, make(sample_images()))


def assert_prompt_equals_the_processor(ours, processor, conversation) -> None:
    """build_prompt's ids, tiles and image layouts equal the processor's for `conversation`."""
    prompt = _prompt(ours, conversation)
    expected = _reference_batch(processor, [conversation])
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    tiles, layouts = ours.anyres_geometry.hf_inputs(expected["pixel_values"], expected["image_sizes"],
                                                    expected["batch_num_images"])
    torch.testing.assert_close(prompt.pixel_values, tiles, rtol=0, atol=1e-6)
    assert torch.equal(prompt.image_grid_thw, layouts)


def test_system_prompt_equals_the_processor(pair):
    _, ours, _, processor = pair
    conversation = [{"role": "system", "content": [_text("You are fine.")]}, *CONVERSATIONS[0](sample_images())]
    assert _prompt(ours, conversation).input_ids == _reference_batch(processor, [conversation])["input_ids"][0].tolist()


# --- model parity -----------------------------------------------------------------------------------------


def _parity_batch(processor):
    """A padded batch from the processor: a text-only row, rows with one image each (wide: 2 tiles,
    tall: 3 tiles, 2 x 2: pooled) and a row with two images, neither tiled."""
    images = sample_images()
    rows = [[{"role": "user", "content": [_text("Hello, how are you today?")]}],
            CONVERSATIONS[0](images), CONVERSATIONS[1](images), CONVERSATIONS[3](images), CONVERSATIONS[2](images)]
    return _reference_batch(processor, rows)


def test_logits_equal_transformers(pair):
    ref, ours, _, processor = pair
    batch = _parity_batch(processor)
    assert batch["batch_num_images"].tolist() == [1, 1, 1, 2] and batch["pixel_values"].dim() == 5
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch)  # the processor's tensors as they are
    assert_logits_close(got, expected, batch["attention_mask"])


def test_config_read_from_the_directory(pair):
    _, ours, path, _ = pair
    cfg = ours.config
    assert (cfg.tiling, cfg.anyres_max_tiles, cfg.grid_pinpoints) == ("anyres", 1, tuple(map(tuple, CANVASES)))
    assert (cfg.vision.style, cfg.vision.feature_layer, cfg.adapter.kind, cfg.adapter.depth) == ("siglip", -1, "mlp", 2)
    assert (cfg.vision.image_mean, cfg.vision.image_std) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    assert cfg.image_token_id == ours.tokenizer.token_id(IMAGE_TOKEN) and cfg.tokens_per_image == TOKENS_PER_TILE
    assert onevision_config(path) == cfg


def _pack_tiles(ours, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return ours.anyres_geometry.hf_inputs(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])


def test_packed_loss_equals_the_padded_batch(pair):
    """A training pack (the rows back to back, positions restarting per sample, the images' layouts
    beside their tiles) gives each token the loss the padded call gives it."""
    _, ours, _, processor = pair
    batch = _parity_batch(processor)
    tiles, layouts = _pack_tiles(ours, batch)
    original = ours.compute_loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ours, "compute_loss", lambda *a, **kw: original(*a, image_grid_thw=layouts, **kw))
        check_packed_loss(ours, batch, tiles)


def test_training_pack_equals_the_unpacked_forward(pair):
    """Records through the training pipeline (one image, two images, text only) packed as the
    trainer packs them: `VLM.pack_loss` gives each token the loss of its sample's own unpacked
    forward, and its backward reaches the newline embedding."""
    _, ours, _, _ = pair
    pipeline = SamplePipeline(ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
    samples = []
    for i, make in enumerate(CONVERSATIONS[2:4]):
        conversation = make(sample_images()) + [{"role": "assistant", "content": [_text("The second one.")]}]
        read = read_conversation(conversation, separator=ours.tokenizer.part_separator)
        samples.append(pipeline.encode(Record(f"r{i}", "test", "chat", read.messages, images=read.images)))
    samples.append(pipeline.encode(Record("t", "test", "text", text="Plain text to learn from.")))
    assert all(samples) and [len(s.tiles_per_image) for s in samples] == [2, 1, 0]
    batch = collate(samples, budget=sum(len(s) for s in samples))
    packed = ours.pack_loss(batch)
    start = 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            logits = ours(ids, sample.pixel_values, image_grid_thw=sample.image_grid_thw)[0]
            labels = torch.tensor(sample.labels)
            supervised = labels[1:] != IGNORE_INDEX
            expected = F.cross_entropy(logits[:-1][supervised], labels[1:][supervised], reduction="none")
            got = packed.token_loss[start + 1:start + len(sample)][supervised]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            start += len(sample)
    packed.loss.backward()
    newline = ours.adapter.image_newline
    assert newline.grad is not None and bool(newline.grad.abs().sum() > 0)
    ours.zero_grad(set_to_none=True)


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    """Conversations with one image and with two decode together through the engine's KV cache and
    give the tokens of transformers' generate on the processor's inputs."""
    ref, ours, _, processor = pair
    engine = Engine(ours)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    conversations = [make(sample_images()) for make in CONVERSATIONS[:3]]
    seqs = [engine.add(_prompt(ours, c), params) for c in conversations]
    while engine.rows:
        engine.step()
        for seq in [s for s in engine.rows if s.finished]:
            engine.remove(seq)
    for conversation, seq in zip(conversations, seqs):
        inputs = _reference_batch(processor, [conversation])
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert seq.output_ids == expected and len(set(expected)) > 1


# --- bad input ---------------------------------------------------------------------------------------------


def test_image_that_does_not_match_the_placeholders(pair):
    """A prompt written for one image but given another's tiles: a named error with both counts."""
    _, ours, _, _ = pair
    images = sample_images()
    prompt = _prompt(ours, CONVERSATIONS[0](images))  # the wide image: 2 tiles
    other = _prompt(ours, CONVERSATIONS[1](images))  # the tall image: 3 tiles
    ids = torch.tensor([prompt.input_ids])
    with pytest.raises(BadRecordError, match=r"holds \d+ image token\(s\) but the images give \d+ visual token"):
        ours(ids, other.pixel_values, image_grid_thw=other.image_grid_thw)
    short = other.image_grid_thw.clone()
    short[0, 0] = 2
    with pytest.raises(ValueError, match="has 2 tile\\(s\\); its canvas"):
        ours(ids, other.pixel_values[:2], image_grid_thw=short)


def test_corrupt_image_is_a_named_error(pair, tmp_path):
    _, ours, _, _ = pair
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(broken)}, _text("What is it?")]}]
    with pytest.raises(BadRecordError) as caught:
        _prompt(ours, conversation)
    assert caught.value.reason == "truncated_image"


def test_video_is_refused(pair):
    _, ours, _, _ = pair
    conversation = [{"role": "user", "content": [{"type": "video", "video": [sample_images()[1]] * 2},
                                                 _text("What happens?")]}]
    with pytest.raises(BadRecordError) as caught:
        build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile,
                     resolve_video=lambda value, where, role: value)
    assert caught.value.reason == "unexpected_video"
    with pytest.raises(ValueError, match="grids and videos are inputs of native-resolution models"):
        ours(torch.tensor([[1, 2]]), pixel_values_videos=torch.zeros(1, 2, 3, TILE, TILE))


# --- vlmkit checkpoint, export ------------------------------------------------------------------------------


def test_vlmkit_checkpoint_round_trip(pair, tmp_path):
    _, ours, _, processor = pair
    check_checkpoint_round_trip(ours, tmp_path, _parity_batch(processor), "chatml")


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path, capsys):
    """`vlmkit export --model DIR --to hf` of the imported directory: the same architecture, the
    tensors transformers writes, no missing or unexpected one on loading, the original's logits,
    and a processor that reads the exported directory and gives the same inputs."""
    ref, ours, path, processor = pair
    out = tmp_path / "hf"
    assert main(["export", "--model", str(path), "--to", "hf", str(out)]) == 0
    assert "(hf)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert tensor_names(out) == tensor_names(path)
    back, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs") and not info.get("error_msgs"), info
    batch = _parity_batch(processor)
    again = _parity_batch(_reference_processor(out))
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(again[key], batch[key]), key
    with torch.no_grad():
        expected, got = ref(**batch).logits, back.eval()(**batch).logits
    assert_logits_close(got, expected, batch["attention_mask"])
    assert onevision_config(out) == ours.config


def test_export_refusals(pair):
    _, ours, _, _ = pair
    cfg = ours.config.to_dict()
    with pytest.raises(ConfigError, match="does not tile images at any resolution"):
        check_onevision_exportable(VLMConfig.from_dict({**cfg, "tiling": "grid"}))
    deeper = VLMConfig.from_dict({**cfg, "adapter": {**cfg["adapter"], "depth": 3}})
    with pytest.raises(ConfigError, match="OneVision's projector has 2"):
        check_onevision_exportable(deeper)


# --- refusals on import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    (dict(config=dict(vision_aspect_ratio="anyres")), "vision_aspect_ratio 'anyres' is not 'anyres_max_N'"),
    (dict(config=dict(image_grid_pinpoints=[[32, 48]])), "each a whole number of the tower's 32-pixel tiles"),
    (dict(config=dict(vision_feature_select_strategy="default")), "vision_feature_select_strategy 'default'"),
    (dict(config=dict(vision_config=dict(model_type="clip_vision_model"))), "reads a SigLIP tower"),
    (dict(preprocessor=dict(size=dict(height=64, width=64))), "tiles differ from the tower's 32x32"),
    (dict(preprocessor=dict(resample=2)), "resample 2"),
    (dict(preprocessor=dict(image_grid_pinpoints=[[32, 32]])), "image_grid_pinpoints differ"),
    (dict(processor=dict(num_image_tokens=17)), "num_image_tokens 17 differs from the 16 tokens"),
    (dict(processor=dict(vision_aspect_ratio="anyres_max_9")), "differs from config.json's anyres_max_1"),
    (dict(config=dict(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next")),
     r"architecture .LlavaNextForConditionalGeneration. is not a VLM vlmkit loads whole: \[.*LlavaOnevisionFor"),
])
def test_import_refusals(saved, tmp_path, changes, match):
    _, path = saved
    with pytest.raises(CheckpointError, match=match):
        VLM.from_hf(edited_copy(path, tmp_path / "edited", **changes))
