"""Load HF AIMv2 vision towers (SAIL-VL2's encoder) into `VisionEncoder` (models/vision.py).

AIMv2 is SigLIP's layout with config switches (`VisionConfig.norm`, `mlp`, `linear_bias`,
`patch_norm`, `positions`), so the one `VisionEncoder` runs it. Accepted directories:
`Aimv2VisionModel`, and the dual encoder `Aimv2Model`, of which only the vision tower is read.
Ignored on purpose: the attention-pooling `head` (it feeds only the pooled output, which a VLM
does not use) and the text tower and projections.

The key map is data (models/hf/common.py); loading is strict (`load_into`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmkit.errors import CheckpointError
from vlmkit.models.config import VisionConfig
from vlmkit.models.hf.common import KeyMap, load_into, read_config, read_state_dict
from vlmkit.models.hf.vision import VISION_MODEL_PREFIX, read_preprocessor

_V = VISION_MODEL_PREFIX  # short, for the table below
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.weights import uninitialised

# `(?:vision_model\.)?` accepts the tower's own names and the dual encoder's.
AIMV2_KEYS: KeyMap = [
    (_V + r"embeddings\.patch_embed\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (_V + r"embeddings\.rms_norm\.weight", r"embeddings.patch_norm.weight"),
    (_V + r"embeddings\.position_embedding\.weight", r"embeddings.position_embedding.weight"),
    (_V + r"encoder\.layers\.(\d+)\.rms_norm([12])\.weight", r"layers.\1.layer_norm\2.weight"),
    (_V + r"encoder\.layers\.(\d+)\.attention\.([qkv]_proj|out_proj)\.(weight|bias)", r"layers.\1.self_attn.\2.\3"),
    (_V + r"encoder\.layers\.(\d+)\.ffn\.(gate_proj|up_proj|down_proj)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (_V + r"rms_norm\.weight", r"post_layernorm.weight"),
]
AIMV2_IGNORE = [_V + r"head\..*", r"text_model\..*", r"visual_projection\..*", r"text_projection\..*",
                r"logit_scale", r".*position_ids"]

AIMV2_MODEL_TYPES = ("aimv2_vision_model", "aimv2")
# The defaults of HF's Aimv2VisionConfig, for keys a config.json leaves out.
AIMV2_HF_DEFAULTS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
                         num_channels=3, image_size=224, patch_size=14, hidden_act="silu", rms_norm_eps=1e-5,
                         qkv_bias=False, mlp_bias=False, is_native=False)


def aimv2_vision_config_from_hf(hf_config: dict, where: str, *, feature_layer: int = -1,
                                preprocessor: dict | None = None) -> VisionConfig:
    """VisionConfig with AIMv2's switches from a HF Aimv2VisionConfig dict (or a dual-encoder
    Aimv2Config holding `vision_config`)."""
    if hf_config.get("model_type") not in AIMV2_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {hf_config.get('model_type')!r} is not one of "
                              f"{list(AIMV2_MODEL_TYPES)}")
    vc = {**AIMV2_HF_DEFAULTS, **(hf_config.get("vision_config") or hf_config)}
    if bool(vc["qkv_bias"]) != bool(vc["mlp_bias"]):
        raise CheckpointError(f"{where}: qkv_bias {vc['qkv_bias']} and mlp_bias {vc['mlp_bias']} differ; "
                              "vlmkit's AIMv2 tower has one bias switch for its attention and MLP linears")
    preprocessor = preprocessor or {}
    try:
        return VisionConfig(
            style="siglip", norm="rms_norm", mlp="gated", patch_norm=True,
            linear_bias=bool(vc["qkv_bias"]),
            positions="sincos" if vc["is_native"] else "learned",
            image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
            num_channels=int(vc["num_channels"]), hidden_size=int(vc["hidden_size"]),
            intermediate_size=int(vc["intermediate_size"]), num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]), hidden_act=str(vc["hidden_act"]),
            layer_norm_eps=float(vc["rms_norm_eps"]), feature_layer=feature_layer,
            image_mean=tuple(preprocessor.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(preprocessor.get("image_std", OPENAI_CLIP_STD)),
        )
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot map the AIMv2 vision config to vlmkit: {e}") from None


def load_aimv2_vision_weights(encoder: VisionEncoder, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF AIMv2 vision tower's tensors (names relative to the tower or the dual encoder)
    into `encoder`, strictly."""
    load_into(encoder, hf_tensors, AIMV2_KEYS, source=source, ignore=AIMV2_IGNORE)


def load_aimv2_vision(path: str | Path, *, feature_layer: int = -1) -> VisionEncoder:
    """An AIMv2 vision tower from a local HF directory, as a VisionEncoder (fp32), in eval mode."""
    path = Path(path)
    cfg = aimv2_vision_config_from_hf(read_config(path), str(path), feature_layer=feature_layer,
                                      preprocessor=read_preprocessor(path))
    encoder = uninitialised(lambda: VisionEncoder(cfg))
    load_aimv2_vision_weights(encoder, read_state_dict(path), source=str(path))
    return encoder.eval()
