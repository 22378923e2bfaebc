"""Import and export llava-hf checkpoints (transformers' `LlavaForConditionalGeneration`).

A llava-hf directory is a SigLIP or CLIP vision tower, a two-layer MLP projector
(`multi_modal_projector.linear_1 / linear_2`) and a Llama-family decoder. Its tensor names come in
two layouts: the one older releases and transformers 5.x `save_pretrained` write
(`vision_tower.`, `multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`) and
the module layout of transformers 5.x (`model.vision_tower.`, `model.multi_modal_projector.`,
`model.language_model.`, `lm_head.`); vision towers may add `vision_model.`. Names are first
normalised to the older layout, then mapped with the vision and LLM key maps (models/hf/vision.py,
models/hf/llm.py) under their prefixes: one strict load of the whole model that reports every
missing, unexpected or mis-shaped tensor together.

What vlmkit computes differently from a llava-hf config is refused with the reason: several
feature layers, a projector without bias, and a feature-select strategy other than LLaVA's usual
pairing (CLIP drops its class token, "default"; SigLIP has none and keeps every patch, "full").
Export writes the older layout (what transformers itself writes) and refuses models llava-hf
cannot express: other adapters, tiling, MoE decoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import IMAGE_TOKEN, RESCALE_FACTOR
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import AdapterConfig, VLMConfig
from vlmkit.models.hf.common import (BICUBIC, PROCESSOR_FILE, KeyMap, architecture, load_into, prefixed, read_config,
                                     read_state_dict, rename, renamed, write_chat_template, write_json, write_weights)
from vlmkit.models.hf.llm import (HF_TO_OURS, decoder_export_reasons, decoder_ignore, llm_config_from_hf,
                                  llm_config_to_hf, llm_state_dict_to_hf)
from vlmkit.models.hf.vision import (VISION_EXPORT_KEYS, VISION_IGNORE, VISION_KEYS, read_preprocessor,
                                     siglip_hf_config, vision_config_from_hf, vision_tower_hf_config)
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors

# Step 1: either layout -> the older one.
LAYOUTS: KeyMap = [
    (r"model\.vision_tower\.(.*)", r"vision_tower.\1"),
    (r"model\.multi_modal_projector\.(.*)", r"multi_modal_projector.\1"),
    (r"model\.language_model\.(.*)", r"language_model.model.\1"),
    (r"lm_head\.(.*)", r"language_model.lm_head.\1"),
    (r"(.*)", r"\1"),
]

PROJECTOR_KEYS: KeyMap = [(r"linear_([12])\.(weight|bias)", r"mlp.linear_\1.\2")]
PROJECTOR_EXPORT_KEYS: KeyMap = [(r"mlp\.linear_([12])\.(weight|bias)", r"linear_\1.\2")]


def llava_key_map(cfg: VLMConfig) -> tuple[KeyMap, list[str]]:
    """(key map, ignore patterns) from normalised llava-hf names to VLMModel names."""
    key_map = (prefixed(VISION_KEYS, "vision_tower.", "vision.")
               + prefixed(PROJECTOR_KEYS, "multi_modal_projector.", "adapter.")
               + prefixed(HF_TO_OURS, "language_model.", "llm."))
    ignore = ([r"vision_tower\." + p for p in VISION_IGNORE[cfg.vision.style]]
              + decoder_ignore("language_model.", cfg.llm))
    return key_map, ignore


def llava_config(hf: dict[str, Any], path: str | Path) -> VLMConfig:
    """VLMConfig of a llava-hf config.json, or CheckpointError naming what vlmkit cannot match."""
    where = f"{path}/config.json"
    vision_hf = dict(hf.get("vision_config") or {})
    vision_hf.setdefault("model_type", "clip_vision_model")  # LlavaConfig's default tower
    text_hf = dict(hf.get("text_config") or {})
    text_hf.setdefault("model_type", "llama")
    if "tie_word_embeddings" in hf:  # LlavaForConditionalGeneration ties by its own flag
        text_hf["tie_word_embeddings"] = hf["tie_word_embeddings"]
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer} concatenates several layers; vlmkit "
                              "reads one feature layer")
    vision = vision_config_from_hf(vision_hf, where, feature_layer=layer, preprocessor=read_preprocessor(path))
    strategy = hf.get("vision_feature_select_strategy", "default")
    expected = "default" if vision.style == "clip" else "full"
    if strategy != expected:
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy {strategy!r} with a {vision.style} tower is not supported; "
            f"vlmkit drops CLIP's class token ('default') and keeps every SigLIP patch ('full')")
    if hf.get("multimodal_projector_bias", True) is False:
        raise CheckpointError(f"{where}: multimodal_projector_bias=false is not supported (vlmkit's MLP has biases)")
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token is None:
        raise CheckpointError(f"{where}: no image_token_index")
    llm = llm_config_from_hf(text_hf, where=f"{where} (text_config)")
    try:
        return VLMConfig(vision=vision, llm=llm, image_token_id=int(image_token),
                         adapter=AdapterConfig(kind="mlp", depth=2, hidden_act=hf.get("projector_hidden_act", "gelu")))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_llava(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A llava-hf directory -> `model_cls` (VLMModel or a subclass) in fp32, eval mode."""
    path = Path(path)
    hf = read_config(path)
    arch = architecture(hf, path)
    if arch not in ("LlavaForConditionalGeneration", "llava"):
        raise CheckpointError(f"{path}: architecture {arch!r} is not LlavaForConditionalGeneration")
    cfg = llava_config(hf, path)
    model = model_cls.empty(cfg)
    key_map, ignore = llava_key_map(cfg)
    load_into(model, renamed(read_state_dict(path), LAYOUTS), key_map, source=str(path), ignore=ignore)
    return model.eval()


