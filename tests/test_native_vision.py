"""Native-resolution vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): parity with transformers on a
packed batch of images of different sizes and a video, the HF loader, and the tower's errors."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import NativeVisionConfig
from vlmkit.models.hf.native_vision import (
    load_native_vision,
    load_native_vision_weights,
    native_vision_config_from_hf,
)
from vlmkit.models.native_vision import NativeVisionTower, merged_token_counts, window_layout

transformers = pytest.importorskip("transformers")
qwen2_vl = transformers.models.qwen2_vl
qwen2_5_vl = transformers.models.qwen2_5_vl
qwen3_vl = transformers.models.qwen3_vl

PATCH = 4
TINY = dict(num_heads=4, patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2)
# Three images of different sizes and aspect ratios, then a video of two frame pairs (t = 2).
GRID_THW = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 6, 10], [2, 4, 4]])
PATCH_DIM = 3 * 2 * PATCH * PATCH
WEIGHT_STD = 0.2
"""Random weights of the reference: larger than its init so norms, biases and positions all matter."""
TOLERANCE = 1e-4

# family -> (HF vision config, HF tower class), built on use. Qwen2.5-VL: windows of 2 x 2 merged
# tokens (the images' merged grids are 2 x 3, 4 x 2, 3 x 5, so windows are cut at the edges),
# block 1 attends over whole frames. Qwen3-VL: a 6 x 6 learned position grid (resized up and down), deepstack at
# blocks 0 and 2.
FAMILIES = {
    "qwen2_vl": (lambda: qwen2_vl.configuration_qwen2_vl.Qwen2VLVisionConfig(
                     depth=2, embed_dim=32, hidden_size=48, mlp_ratio=2, **TINY),
                 lambda: qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel),
    "qwen2_5_vl": (lambda: qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig(
                       depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=48,
                       window_size=4 * PATCH, fullatt_block_indexes=[1], **TINY),
                   lambda: qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel),
    "qwen3_vl": (lambda: qwen3_vl.configuration_qwen3_vl.Qwen3VLVisionConfig(
                     depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=48,
                     num_position_embeddings=36, deepstack_visual_indexes=[0, 2], **TINY),
                 lambda: qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel),
}


def _reference(family: str):
    make_config, tower_class = FAMILIES[family]
    torch.manual_seed(0)
    hf_config = make_config()
    ref = tower_class()(hf_config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, WEIGHT_STD)
    return hf_config, ref


def _ours(hf_config, hf_tensors, **changes) -> NativeVisionTower:
    cfg = dataclasses.replace(native_vision_config_from_hf(hf_config.to_dict(), "test"), **changes)
    tower = NativeVisionTower(cfg, attention_backend="sdpa").eval()
    load_native_vision_weights(tower, hf_tensors, source="test")
    return tower


def _pixels(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(int(GRID_THW.prod(-1).sum()), PATCH_DIM)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_transformers(family):
    hf_config, ref = _reference(family)
    ours = _ours(hf_config, ref.state_dict())
    pixels = _pixels()
    with torch.no_grad():
        expected = ref(pixels, grid_thw=GRID_THW)
        got = ours(pixels, GRID_THW)
    assert got.features.shape == (sum(merged_token_counts(GRID_THW, 2)), 48)
    torch.testing.assert_close(got.features, expected.pooler_output, rtol=0, atol=TOLERANCE)
    expected_deepstack = getattr(expected, "deepstack_features", None) or []
    assert len(got.deepstack_features) == len(expected_deepstack) == len(ours.config.deepstack_visual_indexes)
    for mine, theirs in zip(got.deepstack_features, expected_deepstack):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=TOLERANCE)


def test_windows_change_the_result():
    """The Qwen2.5-VL parity test exercises window attention: without windows the output differs."""
    hf_config, ref = _reference("qwen2_5_vl")
    windowed = _ours(hf_config, ref.state_dict())
    whole_frames = _ours(hf_config, ref.state_dict(), window_size=0, fullatt_block_indexes=())
    pixels = _pixels()
    with torch.no_grad():
        assert (windowed(pixels, GRID_THW).features - whole_frames(pixels, GRID_THW).features).abs().max() > 1e-2


def test_window_layout_groups_tokens_by_window():
    cfg = NativeVisionConfig(patch_size=PATCH, spatial_merge_size=2, window_size=4 * PATCH, hidden_size=32)
    index, cu = window_layout(torch.tensor([[1, 4, 6], [2, 4, 4]]), cfg)
    # image: merged grid 2 x 3 -> windows [0 1 3 4], [2 5]; video: two frames of one 2 x 2 window each
    assert index.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert cu.tolist() == [0, 16, 24, 40, 56]


def test_images_do_not_see_each_other():
    """Each item's features depend on its own patches only (attention is per frame)."""
    hf_config, ref = _reference("qwen3_vl")
    ours = _ours(hf_config, ref.state_dict())
    pixels = _pixels()
    changed = pixels.clone()
    changed[:int(GRID_THW[0].prod())] += 1.0  # the first image's patches only
    with torch.no_grad():
        a, b = ours(pixels, GRID_THW).features, ours(changed, GRID_THW).features
    first = merged_token_counts(GRID_THW, 2)[0]
    assert (a[:first] - b[:first]).abs().max() > 1e-3
    torch.testing.assert_close(a[first:], b[first:], rtol=0, atol=1e-6)


