"""Parity of load_vision with transformers' SiglipVisionModel / CLIPVisionModel, and loader errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError
from vlmkit.models.hf.vision import load_vision

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8)


def _save_siglip(path, **kw):
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, **kw})).eval()
    model.save_pretrained(path)
    return model


def _save_clip(path, **kw):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**TINY, **kw})).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("save", [_save_siglip, _save_clip], ids=["siglip", "clip"])
@pytest.mark.parametrize("size", [(32, 32), (48, 48), (24, 40)])
def test_parity_last_hidden_state_and_features(tmp_path, save, size):
    ref = save(tmp_path)
    ours = load_vision(tmp_path, feature_layer=-2).eval()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        last = ours(pixels)
        feats = ours.features(pixels)
    assert last.shape == out.last_hidden_state.shape
    assert (last - out.last_hidden_state).abs().max() <= 1e-4
    expected = out.hidden_states[-2]
    if isinstance(ref, transformers.CLIPVisionModel):
        expected = expected[:, 1:]  # LLaVA "default": class token dropped
    assert feats.shape == expected.shape
    assert (feats - expected).abs().max() <= 1e-4


def test_full_dual_encoder_dir_loads_vision_tower(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        vision_config=TINY, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
    ref = transformers.SiglipModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = load_vision(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ref.vision_model(pixels).last_hidden_state
        assert (ours(pixels) - expected).abs().max() <= 1e-4


def test_preprocessor_mean_std_are_read(tmp_path):
    _save_clip(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                    "image_std": [0.4, 0.5, 0.6]}))
    cfg = load_vision(tmp_path).config
    assert cfg.style == "clip" and cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (0.4, 0.5, 0.6)


def test_unknown_architecture(tmp_path):
    _save_siglip(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["Dinov2Model"], model_type="dinov2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported vision architecture"):
        load_vision(tmp_path)


def _edit_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_unexpected_and_mis_shaped_tensors_are_all_reported(tmp_path):
    _save_siglip(tmp_path)

    def edit(t):
        del t["encoder.layers.1.mlp.fc1.weight"]
        t["encoder.layers.9.mlp.fc1.weight"] = torch.zeros(64, 32)
        t["embeddings.position_embedding.weight"] = torch.zeros(15, 32)
        t["surprise.weight"] = torch.zeros(1)

    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_vision(tmp_path)
    msg = str(err.value)
    assert "missing tensors" in msg and "layers.1.mlp.fc1.weight" in msg
    assert "unexpected tensors" in msg and "surprise.weight" in msg and "encoder.layers.9" in msg
    assert "shape mismatches" in msg and "position_embedding" in msg


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vision(tmp_path)
    _save_clip(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_vision(tmp_path)
