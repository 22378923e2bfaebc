"""DeepSeek-VL checkpoints (transformers' `DeepseekVLForConditionalGeneration` and
`DeepseekVLHybridForConditionalGeneration`) in vlmkit: tiny random models of both shapes saved with
a DeepSeek-format tokenizer and processor configs. Checked against transformers: the image
processor's tensors (both resolutions), the processor's prompt ids, logits on a padded batch of a
text-only row and rows with several images of different sizes, cached greedy decoding, the export
round trip; plus the packed loss, the vlmkit checkpoint, freezing and the refusals."""

import json

import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer as Backend, processors

from tests.hf_vlm_support import (CONVERSATIONS, assert_logits_close, check_cached_greedy_decoding,
                                  check_checkpoint_round_trip, check_packed_loss, conversation_images, edited_copy,
                                  image_parts, randomized, sample_images, tensor_names)
from tests.tokenizer_support import hf_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.config import Stage
from vlmkit.constants import DEEPSEEK_END_OF_SENTENCE, DEEPSEEK_VL_IMAGE_TOKEN, OPENAI_CLIP_MEAN
from vlmkit.data.prompt import build_prompt
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.deepseek_vl import check_deepseek_vl_exportable, deepseek_vl_config
from vlmkit.models.sam import split_hybrid_rows
from vlmkit.train.stages import apply_freezing, module_parameters

BOS = "<｜begin▁of▁sentence｜>"
# The chat template of the DeepSeek-VL checkpoints transformers' conversion writes (a fixed system
# text, `User: ` / `Assistant:` turns, parts stripped at the ends and joined).
TEMPLATE = (
    "{% set seps = ['\n\n', '<｜end▁of▁sentence｜>'] %}{% set i = 0 %}You are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language.\n\n{% for message in messages %}{% if message['role']|lower == 'user' %}"
    "User: {% elif message['role']|lower == 'assistant' %}Assistant:{% if not (loop.last and not add_generation_prompt "
    "and message['content'][0]['type']=='text' and message['content'][0]['text']=='') %} {% endif %}{% else %}"
    "{{ message['role'].capitalize() }}: {% endif %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image_placeholder>{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}{% if loop.first %}{% set text = text.lstrip() %}{% endif %}{% if loop.last %}"
    "{% set text = text.rstrip() %}{% endif %}{% if not loop.first and message['content'][loop.index0-1]['type'] == "
    "'text' %}{{ ' ' + text }}{% else %}{{ text }}{% endif %}{% endif %}{% endfor %}{% if not loop.last or "
    "add_generation_prompt %}{% if message['role']|lower == 'user' %}{{ seps[0] }}{% else %}{{ seps[1] }}{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
SPECIALS = [BOS, DEEPSEEK_END_OF_SENTENCE, DEEPSEEK_VL_IMAGE_TOKEN]

IMAGE_SIZE, PATCH, HIGH_RES_SIZE = 32, 8, 64
TOKENS = (IMAGE_SIZE // PATCH) ** 2
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
# An 8 x 8 patch grid: windows of 3 leave a padded edge.
SAM = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=3,
           num_attention_heads=2, image_size=HIGH_RES_SIZE, patch_size=8, window_size=3, global_attn_indexes=[1],
           mlp_dim=48)
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512)
FAMILIES = {
    "deepseek_vl": (transformers.DeepseekVLConfig, transformers.DeepseekVLForConditionalGeneration,
                    transformers.DeepseekVLImageProcessorPil, transformers.DeepseekVLProcessor, {}),
    "deepseek_vl_hybrid": (transformers.DeepseekVLHybridConfig, transformers.DeepseekVLHybridForConditionalGeneration,
                           transformers.DeepseekVLHybridImageProcessorPil, transformers.DeepseekVLHybridProcessor,
                           dict(high_res_vision_config=SAM)),
}
PREPROCESSOR = {"deepseek_vl": dict(image_processor_type="DeepseekVLImageProcessor",
                                    size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE), **IMAGENET),
                "deepseek_vl_hybrid": dict(image_processor_type="DeepseekVLHybridImageProcessor",
                                           size=dict(height=IMAGE_SIZE, width=IMAGE_SIZE),
                                           high_res_size=dict(height=HIGH_RES_SIZE, width=HIGH_RES_SIZE), **IMAGENET)}


