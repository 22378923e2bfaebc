"""Whole native-resolution VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) loaded from transformers
checkpoints: logits equal to transformers' on a padded batch of a text-only row, images of three
sizes and a video; a packed training batch equal to the padded call; the vlmkit checkpoint round
trip; token / grid mismatches; config layouts. Qwen3-VL-MoE: tests/test_qwen3_vl_moe.py."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.tokenizer_support import chatml_dir
from vlmkit import VLM
from vlmkit.errors import BadRecordError, CheckpointError, ConfigError
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.llm import llm_config_from_hf
from vlmkit.models.hf.qwen_vl import qwen_vl_config
from vlmkit.models.mrope import packed_rope_positions, rope_positions

transformers = pytest.importorskip("transformers")

VOCAB = 96
IMAGE, VIDEO, VISION_START, VISION_END = 90, 91, 92, 93
TEXT_IDS = 80  # ordinary text tokens are drawn from 0 .. TEXT_IDS - 1
PATCH, MERGE, TEMPORAL = 4, 2, 2
TOKENS_PER_SECOND = 2
SECONDS_PER_GRID = torch.tensor([0.75])  # Qwen2.5-VL: frame pairs 1.5 positions apart
WEIGHT_STD = 0.1
"""Random weights (norm scales around 1) larger than transformers' init, so that norms, biases and
positions all matter."""
TOLERANCE = 1e-4
IMAGE_SIZES = [(16, 24), (32, 16), (24, 40)]  # (height, width): three sizes and aspect ratios
VIDEO_FRAMES, VIDEO_SIZE = 4, (16, 16)  # two frame pairs of 2 x 2 merged tokens

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-6)
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)
VISION = dict(num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)


def _hf_model(family: str):
    """A tiny random transformers model of `family`. Qwen2.5-VL: window attention (windows of
    2 x 2 merged tokens, block 1 over whole frames) and tied embeddings; Qwen3-VL: interleaved
    M-RoPE, a learned position grid and deepstack at tower blocks 0 and 1."""
    rope = dict(rope_type="default", rope_theta=500.0, mrope_section=[4, 6, 6])
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config={**TEXT, "rope_parameters": rope}, **TOKENS,
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **VISION))
        model_class = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_parameters": rope}, tie_word_embeddings=True, **TOKENS,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, out_hidden_size=64,
                               window_size=4 * PATCH, fullatt_block_indexes=[1],
                               tokens_per_second=TOKENS_PER_SECOND, **VISION))
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text = {**TEXT, "head_dim": 32, "rope_parameters": {**rope, "mrope_section": [6, 5, 5],
                                                            "mrope_interleaved": True}}
        config = transformers.Qwen3VLConfig(
            text_config=text, **TOKENS,
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=64,
                               num_position_embeddings=36, deepstack_visual_indexes=[0, 1], **VISION))
        model_class = transformers.Qwen3VLForConditionalGeneration
    return _randomized(model_class(config))


def _randomized(model):
    """`model` in eval mode with every weight drawn at WEIGHT_STD (norm scales around 1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, WEIGHT_STD)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def pair(request, tmp_path_factory):
    """(family, transformers model, the same model loaded by VLM.from_hf, its directory)."""
    family = request.param
    ref = _hf_model(family)
    path = tmp_path_factory.mktemp(family)
    ref.save_pretrained(path)
    return family, ref, VLM.from_hf(path), path


# --- inputs: what the processor makes ---------------------------------------------------------------


