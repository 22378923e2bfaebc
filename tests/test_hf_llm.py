"""HF decoder loading: logits parity with transformers on tiny random models, strict error reporting."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError
from vlmkit.models.hf.llm import llm_config_from_hf, llm_config_to_hf, llm_state_dict_to_hf, load_llm

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rope_theta=5000.0)


def build(family: str, **kw):
    torch.manual_seed(0)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    if family == "mistral":
        extra["sliding_window"] = None
    model = model_cls(cfg_cls(**{**TINY, **extra, **kw})).eval()
    with torch.no_grad():  # random norms and biases, so that a mis-mapped one would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_parity(ref, path):
    ours = load_llm(path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
        diff = (ours(ids, attention_mask=mask) - ref(ids, attention_mask=mask).logits)[mask.bool()]
        assert diff.abs().max() <= 1e-4
    return ours


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(num_key_value_heads=2)),  # GQA
    ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),  # MHA, tied (SmolLM2-like)
    ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),  # qkv bias
    ("qwen3", dict(num_key_value_heads=2)),  # qk-norm, explicit head_dim
    ("mistral", dict(num_key_value_heads=1)),
])
def test_parity_with_transformers(tmp_path, family, kw):
    ref = build(family, **kw)
    ref.save_pretrained(tmp_path)
    ours = assert_parity(ref, tmp_path)
    assert ours.config.tie_embeddings == bool(kw.get("tie_word_embeddings", False))
    assert ours.config.qkv_bias == (family == "qwen2") and ours.config.qk_norm == (family == "qwen3")


def test_sharded_checkpoint(tmp_path):
    ref = build("llama", num_key_value_heads=2)
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_parity(ref, tmp_path)


def test_rope_theta_from_both_config_layouts():
    v4 = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_theta": 123.0}
    v5 = {**v4, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 456.0}}
    assert llm_config_from_hf(v4).rope_theta == 123.0
    assert llm_config_from_hf(v5).rope_theta == 456.0
    with pytest.raises(CheckpointError, match="llama3"):
        llm_config_from_hf({**v5, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})


def test_sliding_window_warns():
    cfg = {"architectures": ["MistralForCausalLM"], **TINY, "sliding_window": 32}
    with pytest.warns(UserWarning, match="sliding-window"):
        llm_config_from_hf(cfg)


@pytest.fixture
def saved_llama(tmp_path):
    build("llama", num_key_value_heads=2).save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_architecture(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_llm(saved_llama)


def test_missing_tensor(saved_llama):
    _edit_weights(saved_llama, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        load_llm(saved_llama)


def test_unexpected_tensor(saved_llama):
    _edit_weights(saved_llama, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"):
        load_llm(saved_llama)


def test_shape_mismatch(saved_llama):
    _edit_weights(saved_llama, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"shape.*model\.norm\.weight \(65,\) -> norm\.weight \(64,\)"):
        load_llm(saved_llama)


@pytest.mark.parametrize("family,kw", [("llama", dict(num_key_value_heads=2)),
                                       ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
                                       ("qwen3", dict(num_key_value_heads=2))])
def test_export_round_trip(tmp_path, family, kw):
    """Our LLM -> HF names + HF config -> transformers loads it and gives the same logits."""
    ref = build(family, **kw)
    ref.save_pretrained(tmp_path / "src")
    ours = load_llm(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(llm_config_to_hf(ours.config)))
    save_file({k: v.contiguous() for k, v in llm_state_dict_to_hf(ours).items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max() <= 1e-4
