"""Load HF SAM vision towers and DeepSeek-VL's hybrid vision (models/sam.py) from HF checkpoints.

- `SamVisionTower` from a `SamVisionModel` / `SamModel` directory (the prompt encoder and mask
  decoder of a whole SAM are ignored) or from any state dict holding a SAM image encoder.
- `HybridVisionTower` from a `DeepseekVLHybridForConditionalGeneration` / `DeepseekVLHybridModel`
  directory: its SigLIP tower (`vision_model.`), its SAM tower (`high_res_vision_model.`), the
  second neck, the downsampler, the global scale and the aligner; the decoder's tensors are left
  to its own loader.

Key maps are data (models/hf/common.py): name templates read both ways (`common.key_map`), so the
export of a hybrid model (models/hf/deepseek_vl.py) writes the names this module reads; the SigLIP
tower's names go through models/hf/vision.py's maps. Loading is strict (`load_into`): every
missing, unexpected or mis-shaped tensor is reported in one CheckpointError before anything is
copied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlmkit.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmkit.errors import CheckpointError
from vlmkit.models.config import HybridVisionConfig, SamVisionConfig
from vlmkit.models.hf.common import KeyMap, key_map, load_into, prefixed, read_config, read_state_dict
from vlmkit.models.hf.vision import (VISION_EXPORT_KEYS, VISION_IGNORE, VISION_KEYS, read_preprocessor,
                                     vision_config_from_hf)
from vlmkit.models.sam import HybridVisionTower, SamVisionTower
from vlmkit.models.weights import uninitialised


NAME_FIELDS = {"i": r"\d+", "n": "[12]", "wb": "weight|bias", "qkv": "qkv|proj", "hw": "[hw]"}

# A neck's names (SAM's own and the hybrid model's second one), relative to the neck: (HF, ours).
NECK_NAMES = [("conv{n}.weight", "conv{n}.weight"), ("layer_norm{n}.{wb}", "norm{n}.{wb}")]

# HF SamVisionEncoder names, SamVisionTower's.
SAM_NAMES = [
    ("patch_embed.projection.{wb}", "patch_embed.{wb}"),
    ("pos_embed", "pos_embed"),
    ("layers.{i}.layer_norm{n}.{wb}", "layers.{i}.norm{n}.{wb}"),
    ("layers.{i}.attn.{qkv}.{wb}", "layers.{i}.attn.{qkv}.{wb}"),
    ("layers.{i}.attn.rel_pos_{hw}", "layers.{i}.attn.rel_pos_{hw}"),
    ("layers.{i}.mlp.lin{n}.{wb}", "layers.{i}.mlp.fc{n}.{wb}"),
    *((f"neck.{hf}", f"neck.{ours}") for hf, ours in NECK_NAMES),
]
SAM_KEYS: KeyMap = key_map(SAM_NAMES, NAME_FIELDS)

# HF DeepseekVLHybridModel names (the `model.` prefix of the ForConditionalGeneration removed) of
# everything but the SigLIP tower, HybridVisionTower's.
HYBRID_NAMES = [
    *((f"high_res_vision_model.vision_encoder.{hf}", f"high_res.{ours}") for hf, ours in SAM_NAMES),
    *((f"high_res_vision_neck.{hf}", f"combiner.global_neck.{ours}") for hf, ours in NECK_NAMES),
    ("high_res_vision_proj.conv{n}.weight", "combiner.downsample.conv{n}.weight"),
    ("high_res_vision_alpha", "combiner.global_scale"),
    ("aligner.vision_proj.{wb}", "combiner.low_res_proj.{wb}"),
    ("aligner.high_res_vision_proj.{wb}", "combiner.high_res_proj.{wb}"),
    ("aligner.proj.{wb}", "combiner.out_proj.{wb}"),
]

SAM_ENCODER_PREFIXES = ("vision_encoder.", "")
"""Where a checkpoint keeps the SAM image encoder: SamVisionModel / SamModel, then the encoder's own."""
SAM_IGNORE = [r"prompt_encoder\..*", r"mask_decoder\..*", r"shared_image_embedding\..*"]
"""A whole SAM's tensors that are not its image encoder."""