def test_grid_and_patch_count_mismatch_names_both():
    hf_config, ref = _reference("qwen2_vl")
    ours = _ours(hf_config, ref.state_dict())
    pixels = _pixels()[:-3]
    total = int(GRID_THW.prod(-1).sum())
    with pytest.raises(ValueError, match=rf"{total} patches.*{total - 3}"):
        ours(pixels, GRID_THW)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        ours(_pixels()[:3 * 5], torch.tensor([[1, 3, 5]]))


def test_gradient_checkpointing_gives_the_same_gradients():
    hf_config, ref = _reference("qwen3_vl")
    pixels = _pixels()
    grads = []
    for on in (False, True):
        tower = _ours(hf_config, ref.state_dict()).train()
        tower.gradient_checkpointing = on
        out = tower(pixels, GRID_THW)
        (out.features.square().mean() + sum(d.mean() for d in out.deepstack_features)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in tower.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("prefix", ["model.visual.", "visual."])
def test_load_from_a_whole_checkpoint_directory(tmp_path, prefix):
    """A whole VLM directory: the tower is read under its prefix, the decoder's tensors are left out."""
    hf_config, ref = _reference("qwen2_5_vl")
    tensors = {prefix + name: t.contiguous() for name, t in ref.state_dict().items()}
    tensors["model.language_model.embed_tokens.weight" if prefix == "model.visual." else "model.embed_tokens.weight"] \
        = torch.zeros(8, 48)
    tensors["lm_head.weight"] = torch.zeros(8, 48)
    save_file(tensors, tmp_path / "model.safetensors")
    vision = {k: v for k, v in hf_config.to_dict().items() if k not in ("transformers_version",)}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "vision_config": vision}))
    ours = load_native_vision(tmp_path)
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, GRID_THW).features, ref(pixels, grid_thw=GRID_THW).pooler_output,
                                   rtol=0, atol=TOLERANCE)


def test_loading_is_strict():
    hf_config, ref = _reference("qwen3_vl")
    tensors = dict(ref.state_dict())
    del tensors["blocks.1.attn.qkv.weight"]
    tensors["merger.extra.weight"] = torch.zeros(1)
    tensors["pos_embed.weight"] = torch.zeros(25, 32)
    with pytest.raises(CheckpointError) as err:
        _ours(hf_config, tensors)
    message = str(err.value)
    assert "blocks.1.attn.qkv.weight" in message and "merger.extra.weight" in message
    assert "pos_embed.weight (25, 32) -> pos_embed.weight (36, 32)" in message


