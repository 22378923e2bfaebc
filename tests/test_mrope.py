"""Multimodal RoPE: position ids equal to transformers' `get_rope_index` (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL) on padded batches of text, images and videos; packed positions equal to per-sample
ones; the decoder with M-RoPE gives transformers' Qwen2-VL / Qwen3-VL text-model logits; KV-cache
decoding after an image-shaped prompt continues at the prompt's largest position + 1."""

import dataclasses

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import LLMConfig, VLMConfig
from vlmkit.models.hf.common import load_into
from vlmkit.models.hf.llm import HF_TO_OURS, IGNORED
from vlmkit.models.llm import LLM
from vlmkit.models.mrope import (MRopeLayout, continue_positions, frequency_axes, packed_rope_positions,
                                 rope_positions)

transformers = pytest.importorskip("transformers")

VOCAB = 64
IMAGE, VIDEO, VISION_START, VISION_END = 60, 61, 62, 63
TEXT_IDS = 50  # ordinary text tokens are drawn from 0 .. TEXT_IDS - 1
MERGE = 2
TOKENS_PER_SECOND = 2
HEADS, HEAD_DIM = 2, 32  # the text models: hidden size 64, grouped-query attention over one kv head
SECTIONS = {"qwen2_vl": [4, 6, 6], "qwen3_vl": [6, 5, 5]}  # head_dim / 2 = 16 frequencies


# --- prompts: rows of text, images and videos ------------------------------------------------------


def row_ids(segments, frames_apart: bool, seed: int) -> list[int]:
    """Token ids of a prompt: ("text", n), ("image", (t, h, w)), ("video", (t, h, w)) with patch
    grids; visual blocks between vision start / end tokens, a Qwen3-VL video frame by frame with
    two timestamp tokens before each frame."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, TEXT_IDS, (n,), generator=g).tolist()

    ids = []
    for kind, arg in segments:
        if kind == "text":
            ids += text(arg)
            continue
        t, h, w = arg
        token = IMAGE if kind == "image" else VIDEO
        per_frame = (h // MERGE) * (w // MERGE)
        if kind == "video" and frames_apart:
            for _ in range(t):
                ids += text(2) + [VISION_START] + [token] * per_frame + [VISION_END]
        else:
            ids += [VISION_START] + [token] * (t * per_frame) + [VISION_END]
    return ids


ROWS = [
    [("text", 9)],
    [("text", 3), ("image", (1, 4, 6)), ("text", 4)],
    [("text", 2), ("image", (1, 4, 4)), ("text", 3), ("image", (1, 6, 2)), ("text", 2)],
    [("text", 3), ("video", (3, 4, 4)), ("text", 5)],
    [("text", 1), ("video", (2, 2, 6)), ("text", 2), ("image", (1, 2, 2)), ("text", 3)],
]


def grids(kind: str, rows=ROWS) -> torch.Tensor | None:
    found = [list(arg) for row in rows for k, arg in row if k == kind]
    return torch.tensor(found) if found else None


def padded_batch(rows, frames_apart: bool, side: str):
    seqs = [row_ids(r, frames_apart, seed=i) for i, r in enumerate(rows)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), 0, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, span], mask[b, span] = torch.tensor(s), 1
    return ids, mask


# --- transformers' get_rope_index ------------------------------------------------------------------


def reference_model(family: str):
    """A tiny transformers model of `family`, for its get_rope_index."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, spatial_merge_size=MERGE)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        return transformers.Qwen2VLModel(config)
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, out_hidden_size=32, num_heads=2,
                      spatial_merge_size=MERGE, tokens_per_second=TOKENS_PER_SECOND, fullatt_block_indexes=[0])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        return transformers.Qwen2_5_VLModel(config)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, out_hidden_size=32, num_heads=2,
                  spatial_merge_size=MERGE, deepstack_visual_indexes=[], num_position_embeddings=16)
    config = transformers.Qwen3VLConfig(text_config={**text, "head_dim": 16}, vision_config=vision, **tokens)
    return transformers.Qwen3VLModel(config)


