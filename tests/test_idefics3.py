"""Idefics3 and SmolVLM checkpoints (transformers' `Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`) in vlmkit: tiny random models of three shapes (Idefics3's: a
Llama-3 vocabulary, an untied decoder, an 8 x 8 patch grid; SmolVLM's: a ChatML vocabulary, a tied
decoder, a 25 x 25 grid, whose bucketed positions the reference rounds off the diagonal, and a
pixel shuffle by 5; SmolVLM-Instruct's: tiles that are not a whole number of patches, shuffled by
3) saved with a tokenizer and processor configs. Checked against transformers:
the image processor's tiles, the processor's prompt ids, logits on a padded batch of a text-only
row and rows with images of different sizes (the processor's 5-D tensors as they are), cached
greedy decoding and the export round trip; plus the packed loss, the vlmkit checkpoint and the
refusals."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.smolvlm import processing_smolvlm

from tests.hf_vlm_support import (CONVERSATIONS, IMAGE_SIZES, assert_logits_close, check_cached_greedy_decoding,
                                  check_checkpoint_round_trip, check_packed_loss, conversation_images, edited_copy,
                                  randomized, sample_images, tensor_names, without_video_processor)
from tests.tokenizer_support import builtin_tokenizer, hf_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.constants import (END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IGNORE_INDEX, IM_END, IM_START,
                              IMAGE_TOKEN)
from vlmkit.data.messages import read_conversation
from vlmkit.data.prompt import build_prompt, encode_images
from vlmkit.data.split_images import SplitImageProcessor
from vlmkit.data.template import encode_record, render
from vlmkit.data.types import Record
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.models.config import VisionConfig, VLMConfig
from vlmkit.models.hf.idefics3 import check_idefics3_exportable, idefics3_config
from vlmkit.models.hf.internvl import check_internvl_exportable
from vlmkit.models.vision import bucketed_position_ids

# Idefics3-8B's chat template (list contents only; the reference rows below give lists).
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
TILE_NAMES = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS3_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE_TOKEN, *TILE_NAMES]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=1024)
SMOLVLM = dict(name="SmolVLM", config=transformers.SmolVLMConfig, model=transformers.SmolVLMForConditionalGeneration,
               image_processor=transformers.SmolVLMImageProcessorPil,
               specials=["<|endoftext|>", IM_START, IM_END, *IDEFICS3_TOKENS],
               tokens=dict(bos_token=IM_START, eos_token=END_OF_UTTERANCE, pad_token="<|endoftext|>",
                           chat_template=processing_smolvlm.DEFAULT_CHAT_TEMPLATE),
               vision=dict(hidden_size=32, num_attention_heads=2, intermediate_size=48, num_hidden_layers=2,
                           image_size=50, patch_size=2),
               scale_factor=5, tied=True, tiles_per_side=2)
SHAPES = {
    "idefics3": dict(name="Idefics3", config=transformers.Idefics3Config,
                     model=transformers.Idefics3ForConditionalGeneration,
                     image_processor=transformers.Idefics3ImageProcessorPil,
                     specials=[*LLAMA3_TOKENS, *IDEFICS3_TOKENS],
                     tokens=dict(bos_token="<|begin_of_text|>", eos_token=END_OF_UTTERANCE,
                                 pad_token="<|end_of_text|>", chat_template=IDEFICS3_TEMPLATE),
                     vision=dict(hidden_size=32, num_attention_heads=2, intermediate_size=48, num_hidden_layers=3,
                                 image_size=32, patch_size=4),
                     scale_factor=2, tied=False, tiles_per_side=2),
    "smolvlm": SMOLVLM,
    # SmolVLM-Instruct's tower in small: tiles of a size that is not a multiple of the patch (384 /
    # 14 there, 38 / 4 here), the conv dropping the part patch (9 x 9), shuffled by 3.
    "smolvlm_instruct": {**SMOLVLM, "vision": {**SMOLVLM["vision"], "image_size": 38, "patch_size": 4},
                         "scale_factor": 3},
}


def _tokens_per_tile(spec) -> int:
    return (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2 // spec["scale_factor"] ** 2


def _write_processor_files(path, shape: str):
    spec = SHAPES[shape]
    tile = spec["vision"]["image_size"]
    image_processor = dict(image_processor_type=f"{spec['name']}ImageProcessor", max_image_size=dict(longest_edge=tile),
                           size=dict(longest_edge=spec["tiles_per_side"] * tile), resample=1, do_image_splitting=True,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    (path / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (path / "processor_config.json").write_text(json.dumps(dict(processor_class=f"{spec['name']}Processor",
                                                                image_seq_len=_tokens_per_tile(spec))))


def _is_scale(name: str, p) -> bool:
    return p.dim() == 1 and "norm" in name and name.endswith("weight")


def _save(path, shape: str):
    """A tiny random model of `shape` saved with its tokenizer and processor configs."""
    spec = SHAPES[shape]
    hf_dir(path, spec["specials"], spec["tokens"])
    _write_processor_files(path, shape)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = spec["config"](vision_config=spec["vision"], scale_factor=spec["scale_factor"],
                            text_config={**TEXT, "vocab_size": len(tok), "tie_word_embeddings": spec["tied"]},
                            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=spec["tied"])
    model = randomized(spec["model"](config), _is_scale)
    model.save_pretrained(path)
    return model


def _reference_processor(path, shape: str):
    """transformers' processor of `path` (Idefics3's or SmolVLM's) with its PIL image processor.
    SmolVLM's is built without its video processor (it needs torchvision) and with num2words
    stood in (it only spells video frame counts)."""
    spec = SHAPES[shape]
    parts = dict(image_processor=spec["image_processor"].from_pretrained(path),
                 tokenizer=transformers.AutoTokenizer.from_pretrained(path), image_seq_len=_tokens_per_tile(spec),
                 chat_template=spec["tokens"]["chat_template"])
    if spec["name"] == "Idefics3":
        return transformers.Idefics3Processor(**parts)
    with without_video_processor(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(processing_smolvlm, "num2words", str)
        return transformers.SmolVLMProcessor(**parts, video_processor=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """shape -> (transformers model, its directory)."""
    out = {}
    for shape in SHAPES:
        path = tmp_path_factory.mktemp(shape)
        out[shape] = _save(path, shape), path
    return out


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, saved):
    """(shape, transformers model, VLM.from_hf of its directory, the directory, its processor)."""
    ref, path = saved[request.param]
    return request.param, ref, VLM.from_hf(path), path, _reference_processor(path, request.param)



def _strip(conversation):
    """The conversation as transformers' chat templates take it: image parts without values, text
    contents as one text part (Idefics3's template reads lists only)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else
             [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
            for m in conversation]


def _reference_batch(processor, conversations, images_per_row):
    texts = [processor.tokenizer.apply_chat_template(_strip(c), tokenize=False, add_generation_prompt=True)
             for c in conversations]
    return processor(text=texts, images=images_per_row if any(images_per_row) else None, return_tensors="pt",
                     padding=True)


# --- processor: tiles and prompts ------------------------------------------------------------------------


@pytest.mark.parametrize("tiles_per_side", [1, 2, 3])
@pytest.mark.parametrize("tile", [32, 38])
def test_tiles_equal_the_image_processor(tiles_per_side, tile):
    """data/split_images.py gives transformers' Idefics3 image processor's tiles: the same grids,
    global images and pixels, for images wider, taller, smaller and larger than a tile, and with
    the longest side of one tile (no split, the image alone); for tiles of whole 4-pixel patches
    and not (SmolVLM-Instruct's)."""
    reference = transformers.Idefics3ImageProcessorPil(size={"longest_edge": tiles_per_side * tile},
                                                        max_image_size={"longest_edge": tile})
    mine = SplitImageProcessor(tile, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), tiles_per_side)
    rng = np.random.default_rng(1)
    sizes = IMAGE_SIZES + [(5, 300), (300, 7), (1, 1), (33, 31), (97, 64), (64, 97)]
    for h, w in sizes:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = reference(images=[[image]], return_tensors="pt", return_row_col_info=True)
        grid = (expected["rows"][0][0], expected["cols"][0][0])
        assert mine.grid(w, h) == grid, (h, w)
        tiles = mine(image)
        assert tiles.shape[0] == mine.num_tiles(w, h) == grid[0] * grid[1] + 1
        torch.testing.assert_close(tiles, expected["pixel_values"][0], rtol=0, atol=1e-6)