def _images():
    """pixel_values and image_grid_thw of three images, from transformers' image processor."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    processor = transformers.Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                                      min_pixels=8 * 8, max_pixels=64 * 64)
    out = processor(images=images, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, h // PATCH, w // PATCH] for h, w in IMAGE_SIZES]
    return out["pixel_values"], out["image_grid_thw"]


def patchify(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (F, C, H, W), F a multiple of the temporal patch -> patch rows (t * h * w, C * T * p * p)
    in the processor's order (each merge x merge block of patches adjacent) and the grid (1, 3)."""
    F_, C, H, W = frames.shape
    t, h, w = F_ // TEMPORAL, H // PATCH, W // PATCH
    x = frames.reshape(t, TEMPORAL, C, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, rows, cols of merged blocks, in-block row, col, C, T, p, p
    return x.reshape(t * h * w, C * TEMPORAL * PATCH * PATCH), torch.tensor([[t, h, w]])


def test_patchify_matches_the_image_processor():
    """An image is its frame repeated over the temporal patch: patchify gives the processor's rows."""
    pixels, grid = _images()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    frame = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean = torch.tensor(transformers.Qwen2VLImageProcessorPil().image_mean)[:, None, None]
    std = torch.tensor(transformers.Qwen2VLImageProcessorPil().image_std)[:, None, None]
    rows, thw = patchify(((frame - mean) / std)[None].expand(TEMPORAL, -1, -1, -1))
    assert thw.tolist() == grid[:1].tolist()
    torch.testing.assert_close(rows, pixels[:rows.shape[0]], rtol=0, atol=1e-5)


def _video():
    torch.manual_seed(2)
    return patchify(torch.randn(VIDEO_FRAMES, 3, *VIDEO_SIZE))


def _visual_ids(token: int, grid: list[int], frames_apart: bool, text) -> list[int]:
    """A visual block as the processor writes it: vision start, the merged tokens, vision end; a
    Qwen3-VL video frame pair by frame pair, each after its timestamp text."""
    t, h, w = grid
    per_frame = (h // MERGE) * (w // MERGE)
    if token == VIDEO and frames_apart:
        return [i for _ in range(t) for i in text(2) + [VISION_START] + [token] * per_frame + [VISION_END]]
    return [VISION_START] + [token] * (t * per_frame) + [VISION_END]


def _batch(family: str):
    """A left-padded batch: a text-only row, a row with two images, a row with an image and a video."""
    pixels, image_grid = _images()
    video_pixels, video_grid = _video()
    frames_apart = family == "qwen3_vl"
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(0, TEXT_IDS, (n,), generator=g).tolist()

    def visual(token, grid):
        return _visual_ids(token, grid.tolist(), frames_apart, text)

    rows = [text(7),
            text(3) + visual(IMAGE, image_grid[0]) + text(2) + visual(IMAGE, image_grid[1]) + text(4),
            text(2) + visual(IMAGE, image_grid[2]) + text(3) + visual(VIDEO, video_grid[0]) + text(3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=image_grid,
                  pixel_values_videos=video_pixels, video_grid_thw=video_grid)
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = SECONDS_PER_GRID
    return inputs


def _reference_logits(ref, inputs) -> torch.Tensor:
    ids = inputs["input_ids"]
    kinds = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()  # the processor's mm_token_type_ids
    with torch.no_grad():
        return ref(**inputs, mm_token_type_ids=kinds).logits


# --- parity ------------------------------------------------------------------------------------------


def test_logits_equal_transformers(pair):
    family, ref, ours, _ = pair
    inputs = _batch(family)
    expected = _reference_logits(ref, inputs)
    with torch.no_grad():
        got = ours(**inputs)
    real = inputs["attention_mask"].bool()
    assert got.shape == expected.shape == (*real.shape, VOCAB)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


def test_config_read_from_the_checkpoint(pair):
    family, _, ours, _ = pair
    cfg = ours.config
    assert cfg.is_native and cfg.vision is None and cfg.adapter is None
    assert cfg.native_vision.style == family
    assert (cfg.image_token_id, cfg.video_token_id) == (IMAGE, VIDEO)
    assert cfg.tokens_per_second == (TOKENS_PER_SECOND if family == "qwen2_5_vl" else None)
    assert cfg.video_frames_apart == (family == "qwen3_vl")
    assert cfg.llm.mrope_interleaved == (family == "qwen3_vl")
    assert cfg.llm.tie_embeddings == (family == "qwen2_5_vl")
    assert cfg.llm.qkv_bias == (family != "qwen3_vl") and cfg.llm.qk_norm == (family == "qwen3_vl")


def test_deepstack_is_what_makes_qwen3_vl_equal(pair):
    """Qwen3-VL's parity rests on deepstack: the same model without it gives other logits."""
    family, ref, ours, _ = pair
    if family != "qwen3_vl":
        pytest.skip("deepstack is Qwen3-VL's")
    inputs = _batch(family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    native = ours.embed_native(ids, inputs["pixel_values"], inputs["image_grid_thw"],
                               inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert native.deepstack is not None and len(native.deepstack.features) == 2
    assert native.deepstack.mask.tolist() == ((ids == IMAGE) | (ids == VIDEO)).tolist()
    positions, _ = rope_positions(ids, ours.mrope_layout, image_grid_thw=inputs["image_grid_thw"],
                                  video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    with torch.no_grad():
        plain = ours.llm.logits(ours.llm.decode(native.embeds, position_ids=positions, spec=AttnSpec.padded(mask)))
    expected = _reference_logits(ref, inputs)
    real = mask.bool()
    assert (plain[real] - expected[real]).abs().max() > 1e-2


def test_save_and_load_round_trip(pair, tmp_path):
    family, _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision"] is None and saved["native_vision"]["style"] == family
    again = VLM.from_pretrained(tmp_path)
    assert again.config == ours.config
    inputs = _batch(family)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs), ours(**inputs), rtol=0, atol=0)


def test_image_tokens_and_grids_must_agree(pair):
    family, _, ours, _ = pair
    inputs = _batch(family)
    short = dict(inputs, image_grid_thw=inputs["image_grid_thw"][:2],
                 pixel_values=inputs["pixel_values"][:int(inputs["image_grid_thw"][:2].prod(-1).sum())])
    with pytest.raises(BadRecordError, match=r"holds 29 image token\(s\) but image_grid_thw gives 14 merged"):
        ours(**short)
    with pytest.raises(BadRecordError, match=r"holds 8 video token\(s\) but no video pixel values"):
        ours(**dict(inputs, pixel_values_videos=None, video_grid_thw=None))


def test_packed_loss_equals_the_padded_batch(pair):
    """A training step's packed batch (the rows back to back, M-RoPE positions per sample) gives
    each token the loss the padded HF-style call gives it."""
    family, _, ours, _ = pair
    inputs = _batch(family)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    rows = [ids[b][real[b]] for b in range(len(ids))]
    flat = torch.cat(rows)
    cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    grids = dict(image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"])
    positions = packed_rope_positions(flat, cu_seqlens, ours.mrope_layout, **grids,
                                      video_seconds_per_grid=inputs.get("second_per_grid_ts"))
    with torch.no_grad():
        packed = ours.compute_loss(flat, flat, positions, cu_seqlens, inputs["pixel_values"],
                                   pixel_values_videos=inputs["pixel_values_videos"], **grids)
        logits = ours(**inputs)
    for b, row in enumerate(rows):
        expected = F.cross_entropy(logits[b][real[b]][:-1], row[1:], reduction="none")
        start = int(cu_seqlens[b])
        torch.testing.assert_close(packed.token_loss[start + 1:start + len(row)], expected, rtol=0, atol=TOLERANCE)
    assert int(packed.num_targets) == len(flat) - len(rows)


# --- loading errors -----------------------------------------------------------------------------------


def test_loading_is_strict(pair, tmp_path):
    _, _, _, path = pair
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"llm\.layers\.1\.mlp\.up_proj\.weight"):
        VLM.from_hf(tmp_path)


def test_the_directory_tokenizer_is_attached(pair, tmp_path):
    _, _, ours, path = pair
    assert ours.tokenizer is None  # the checkpoint directory has none
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, tmp_path / name)
    chatml_dir(tmp_path)
    assert VLM.from_hf(tmp_path).tokenizer.token_id("<|im_end|>") is not None


def test_from_hf_takes_one_directory_or_a_pair(tmp_path):
    with pytest.raises(ValueError, match="either a whole VLM directory or vision= and llm="):
        VLM.from_hf(tmp_path, vision=tmp_path, llm=tmp_path)
    with pytest.raises(ValueError, match="either"):
        VLM.from_hf()
    with pytest.raises(ValueError, match="needs both"):
        VLM.from_hf(vision=tmp_path)


def test_text_config_and_transformers_4_layouts():
    """The decoder config nested under text_config (transformers 5) or flat at the top level with
    rope_scaling "mrope" (transformers 4's Qwen2-VL and Qwen2.5-VL configs)."""
    nested = {"architectures": ["Qwen3VLForConditionalGeneration"], "tie_word_embeddings": True,
              "text_config": {"model_type": "qwen3_vl_text", **TEXT, "head_dim": 32,
                              "rope_parameters": {"rope_theta": 5e5, "mrope_section": [6, 5, 5],
                                                  "mrope_interleaved": True}}}
    cfg = llm_config_from_hf(nested)
    assert (cfg.mrope_section, cfg.mrope_interleaved, cfg.tie_embeddings, cfg.qk_norm) == ([6, 5, 5], True, True, True)
    flat = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **TEXT, **TOKENS,
            "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": True,
            "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 40, "out_hidden_size": 64,
                              "num_heads": 2, "in_chans": 3, "window_size": 112, "fullatt_block_indexes": [1],
                              "tokens_per_second": 2}}
    cfg = qwen_vl_config(flat, "test")
    assert (cfg.llm.mrope_section, cfg.llm.rope_theta, cfg.llm.qkv_bias, cfg.llm.tie_embeddings) == (
        [4, 6, 6], 1e6, True, True)
    assert (cfg.native_vision.style, cfg.tokens_per_second, cfg.video_token_id) == ("qwen2_5_vl", 2.0, VIDEO)
    with pytest.raises(CheckpointError, match="not a Qwen-VL model"):
        qwen_vl_config({"architectures": ["LlavaForConditionalGeneration"]}, "test")


def test_native_config_checks():
    native = dict(native_vision=dict(out_hidden_size=64),
                  llm=dict(hidden_size=64, num_heads=2, mrope_section=[4, 6, 6]))
    assert VLMConfig.from_dict(VLMConfig(**native).to_dict()) == VLMConfig(**native)
    with pytest.raises(ConfigError, match="no vision or adapter section"):
        VLMConfig(**native, vision={})
    with pytest.raises(ConfigError, match="out_hidden_size 32 must equal llm.hidden_size 64"):
        VLMConfig(**dict(native, native_vision=dict(out_hidden_size=32)))
    with pytest.raises(ConfigError, match="needs llm.mrope_section"):
        VLMConfig(**dict(native, llm=dict(hidden_size=64, num_heads=2)))
    with pytest.raises(ConfigError, match="need a native_vision tower"):
        VLMConfig(video_token_id=3)
    with pytest.raises(ValueError, match="no fixed tokens per image"):
        VLMConfig(**native).tokens_per_image


# --- generation through the engine --------------------------------------------------------------------

NEW_TOKENS = 6


def _row_prompts(family: str):
    """The two visual rows of `_batch`, unpadded, each with its own images / video, as Prompts."""
    from vlmkit.data.prompt import Prompt

    inputs = _batch(family)
    image_grid, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
    starts = [0] + torch.cumsum(image_grid.prod(-1), 0).tolist()
    prompts = []
    for row, images, with_video in ((1, [0, 1], False), (2, [2], True)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        video = dict(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"],
                     second_per_grid_ts=inputs["second_per_grid_ts"].tolist()
                     if "second_per_grid_ts" in inputs else []) if with_video else {}
        prompts.append(Prompt(ids, torch.cat([pixels[starts[i]:starts[i + 1]] for i in images]),
                              image_grid_thw=image_grid[images], **video))
    return prompts


def _reference_tokens(ref, prompt, image: int = IMAGE, video: int = VIDEO) -> list[int]:
    ids = torch.tensor([prompt.input_ids])
    kw = dict(pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
    if prompt.video_grid_thw is not None:
        kw.update(pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw)
        if prompt.second_per_grid_ts:
            kw["second_per_grid_ts"] = torch.tensor(prompt.second_per_grid_ts)
    kinds = (ids == image).int() + 2 * (ids == video).int()  # the processor's mm_token_type_ids
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=kinds, max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_cached_greedy_decoding_gives_transformers_tokens(pair):
    """Both rows decode together through the engine's KV cache, each continuing from its own
    M-RoPE position (its rope delta), and give the tokens of transformers' generate."""
    from vlmkit.infer.engine import Engine
    from vlmkit.infer.sampling import SamplingParams

    family, ref, ours, _ = pair
    prompts = _row_prompts(family)
    expected = [_reference_tokens(ref, p) for p in prompts]
    engine = Engine(ours)  # the checkpoint has no tokenizer: token ids only, nothing stops the rows early
    assert engine.tokenizer is None
    seqs = [engine.add(p, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)) for p in prompts]
    assert any(s.rope_delta != 0 for s in seqs)  # images make the positions run behind the tokens
    while engine.rows:
        engine.step()
        for s in [s for s in engine.rows if s.finished]:
            engine.remove(s)
    assert [s.output_ids for s in seqs] == expected


def test_generate_from_messages_through_the_native_processor(tmp_path):
    """A Qwen2-VL directory with its tokenizer and processor config: a conversation with an image
    becomes a prompt through the model's own native processor and chat format (data/prompt.py),
    decodes to transformers' generate tokens on that prompt, and a vlmkit checkpoint keeps the
    processor settings (processor.json)."""
    from tests.tokenizer_support import QWEN2_VL_TEMPLATE, qwen_vl_dir
    from vlmkit.constants import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.infer.engine import Engine
    from vlmkit.infer.generate import prompt_for
    from vlmkit.infer.sampling import SamplingParams

    directory = qwen_vl_dir(tmp_path / "qwen2_vl", QWEN2_VL_TEMPLATE)
    tok = Tokenizer.load(directory)
    tokens = dict(image_token_id=tok.token_id(IMAGE_PAD), video_token_id=tok.token_id(VIDEO_PAD),
                  vision_start_token_id=tok.token_id(VISION_START), vision_end_token_id=tok.token_id(VISION_END))
    config = transformers.Qwen2VLConfig(
        text_config={**TEXT, "vocab_size": tok.vocab_size,
                     "rope_parameters": dict(rope_type="default", rope_theta=500.0, mrope_section=[4, 6, 6])},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **VISION), **tokens)
    ref = _randomized(transformers.Qwen2VLForConditionalGeneration(config))
    ref.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(dict(
        min_pixels=8 * 8, max_pixels=32 * 32, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)))

    ours = VLM.from_hf(directory)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 36, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is it?"}]}]
    prompt = prompt_for(ours, messages)
    assert prompt.image_grid_thw.tolist() == [[1, 4, 8]]  # 20 x 36 -> 16 x 32 within max_pixels
    assert prompt.input_ids.count(tokens["image_token_id"]) == 8  # 4 x 8 patches, 2 x 2 merged

    engine = Engine(ours)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    while engine.rows:
        engine.step()
        if seq.finished:
            engine.remove(seq)
    expected = _reference_tokens(ref, prompt, tokens["image_token_id"], tokens["video_token_id"])
    assert seq.output_ids == expected and len(set(expected)) > 1
    assert isinstance(ours.generate(messages, max_new_tokens=2), str)

    ours.save_pretrained(tmp_path / "saved")
    back = VLM.from_pretrained(tmp_path / "saved")
    assert back.processor_config == ours.processor_config and back.processor_config.max_pixels == 32 * 32
    again = prompt_for(back, messages)
    assert again.input_ids == prompt.input_ids and torch.equal(again.pixel_values, prompt.pixel_values)


