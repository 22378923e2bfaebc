"""Adapters: output shapes and token counts for every kind, at native and other patch grids."""

import pytest
import torch

from vlmkit.models.adapter import MLPAdapter, PixelShuffleAdapter, build_adapter, sincos_2d
from vlmkit.models.config import AdapterConfig, VLMConfig

Dv, D = 32, 48


@pytest.mark.parametrize("kind", ["mlp", "pixel_shuffle", "resampler"])
def test_tokens_per_image_matches_config(kind):
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(image_size=32, patch_size=4, hidden_size=Dv, intermediate_size=64, num_heads=4),
                    adapter=dict(kind=kind, num_queries=5, num_heads=4),
                    llm=dict(hidden_size=D, num_heads=4, vocab_size=64))
    adapter = build_adapter(cfg.adapter, Dv, D)
    out = adapter(torch.randn(3, cfg.vision.num_patches, Dv))
    assert out.shape == (3, cfg.tokens_per_image, D)


def test_other_grids():
    torch.manual_seed(0)
    feats = torch.randn(2, 6 * 10, Dv)  # a 6x10 grid: a non-native, non-square image
    assert build_adapter(AdapterConfig(kind="mlp"), Dv, D)(feats, grid=(6, 10)).shape == (2, 60, D)
    assert build_adapter(AdapterConfig(kind="pixel_shuffle"), Dv, D)(feats, grid=(6, 10)).shape == (2, 15, D)
    resampler = build_adapter(AdapterConfig(kind="resampler", num_queries=7), Dv, D)
    assert resampler(feats, grid=(6, 10)).shape == (2, 7, D)
    assert resampler(torch.randn(2, 16, Dv)).shape == (2, 7, D)


def test_pixel_shuffle_groups_neighbouring_patches():
    adapter = PixelShuffleAdapter(AdapterConfig(kind="pixel_shuffle", scale_factor=2), 1, D)
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, value = row-major patch index
    blocks = adapter.shuffle(grid, (4, 4))  # (1, 4, 4)
    assert blocks[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="must divide the patch grid"):
        adapter.shuffle(torch.randn(1, 15, 1), (3, 5))


def test_mlp_names_match_llava_projector():
    names = set(MLPAdapter(AdapterConfig(kind="mlp"), Dv, D).state_dict())
    assert names == {"mlp.linear_1.weight", "mlp.linear_1.bias", "mlp.linear_2.weight", "mlp.linear_2.bias"}


def test_sincos_2d():
    pos = sincos_2d((3, 5), 8)
    assert pos.shape == (15, 8)
    assert torch.equal(pos[0, :2], torch.tensor([0.0, 0.0]))  # sin(0) of row and column
    assert len({tuple(row.tolist()) for row in pos}) == 15  # every patch distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


def test_resampler_is_position_aware():
    torch.manual_seed(0)
    resampler = build_adapter(AdapterConfig(kind="resampler", num_queries=4), Dv, D)
    feats = torch.randn(1, 16, Dv)
    flipped = feats.flip(1)  # same patches, other places
    assert not torch.allclose(resampler(feats), resampler(flipped), atol=1e-4)
    with pytest.raises(ValueError, match="must divide the LLM width"):
        build_adapter(AdapterConfig(kind="resampler", num_heads=5), Dv, D)


def test_pixel_shuffle_normalises_its_input():
    # InternVL's projector: a LayerNorm over the r^2 * Dv channels before the MLP, so the scale of the
    # vision features (which grows in training) does not reach the LLM's embeddings
    torch.manual_seed(0)
    adapter = build_adapter(AdapterConfig(kind="pixel_shuffle"), Dv, D)
    feats = torch.randn(2, 16, Dv)
    assert torch.allclose(adapter(feats), adapter(100.0 * feats + 3.0), atol=1e-4)