# --- export ------------------------------------------------------------------------------------------

def check_llava_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why llava-hf cannot express this model (nothing when it can)."""
    reasons = []
    if cfg.vision.style == "intern_vit":
        reasons.append("the vision tower is InternViT; llava-hf's towers are SigLIP or CLIP")
    if cfg.adapter.kind != "mlp":
        reasons.append(f"the adapter is {cfg.adapter.kind!r}; llava-hf's projector is an MLP applied to each "
                       "patch (adapter.kind 'mlp')")
    elif cfg.adapter.depth != 2:
        reasons.append(f"the MLP adapter has {cfg.adapter.depth} layers; llava-hf's projector has exactly 2")
    if cfg.max_tiles > 1:
        reasons.append(f"max_tiles is {cfg.max_tiles}; LlavaForConditionalGeneration sees one image at the "
                       "encoder's size, without dynamic tiling")
    reasons += decoder_export_reasons(cfg.llm)
    if reasons:
        raise ConfigError("cannot export to hf-llava: " + "; ".join(reasons))


def llava_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    v = cfg.vision
    text = llm_config_to_hf(cfg.llm)
    text.pop("architectures")
    vision = vision_tower_hf_config(v, "clip_vision_model") if v.style == "clip" else siglip_hf_config(v)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.tokens_per_image,
        "projector_hidden_act": cfg.adapter.hidden_act,
        "multimodal_projector_bias": True,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default" if v.style == "clip" else "full",
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


def llava_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under llava-hf names (the layout transformers writes)."""
    out: dict[str, torch.Tensor] = {}
    for part, key_map, prefix in ((model.vision, VISION_EXPORT_KEYS, "vision_tower."),
                                  (model.adapter, PROJECTOR_EXPORT_KEYS, "multi_modal_projector.")):
        state = part.state_dict()
        mapping, unmatched = rename(state, key_map)
        if unmatched:
            raise ConfigError(f"no llava-hf name for {unmatched}")
        out.update({prefix + hf: state[ours] for ours, hf in mapping.items()})
    out.update({"language_model." + name: t for name, t in llm_state_dict_to_hf(model.llm).items()})
    if model.config.vision.style == "clip":
        # CLIP's post-layernorm feeds only the pooled output, unused by LLaVA; an identity keeps
        # transformers from reporting it as newly initialised.
        D = model.config.vision.hidden_size
        out["vision_tower.post_layernorm.weight"] = torch.ones(D)
        out["vision_tower.post_layernorm.bias"] = torch.zeros(D)
    return out


def _preprocessor_config(cfg: VLMConfig) -> dict[str, Any]:
    v = cfg.vision
    common = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": RESCALE_FACTOR,
              "do_normalize": True, "image_mean": list(v.image_mean), "image_std": list(v.image_std),
              "do_convert_rgb": True}
    if v.style == "clip":
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": v.image_size},
                "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size}}
    return {"image_processor_type": "SiglipImageProcessor", **common,
            "size": {"height": v.image_size, "width": v.image_size}}


def export_hf_llava(model: VLMModel, out_dir: str | Path) -> Path:
    """Write `model` as a directory LlavaForConditionalGeneration loads: config.json,
    model.safetensors, preprocessor_config.json; and when the model has a tokenizer, its files plus
    processor_config.json and chat_template.jinja, so that AutoProcessor loads the directory too."""
    cfg = model.config
    check_llava_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = llava_hf_config(cfg)
    write_weights(out, for_safetensors(llava_state_dict(model)), hf_config)
    write_json(out / "preprocessor_config.json", _preprocessor_config(cfg))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(out)
        image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        processor = {"processor_class": "LlavaProcessor", "image_token": image_token,
                     "patch_size": cfg.vision.patch_size,
                     "vision_feature_select_strategy": hf_config["vision_feature_select_strategy"],
                     "num_additional_image_tokens": 1 if cfg.vision.style == "clip" else 0}
        write_json(out / PROCESSOR_FILE, processor)
        write_chat_template(out, getattr(tokenizer, "chat_template", None))
    return out
