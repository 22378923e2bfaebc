"""AIMv2 as VisionEncoder switches: parity with transformers' Aimv2VisionModel (learned and
sine-cosine positions), the dual encoder's vision tower, config conversion and checks."""

import json

import pytest
import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import VisionConfig
from vlmkit.models.hf.aimv2 import load_aimv2_vision
from vlmkit.models.vision import VisionEncoder, sincos_positions

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)


@torch.no_grad()
def _randomise(model):
    """Every parameter random (norm weights start at one, which would hide a swapped norm)."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.normal_(0, 0.2)


def _save_aimv2(path, **kw):
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**{**TINY, **kw})).eval()
    _randomise(model)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("native, size", [(False, (32, 32)), (True, (32, 32)), (True, (24, 40))],
                         ids=["learned", "sincos", "sincos-other-size"])
def test_parity_last_hidden_state_and_features(tmp_path, native, size):
    ref = _save_aimv2(tmp_path, is_native=native)
    ours = load_aimv2_vision(tmp_path, feature_layer=-2)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(pixels, output_hidden_states=True)
        last, feats = ours(pixels), ours.features(pixels)
    assert last.shape == out.last_hidden_state.shape
    assert (last - out.last_hidden_state).abs().max() <= 1e-4
    assert (feats - out.hidden_states[-2]).abs().max() <= 1e-4  # hidden_states[0] is the embeddings


def test_config_from_hf(tmp_path):
    _save_aimv2(tmp_path, is_native=True)
    cfg = load_aimv2_vision(tmp_path).config
    assert (cfg.style, cfg.norm, cfg.mlp, cfg.linear_bias, cfg.patch_norm, cfg.positions) == (
        "siglip", "rms_norm", "gated", False, True, "sincos")
    assert (cfg.layer_norm_eps, cfg.hidden_act, cfg.image_mean[0]) == (1e-5, "silu", 0.48145466)


def test_biased_tower_loads(tmp_path):
    ref = _save_aimv2(tmp_path, qkv_bias=True, mlp_bias=True)
    ours = load_aimv2_vision(tmp_path)
    assert ours.config.linear_bias
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(pixels) - ref(pixels).last_hidden_state).abs().max() <= 1e-4


def test_dual_encoder_dir_loads_vision_tower(tmp_path):
    cfg = transformers.Aimv2Config(vision_config=TINY, text_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    ref = transformers.Aimv2Model(cfg).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    ours = load_aimv2_vision(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(pixels) - ref.vision_model(pixels).last_hidden_state).abs().max() <= 1e-4


def test_mixed_biases_and_other_models_are_refused(tmp_path):
    _save_aimv2(tmp_path, qkv_bias=True)
    with pytest.raises(CheckpointError, match="one bias switch"):
        load_aimv2_vision(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "siglip_vision_model"}))
    with pytest.raises(CheckpointError, match="is not one of"):
        load_aimv2_vision(tmp_path)


def test_sincos_positions_layout():
    pos = sincos_positions(2, 3, 8)  # rows, columns, dim: 2 frequencies per quarter
    assert pos.shape == (6, 8)
    # patch (row 1, col 2) is raster index 5: [sin(col f), cos(col f), sin(row f), cos(row f)], f = (1, 0.01)
    f = torch.tensor([1.0, 0.01])
    expected = torch.cat([torch.sin(2 * f), torch.cos(2 * f), torch.sin(1 * f), torch.cos(1 * f)])
    assert torch.allclose(pos[5], expected)


def test_switched_tower_has_no_table_and_trains():
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       norm="rms_norm", mlp="gated", linear_bias=False, patch_norm=True, positions="sincos")
    enc = VisionEncoder(cfg)
    assert enc.embeddings.position_embedding is None
    names = {name for name, _ in enc.named_parameters()}
    assert "embeddings.patch_norm.weight" in names and "layers.0.mlp.gate_proj.weight" in names
    assert not any(name.endswith("self_attn.q_proj.bias") or name.endswith("mlp.up_proj.bias") for name in names)
    enc(torch.randn(1, 3, 24, 40)).sum().backward()
    assert enc.embeddings.patch_norm.weight.grad is not None


@pytest.mark.parametrize("kw, needle", [
    (dict(norm="batch_norm"), "vision.norm"),
    (dict(positions="sincos", style="clip"), "sincos"),
    (dict(positions="sincos", hidden_size=30, num_heads=3), "divisible by 4"),
])
def test_config_checks(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        VisionConfig(**kw)


def test_an_aimv2_tower_and_a_qwen3_decoder_assemble_sail_vl2s_shape(tmp_path):
    """`VLM.from_hf(vision=AIMV2_DIR, llm=QWEN3_DIR)` (what `vlmkit build` calls): the tower computes
    transformers' Aimv2VisionModel features, the decoder keeps its logits, and the assembled model
    trains and round-trips through its own checkpoint."""
    from tests.test_hf_llm import build as build_llm
    from vlmkit.api import VLM

    tower = _save_aimv2(tmp_path / "vision")
    decoder = build_llm("qwen3", num_key_value_heads=2)
    decoder.save_pretrained(tmp_path / "llm")
    model = VLM.from_hf(vision=tmp_path / "vision", llm=tmp_path / "llm", feature_layer=-1)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tower(pixel_values=pixels).last_hidden_state
        assert (model.vision(pixels) - want).abs().max() <= 1e-4
        ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
        # the vocabulary grew by the image token's row (no tokenizer here): the old rows are equal
        assert (model.llm(ids)[..., :128] - decoder(ids).logits).abs().max() <= 1e-4
    tokens = model.config.tokens_per_tile
    ids = torch.tensor([1, 2, *[model.config.image_token_id] * tokens, 3, 4])
    out = model.compute_loss(ids, ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32),
                             pixels[:1])
    out.loss.backward()
    grads = [p.grad for p in model.adapter.parameters()]
    assert torch.isfinite(out.loss) and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.save_pretrained(tmp_path / "built")
    again = VLM.load(tmp_path / "built")
    with torch.no_grad():
        assert torch.equal(again(ids[None], pixels[:1]), model.eval()(ids[None], pixels[:1]))
