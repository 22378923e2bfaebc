"""InternVL checkpoints (transformers' `InternVLForConditionalGeneration`) in vlmkit: tiny random
models of two shapes (InternVL3's: LayerNorm, q/k/v biases, tied Qwen2 decoder, last-layer
features; InternViT-6B's: RMSNorm, qk-norm, no q/k/v biases, untied Qwen3 decoder, second-to-last
layer features) saved with a tokenizer and processor configs in the InternVL layout. Checked
against transformers: the image processor's tiles, the processor's prompt ids, logits on a padded
batch of a text-only row and rows with images of different sizes, cached greedy decoding, and the
export round trip; plus the packed loss, the vlmkit checkpoint and the refusals."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from tests.hf_vlm_support import (CONVERSATIONS, assert_logits_close, check_cached_greedy_decoding,
                                  check_checkpoint_round_trip, check_packed_loss, conversation_images, edited_copy,
                                  image_parts, randomized, sample_images, tensor_names, without_video_processor)
from tests.tokenizer_support import builtin_tokenizer, hf_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.constants import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, QWEN_VL_TOKENS
from vlmkit.data.images import tile_grid
from vlmkit.data.prompt import build_prompt
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.internvl import EXTRA_SPECIAL_TOKENS, check_internvl_exportable, internvl_config
from vlmkit.models.hf.llava import check_llava_exportable

# The chat template transformers' conversion script gives InternVL checkpoints: an image part is
# <IMG_CONTEXT> and a newline, which the processor expands to <img> + tokens + </img>.
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
# InternVL's vocabulary is Qwen2.5-VL's (with its vision tokens) plus the InternVL tokens.
SPECIALS = ["<|endoftext|>", IM_START, IM_END, *QWEN_VL_TOKENS, IMG_START, IMG_END, IMG_CONTEXT, "<video>"]

IMAGE_SIZE, PATCH, MAX_TILES = 32, 4, 6
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2 // 4  # pixel shuffle by 2
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

VISION = dict(hidden_size=32, num_attention_heads=2, intermediate_size=48, image_size=IMAGE_SIZE, patch_size=PATCH)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=512)
SHAPES = {
    "internvl3": dict(vision=dict(num_hidden_layers=2, attention_bias=True, norm_type="layer_norm"),
                      text=dict(model_type="qwen2"), top=dict(tie_word_embeddings=True)),
    "intern_vit_6b": dict(vision=dict(num_hidden_layers=3, attention_bias=False, use_qk_norm=True,
                                      norm_type="rms_norm", use_mean_pooling=False),
                          text=dict(model_type="qwen3", head_dim=32),
                          top=dict(tie_word_embeddings=False, vision_feature_layer=-2)),
}


def _tokenizer_dir(path):
    hf_dir(path, SPECIALS, {"eos_token": IM_END, "pad_token": "<|endoftext|>", "chat_template": TEMPLATE,
                            "extra_special_tokens": EXTRA_SPECIAL_TOKENS})
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="GotOcr2ImageProcessor", size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE),
        crop_to_patches=True, max_patches=MAX_TILES, **IMAGENET)))
    (path / "processor_config.json").write_text(json.dumps(dict(processor_class="InternVLProcessor",
                                                                image_seq_length=TOKENS_PER_TILE)))
    return path


def _is_scale(name: str, p) -> bool:
    """Norm scales and layer scales."""
    return p.dim() == 1 and ("norm" in name or "lambda" in name) and name.endswith(("weight", "lambda_1", "lambda_2"))


def _save_internvl(path, shape: str):
    """A tiny random InternVL model of `shape` saved with its tokenizer and processor configs."""
    _tokenizer_dir(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    spec = SHAPES[shape]
    config = transformers.InternVLConfig(
        vision_config={**VISION, **spec["vision"]}, text_config={**TEXT, **spec["text"], "vocab_size": len(tok)},
        image_token_id=tok.context_image_token_id, image_seq_length=TOKENS_PER_TILE, **spec["top"])
    model = randomized(transformers.InternVLForConditionalGeneration(config), _is_scale)
    model.save_pretrained(path)
    return model


def _reference_processor(path):
    """transformers' InternVL processor of `path` with its PIL image processor. Built by hand:
    AutoProcessor would also load the video processor, which needs torchvision; the class check
    of the absent video processor is skipped for that."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.GotOcr2ImageProcessorPil.from_pretrained(path)
    with without_video_processor():
        return transformers.InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                              image_seq_length=TOKENS_PER_TILE, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """shape -> (transformers model, its directory)."""
    out = {}
    for shape in SHAPES:
        path = tmp_path_factory.mktemp(shape)
        out[shape] = _save_internvl(path, shape), path
    return out


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, saved):
    """(shape, transformers model, VLM.from_hf of its directory, the directory, its processor)."""
    ref, path = saved[request.param]
    return request.param, ref, VLM.from_hf(path), path, _reference_processor(path)