HYBRID_KEYS: KeyMap = [*prefixed(VISION_KEYS, "vision_model.", "low_res."), *key_map(HYBRID_NAMES, NAME_FIELDS)]
"""HF DeepseekVLHybridModel names (without the `model.` prefix) -> HybridVisionTower's."""
HYBRID_EXPORT_KEYS: KeyMap = [*prefixed(VISION_EXPORT_KEYS, "low_res.", "vision_model."),
                              *key_map(HYBRID_NAMES, NAME_FIELDS, reverse=True)]
"""HYBRID_KEYS read backwards: HybridVisionTower's names -> transformers'."""
HYBRID_IGNORE = [r"language_model\..*", r"lm_head\..*",
                 *(re.escape("vision_model.") + p for p in VISION_IGNORE["siglip"])]
HYBRID_MODEL_PREFIX = "model."
"""Where DeepseekVLHybridForConditionalGeneration keeps the model (not the lm_head)."""

# The defaults of HF's SamVisionConfig, for keys a config.json leaves out.
SAM_HF_DEFAULTS = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                       qkv_bias=True, mlp_ratio=4.0, use_abs_pos=True, use_rel_pos=True, window_size=14,
                       global_attn_indexes=(2, 5, 8, 11), mlp_dim=None)
SAM_MODEL_TYPES = ("sam_vision_model", "sam")
HYBRID_MODEL_TYPE = "deepseek_vl_hybrid"


def sam_vision_config_from_hf(hf_config: dict, where: str, *, image_mean=OPENAI_CLIP_MEAN,
                              image_std=OPENAI_CLIP_STD) -> SamVisionConfig:
    """SamVisionConfig from a HF SamVisionConfig dict (or a whole SamConfig holding `vision_config`)."""
    vc = hf_config.get("vision_config") or hf_config
    base = {**SAM_HF_DEFAULTS, **vc}
    if base["mlp_dim"] is None:
        base["mlp_dim"] = int(base["hidden_size"] * base["mlp_ratio"])
    try:
        return SamVisionConfig(
            image_size=int(base["image_size"]), patch_size=int(base["patch_size"]),
            num_channels=int(base["num_channels"]), hidden_size=int(base["hidden_size"]),
            intermediate_size=int(base["mlp_dim"]), num_layers=int(base["num_hidden_layers"]),
            num_heads=int(base["num_attention_heads"]), hidden_act=str(base["hidden_act"]),
            layer_norm_eps=float(base["layer_norm_eps"]), qkv_bias=bool(base["qkv_bias"]),
            use_abs_pos=bool(base["use_abs_pos"]), use_rel_pos=bool(base["use_rel_pos"]),
            window_size=int(base["window_size"]),
            global_attn_indexes=tuple(int(i) for i in base["global_attn_indexes"]),
            output_channels=int(base["output_channels"]),
            image_mean=tuple(image_mean), image_std=tuple(image_std),
        )
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot map the SAM vision config to vlmkit: {e}") from None


def sam_vision_config_to_hf(cfg: SamVisionConfig) -> dict:
    """transformers' SamVisionConfig dict of `cfg` (what `sam_vision_config_from_hf` reads back)."""
    return {"model_type": SAM_MODEL_TYPES[0], "hidden_size": cfg.hidden_size, "output_channels": cfg.output_channels,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_channels": cfg.num_channels, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps, "qkv_bias": cfg.qkv_bias,
            "mlp_dim": cfg.intermediate_size, "use_abs_pos": cfg.use_abs_pos, "use_rel_pos": cfg.use_rel_pos,
            "window_size": cfg.window_size, "global_attn_indexes": list(cfg.global_attn_indexes)}