LAYOUTS = {
    "qwen2_vl": MRopeLayout(IMAGE, VIDEO, MERGE),
    "qwen2_5_vl": MRopeLayout(IMAGE, VIDEO, MERGE, tokens_per_second=TOKENS_PER_SECOND),
    "qwen3_vl": MRopeLayout(IMAGE, VIDEO, MERGE, video_frames_apart=True),
}
SECONDS = torch.tensor([0.75, 1.0])  # Qwen2.5-VL: one per video; 0.75 s * 2 tokens/s spaces frames 1.5 apart


def reference_positions(family: str, ids, mask, rows=ROWS):
    model = reference_model(family)
    kinds = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()  # the processor's mm_token_type_ids
    extra = {"second_per_grid_ts": SECONDS} if family == "qwen2_5_vl" else {}
    return model.get_rope_index(ids, kinds, image_grid_thw=grids("image", rows), video_grid_thw=grids("video", rows),
                                attention_mask=mask, **extra)


def our_positions(family: str, ids, mask, rows=ROWS):
    return rope_positions(ids, LAYOUTS[family], image_grid_thw=grids("image", rows),
                          video_grid_thw=grids("video", rows), attention_mask=mask,
                          video_seconds_per_grid=SECONDS if family == "qwen2_5_vl" else None)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_equal_transformers(family, side):
    ids, mask = padded_batch(ROWS, LAYOUTS[family].video_frames_apart, side)
    ref_positions, ref_deltas = reference_positions(family, ids, mask)
    positions, deltas = our_positions(family, ids, mask)
    assert torch.equal(positions, ref_positions)
    assert torch.equal(deltas, ref_deltas)
    assert deltas[0].item() == 0  # the text-only row: plain 1-D positions
    assert positions[:, 0][:, mask[0].bool()].tolist() == [list(range(9))] * 3


def test_qwen2_5_video_frames_spaced_by_seconds():
    """A video's temporal positions step by tokens_per_second * seconds per grid (floored), its
    height and width positions do not; the text after it goes on from the grid's larger side."""
    rows = [[("text", 1), ("video", (3, 2, 2))]]
    ids, _ = padded_batch(rows, False, "right")
    positions, deltas = rope_positions(ids, LAYOUTS["qwen2_5_vl"], video_grid_thw=grids("video", rows),
                                       video_seconds_per_grid=[0.75])
    video = positions[:, 0, 2:5]  # after text and vision start: one token per frame (grid 1 x 1)
    assert video.tolist() == [[2, 3, 5], [2, 2, 2], [2, 2, 2]]
    assert positions[:, 0, -1].tolist() == [3, 3, 3]  # vision end: 2 + max(h, w)
    assert deltas.tolist() == [[5 + 1 - ids.shape[1]]]


def test_positions_without_attention_mask():
    rows = ROWS[1:2]
    ids = torch.tensor([row_ids(rows[0], False, seed=0)])
    ref, ref_deltas = reference_positions("qwen2_vl", ids, None, rows)
    ours, deltas = our_positions("qwen2_vl", ids, None, rows)
    assert torch.equal(ours, ref) and torch.equal(deltas, ref_deltas)


def test_grid_mismatch_is_refused():
    ids, mask = padded_batch(ROWS[1:2], False, "right")
    with pytest.raises(ValueError, match="shorter than its grid"):
        rope_positions(ids, LAYOUTS["qwen2_vl"], image_grid_thw=torch.tensor([[1, 4, 8]]), attention_mask=mask)
    with pytest.raises(ValueError, match="more image tokens"):
        rope_positions(ids, LAYOUTS["qwen2_vl"], attention_mask=mask)
    with pytest.raises(ValueError, match="grids left"):
        rope_positions(ids, LAYOUTS["qwen2_vl"], image_grid_thw=torch.tensor([[1, 4, 6], [1, 2, 2]]),
                       attention_mask=mask)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_positions_are_per_sample_positions(family):
    layout = LAYOUTS[family]
    ids, mask = padded_batch(ROWS, layout.video_frames_apart, "left")
    batched, _ = our_positions(family, ids, mask)
    real = mask.bool()
    flat = ids[real]  # the rows' real tokens one after another
    cu = torch.tensor([0] + real.sum(1).tolist()).cumsum(0)
    packed = packed_rope_positions(flat, cu, layout, image_grid_thw=grids("image"), video_grid_thw=grids("video"),
                                   video_seconds_per_grid=SECONDS if family == "qwen2_5_vl" else None)
    expected = torch.cat([batched[:, b, real[b]] for b in range(len(ROWS))], dim=1)
    assert torch.equal(packed, expected)
    assert (packed[:, cu[:-1]] == 0).all()  # every sample restarts at 0