def _tokenizer_dir(path, family: str):
    """A DeepSeek-format tokenizer: its bos token put before every text, as DeepSeek's tokenizer does."""
    hf_dir(path, SPECIALS, {"bos_token": BOS, "eos_token": DEEPSEEK_END_OF_SENTENCE,
                            "pad_token": DEEPSEEK_END_OF_SENTENCE, "chat_template": TEMPLATE,
                            "extra_special_tokens": {"image_token": DEEPSEEK_VL_IMAGE_TOKEN}})
    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    backend.save(str(path / "tokenizer.json"))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR[family]))
    processor_class = FAMILIES[family][3].__name__
    (path / "processor_config.json").write_text(json.dumps(dict(processor_class=processor_class,
                                                                num_image_tokens=TOKENS)))
    return path


def _is_scale(name: str, p) -> bool:
    return p.dim() == 1 and "norm" in name and name.endswith("weight")


def _save(path, family: str):
    _tokenizer_dir(path, family)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config_cls, model_cls, _, _, extra = FAMILIES[family]
    config = config_cls(vision_config=SIGLIP, text_config={**TEXT, "vocab_size": len(tok)},
                        image_token_id=tok.convert_tokens_to_ids(DEEPSEEK_VL_IMAGE_TOKEN), **extra)
    model = randomized(model_cls(config), _is_scale)
    model.save_pretrained(path)
    return model


def _reference_processor(path, family: str):
    _, _, image_processor_cls, processor_cls, _ = FAMILIES[family]
    return processor_cls(image_processor=image_processor_cls.from_pretrained(path),
                         tokenizer=transformers.AutoTokenizer.from_pretrained(path), chat_template=TEMPLATE,
                         num_image_tokens=TOKENS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    return {family: (_save(path := tmp_path_factory.mktemp(family), family), path) for family in FAMILIES}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, saved):
    """(family, transformers model, VLM.from_hf of its directory, the directory, its processor)."""
    ref, path = saved[request.param]
    return request.param, ref, VLM.from_hf(path), path, _reference_processor(path, request.param)


