"""InternVL checkpoints (transformers' `InternVLForConditionalGeneration`) in vlmkit: tiny random
models of two shapes (InternVL3's: LayerNorm, q/k/v biases, tied Qwen2 decoder, last-layer
features; InternViT-6B's: RMSNorm, qk-norm, no q/k/v biases, untied Qwen3 decoder, second-to-last
layer features) saved with a tokenizer and processor configs in the InternVL layout. Checked
against transformers: the image processor's tiles, the processor's prompt ids, logits on a padded
batch of a text-only row and rows with images of different sizes, cached greedy decoding, and the
export round trip; plus the packed loss, the vlmkit checkpoint and the refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.processing_utils import ProcessorMixin

from tests.tokenizer_support import builtin_tokenizer, hf_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.constants import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, QWEN_VL_TOKENS
from vlmkit.data.images import tile_grid
from vlmkit.data.prompt import build_prompt
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams
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
WEIGHT_STD = 0.2
"""Random weights (norm scales and layer scales around 1) larger than transformers' init, so that
norms, biases, layer scales and positions all matter."""
TOLERANCE = 1e-4
IMAGE_SIZES = [(40, 90), (32, 32), (70, 24), (64, 64)]  # (height, width): wide, one tile, tall, 2 x 2
NEW_TOKENS = 6

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


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.dim() == 1 and ("norm" in name or "lambda" in name) and name.endswith(("weight", "lambda_1",
                                                                                              "lambda_2"))
            p.normal_(1.0 if scale else 0.0, WEIGHT_STD)
    return model.eval()


def _save_internvl(path, shape: str):
    """A tiny random InternVL model of `shape` saved with its tokenizer and processor configs."""
    _tokenizer_dir(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    spec = SHAPES[shape]
    config = transformers.InternVLConfig(
        vision_config={**VISION, **spec["vision"]}, text_config={**TEXT, **spec["text"], "vocab_size": len(tok)},
        image_token_id=tok.context_image_token_id, image_seq_length=TOKENS_PER_TILE, **spec["top"])
    model = _randomized(transformers.InternVLForConditionalGeneration(config))
    model.save_pretrained(path)
    return model


def _reference_processor(path):
    """transformers' InternVL processor of `path` with its PIL image processor. Built by hand:
    AutoProcessor would also load the video processor, which needs torchvision; the class check
    of the absent video processor is skipped for that."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.GotOcr2ImageProcessorPil.from_pretrained(path)
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
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


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]


def _image_parts(images) -> list[dict]:
    return [{"type": "image", "image": image} for image in images]


# Conversations: images before, after and between text; a second turn; an image part alone.
CONVERSATIONS = [
    lambda im: [{"role": "user", "content": [*_image_parts(im[:2]), {"type": "text", "text": "What color is it?"}]}],
    lambda im: [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}, *_image_parts(im[2:3])]}],
    lambda im: [{"role": "system", "content": "You are fine."},
                {"role": "user", "content": [{"type": "text", "text": "How many"}, *_image_parts(im[3:]),
                                             {"type": "text", "text": "shapes?"}]},
                {"role": "assistant", "content": "There are three shapes."},
                {"role": "user", "content": _image_parts(im[:1])}],
]


def _reference_batch(processor, conversations, images_per_row):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    images = [image for row in images_per_row for image in row]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True)


def _strip(conversation):
    """The conversation without image values, as transformers' chat template takes it."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]}
            for m in conversation]


def _conversation_images(conversation):
    return [p["image"] for m in conversation if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image"]


# --- processor: tiles and prompts ------------------------------------------------------------------------


def test_tiles_equal_the_image_processor(pair):
    """The model's image processor (data/images.py, its settings from preprocessor_config.json)
    makes transformers' GotOcr2 tiles: the same grids and thumbnails, the same pixels."""
    _, _, ours, path, processor = pair
    images = _images() + [Image.fromarray(np.full((5, 300, 3), 200, dtype=np.uint8))]
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
        conversation = make(_images())
        prompt = build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
        expected = _reference_batch(processor, [_strip(conversation)], [_conversation_images(conversation)])
        assert prompt.input_ids == expected["input_ids"][0].tolist()
        torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


# --- model parity -----------------------------------------------------------------------------------------


def _parity_batch(processor):
    """A left-padded batch from the processor: a text-only row, a row with two images of different
    sizes (3 + 1 tiles), a row with a 2 x 2 image and its thumbnail."""
    images = _images()
    rows = [[{"role": "user", "content": "Hello, how are you today?"}],
            CONVERSATIONS[0](images), [{"role": "user", "content": _image_parts(images[3:])}]]
    return _reference_batch(processor, [_strip(r) for r in rows], [_conversation_images(r) for r in rows])


