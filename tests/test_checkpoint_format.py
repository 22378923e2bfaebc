"""The checkpoint directory (save_pretrained / from_pretrained), VLM.from_hf, and the build / export CLIs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.api import VLM
from vlmkit.errors import CheckpointError
from vlmkit.models.config import VLMConfig

transformers = pytest.importorskip("transformers")


def _config(**kw):
    return VLMConfig(**{**dict(vision=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=4),
                               adapter=dict(kind="pixel_shuffle"),
                               llm=dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=2,
                                        num_heads=4, num_kv_heads=2),
                               image_token_id=3), **kw})


def _inputs(model):
    n = model.config.tokens_per_image
    torch.manual_seed(1)
    return torch.tensor([[5, 6] + [3] * n + [7, 8, 9]]), torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("kw", [{}, dict(llm=dict(vocab_size=64, hidden_size=48, num_heads=4, num_layers=1,
                                                  tie_embeddings=True, qk_norm=True)),
                                dict(adapter=dict(kind="resampler", num_queries=5), max_tiles=4),
                                dict(llm=dict(vocab_size=64, hidden_size=48, num_heads=4, num_layers=2,
                                              moe=dict(num_experts=4, top_k=2)))],
                         ids=["pixel_shuffle", "tied_qknorm", "resampler_tiles", "moe"])
def test_round_trip_is_bitwise(tmp_path, kw):
    torch.manual_seed(0)
    model = VLM(_config(**kw)).eval()
    with torch.no_grad():  # make MoE selection biases non-trivial so that they must be saved
        for m in model.llm.moe_layers().values():
            m.router.score_bias.normal_()
    model.save_pretrained(tmp_path, meta={"stages": [{"name": "s1"}]})
    loaded = VLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids, pixels = _inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels), model(ids, pixels))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    meta = json.loads((tmp_path / "vlmkit.json").read_text())
    assert meta["stages"] == [{"name": "s1"}] and "version" in meta


def test_config_json_has_every_field(tmp_path):
    VLM(_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {"vision", "adapter", "llm", "image_token_id", "max_tiles", "use_thumbnail"} <= set(cfg)
    assert cfg["vision"]["feature_layer"] == -1 and cfg["llm"]["num_kv_heads"] == 2 and cfg["llm"]["head_dim"] == 12


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        VLM.from_pretrained(tmp_path)
    VLM(_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["adapter"]["kindd"] = "mlp"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown key"):
        VLM.from_pretrained(tmp_path)
    del cfg["adapter"]["kindd"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["adapter.mlp.linear_1.weight"]
    tensors["llm.extra"] = torch.zeros(1)
    tensors["llm.norm.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        VLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "adapter.mlp.linear_1.weight" in msg and "llm.extra" in msg and "llm.norm.weight (3,)" in msg
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        VLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("section, key, value, needle", [
    ("llm", "hidden_size", "big", "llm.hidden_size: expected an integer, got str 'big'"),
    ("vision", "style", "vit", "vision.style: must be one of ['siglip', 'clip', 'intern_vit']"),
    ("llm", "moe", {"top_k": 1.5}, "llm.moe.top_k: expected an integer"),
])
def test_wrong_typed_config_json_field_names_its_dotted_path(tmp_path, section, key, value, needle):
    VLM(_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[section][key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        VLM.from_pretrained(tmp_path)
    assert "config.json" in str(err.value) and needle in str(err.value)


def _save_hf_parts(tmp_path):
    torch.manual_seed(0)
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4)).eval()
    vision.save_pretrained(tmp_path / "vision")
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    llm.save_pretrained(tmp_path / "llm")
    return vision, llm


def test_from_hf_adds_an_image_token_and_keeps_the_parts(tmp_path):
    vision, llm = _save_hf_parts(tmp_path)
    model = VLM.from_hf(vision=tmp_path / "vision", llm=tmp_path / "llm", adapter="pixel_shuffle")
    assert model.config.image_token_id == 64 and model.config.llm.vocab_size == 65
    assert model.config.vision.feature_layer == -2 and model.config.tokens_per_image == 4
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (model.llm(ids)[..., :64] - llm(ids).logits).abs().max() <= 1e-4
        assert (model.vision(pixels) - vision(pixels).last_hidden_state).abs().max() <= 1e-4
        out = model(torch.tensor([[1, 2] + [64] * 4 + [5]]), pixels)
    assert out.shape == (1, 7, 65)


def test_build_and_export_cli(tmp_path):
    from vlmkit.cli import main

    _save_hf_parts(tmp_path)
    assert main(["build", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"), "--adapter", "mlp",
                 "--out", str(tmp_path / "vlm")]) == 0
    model = VLM.from_pretrained(tmp_path / "vlm")
    assert model.config.adapter.kind == "mlp"
    assert main(["export", "--model", str(tmp_path / "vlm"), "--to", "hf-llava", str(tmp_path / "llava")]) == 0
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    ids = torch.tensor([[1, 2] + [64] * 16 + [5]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (ref(input_ids=ids, pixel_values=pixels).logits - model(ids, pixels)).abs().max() <= 1e-4


def test_export_cli_refusal_is_one_clear_line(tmp_path, capsys):
    from vlmkit.cli import main

    VLM(_config()).save_pretrained(tmp_path / "vlm")
    assert main(["export", "--model", str(tmp_path / "vlm"), "--to", "hf-llava", str(tmp_path / "out")]) == 2
    assert "adapter is 'pixel_shuffle'" in capsys.readouterr().err


def test_image_processor_follows_the_config():
    pytest.importorskip("vlmkit.data.images")
    from PIL import Image

    model = VLM(_config(max_tiles=4, use_thumbnail=True))
    processor = model.image_processor()
    tiles = processor(Image.new("RGB", (64, 32), (255, 0, 0)))  # wide: a grid of tiles plus a thumbnail
    assert tiles.shape[1:] == (3, 16, 16) and 1 < tiles.shape[0] <= 5
    # red, normalised with the encoder's mean / std (0.5, 0.5): (1 - 0.5) / 0.5 and (0 - 0.5) / 0.5
    assert torch.allclose(tiles[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2)


def _wordlevel_tokenizer_dir(path, size):
    """A ChatML word-level HF tokenizer directory of exactly `size` tokens, without an image token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["[UNK]", "hello", "world"] + [f"w{i}" for i in range(size - 6)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def test_from_hf_adds_image_token_to_the_llm_tokenizer_and_round_trips_it(tmp_path):
    pytest.importorskip("vlmkit.data.tokenizer")
    _save_hf_parts(tmp_path)
    _wordlevel_tokenizer_dir(tmp_path / "llm", 64)
    model = VLM.from_hf(vision=tmp_path / "vision", llm=tmp_path / "llm", adapter="mlp")
    assert model.tokenizer.image_token_id == 64 == model.config.image_token_id
    assert model.config.llm.vocab_size == 65 and model.llm.embed_tokens.weight.shape[0] == 65
    model.save_pretrained(tmp_path / "vlm")
    loaded = VLM.from_pretrained(tmp_path / "vlm")
    assert loaded.tokenizer.image_token_id == 64
    assert loaded.tokenizer.encode("hello <image> world") == model.tokenizer.encode("hello <image> world")
    ids = torch.tensor([[1, 2] + [64] * 16 + [5]])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels), model(ids, pixels))