def hybrid_vision_config_from_hf(hf_config: dict, where: str, preprocessor: dict | None = None) -> HybridVisionConfig:
    """HybridVisionConfig from a HF DeepseekVLHybridConfig dict (and its preprocessor_config.json,
    whose `image_mean` / `high_res_image_mean` name each tower's normalisation)."""
    if hf_config.get("model_type") != HYBRID_MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type {hf_config.get('model_type')!r} is not {HYBRID_MODEL_TYPE!r}")
    for key in ("vision_config", "high_res_vision_config", "text_config"):
        if not isinstance(hf_config.get(key), dict):
            raise CheckpointError(f"{where}: the config has no {key!r}")
    preprocessor = preprocessor or {}
    low_res = vision_config_from_hf(hf_config["vision_config"], where, preprocessor=preprocessor)
    high_res = sam_vision_config_from_hf(hf_config["high_res_vision_config"], where,
                                         image_mean=preprocessor.get("high_res_image_mean", OPENAI_CLIP_MEAN),
                                         image_std=preprocessor.get("high_res_image_std", OPENAI_CLIP_STD))
    try:
        return HybridVisionConfig(low_res=low_res, high_res=high_res,
                                  out_hidden_size=int(hf_config["text_config"]["hidden_size"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot map the hybrid vision config to vlmkit: {e}") from None


def sam_encoder_tensors(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SAM image encoder's tensors by their names inside the encoder (a whole SAM's other
    tensors kept under their own names, for the ignore list)."""
    prefix = SAM_ENCODER_PREFIXES[0]
    if any(name.startswith(prefix) for name in hf_tensors):
        return {name.removeprefix(prefix): t for name, t in hf_tensors.items()}
    return dict(hf_tensors)


def load_sam_vision_weights(tower: SamVisionTower, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF SAM image encoder's tensors (a SamVisionModel's, a SamModel's or the encoder's own)
    into `tower`, strictly."""
    load_into(tower, sam_encoder_tensors(hf_tensors), SAM_KEYS, source=source, ignore=SAM_IGNORE)


def load_hybrid_vision_weights(tower: HybridVisionTower, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF DeepSeek-VL hybrid checkpoint's vision tensors (the ForConditionalGeneration's,
    under `model.`, or the bare model's) into `tower`, strictly; the decoder's are ignored."""
    if any(name.startswith(HYBRID_MODEL_PREFIX) for name in hf_tensors):
        hf_tensors = {name.removeprefix(HYBRID_MODEL_PREFIX): t for name, t in hf_tensors.items()}
    load_into(tower, hf_tensors, HYBRID_KEYS, source=source, ignore=HYBRID_IGNORE)


def load_sam_vision(path: str | Path, dtype: torch.dtype = torch.float32) -> SamVisionTower:
    """The image encoder of a local HF SamVisionModel / SamModel directory, in eval mode."""
    path = Path(path)
    hf_config = read_config(path)
    if hf_config.get("model_type") not in SAM_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {hf_config.get('model_type')!r} is not one of "
                              f"{list(SAM_MODEL_TYPES)}")
    cfg = sam_vision_config_from_hf(hf_config, str(path))
    tower = uninitialised(lambda: SamVisionTower(cfg)).to(dtype)
    load_sam_vision_weights(tower, read_state_dict(path), source=str(path))
    return tower.eval()


def load_hybrid_vision(path: str | Path, dtype: torch.dtype = torch.float32) -> HybridVisionTower:
    """The hybrid vision (both towers and the combiner) of a local HF DeepSeek-VL hybrid directory,
    in eval mode."""
    path = Path(path)
    cfg = hybrid_vision_config_from_hf(read_config(path), str(path), read_preprocessor(path))
    tower = uninitialised(lambda: HybridVisionTower(cfg)).to(dtype)
    load_hybrid_vision_weights(tower, read_state_dict(path), source=str(path))
    return tower.eval()