def test_bucketed_positions_equal_the_reference():
    """The position rows the tower reads: transformers' bucketing, float rounding included (side 25
    shifts some patches of the native grid), for native and other grids, and for image sizes that
    end in a part patch (the table's side is the whole patches)."""
    torch.manual_seed(0)
    for side, part_patch in ((8, 0), (25, 0), (26, 0), (31, 0), (25, 1)):
        config = transformers.Idefics3VisionConfig(hidden_size=8, image_size=side * 2 + part_patch, patch_size=2,
                                                   num_attention_heads=2)
        assert VisionConfig(image_size=config.image_size, patch_size=2).grid_size == side
        embeddings = transformers.models.idefics3.modeling_idefics3.Idefics3VisionEmbeddings(config)
        table = embeddings.position_embedding.weight
        for grid in ((side, side), (side - 3, side), (5, 12)):
            mask = torch.ones(1, *grid, dtype=torch.bool)
            pixels = torch.zeros(1, 3, grid[0] * 2, grid[1] * 2)
            with torch.no_grad():
                expected = embeddings(pixels, mask)[0] - embeddings.patch_embedding.bias
            got = table[bucketed_position_ids(*grid, side)]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(bucketed_position_ids(25, 25, 25), torch.arange(625))


def test_prompts_equal_the_processor(pair):
    """build_prompt (what generate, chat, serve and eval use) gives the processor's ids and pixels
    for conversations with images anywhere, several turns and a system prompt."""
    _, _, ours, _, processor = pair
    assert ours.tokenizer.template == "idefics3" and ours.tokenizer.image_token == IMAGE_TOKEN
    for make in CONVERSATIONS:
        conversation = make(sample_images())
        prompt = build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
        expected = _reference_batch(processor, [conversation], [conversation_images(conversation)])
        assert prompt.input_ids == expected["input_ids"][0].tolist()
        torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"][0], rtol=0, atol=1e-6)