def _reference_batch(processor, conversations, images_per_row):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    images = [image for row in images_per_row for image in row]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True)


def _strip(conversation):
    """The conversation without image values, as transformers' chat template takes it."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
            for m in conversation]


# --- processor: tiles and prompts ------------------------------------------------------------------------


def test_tiles_equal_the_image_processor(pair):
    """The model's image processor (data/images.py, its settings from preprocessor_config.json)
    makes transformers' GotOcr2 tiles: the same grids and thumbnails, the same pixels."""
    _, _, ours, path, processor = pair
    images = sample_images() + [Image.fromarray(np.full((5, 300, 3), 200, dtype=np.uint8))]
    expected = processor.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
    mine = ours.image_processor()
    tiles = [mine(image) for image in images]
    assert [t.shape[0] for t in tiles] == expected["num_patches"].tolist() == [3, 1, 4, 5, MAX_TILES + 1]
    torch.testing.assert_close(torch.cat(tiles), expected["pixel_values"], rtol=0, atol=1e-6)


def test_tile_grid_is_transformers_canvas():
    """The grid choice, ties included, over many image shapes and tile limits."""
    for max_tiles in (2, 4, 6, 12):
        for width in range(1, 200, 7):
            for height in range(1, 200, 5):
                assert tile_grid(width, height, IMAGE_SIZE, max_tiles) == get_optimal_tiled_canvas(
                    (height, width), (IMAGE_SIZE, IMAGE_SIZE), 1, max_tiles)


def test_prompts_equal_the_processor(pair):
    """build_prompt (what generate, chat, serve and eval use) gives the processor's ids and pixels
    for conversations with images anywhere, several turns and a system prompt."""
    _, _, ours, _, processor = pair
    assert ours.tokenizer.template == "internvl" and ours.tokenizer.image_token == IMG_CONTEXT
    for make in CONVERSATIONS:
        conversation = make(sample_images())
        prompt = build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
        expected = _reference_batch(processor, [_strip(conversation)], [conversation_images(conversation)])
        assert prompt.input_ids == expected["input_ids"][0].tolist()
        torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


# --- model parity -----------------------------------------------------------------------------------------


def _parity_batch(processor):
    """A left-padded batch from the processor: a text-only row, a row with two images of different
    sizes (3 + 1 tiles), a row with a 2 x 2 image and its thumbnail."""
    images = sample_images()
    rows = [[{"role": "user", "content": "Hello, how are you today?"}],
            CONVERSATIONS[0](images), [{"role": "user", "content": image_parts(images[3:])}]]
    return _reference_batch(processor, [_strip(r) for r in rows], [conversation_images(r) for r in rows])


def test_logits_equal_transformers(pair):
    _, ref, ours, _, processor = pair
    batch = _parity_batch(processor)
    assert batch["pixel_values"].shape[0] == 3 + 1 + 5
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch)  # the processor's tensors as they are
    assert got.shape[-1] == ours.config.llm.vocab_size
    assert_logits_close(got, expected, batch["attention_mask"])


def test_config_read_from_the_directory(pair):
    shape, _, ours, path, _ = pair
    cfg, vision = ours.config, ours.config.vision
    six_b = shape == "intern_vit_6b"
    assert (vision.style, vision.layer_scale, vision.image_mean) == ("intern_vit", 0.1, tuple(IMAGENET["image_mean"]))
    assert (vision.qk_norm, vision.qkv_bias, vision.norm) == (six_b, not six_b, "rms_norm" if six_b else "layer_norm")
    assert vision.feature_layer == (-2 if six_b else -1)
    assert (cfg.adapter.kind, cfg.adapter.scale_factor, cfg.tokens_per_image) == ("pixel_shuffle", 2, TOKENS_PER_TILE)
    assert (cfg.max_tiles, cfg.use_thumbnail, cfg.llm.tie_embeddings) == (MAX_TILES, True, not six_b)
    assert (cfg.llm.qk_norm, cfg.llm.qkv_bias) == (six_b, not six_b)
    assert cfg.image_token_id == ours.tokenizer.token_id(IMG_CONTEXT)
    assert internvl_config(path) == cfg


def test_packed_loss_equals_the_padded_batch(pair):
    """A training pack (the rows back to back, positions restarting per sample) gives each token
    the loss the padded call gives it."""
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    check_packed_loss(ours, batch, batch["pixel_values"])


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    """Two conversations decode together through the engine's KV cache and give the tokens of
    transformers' generate on the processor's inputs."""
    _, ref, ours, _, processor = pair
    check_cached_greedy_decoding(ours, ref,
                                 lambda c: _reference_batch(processor, [_strip(c)], [conversation_images(c)]))