def _parts(conversation):
    """The conversation as the DeepSeek template takes it: every content a list of parts, images
    without their values."""
    out = []
    for m in conversation:
        content = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else [
            {"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})} for p in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


def _reference_batch(processor, conversations):
    texts = [processor.apply_chat_template(_parts(c), add_generation_prompt=True) for c in conversations]
    images = [image for c in conversations for image in conversation_images(c)]
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True)


def _rows(batch) -> torch.Tensor:
    """The processor's images as the model's own pixel_values: a hybrid model's rows of both
    resolutions (data/padded_images.py), else the tiles as they are."""
    if "high_res_pixel_values" not in batch:
        return batch["pixel_values"]
    return torch.cat([batch["high_res_pixel_values"].flatten(1), batch["pixel_values"].flatten(1)], dim=1)


def _parity_batch(processor):
    """A left-padded batch: a text-only row, a row with two images of different sizes, a row with one."""
    images = sample_images()
    rows = [[{"role": "user", "content": "Hello, how are you today?"}],
            CONVERSATIONS[0](images), [{"role": "user", "content": image_parts(images[2:3])}]]
    return _reference_batch(processor, rows)


# --- processor --------------------------------------------------------------------------------------------


def test_images_equal_the_image_processor(pair):
    """The model's image processor (data/padded_images.py) makes transformers' tensors, both
    resolutions of a hybrid model, for wide, tall, square and thin images (the minimum side)."""
    family, _, ours, _, processor = pair
    images = sample_images() + [Image.new("RGB", (300, 5), (200, 10, 30))]
    expected = processor.image_processor(images=images, return_tensors="pt")
    mine = torch.cat([ours.image_processor()(image) for image in images])
    if family == "deepseek_vl_hybrid":
        low, high = split_hybrid_rows(mine, ours.config.hybrid_vision)
        torch.testing.assert_close(high, expected["high_res_pixel_values"], rtol=0, atol=1e-6)
    else:
        low = mine
    torch.testing.assert_close(low, expected["pixel_values"], rtol=0, atol=1e-6)


def test_prompts_equal_the_processor(pair):
    """build_prompt gives the processor's ids and pixels: images anywhere, several turns, a system
    message, the fixed system text and the bos token. The template writes a message's parts in
    their order (text before, between and after images: CONVERSATIONS[1:3])."""
    _, _, ours, _, processor = pair
    assert ours.tokenizer.template == "deepseek_vl" and ours.tokenizer.image_token == DEEPSEEK_VL_IMAGE_TOKEN
    assert not ours.tokenizer.visuals_first
    for make in CONVERSATIONS:
        conversation = make(sample_images())
        prompt = build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
        expected = _reference_batch(processor, [conversation])
        assert prompt.input_ids == expected["input_ids"][0].tolist()
        torch.testing.assert_close(prompt.pixel_values, _rows(expected), rtol=0, atol=1e-6)


# --- model parity -----------------------------------------------------------------------------------------


def test_logits_equal_transformers(pair):
    _, ref, ours, _, processor = pair
    batch = _parity_batch(processor)
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        expected = ref(**batch).logits
        got = ours(**batch)  # the processor's tensors as they are
        rows = ours(batch["input_ids"], _rows(batch), batch["attention_mask"])  # the prompts' own layout
    assert_logits_close(got, expected, batch["attention_mask"])
    assert_logits_close(rows, expected, batch["attention_mask"])


def test_config_read_from_the_directory(pair):
    family, _, ours, path, _ = pair
    cfg = ours.config
    assert (cfg.vision.style, cfg.vision.post_norm_features, cfg.vision.image_mean) == (
        "siglip", True, tuple(IMAGENET["image_mean"]))
    assert (cfg.tiling, cfg.tokens_per_image, cfg.is_hybrid, cfg.llm.tie_embeddings) == (
        "pad", TOKENS, family == "deepseek_vl_hybrid", True)
    if cfg.is_hybrid:
        assert cfg.adapter is None and cfg.high_res_vision.image_size == HIGH_RES_SIZE
        assert cfg.high_res_vision.image_mean == OPENAI_CLIP_MEAN  # the processor's default
    else:
        assert (cfg.adapter.kind, cfg.adapter.depth) == ("mlp", 2)
    assert cfg.image_token_id == ours.tokenizer.token_id(DEEPSEEK_VL_IMAGE_TOKEN)
    assert deepseek_vl_config(path) == cfg


def test_packed_training_step_equals_the_unpacked_forward(pair):
    """A pack of the rows back to back (the images as the prompts carry them) gives each token the
    loss the padded call gives it, and a backward step through it reaches both towers."""
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    check_packed_loss(ours, batch, _rows(batch))
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    rows = [ids[b][real[b]] for b in range(len(ids))]
    flat = torch.cat(rows)
    cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    ours.zero_grad()
    ours.compute_loss(flat, flat, positions, cu_seqlens, _rows(batch)).loss.backward()
    towers = ["vision.low_res.", "vision.high_res."] if ours.config.is_hybrid else ["vision."]
    for prefix in towers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters()
                   if n.startswith(prefix))
    ours.zero_grad(set_to_none=True)


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    _, ref, ours, _, processor = pair
    check_cached_greedy_decoding(ours, ref, lambda c: _reference_batch(processor, [c]))


def test_image_count_must_match_the_placeholders(pair):
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    with pytest.raises(BadRecordError, match=r"holds 48 image token\(s\) but the images give 32 visual token"):
        ours(batch["input_ids"], _rows(batch)[:-1], batch["attention_mask"])