def test_logits_equal_transformers(pair):
    _, ref, ours, _, processor = pair
    batch = _parity_batch(processor)
    assert batch["pixel_values"].shape[0] == 3 + 1 + 5
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch)  # the processor's tensors as they are
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape == (*real.shape, ours.config.llm.vocab_size)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


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
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    rows = [ids[b][real[b]] for b in range(len(ids))]
    flat = torch.cat(rows)
    cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    with torch.no_grad():
        packed = ours.compute_loss(flat, flat, positions, cu_seqlens, batch["pixel_values"])
        logits = ours(**batch)
    for b, row in enumerate(rows):
        expected = F.cross_entropy(logits[b][real[b]][:-1], row[1:], reduction="none")
        start = int(cu_seqlens[b])
        torch.testing.assert_close(packed.token_loss[start + 1:start + len(row)], expected, rtol=0, atol=TOLERANCE)


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    """Two conversations decode together through the engine's KV cache and give the tokens of
    transformers' generate on the processor's inputs."""
    _, ref, ours, _, processor = pair
    engine = Engine(ours)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    conversations = [make(_images()) for make in CONVERSATIONS[:2]]
    seqs = [engine.add(build_prompt(c, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile), params)
            for c in conversations]
    while engine.rows:
        engine.step()
        for seq in [s for s in engine.rows if s.finished]:
            engine.remove(seq)
    for conversation, seq in zip(conversations, seqs):
        inputs = _reference_batch(processor, [_strip(conversation)], [_conversation_images(conversation)])
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert seq.output_ids == expected and len(set(expected)) > 1


def test_tile_count_must_match_the_placeholders(pair):
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    with pytest.raises(BadRecordError, match=r"holds 144 image token\(s\) but the images give 128 visual token"):
        ours(batch["input_ids"], batch["pixel_values"][:-1], batch["attention_mask"])


# --- vlmkit checkpoint, export ------------------------------------------------------------------------------


def test_vlmkit_checkpoint_round_trip(pair, tmp_path):
    _, _, ours, _, processor = pair
    ours.save_pretrained(tmp_path)
    again = VLM.load(tmp_path)
    assert again.config == ours.config and again.tokenizer.template == "internvl"
    batch = _parity_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), ours(**batch), rtol=0, atol=0)
    conversation = CONVERSATIONS[2](_images())
    assert build_prompt(conversation, again.tokenizer, again.image_processor(), 16).input_ids == build_prompt(
        conversation, ours.tokenizer, ours.image_processor(), 16).input_ids


def _tensor_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path, capsys):
    """`vlmkit export --model DIR --to hf` of the imported directory: the tensors transformers
    writes, no missing or unexpected one on loading, the original's logits, and a processor that
    reads the exported directory and gives the same inputs."""
    _, ref, ours, path, processor = pair
    out = tmp_path / "hf"
    assert main(["export", "--model", str(path), "--to", "hf", str(out)]) == 0
    assert "(hf)" in capsys.readouterr().out
    expected_names = _tensor_names(path) - {n for n in _tensor_names(path) if n.startswith("vision_tower.layernorm")}
    assert _tensor_names(out) == expected_names
    back, info = transformers.InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs") and not info.get("error_msgs"), info
    batch = _parity_batch(processor)
    again = _parity_batch(_reference_processor(out))
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(again[key], batch[key])
    with torch.no_grad():
        expected, got = ref(**batch).logits, back.eval()(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)
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


def _edited_copy(source, target, config=None, preprocessor=None, processor=None):
    shutil.copytree(source, target)
    for name, changes in (("config.json", config), ("preprocessor_config.json", preprocessor),
                          ("processor_config.json", processor)):
        if changes:
            data = json.loads((target / name).read_text())
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key].update(value)
                else:
                    data[key] = value
            (target / name).write_text(json.dumps(data))
    return target


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
        VLM.from_hf(_edited_copy(path, tmp_path / "edited", **changes))


def test_import_is_strict(saved, tmp_path):
    _, path = saved["internvl3"]
    target = _edited_copy(path, tmp_path / "edited")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "encoder.layer.1.lambda_2" not in k}
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vision\.layers\.1\.layer_scale_2"):
        VLM.from_hf(target)


def test_module_layout_names_load_the_same(saved, tmp_path):
    """transformers 5's module names (`model.vision_tower.`, `model.multi_modal_projector.`,
    `model.language_model.`, `lm_head.`) load as the saved layout does."""
    _, path = saved["intern_vit_6b"]
    target = _edited_copy(path, tmp_path / "modules")
    prefixes = {"vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
                "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {next(new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)): f.get_tensor(k)
                 for k in f.keys()}
    save_file(state, str(target / "model.safetensors"))
    expected, got = VLM.from_hf(path).state_dict(), VLM.from_hf(target).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