def test_rendered_text_equals_the_template(pair):
    """The text vlmkit's template writes, with images as placeholders, is the jinja template's."""
    _, _, ours, _, processor = pair
    for make in CONVERSATIONS:
        conversation = make(sample_images())
        messages = read_conversation(conversation, separator=ours.tokenizer.part_separator).messages
        expected = processor.tokenizer.apply_chat_template(_strip(conversation), tokenize=False,
                                                           add_generation_prompt=True)
        assert render(messages, ours.tokenizer, add_generation_prompt=True) == expected


def test_training_sample_equals_the_processor(pair):
    """A chat record (what training packs) becomes the processor's ids of the whole conversation,
    and only the assistant's reply, its leading space and <end_of_utterance> are supervised."""
    _, _, ours, _, processor = pair
    conversation = CONVERSATIONS[2](sample_images())[:3]  # system, user with an image, assistant
    read = read_conversation(conversation, separator=ours.tokenizer.part_separator)
    visual = encode_images(read.images, ours.image_processor(), ours.config.tokens_per_tile)
    ids, labels = encode_record(Record("r", "test", "chat", read.messages), ours.tokenizer, visual.visual_tokens)
    text = processor.tokenizer.apply_chat_template(_strip(conversation), tokenize=False)
    expected = processor(text=[text], images=[conversation_images(conversation)], return_tensors="pt")
    assert ids == expected["input_ids"][0].tolist()
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert ours.tokenizer.decode(supervised, skip_special=False) == " There are three shapes.<end_of_utterance>"


# --- model parity -----------------------------------------------------------------------------------------


def _parity_batch(processor):
    """A padded batch from the processor: a text-only row, a row with two images of different
    sizes (3 + 5 tiles), a row with one tall image (3 tiles)."""
    images = sample_images()
    rows = [[{"role": "user", "content": "Hello, how are you today?"}],
            CONVERSATIONS[0](images), CONVERSATIONS[1](images)]
    return _reference_batch(processor, rows, [conversation_images(r) for r in rows])