def test_config_from_hf_converts_qwen2_vl_names_and_whole_vlm_configs():
    vision = {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "hidden_size": 48, "mlp_ratio": 4,
              "num_heads": 4, "in_chans": 3, "patch_size": 14}
    cfg = native_vision_config_from_hf({"model_type": "qwen2_vl", "vision_config": vision}, "test")
    assert (cfg.style, cfg.hidden_size, cfg.out_hidden_size, cfg.intermediate_size) == ("qwen2_vl", 32, 48, 128)
    assert cfg.hidden_act == "quick_gelu"  # the released configs name none: HF's default
    moe = native_vision_config_from_hf({"model_type": "qwen3_vl_moe", "vision_config": {
        "depth": 4, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 48, "num_heads": 4,
        "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2]}}, "test")
    assert (moe.style, moe.patch_size, moe.deepstack_visual_indexes) == ("qwen3_vl", 16, (1, 2))
    with pytest.raises(CheckpointError, match="llava"):
        native_vision_config_from_hf({"model_type": "llava"}, "test")
    with pytest.raises(CheckpointError, match="'depth'"):
        native_vision_config_from_hf({"model_type": "qwen2_vl", "vision_config": {"embed_dim": 32}}, "test")


@pytest.mark.parametrize("fields, message", [
    (dict(style="qwen9"), "native_vision.style"),
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (dict(hidden_size=24, num_heads=4), "multiple of 4"),
    (dict(window_size=20, patch_size=4), "window_size 20 must be a multiple"),
    (dict(fullatt_block_indexes=(0,)), "needs window attention"),
    (dict(num_position_embeddings=30), "square number"),
    (dict(depth=2, deepstack_visual_indexes=(1, 2)), "distinct blocks in 0..1"),
    (dict(position_grid="absolute"), "native_vision.position_grid"),
    (dict(position_init_std=0.0), "position_init_std"),
])
def test_config_checks(fields, message):
    with pytest.raises(ConfigError, match=message):
        NativeVisionConfig(**fields)


def _indexed_tower(side: int = 5, std: float = 0.3) -> NativeVisionTower:
    cfg = NativeVisionConfig(depth=1, hidden_size=32, intermediate_size=40, out_hidden_size=48, **TINY,
                             num_position_embeddings=side * side, position_grid="indexed", position_init_std=std)
    torch.manual_seed(0)
    return NativeVisionTower(cfg, attention_backend="sdpa")


def test_indexed_position_grid_gives_each_patch_its_own_row_and_column():
    """position_grid: indexed: a patch in row i, column j takes entry (i, j) of the grid, on every
    image size (the top left patches of two images of different sizes share their entries), and
    rows or columns past the grid's side take its last entry."""
    tower = _indexed_tower(side=5)
    table = tower.pos_embed.weight.detach().view(5, 5, -1)
    grid_thw = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 columns: one past the grid's side
    positions = tower.learned_positions(grid_thw).detach()
    # the first image in merge-window order: window (0, 0) holds patches (0,0) (0,1) (1,0) (1,1)
    torch.testing.assert_close(positions[:4], table[[0, 0, 1, 1], [0, 1, 0, 1]])
    # its last window covers rows 2-3, columns 4-5; column 5 takes the last column's entry
    torch.testing.assert_close(positions[20:24], table[[2, 2, 3, 3], [4, 4, 4, 4]])
    # the second image (2 x 2 patches) starts at the same entries as the first
    torch.testing.assert_close(positions[24:28], positions[:4])


def test_indexed_grid_places_by_patch_and_resized_grid_by_fraction():
    """Patch (1, 1) is the bottom right of a 2 x 2 image and inside a 4 x 4 one: the indexed grid
    gives it the same entry on both, the resized grid two different ones; the top left corner is
    entry (0, 0) either way."""
    indexed = _indexed_tower(side=8)
    resized = NativeVisionTower(dataclasses.replace(indexed.config, position_grid="resized"), attention_backend="sdpa")
    resized.load_state_dict(indexed.state_dict())
    small, large = torch.tensor([[1, 2, 2]]), torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        for tower, same in ((indexed, True), (resized, False)):
            a, b = tower.learned_positions(small), tower.learned_positions(large)
            assert torch.equal(a[0], b[0])
            assert torch.equal(a[3], b[3]) is same  # merge-window order: index 3 is patch (1, 1) in both


def test_position_init_std_sets_the_grid_scale():
    weight = _indexed_tower(side=16, std=0.3).pos_embed.weight
    assert abs(weight.std().item() - 0.3) < 0.01


def test_an_indexed_position_grid_is_not_exported_as_a_qwen_vl_tower():
    from vlmkit.models.config import VLMConfig
    from vlmkit.models.hf.qwen_vl import check_qwen_vl_exportable

    def config(grid: str) -> VLMConfig:
        return VLMConfig(native_vision=dict(style="qwen3_vl", out_hidden_size=64, num_position_embeddings=16,
                                            position_grid=grid),
                         llm=dict(hidden_size=64, num_heads=2, mrope_section=[4, 6, 6], mrope_interleaved=True))

    # this tiny decoder is not Qwen3-VL's either; only the indexed grid adds the tower's reason
    with pytest.raises(ConfigError) as resized:
        check_qwen_vl_exportable(config("resized"))
    assert "position_grid" not in str(resized.value)
    with pytest.raises(ConfigError, match="position_grid is 'indexed'"):
        check_qwen_vl_exportable(config("indexed"))
