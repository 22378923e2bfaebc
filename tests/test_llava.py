"""llava-hf import / export parity with transformers' LlavaForConditionalGeneration, and refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.llava import export_hf_llava, load_llava
from vlmkit.models.vlm import VLMModel

transformers = pytest.importorskip("transformers")

IMG = 99
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)
STYLES = {  # vision tower -> (model_type, select strategy, feature layer)
    "siglip": ("siglip_vision_model", "full", -1),
    "clip": ("clip_vision_model", "default", -2),
}


def _save_llava(path, style, **kw):
    model_type, strategy, layer = STYLES[style]
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(vision_config=dict(model_type=model_type, **VISION), text_config=TEXT,
                                   image_token_index=IMG, vision_feature_select_strategy=strategy,
                                   vision_feature_layer=layer, **kw)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model


def _inputs(n_tokens):
    torch.manual_seed(1)
    ids = torch.tensor([[1, 5, 6] + [IMG] * n_tokens + [7, 8, 9, 10], [1, 11] + [IMG] * n_tokens + [12, 13, 14, 15, 16]])
    return ids, torch.randn(2, 3, 32, 32)


def _max_diff(ref, ours, ids, pixels):
    with torch.no_grad():
        return float((ref(input_ids=ids, pixel_values=pixels).logits - ours(ids, pixels)).abs().max())


@pytest.mark.parametrize("style", ["siglip", "clip"])
def test_import_parity(tmp_path, style):
    ref = _save_llava(tmp_path, style)
    ours = load_llava(tmp_path)
    assert ours.config.vision.style == style and ours.config.image_token_id == IMG
    assert ours.config.tokens_per_image == 16
    assert _max_diff(ref, ours, *_inputs(16)) <= 1e-4


def test_import_module_layout_names(tmp_path):
    """The transformers 5.x module layout (model.vision_tower..., lm_head) loads the same."""
    ref = _save_llava(tmp_path, "clip", tie_word_embeddings=False)
    file = tmp_path / "model.safetensors"
    old = load_file(file)
    new = {}
    for k, v in old.items():
        k = (k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
             .replace("vision_tower.", "model.vision_tower.vision_model.")
             .replace("multi_modal_projector.", "model.multi_modal_projector."))
        new[k] = v
    save_file(new, file)
    assert _max_diff(ref, load_llava(tmp_path), *_inputs(16)) <= 1e-4


def exportable_config(style: str, **llm) -> VLMConfig:
    """A tiny VLM of a SigLIP or CLIP tower that exports to llava-hf; `llm` changes its decoder."""
    return VLMConfig(vision=dict(style=style, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, feature_layer=-2,
                                 hidden_act="quick_gelu" if style == "clip" else "gelu_pytorch_tanh"),
                     adapter=dict(kind="mlp"),
                     llm=dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, **llm),
                     image_token_id=IMG)


def with_random_norms(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with non-trivial norms, so that a norm left out of an export would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("style,llm", [("siglip", {}), ("clip", dict(tie_embeddings=True)),
                                       ("siglip", dict(qk_norm=True))], ids=["siglip-llama", "clip-llama-tied",
                                                                            "siglip-qwen3"])
def test_export_loads_in_transformers(tmp_path, style, llm):
    torch.manual_seed(0)
    cfg = exportable_config(style, **llm)
    ours = with_random_norms(VLMModel(cfg).eval())
    export_hf_llava(ours, tmp_path)
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert _max_diff(ref, ours, *_inputs(16)) <= 1e-4
    # and back again: our import of our export is the same model
    again = load_llava(tmp_path)
    ids, pixels = _inputs(16)
    with torch.no_grad():
        assert torch.equal(again(ids, pixels), ours(ids, pixels))
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(cfg.vision.image_mean)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    (dict(vision_feature_layer=[-2, -1]), "concatenates several layers"),
    (dict(vision_feature_select_strategy="full"), "'full' with a clip tower is not supported"),
    (dict(multimodal_projector_bias=False), "multimodal_projector_bias"),
    (dict(architectures=["LlavaNextForConditionalGeneration"]), "is not LlavaForConditionalGeneration"),
])
def test_import_refusals(tmp_path, changes, match):
    _save_llava(tmp_path, "clip")
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_llava(tmp_path)


def test_import_reports_bad_tensors(tmp_path):
    _save_llava(tmp_path, "siglip")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["multi_modal_projector.linear_2.weight"]
    tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError) as err:
        load_llava(tmp_path)
    assert "adapter.mlp.linear_2.weight" in str(err.value) and "up_proj" in str(err.value)


@pytest.mark.parametrize("changes,match", [
    (dict(adapter=dict(kind="pixel_shuffle")), "adapter is 'pixel_shuffle'"),
    (dict(adapter=dict(kind="resampler", num_queries=4)), "adapter is 'resampler'"),
    (dict(adapter=dict(kind="mlp", depth=3)), "exactly 2"),
    (dict(adapter=dict(kind="mlp"), max_tiles=4), "dynamic tiling"),
    (dict(adapter=dict(kind="mlp"), llm=dict(vocab_size=100, hidden_size=48, num_heads=4, moe=dict(num_experts=2,
                                                                                                  top_k=1))),
     "MoE"),
])
def test_export_refusals(tmp_path, changes, match):
    base = dict(vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=4),
                llm=dict(vocab_size=100, hidden_size=48, num_heads=4, num_layers=1), image_token_id=IMG)
    model = VLMModel(VLMConfig(**{**base, **changes}))
    with pytest.raises(ConfigError, match=match):
        export_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_with_tokenizer_loads_in_transformers_processor(tmp_path):
    """AutoProcessor reads the exported directory; its inputs give our logits through transformers."""
    tokenizer_mod = pytest.importorskip("vlmkit.data.tokenizer")
    from PIL import Image

    from vlmkit.api import VLM

    tok = tokenizer_mod.Tokenizer.train(["a red square and a blue circle, hello world"] * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(style="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4),
                    adapter=dict(kind="mlp"),
                    llm=dict(vocab_size=tok.vocab_size, hidden_size=48, num_heads=4, num_layers=2),
                    image_token_id=tok.image_token_id)
    ours = VLM(cfg, tokenizer=tok).eval()
    ours.export_hf_llava(tmp_path)
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello world"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    torch.manual_seed(2)
    image = Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy())
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == tok.image_token_id).sum()) == cfg.tokens_per_image
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        diff = (ref(**inputs).logits - ours(inputs["input_ids"], inputs["pixel_values"])).abs().max()
    assert diff <= 1e-4
    # our import of the export brings the tokenizer back
    again = VLM.from_hf_llava(tmp_path)
    assert again.tokenizer is not None and again.tokenizer.image_token_id == tok.image_token_id
    with torch.no_grad():
        assert torch.equal(again(inputs["input_ids"], inputs["pixel_values"]),
                           ours(inputs["input_ids"], inputs["pixel_values"]))
