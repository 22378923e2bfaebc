"""VisionEncoder invariants: shapes per style, feature layer selection, interpolation, checkpointing."""

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.models.config import VisionConfig
from vlmkit.models.vision import VisionEncoder, activation


def _cfg(**kw):
    return VisionConfig(**{**dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                  num_layers=3, num_heads=4), **kw})


@pytest.mark.parametrize("style,tokens", [("siglip", 16), ("clip", 17)])
def test_shapes(style, tokens):
    torch.manual_seed(0)
    enc = VisionEncoder(_cfg(style=style))
    x = torch.randn(2, 3, 32, 32)
    assert enc(x).shape == (2, tokens, 32)
    assert enc.features(x).shape == (2, 16, 32)  # class token dropped
    assert enc(torch.randn(1, 3, 48, 64)).shape == (1, 6 * 8 + tokens - 16, 32)


def test_feature_layer_selects_a_hidden_state():
    torch.manual_seed(0)
    enc = VisionEncoder(_cfg(feature_layer=0)).eval()
    x = torch.randn(1, 3, 32, 32)
    # feature layer 0 = embeddings; -1 = last block output before the post-layernorm
    assert torch.allclose(enc.features(x), enc.embeddings(x))
    enc.config.feature_layer = -1
    last = enc.features(x)
    assert torch.allclose(enc.post_layernorm(last), enc(x))
    enc.config.feature_layer = 2
    assert not torch.allclose(enc.features(x), last)


def test_native_size_uses_position_table_unchanged():
    enc = VisionEncoder(_cfg())
    assert torch.equal(enc.embeddings.patch_positions(4, 4), enc.embeddings.position_embedding.weight)
    assert enc.embeddings.patch_positions(2, 6).shape == (12, 32)


def test_bad_pixel_values():
    enc = VisionEncoder(_cfg())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        enc(torch.randn(3, 32, 32))


def test_image_size_need_not_be_whole_patches():
    """A tower whose image size ends in a part patch (SmolVLM-Instruct's 384 / 14): at that size the
    patch conv drops the pixels past the last whole patch, as transformers' towers do; other sizes
    stay whole patches, and a size under one patch is refused."""
    torch.manual_seed(0)
    enc = VisionEncoder(_cfg(image_size=30)).eval()  # 3 whole 8-pixel patches per side, 6 pixels left
    assert (enc.config.grid_size, enc.config.num_patches) == (3, 9)
    x = torch.randn(2, 3, 30, 30)
    assert enc.grid(x) == (3, 3)
    torch.testing.assert_close(enc(x), enc(x[..., :24, :24]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        enc(torch.randn(1, 3, 30, 26))
    with pytest.raises(ConfigError, match="at least one patch"):
        _cfg(image_size=4)


@pytest.mark.parametrize("style", ["siglip", "clip"])
def test_gradient_checkpointing_same_values_and_grads(style):
    torch.manual_seed(0)
    enc = VisionEncoder(_cfg(style=style, feature_layer=-1)).train()
    x = torch.randn(2, 3, 32, 32)

    def run():
        enc.zero_grad()
        out = enc.features(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    out_a, grads_a = run()
    enc.gradient_checkpointing = True
    out_b, grads_b = run()
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)


def test_activation_names():
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(activation("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="unknown activation"):
        activation("swishy")


def test_position_init_std_sets_the_position_table_scale():
    torch.manual_seed(0)
    default = VisionEncoder(VisionConfig(hidden_size=64, intermediate_size=128, num_heads=2, num_layers=1))
    torch.manual_seed(0)
    wide = VisionEncoder(VisionConfig(hidden_size=64, intermediate_size=128, num_heads=2, num_layers=1,
                                      position_init_std=0.2))
    std = lambda m: float(m.embeddings.position_embedding.weight.detach().std())  # noqa: E731
    assert std(default) == pytest.approx(0.02, rel=0.1) and std(wide) == pytest.approx(0.2, rel=0.1)
    with pytest.raises(ValueError, match="position_init_std"):
        VisionConfig(position_init_std=-1.0)