# --- rotary sections ----------------------------------------------------------------------------


def test_frequency_axes():
    contiguous = frequency_axes([16, 24, 24], interleaved=False)
    assert contiguous.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    interleaved = frequency_axes([24, 20, 20], interleaved=True)  # Qwen3-VL's sections
    assert interleaved[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.bincount(interleaved).tolist() == [24, 20, 20]
    assert interleaved[60:].tolist() == [0] * 4  # past 3 * 20 the temporal axis takes every frequency


def test_config_checks_sections():
    with pytest.raises(ConfigError, match="add up to head_dim / 2"):
        LLMConfig(hidden_size=64, num_heads=2, mrope_section=[4, 6, 7])
    with pytest.raises(ConfigError, match="3 positive"):
        LLMConfig(hidden_size=64, num_heads=2, mrope_section=[16, 16])
    with pytest.raises(ConfigError, match="needs llm.mrope_section"):
        LLMConfig(mrope_interleaved=True)
    cfg = VLMConfig(llm=dict(hidden_size=64, num_heads=2, mrope_section=[6, 5, 5], mrope_interleaved=True))
    assert VLMConfig.from_dict(cfg.to_dict()).llm == cfg.llm


# --- the decoder against transformers' text models -------------------------------------------------


def reference_text_model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-6)
    rope = dict(rope_type="default", rope_theta=500.0, mrope_section=SECTIONS[family])
    if family == "qwen2_vl":
        model = transformers.Qwen2VLTextModel(transformers.Qwen2VLTextConfig(**common, rope_parameters=rope))
    else:
        config = transformers.Qwen3VLTextConfig(**common, head_dim=HEAD_DIM,
                                                rope_parameters={**rope, "mrope_interleaved": True})
        model = transformers.Qwen3VLTextModel(config)
    model.eval()
    head = torch.nn.Linear(64, VOCAB, bias=False)
    with torch.no_grad():  # random norms and biases, so that a mis-mapped one would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model, head


def ours_from(family: str, model, head) -> LLM:
    cfg = LLMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=HEADS,
                    num_kv_heads=1, head_dim=HEAD_DIM, rope_theta=500.0, max_position_embeddings=256, rms_norm_eps=1e-6,
                    qkv_bias=family == "qwen2_vl", qk_norm=family == "qwen3_vl",
                    mrope_section=SECTIONS[family], mrope_interleaved=family == "qwen3_vl")
    llm = LLM(cfg).eval()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {"lm_head.weight": head.weight}
    load_into(llm, tensors, HF_TO_OURS, source=family, ignore=IGNORED)
    return llm


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_decoder_logits_equal_transformers(family):
    ids, mask = padded_batch(ROWS, LAYOUTS[family].video_frames_apart, "left")
    positions, _ = our_positions(family, ids, mask)
    model, head = reference_text_model(family)
    llm = ours_from(family, model, head)
    ref = head(model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state)
    ours = llm.logits(llm.decode(llm.embed(ids), position_ids=positions, spec=AttnSpec.padded(mask)))
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    # the sections matter: the same model with 1-D positions (token index) gives other logits
    plain = llm.logits(llm.decode(llm.embed(ids), spec=AttnSpec.padded(mask)))
    assert (plain[real] - ref[real]).abs().max() > 1e-2


