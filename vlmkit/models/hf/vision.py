"""Load HF SigLIP / CLIP vision towers into `VisionEncoder` (models/vision.py).

Accepted directories (config.json + safetensors): SiglipVisionModel, CLIPVisionModel,
CLIPVisionModelWithProjection, and the full dual-encoder SiglipModel / CLIPModel, of which only the
vision tower is read (the text tower, projections and logit scale are ignored). Tensor names with
or without the `vision_model.` prefix (older and newer transformers) both load.

The key map is data (models/hf/common.py): our parameter names follow HF's, except CLIP's
`pre_layrnorm` (spelled correctly here). Ignored on purpose: SigLIP's attention-pooling `head`
and CLIP's `post_layernorm` (both feed only the pooled output, which a VLM does not use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmkit.errors import CheckpointError
from vlmkit.models.config import VisionConfig
from vlmkit.models.hf.common import KeyMap, architecture, load_into, read_config, read_state_dict
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.weights import uninitialised

# HF vision-tower name -> ours. `(?:vision_model\.)?` accepts both prefix conventions.
VISION_MODEL_PREFIX = r"(?:vision_model\.)?"
_V = VISION_MODEL_PREFIX  # short, for the tables below
VISION_KEYS: KeyMap = [
    (_V + r"embeddings\.(patch_embedding\.(?:weight|bias)|class_embedding|position_embedding\.weight)",
     r"embeddings.\1"),
    (_V + r"pre_layrnorm\.(weight|bias)", r"pre_layernorm.\1"),
    (_V + r"encoder\.layers\.(\d+)\.(layer_norm[12]|self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
          r"\.(weight|bias)", r"layers.\1.\2.\3"),
    (_V + r"post_layernorm\.(weight|bias)", r"post_layernorm.\1"),
]

# Tensors of these checkpoints that a vision encoder does not use.
_COMMON_IGNORE = [r"text_model\..*", r"logit_scale", r"logit_bias", r"visual_projection\..*",
                  r"text_projection\..*", r".*position_ids"]
VISION_IGNORE = {
    "siglip": _COMMON_IGNORE + [_V + r"head\..*"],
    "clip": _COMMON_IGNORE + [_V + r"post_layernorm\..*"],
}

# Ours -> HF vision-tower names (export to llava-hf, which nests the tower without a prefix).
VISION_EXPORT_KEYS: KeyMap = [
    (r"embeddings\.(.*)", r"embeddings.\1"),
    (r"pre_layernorm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"layers\.(\d+)\.(.*)", r"encoder.layers.\1.\2"),
    (r"post_layernorm\.(weight|bias)", r"post_layernorm.\1"),
]

# architectures / model_type -> vision style
_STYLES = {
    "SiglipVisionModel": "siglip", "SiglipModel": "siglip", "siglip_vision_model": "siglip", "siglip": "siglip",
    "CLIPVisionModel": "clip", "CLIPVisionModelWithProjection": "clip", "CLIPModel": "clip",
    "clip_vision_model": "clip", "clip": "clip",
}

# Normalisation constants of the reference image processors (SiglipImageProcessor, CLIPImageProcessor).
_DEFAULT_MEAN_STD = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def vision_style(hf_config: dict, where: str) -> str:
    """'siglip' or 'clip' for a vision (or dual-encoder) config, else CheckpointError."""
    for name in [*(hf_config.get("architectures") or []), hf_config.get("model_type")]:
        if name in _STYLES:
            return _STYLES[name]
    raise CheckpointError(f"{where}: unsupported vision architecture "
                          f"{hf_config.get('architectures') or hf_config.get('model_type')!r}; "
                          f"vlmkit loads {sorted(k for k in _STYLES if k[0].isupper())}")


def vision_config_from_hf(hf_config: dict, where: str, *, feature_layer: int = -1,
                          preprocessor: dict | None = None) -> VisionConfig:
    """VisionConfig from a HF vision config (or a dual-encoder config holding `vision_config`)."""
    style = vision_style(hf_config, where)
    vc = hf_config.get("vision_config") or hf_config
    mean, std = _DEFAULT_MEAN_STD[style]
    if preprocessor:
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    try:
        return VisionConfig(
            style=style,
            image_size=int(vc.get("image_size", 224)),
            patch_size=int(vc.get("patch_size", 16 if style == "siglip" else 32)),
            num_channels=int(vc.get("num_channels", 3)),
            hidden_size=int(vc.get("hidden_size", 768)),
            intermediate_size=int(vc.get("intermediate_size", 3072)),
            num_layers=int(vc.get("num_hidden_layers", 12)),
            num_heads=int(vc.get("num_attention_heads", 12)),
            hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh" if style == "siglip" else "quick_gelu"),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6 if style == "siglip" else 1e-5)),
            feature_layer=feature_layer,
            image_mean=mean,
            image_std=std,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot map the vision config to vlmkit: {e}") from None


def load_vision_weights(encoder: VisionEncoder, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF vision tower's tensors (names relative to the tower) into `encoder`, strictly."""
    load_into(encoder, hf_tensors, VISION_KEYS, source=source, ignore=VISION_IGNORE[encoder.config.style])


def read_preprocessor(path: str | Path) -> dict | None:
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def vision_tower_hf_config(v: VisionConfig, model_type: str) -> dict[str, Any]:
    """The fields transformers' ViT tower configs share (SigLIP's, CLIP's, Idefics3's), for the tower
    `v`, as a `model_type` config."""
    return {"model_type": model_type, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps}


def siglip_hf_config(v: VisionConfig) -> dict[str, Any]:
    """transformers' SiglipVisionConfig of the tower, without the pooling head it does not use."""
    return {**vision_tower_hf_config(v, "siglip_vision_model"), "vision_use_head": False}


def load_vision(path: str | Path, *, feature_layer: int = -1) -> VisionEncoder:
    """A SigLIP / CLIP vision tower from a local HF directory, as a VisionEncoder (fp32)."""
    path = Path(path)
    hf_config = read_config(path)
    architecture(hf_config, path)
    cfg = vision_config_from_hf(hf_config, str(path), feature_layer=feature_layer,
                                preprocessor=read_preprocessor(path))
    encoder = uninitialised(lambda: VisionEncoder(cfg))
    load_vision_weights(encoder, read_state_dict(path), source=str(path))
    return encoder
