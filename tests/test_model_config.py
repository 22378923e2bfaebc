import pytest

from vlmkit.errors import ConfigError
from vlmkit.models.config import LLMConfig, VLMConfig


def test_defaults_round_trip():
    cfg = VLMConfig()
    again = VLMConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.llm.num_kv_heads == cfg.llm.num_heads
    assert cfg.llm.head_dim == cfg.llm.hidden_size // cfg.llm.num_heads


def test_missing_keys_take_defaults_and_unknown_keys_fail():
    cfg = VLMConfig.from_dict({"llm": {"hidden_size": 64, "num_heads": 4}})
    assert cfg.llm.hidden_size == 64 and cfg.vision == VLMConfig().vision
    with pytest.raises(ConfigError, match="hiden_size"):
        VLMConfig.from_dict({"llm": {"hiden_size": 64}})


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(hidden_size=100, num_heads=6), "divisible by num_heads"),
])
def test_invalid_llm_config(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        LLMConfig(**kwargs)


def test_tokens_per_image():
    base = dict(vision={"image_size": 48, "patch_size": 8})
    assert VLMConfig(**base, adapter={"kind": "mlp"}).tokens_per_image == 36
    assert VLMConfig(**base, adapter={"kind": "pixel_shuffle", "scale_factor": 2}).tokens_per_image == 9
    assert VLMConfig(**base, adapter={"kind": "resampler", "num_queries": 16}).tokens_per_image == 16
    with pytest.raises(ConfigError, match="must divide the patch grid"):
        VLMConfig(**base, adapter={"kind": "pixel_shuffle", "scale_factor": 4})


def test_image_token_outside_vocab():
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        VLMConfig(llm={"vocab_size": 10}, image_token_id=10)