@torch.no_grad()
def test_text_only_positions_are_plain_rope():
    """All three axes equal: M-RoPE gives exactly what 1-D RoPE gives, with either kind of ids."""
    model, head = reference_text_model("qwen3_vl")
    llm = ours_from("qwen3_vl", model, head)
    plain = LLM(dataclasses.replace(llm.config, mrope_section=None, mrope_interleaved=False)).eval()
    plain.load_state_dict(llm.state_dict())
    ids = torch.randint(0, TEXT_IDS, (2, 11), generator=torch.Generator().manual_seed(3))
    index = torch.arange(11).expand(2, 11)
    embeds = llm.embed(ids)
    expected = plain.decode(embeds)
    assert torch.equal(llm.decode(embeds), expected)
    assert torch.equal(llm.decode(embeds, position_ids=index[None].expand(3, 2, 11)), expected)
    with pytest.raises(ValueError, match="mrope_section"):
        plain.decode(embeds, position_ids=index[None].expand(3, 2, 11))


@torch.no_grad()
def test_packed_decoder_equals_padded():
    model, head = reference_text_model("qwen2_vl")
    llm = ours_from("qwen2_vl", model, head)
    layout = LAYOUTS["qwen2_vl"]
    ids, mask = padded_batch(ROWS, False, "right")
    positions, _ = rope_positions(ids, layout, image_grid_thw=grids("image"), video_grid_thw=grids("video"),
                                  attention_mask=mask)
    padded = llm.decode(llm.embed(ids), position_ids=positions, spec=AttnSpec.padded(mask))
    real = mask.bool()
    cu = torch.tensor([0] + real.sum(1).tolist()).cumsum(0)
    flat_positions = packed_rope_positions(ids[real], cu, layout, image_grid_thw=grids("image"),
                                           video_grid_thw=grids("video"))
    packed = llm.decode(llm.embed(ids[real]), position_ids=flat_positions, spec=AttnSpec.packed(cu))  # (T, D)
    torch.testing.assert_close(packed, padded[real], atol=1e-5, rtol=1e-5)


# --- KV-cache decoding after an image prompt --------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@torch.no_grad()
def test_cache_decoding_continues_after_max_position(family):
    """Prefill image prompts (ragged, left-padded) with their 3-axis positions, then decode steps
    at max + 1, max + 2, ... through the cache: the same logits as one forward over everything."""
    model, head = reference_text_model(family)
    llm = ours_from(family, model, head)
    layout = LAYOUTS[family]
    rows = [ROWS[2], ROWS[1]]
    ids, mask = padded_batch(rows, False, "left")
    positions, deltas = rope_positions(ids, layout, image_grid_thw=grids("image", rows), attention_mask=mask)
    new = torch.randint(0, TEXT_IDS, (2, 4), generator=torch.Generator().manual_seed(5))

    cache = llm.new_cache()
    steps = [llm.logits(llm.decode(llm.embed(ids), position_ids=positions, spec=AttnSpec.padded(mask),
                                   cache=cache))[:, -1]]
    step_positions = []
    for k in range(new.shape[1]):
        at = continue_positions(cache.position_ids(), deltas)  # (B, 1): index + rope delta
        step_positions.append(at)
        steps.append(llm.logits(llm.decode(llm.embed(new[:, k:k + 1]), position_ids=at, cache=cache))[:, -1])
    first = step_positions[0][:, 0]
    assert torch.equal(first, positions.amax(dim=(0, 2)) + 1)  # the first new token: max position + 1
    assert not torch.equal(first, mask.sum(1))  # ... not the token index

    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    new_positions = torch.cat(step_positions, dim=1)[None].expand(3, -1, -1)  # text: all three axes equal
    full_positions = torch.cat([positions, new_positions], dim=2)
    full = llm.logits(llm.decode(llm.embed(full_ids), position_ids=full_positions, spec=AttnSpec.padded(full_mask)))
    T = ids.shape[1]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, T - 1:], atol=1e-5, rtol=1e-5)

    # 3-axis positions for the steps take the same path to the same logits
    cache = llm.new_cache()
    llm.decode(llm.embed(ids), position_ids=positions, spec=AttnSpec.padded(mask), cache=cache)
    at = continue_positions(cache.position_ids(), deltas)
    step = llm.logits(llm.decode(llm.embed(new[:, :1]), position_ids=at[None].expand(3, -1, -1), cache=cache))
    torch.testing.assert_close(step[:, -1], steps[1], atol=1e-6, rtol=1e-6)
