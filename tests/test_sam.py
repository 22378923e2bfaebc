"""SAM tower and DeepSeek-VL's hybrid vision: parity with transformers' DeepseekVLHybridModel and
SamVisionModel, strict loading, config checks."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import HybridVisionConfig, SamVisionConfig, VisionConfig
from vlmkit.models.hf.sam import load_hybrid_vision, load_sam_vision
from vlmkit.models.sam import SamVisionTower, window_partition, window_unpartition

transformers = pytest.importorskip("transformers")

SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)
# An 8 x 8 patch grid: windows of 3 leave a padded edge, windows of 4 tile it exactly.
SAM = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=4,
           num_attention_heads=4, image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1, 3], mlp_dim=48)
TEXT = dict(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4)


@torch.no_grad()
def _randomise(model):
    """Every parameter random: SAM initialises its positions, relative tables and the global scale
    to zero, which would hide a wrong mapping of them."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.normal_(0, 0.2)


def _save_hybrid(path, **sam):
    cfg = transformers.DeepseekVLHybridConfig(vision_config=SIGLIP, high_res_vision_config={**SAM, **sam},
                                              text_config=TEXT)
    model = transformers.DeepseekVLHybridForConditionalGeneration(cfg).eval()
    _randomise(model)
    model.save_pretrained(path)
    return model


def _pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("sam", [{}, dict(window_size=4, qkv_bias=False)], ids=["padded-windows", "exact-windows"])
def test_hybrid_parity_with_deepseek_vl_hybrid(tmp_path, sam):
    ref = _save_hybrid(tmp_path, **sam).model
    ours = load_hybrid_vision(tmp_path)
    low, high = _pixels()
    with torch.no_grad():
        expected = ref.get_image_features(low, high)
        raw = ref.high_res_vision_model(high, output_hidden_states=True)
        sam_out = ours.high_res(high, keep_blocks=(1,))
        reduced = ours.combiner.high_res_tokens(sam_out)
        combined = ours(low, high)
    assert sam_out.features.shape == raw.last_hidden_state.shape == (2, 16, 8, 8)
    assert (sam_out.features - raw.last_hidden_state).abs().max() <= 1e-4
    assert (sam_out.block_outputs[1] - raw.hidden_states[2]).abs().max() <= 1e-4  # [0] is the embeddings
    assert reduced.shape == expected.high_res_vision_last_hidden_state.shape == (2, 16, 64)
    assert (reduced - expected.high_res_vision_last_hidden_state).abs().max() <= 1e-4
    assert combined.shape == expected.pooler_output.shape == (2, 16, 48)
    assert (combined - expected.pooler_output).abs().max() <= 1e-4


def test_global_branch_counts_by_its_scale(tmp_path):
    _save_hybrid(tmp_path)
    ours = load_hybrid_vision(tmp_path)
    low, high = _pixels()
    with torch.no_grad():
        before = ours(low, high)
        ours.combiner.global_scale.zero_()
        assert not torch.allclose(ours(low, high), before)


def test_sam_vision_model_dir_loads(tmp_path):
    torch.manual_seed(0)
    ref = transformers.SamVisionModel(transformers.SamVisionConfig(**{k: v for k, v in SAM.items()
                                                                     if k != "model_type"})).eval()
    _randomise(ref)
    ref.save_pretrained(tmp_path)
    ours = load_sam_vision(tmp_path)
    assert ours.config.grid_size == 8 and ours.config.intermediate_size == 48
    _, high = _pixels()
    with torch.no_grad():
        assert (ours(high).features - ref(high).last_hidden_state).abs().max() <= 1e-4


def test_hybrid_config_from_hf(tmp_path):
    _save_hybrid(tmp_path)
    cfg = load_hybrid_vision(tmp_path).config
    assert (cfg.low_res.style, cfg.low_res.grid_size, cfg.out_hidden_size) == ("siglip", 4, 48)
    assert (cfg.high_res.window_size, cfg.high_res.global_attn_indexes, cfg.high_res_block) == (3, (1, 3), 1)
    assert cfg.high_res_channels == 64


def test_missing_unexpected_and_mis_shaped_are_all_reported(tmp_path):
    _save_hybrid(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.high_res_vision_model.vision_encoder.layers.0.attn.rel_pos_h"]
    tensors["model.high_res_vision_alpha"] = torch.zeros(2)
    tensors["model.surprise"] = torch.zeros(1)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as err:
        load_hybrid_vision(tmp_path)
    msg = str(err.value)
    assert "missing tensors" in msg and "high_res.layers.0.attn.rel_pos_h" in msg
    assert "unexpected tensors" in msg and "surprise" in msg
    assert "shape mismatches" in msg and "global_scale" in msg


def test_window_partition_round_trip_and_padding():
    x = torch.randn(2, 5, 7, 3)
    windows = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 3, 3, 3)
    assert windows[1, :, :, 0].flatten().tolist() == x[0, :3, 3:6, 0].flatten().tolist()
    assert windows[5, 2:].abs().sum() == 0 and windows[5, :, 1:].abs().sum() == 0  # the padded corner
    assert torch.equal(window_unpartition(windows, 3, 5, 7), x)


def test_wrong_image_size_is_refused():
    tower = SamVisionTower(SamVisionConfig())
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        tower(torch.randn(1, 3, 48, 48))


def test_gradient_checkpointing_same_values():
    torch.manual_seed(0)
    tower = SamVisionTower(SamVisionConfig()).train()
    x = torch.randn(1, 3, 64, 64)
    plain = tower(x).features
    tower.gradient_checkpointing = True
    assert torch.allclose(tower(x).features, plain)


@pytest.mark.parametrize("kw, needle", [
    (dict(global_attn_indexes=(1, 4)), "global_attn_indexes"),
    (dict(hidden_size=30), "divisible by num_heads"),
    (dict(image_size=60), "multiple of patch_size"),
])
def test_sam_config_checks(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        SamVisionConfig(**kw)


def test_hybrid_config_checks():
    with pytest.raises(ConfigError, match="low_res.style"):
        HybridVisionConfig(low_res=VisionConfig(style="clip"))
    with pytest.raises(ConfigError, match="needs a global block"):
        HybridVisionConfig(high_res=dict(global_attn_indexes=()))
    with pytest.raises(ConfigError, match="even"):
        HybridVisionConfig(out_hidden_size=47)