def test_logits_equal_transformers(pair):
    _, ref, ours, _, processor = pair
    batch = _parity_batch(processor)
    assert batch["pixel_values"].dim() == 5 and batch["pixel_values"].shape[:2] == (3, 8)
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch)  # the processor's tensors as they are
    assert got.shape[-1] == ours.config.llm.vocab_size
    assert_logits_close(got, expected, batch["attention_mask"])


def test_config_read_from_the_directory(pair):
    shape, _, ours, path, _ = pair
    cfg, vision, spec = ours.config, ours.config.vision, SHAPES[shape]
    assert (vision.style, vision.positions, vision.post_norm_features, vision.feature_layer) == (
        "siglip", "bucketed", True, -1)
    assert (cfg.adapter.kind, cfg.adapter.depth, cfg.adapter.norm, cfg.adapter.bias) == (
        "pixel_shuffle", 1, False, False)
    assert (cfg.adapter.scale_factor, cfg.tokens_per_image) == (spec["scale_factor"], _tokens_per_tile(spec))
    assert (cfg.tiling, cfg.tiles_per_side, cfg.use_thumbnail, cfg.llm.tie_embeddings) == (
        "split", spec["tiles_per_side"], True, spec["tied"])
    assert cfg.hf_architecture == spec["model"].__name__
    assert cfg.image_token_id == ours.tokenizer.token_id(IMAGE_TOKEN)
    assert ours.tokenizer.bos_id == ours.tokenizer.token_id(spec["tokens"]["bos_token"])
    assert ours.tokenizer.stop_ids == [ours.tokenizer.token_id(END_OF_UTTERANCE)]
    assert idefics3_config(path) == cfg


def test_smolvlm_instruct_sizes_are_read(tmp_path):
    """SmolVLM-Instruct's own sizes (384-pixel tiles of 14-pixel patches, a pixel shuffle by 3, 4
    tiles per side): the 27 x 27 patches and 81 tokens per tile transformers counts."""
    config = transformers.SmolVLMConfig(vision_config=dict(image_size=384, patch_size=14), scale_factor=3,
                                        text_config={**TEXT, "vocab_size": 64}, image_token_id=63)
    config.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="SmolVLMImageProcessor", size=dict(longest_edge=4 * 384),
        max_image_size=dict(longest_edge=384), resample=1, do_image_splitting=True)))
    (tmp_path / "processor_config.json").write_text(json.dumps(dict(processor_class="SmolVLMProcessor",
                                                                    image_seq_len=81)))
    cfg = idefics3_config(tmp_path)
    assert (cfg.vision.grid_size, cfg.tokens_per_image, cfg.tiles_per_side) == (27, 81, 4)


def test_packed_loss_equals_the_padded_batch(pair):
    """A training pack (the rows back to back, positions restarting per sample) gives each token
    the loss the padded call gives it."""
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    tiles = batch["pixel_values"].flatten(0, 1)
    check_packed_loss(ours, batch, tiles[tiles.flatten(1).ne(0).any(1)])  # the padding tiles dropped


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    """Two conversations decode together through the engine's KV cache and give the tokens of
    transformers' generate on the processor's inputs."""
    _, ref, ours, _, processor = pair
    check_cached_greedy_decoding(ours, ref, lambda c: _reference_batch(processor, [c], [conversation_images(c)]))


# --- bad input ---------------------------------------------------------------------------------------------


def test_tile_count_must_match_the_placeholders(pair):
    """An image's tiles and the prompt's placeholders disagree: a named error with both counts."""
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    short = batch["pixel_values"].clone()
    short[1, 7] = 0  # the second row's last tile becomes padding
    tokens = int((batch["input_ids"] == ours.config.image_token_id).sum())
    per_tile = ours.config.tokens_per_image
    with pytest.raises(BadRecordError, match=rf"holds {tokens} image token\(s\) but the images give "
                                             rf"{tokens - per_tile} visual token"):
        ours(batch["input_ids"], short, batch["attention_mask"], pixel_attention_mask=batch["pixel_attention_mask"])