def test_corrupt_image_is_a_named_error(pair):
    _, _, ours, _, _ = pair
    conversation = [{"role": "user", "content": [{"type": "image", "image": b"not an image at all"},
                                                 {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(BadRecordError, match="not a readable image") as err:
        build_prompt(conversation, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile)
    assert err.value.reason == "not_an_image"


# --- freezing ----------------------------------------------------------------------------------------------


def test_stage_modules_of_the_hybrid_model(saved):
    """The aligner is the adapter; `vision` is both towers with the high-resolution reduction; every
    parameter belongs to one module, and an adapter-only stage trains the aligner alone."""
    ours = VLM.from_hf(saved["deepseek_vl_hybrid"][1])
    parts = {name: {n for n, _ in module_parameters(ours, name)} for name in ("vision", "adapter", "llm")}
    assert {n.split(".")[1] for n in parts["adapter"]} == {"low_res_proj", "high_res_proj", "out_proj"}
    assert {n.split(".")[0] for n in parts["vision"]} == {"low_res", "high_res", "combiner"}
    assert sum(map(len, parts.values())) == len(list(ours.named_parameters()))
    counts = apply_freezing(ours, Stage(vision_lr=0, adapter_lr=1e-3, llm_lr=0))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"vision.{n}" for n in parts["adapter"]} and counts["vision"] == counts["llm"] == 0


def test_each_branch_of_the_hybrid_tower_freezes_on_its_own(saved):
    """`frozen` patterns freeze one branch while the stage trains the rest of the tower."""
    ours = VLM.from_hf(saved["deepseek_vl_hybrid"][1])
    names = [n for n, _ in ours.named_parameters()]
    for frozen, branch in ((["vision.low_res.*"], "vision.low_res."), (["vision.high_res.*"], "vision.high_res.")):
        apply_freezing(ours, Stage(vision_lr=1e-4, adapter_lr=1e-3, llm_lr=0, frozen=frozen))
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {n for n in names if n.startswith("vision.") and not n.startswith(branch)}
    with pytest.raises(ConfigError, match="match no parameter"):
        apply_freezing(ours, Stage(vision_lr=1e-4, frozen=["vision.sam.*"]))


# --- vlmkit checkpoint, export ------------------------------------------------------------------------------


def test_vlmkit_checkpoint_round_trip(pair, tmp_path):
    _, _, ours, _, processor = pair
    batch = _parity_batch(processor)
    check_checkpoint_round_trip(ours, tmp_path, {"input_ids": batch["input_ids"], "pixel_values": _rows(batch),
                                                 "attention_mask": batch["attention_mask"]}, "deepseek_vl")


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path, capsys):
    """`vlmkit export --model DIR --to hf`: the tensors transformers writes (SigLIP's unused pooling
    head left out), nothing missing or unexpected on loading, the original's logits, and a
    processor reading the exported directory gives the same inputs."""
    family, ref, ours, path, processor = pair
    out = tmp_path / "hf"
    assert main(["export", "--model", str(path), "--to", "hf", str(out)]) == 0
    assert "(hf)" in capsys.readouterr().out
    assert tensor_names(out) == {n for n in tensor_names(path) if ".vision_model.head." not in n}
    back, info = FAMILIES[family][1].from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs") and not info.get("error_msgs"), info
    batch = _parity_batch(processor)
    again = _parity_batch(_reference_processor(out, family))
    for key in batch:
        assert torch.equal(again[key], batch[key])
    with torch.no_grad():
        expected, got = ref(**batch).logits, back.eval()(**batch).logits
    assert_logits_close(got, expected, batch["attention_mask"])
    assert deepseek_vl_config(out) == ours.config


def test_export_refusals(pair):
    family, _, ours, _, _ = pair
    cfg = ours.config.to_dict()
    bucketed = VLMConfig.from_dict({**cfg, "vision": {**cfg["vision"], "positions": "bucketed"}})
    with pytest.raises(ConfigError, match="DeepSeek-VL's tower is SigLIP's"):
        check_deepseek_vl_exportable(bucketed)
    if family == "deepseek_vl":
        grid = VLMConfig.from_dict({**cfg, "tiling": "grid", "adapter": {**cfg["adapter"], "depth": 3}})
        with pytest.raises(ConfigError, match="linear, GELU, linear.*tiling 'pad'"):
            check_deepseek_vl_exportable(grid)


# --- refusals on import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    (dict(preprocessor=dict(min_size=10)), "min_size 10"),
    (dict(preprocessor=dict(resample=2)), "resample 2 is not bicubic"),
    (dict(preprocessor=dict(do_pad=False)), "pads"),
    (dict(preprocessor=dict(size=dict(height=32, width=48))), "not a square"),
    (dict(preprocessor=dict(high_res_size=dict(height=32, width=32))), "differs from the tower's 64x64"),
    (dict(preprocessor=dict(image_processor_type="CLIPImageProcessor")), "prepares images as"),
    (dict(processor=dict(num_image_tokens=576)), "num_image_tokens 576 differs from the 16 tokens"),
])
def test_import_refusals(saved, tmp_path, changes, match):
    _, path = saved["deepseek_vl_hybrid"]
    with pytest.raises(CheckpointError, match=match):
        VLM.from_hf(edited_copy(path, tmp_path / "edited", **changes))


def test_unknown_architecture_is_named(saved, tmp_path):
    _, path = saved["deepseek_vl"]
    edited = edited_copy(path, tmp_path / "edited", config=dict(architectures=["DeepseekVL2ForCausalLM"],
                                                                model_type="deepseek_vl_v2"))
    with pytest.raises(CheckpointError, match="DeepseekVL2ForCausalLM.*DeepseekVLHybridForConditionalGeneration"):
        VLM.from_hf(edited)