def test_load_tells_a_transformers_directory_from_a_vlmkit_checkpoint(pair, tmp_path):
    """VLM.load (what `--model` of chat, serve, eval and export goes through) reads both."""
    family, _, ours, path = pair
    inputs = _batch(family)
    hf = VLM.load(path)
    ours.save_pretrained(tmp_path / "ck")
    ck = VLM.load(tmp_path / "ck")
    with torch.no_grad():
        expected = ours(**inputs)
        torch.testing.assert_close(hf(**inputs), expected, rtol=0, atol=0)
        torch.testing.assert_close(ck(**inputs), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="config.json"):
        VLM.load(tmp_path / "nothing-here")


def test_eval_runs_on_a_native_model_with_its_blind_baseline(tmp_path):
    """`evaluate` (gen and ppl) on a Qwen2-VL directory with its tokenizer: every question is
    asked through the native processor, and the blind baseline blanks to the processor's mean."""
    from tests.serving_support import build_qwen2_vl_dir
    from vlmkit.eval.runner import evaluate_with_blind

    model = VLM.load(build_qwen2_vl_dir(tmp_path / "model"))
    rng = np.random.default_rng(4)
    rows = []
    for i, (h, w) in enumerate([(20, 36), (32, 24), (28, 28)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "images": [f"{i}.png"], "question": "Is there a circle?",
                     "answer": "yes" if i % 2 else "no"})
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in ("gen", "ppl"):
        results = evaluate_with_blind(model, bench, mode=mode, max_new_tokens=3, progress=False)
        for result in results.values():
            assert result.summary["n"] == 3 and not result.bad_rows


def test_generate_takes_a_video_as_a_list_of_frames(tmp_path):
    """The Python API reads video parts as given (here four PIL frames): the prompt carries the
    video's grid and its tokens, and generation runs on it."""
    from tests.serving_support import build_qwen2_vl_dir
    from vlmkit.data.messages import keep_image
    from vlmkit.infer.generate import prompt_for

    model = VLM.load(build_qwen2_vl_dir(tmp_path / "model"))
    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(4)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                             {"type": "text", "text": "What moved?"}]}]
    prompt = prompt_for(model, messages, resolve_video=keep_image)
    assert prompt.video_grid_thw.tolist() == [[2, 4, 6]] and prompt.image_grid_thw is None
    assert prompt.input_ids.count(model.config.video_token_id) == 2 * 2 * 3
    assert isinstance(model.generate(messages, max_new_tokens=2), str)