def test_partly_padded_tile_is_refused(pair):
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    mask = batch["pixel_attention_mask"].clone()
    mask[1, 0, -1] = 0
    with pytest.raises(ValueError, match="padded pixels inside an image tile"):
        ours(**{**batch, "pixel_attention_mask": mask})


def test_corrupt_image_is_a_named_error(pair, tmp_path):
    _, _, ours, _, _ = pair
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(broken)},
                                                 {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(BadRecordError) as caught:
        build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
    assert caught.value.reason == "truncated_image"


# --- vlmkit checkpoint, export ------------------------------------------------------------------------------


def test_vlmkit_checkpoint_round_trip(pair, tmp_path):
    _, _, ours, _, processor = pair
    check_checkpoint_round_trip(ours, tmp_path, _parity_batch(processor), "idefics3")


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path, capsys):
    """`vlmkit export --model DIR --to hf` of the imported directory: the same architecture, the
    tensors transformers writes, no missing or unexpected one on loading, the original's logits,
    and a processor that reads the exported directory and gives the same inputs."""
    shape, ref, ours, path, processor = pair
    out = tmp_path / "hf"
    assert main(["export", "--model", str(path), "--to", "hf", str(out)]) == 0
    assert "(hf)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == [SHAPES[shape]["model"].__name__]
    assert tensor_names(out) == tensor_names(path) - ({"lm_head.weight"} if SHAPES[shape]["tied"] else set())
    back, info = SHAPES[shape]["model"].from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs") and not info.get("error_msgs"), info
    batch = _parity_batch(processor)
    again = _parity_batch(_reference_processor(out, shape))
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(again[key], batch[key])
    with torch.no_grad():
        expected, got = ref(**batch).logits, back.eval()(**batch).logits
    assert_logits_close(got, expected, batch["attention_mask"])
    assert idefics3_config(out) == ours.config


def test_export_refusals(pair, tmp_path):
    _, _, ours, _, _ = pair
    cfg = ours.config.to_dict()
    with pytest.raises(ConfigError, match="the vision tower is 'siglip'"):
        check_internvl_exportable(ours.config)
    plain = VLMConfig.from_dict({**cfg, "vision": {**cfg["vision"], "positions": "learned"},
                                 "adapter": {**cfg["adapter"], "norm": True}})
    with pytest.raises(ConfigError, match="bucketed positions.*without LayerNorm or bias"):
        check_idefics3_exportable(plain)
    tok = builtin_tokenizer()
    builtin = VLM(VLMConfig(**{**cfg, "llm": {**cfg["llm"], "vocab_size": tok.vocab_size},
                               "image_token_id": tok.image_token_id}), tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer's chat format is 'builtin'"):
        builtin.export_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refusals on import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    (dict(preprocessor=dict(do_image_splitting=False)), "do_image_splitting"),
    (dict(preprocessor=dict(resample=3)), "resample 3 is not LANCZOS"),
    (dict(preprocessor=dict(max_image_size=dict(longest_edge=64))), "tiles differ from the tower's 32x32"),
    (dict(preprocessor=dict(size=dict(longest_edge=80))), "not a whole number of 32-pixel tiles"),
    (dict(preprocessor=dict(image_processor_type="SiglipImageProcessor")), "vlmkit splits images as"),
    (dict(processor=dict(image_seq_len=169)), "image_seq_len 169 differs from the 16 tokens"),
    (dict(config=dict(vision_config=dict(image_size=3))), "must hold at least one patch of 4"),
    (dict(config=dict(architectures=["Idefics2ForConditionalGeneration"], model_type="idefics2")),
     r"architecture .Idefics2ForConditionalGeneration. is not a VLM vlmkit loads whole: \[.*Idefics3For.*SmolVLMFor"),
])
def test_import_refusals(saved, tmp_path, changes, match):
    _, path = saved["idefics3"]
    with pytest.raises(CheckpointError, match=match):
        VLM.from_hf(edited_copy(path, tmp_path / "edited", **changes))


def test_import_is_strict(saved, tmp_path):
    _, path = saved["idefics3"]
    target = edited_copy(path, tmp_path / "edited")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "connector" not in k}
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"adapter\.mlp\.linear_1\.weight"):
        VLM.from_hf(target)