def test_tile_count_must_match_the_placeholders(pair):
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    with pytest.raises(BadRecordError, match=r"holds 144 image token\(s\) but the images give 128 visual token"):
        ours(batch["input_ids"], batch["pixel_values"][:-1], batch["attention_mask"])


# --- vlmkit checkpoint, export ------------------------------------------------------------------------------


def test_vlmkit_checkpoint_round_trip(pair, tmp_path):
    _, _, ours, _, processor = pair
    check_checkpoint_round_trip(ours, tmp_path, _parity_batch(processor), "internvl")


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path, capsys):
    """`vlmkit export --model DIR --to hf` of the imported directory: the tensors transformers
    writes, no missing or unexpected one on loading, the original's logits, and a processor that
    reads the exported directory and gives the same inputs."""
    _, ref, ours, path, processor = pair
    out = tmp_path / "hf"
    assert main(["export", "--model", str(path), "--to", "hf", str(out)]) == 0
    assert "(hf)" in capsys.readouterr().out
    expected_names = tensor_names(path) - {n for n in tensor_names(path) if n.startswith("vision_tower.layernorm")}
    assert tensor_names(out) == expected_names
    back, info = transformers.InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs") and not info.get("error_msgs"), info
    batch = _parity_batch(processor)
    again = _parity_batch(_reference_processor(out))
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(again[key], batch[key])
    with torch.no_grad():
        expected, got = ref(**batch).logits, back.eval()(**batch).logits
    assert_logits_close(got, expected, batch["attention_mask"])
    assert internvl_config(out) == ours.config


def test_export_refusals(pair, tmp_path):
    _, _, ours, _, _ = pair
    cfg = ours.config.to_dict()
    with pytest.raises(ConfigError, match="InternViT; llava-hf's towers are SigLIP or CLIP"):
        check_llava_exportable(ours.config)
    siglip = VLMConfig.from_dict({**cfg, "vision": {**cfg["vision"], "style": "siglip"}})
    with pytest.raises(ConfigError, match="the vision tower is 'siglip'"):
        check_internvl_exportable(siglip)
    no_thumbnail = VLMConfig.from_dict({**cfg, "use_thumbnail": False, "adapter": {**cfg["adapter"], "depth": 3}})
    with pytest.raises(ConfigError, match="2 linear layers.*always adds a thumbnail"):
        check_internvl_exportable(no_thumbnail)
    tok = builtin_tokenizer()
    builtin = VLM(VLMConfig(vision=dict(style="intern_vit", layer_scale=0.1), adapter=dict(kind="pixel_shuffle"),
                            llm=dict(vocab_size=tok.vocab_size), image_token_id=tok.image_token_id), tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer's chat format is 'builtin'"):
        builtin.export_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refusals on import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    (dict(config=dict(vision_feature_select_strategy="full")), "keeps the class token"),
    (dict(config=dict(vision_feature_layer=[-1, -2])), "concatenates several layers"),
    (dict(config=dict(vision_config=dict(use_mean_pooling=False))), "final LayerNorm"),
    (dict(config=dict(vision_config=dict(image_size=[32, 48]))), "not square"),
    (dict(config=dict(vision_config=dict(use_absolute_position_embeddings=False))), "learned position table"),
    (dict(preprocessor=dict(min_patches=2)), "tiles from one tile"),
    (dict(preprocessor=dict(size=dict(height=64, width=64))), "differ from the tower's 32x32"),
    (dict(preprocessor=dict(image_processor_type="InternVL3_5ImageProcessor")), "tiles as GotOcr2ImageProcessor"),
    (dict(processor=dict(image_seq_length=256)), "image_seq_length 256 differs from the 16 tokens"),
])
def test_import_refusals(saved, tmp_path, changes, match):
    _, path = saved["internvl3"]
    with pytest.raises(CheckpointError, match=match):
        VLM.from_hf(edited_copy(path, tmp_path / "edited", **changes))


def test_import_is_strict(saved, tmp_path):
    _, path = saved["internvl3"]
    target = edited_copy(path, tmp_path / "edited")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "encoder.layer.1.lambda_2" not in k}
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vision\.layers\.1\.layer_scale_2"):
        VLM.from_hf(target)


def test_module_layout_names_load_the_same(saved, tmp_path):
    """transformers 5's module names (`model.vision_tower.`, `model.multi_modal_projector.`,
    `model.language_model.`, `lm_head.`) load as the saved layout does."""
    _, path = saved["intern_vit_6b"]
    target = edited_copy(path, tmp_path / "modules")
    prefixes = {"vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
                "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {next(new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)): f.get_tensor(k)
                 for k in f.keys()}
    save_file(state, str(target / "model.safetensors"))
    expected, got = VLM.from_hf(path).state_dict(), VLM.from_hf(target).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
