"""Load HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers into `NativeVisionTower` (models/native_vision.py).

The tower's tensors are read from a whole VLM checkpoint (`model.visual.*` as transformers 5
writes it, or `visual.*` as the released Qwen checkpoints store it; the decoder's tensors are left
to its own loader) or from a tower's own state dict (names without a prefix). Loading is strict
(models/hf/common.py's `load_into`): every missing, unexpected or mis-shaped tower tensor is
reported in one CheckpointError before anything is copied.

Key maps are data. vlmkit's names are the same for every style (`merger.norm`, `merger.fc1`,
`merger.fc2`, `blocks.{i}.mlp.fc1` ...); each family's HF names map onto them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.errors import CheckpointError
from vlmkit.models.config import NativeVisionConfig
from vlmkit.models.hf.common import KeyMap, key_map, load_into, read_config, read_state_dict
from vlmkit.models.native_vision import NativeVisionTower
from vlmkit.models.weights import uninitialised

TOWER_PREFIXES = ("model.visual.", "visual.")
"""Where a whole checkpoint keeps the vision tower: transformers 5's layout, then the released files'."""

# HF tower names (prefix removed) <-> ours, per style: one table of name templates, read both ways
# (models/hf/common.py's `key_map`): loading here, export in models/hf/qwen_vl.py.
_BLOCK_NAMES = [
    ("patch_embed.proj.{wb}", "patch_embed.proj.{wb}"),
    ("blocks.{i}.{part}.{wb}", "blocks.{i}.{part}.{wb}"),
]
_MERGER_MLP_NAMES = [("merger.mlp.0.{wb}", "merger.fc1.{wb}"), ("merger.mlp.2.{wb}", "merger.fc2.{wb}")]
NATIVE_VISION_NAMES: dict[str, list[tuple[str, str]]] = {
    "qwen2_vl": _BLOCK_NAMES + _MERGER_MLP_NAMES + [
        ("blocks.{i}.mlp.{fc}.{wb}", "blocks.{i}.mlp.{fc}.{wb}"),
        ("merger.ln_q.{wb}", "merger.norm.{wb}"),
    ],
    "qwen2_5_vl": _BLOCK_NAMES + _MERGER_MLP_NAMES + [
        ("blocks.{i}.mlp.{ffn}_proj.{wb}", "blocks.{i}.mlp.{ffn}_proj.{wb}"),
        ("merger.ln_q.weight", "merger.norm.weight"),
    ],
    "qwen3_vl": _BLOCK_NAMES + [
        ("pos_embed.weight", "pos_embed.weight"),
        ("blocks.{i}.mlp.linear_{fc}.{wb}", "blocks.{i}.mlp.{fc}.{wb}"),
        ("merger.norm.{wb}", "merger.norm.{wb}"),
        ("merger.linear_{fc}.{wb}", "merger.{fc}.{wb}"),
        ("deepstack_merger_list.{i}.norm.{wb}", "deepstack_mergers.{i}.norm.{wb}"),
        ("deepstack_merger_list.{i}.linear_{fc}.{wb}", "deepstack_mergers.{i}.{fc}.{wb}"),
    ],
}
NATIVE_VISION_FIELDS = {"i": r"\d+", "wb": "weight|bias", "part": r"norm[12]|attn\.qkv|attn\.proj",
                        "fc": "fc[12]", "ffn": "gate|up|down"}
NATIVE_VISION_KEYS: dict[str, KeyMap] = {style: key_map(names, NATIVE_VISION_FIELDS)
                                         for style, names in NATIVE_VISION_NAMES.items()}
"""HF tower name (prefix removed) -> ours, per style."""
NATIVE_VISION_EXPORT_KEYS: dict[str, KeyMap] = {style: key_map(names, NATIVE_VISION_FIELDS, reverse=True)
                                                for style, names in NATIVE_VISION_NAMES.items()}
"""Ours -> HF tower names (inside `visual.`), per style: the same table read backwards."""

# model_type of a whole VLM config or of its vision_config -> style. Qwen3-VL-MoE's tower is Qwen3-VL's.
MODEL_TYPE_STYLES = {
    "qwen2_vl": "qwen2_vl", "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_vision": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl", "qwen3_vl_vision": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl", "qwen3_vl_moe_vision": "qwen3_vl",
}

# The defaults of HF's vision config classes, for keys a config.json leaves out (the released
# Qwen2-VL configs name no activation, for one).
_COMMON_DEFAULTS = dict(in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
HF_DEFAULTS = {
    "qwen2_vl": dict(_COMMON_DEFAULTS, hidden_act="quick_gelu", mlp_ratio=4),
    "qwen2_5_vl": dict(_COMMON_DEFAULTS, hidden_act="silu", window_size=112, fullatt_block_indexes=(7, 15, 23, 31)),
    "qwen3_vl": dict(_COMMON_DEFAULTS, hidden_act="gelu_pytorch_tanh", patch_size=16,
                     deepstack_visual_indexes=(8, 16, 24)),
}
DEFAULT_ROPE_THETA = 10000.0


def native_vision_style(hf_config: dict, where: str) -> str:
    """The style of a Qwen VLM config (or of its `vision_config`), from `model_type`."""
    for config in (hf_config, hf_config.get("vision_config") or {}):
        style = MODEL_TYPE_STYLES.get(config.get("model_type"))
        if style is not None:
            return style
    raise CheckpointError(f"{where}: model_type {hf_config.get('model_type')!r} has no native-resolution "
                          f"vision tower vlmkit loads; known: {sorted(MODEL_TYPE_STYLES)}")


def native_vision_config_from_hf(hf_config: dict, where: str) -> NativeVisionConfig:
    """NativeVisionConfig from a HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) config dict (the whole
    VLM's, holding `vision_config`, or the vision config itself with its `model_type`)."""
    style = native_vision_style(hf_config, where)
    vc = hf_config.get("vision_config") or hf_config
    base = {**HF_DEFAULTS[style], **vc}
    if "in_channels" not in vc and "in_chans" in vc:  # the released checkpoints' spelling
        base["in_channels"] = vc["in_chans"]
    try:
        fields = dict(
            style=style,
            depth=int(base["depth"]),
            num_heads=int(base["num_heads"]),
            in_channels=int(base["in_channels"]),
            patch_size=int(base["patch_size"]),
            temporal_patch_size=int(base["temporal_patch_size"]),
            spatial_merge_size=int(base["spatial_merge_size"]),
            hidden_act=str(base["hidden_act"]),
            rope_theta=float((base.get("rope_parameters") or {}).get("rope_theta", DEFAULT_ROPE_THETA)),
        )
        fields.update(_family_fields(style, base))
        return NativeVisionConfig(**fields)
    except KeyError as e:
        raise CheckpointError(f"{where}: the vision config has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot map the vision config to vlmkit: {e}") from None


def _family_fields(style: str, vc: dict) -> dict:
    """The fields whose HF names differ between the families."""
    if style == "qwen2_vl":  # tower width `embed_dim`, LLM width `hidden_size`, MLP width by ratio
        embed_dim = int(vc["embed_dim"])
        return dict(hidden_size=embed_dim, out_hidden_size=int(vc["hidden_size"]),
                    intermediate_size=int(embed_dim * vc["mlp_ratio"]))
    fields = dict(hidden_size=int(vc["hidden_size"]), out_hidden_size=int(vc["out_hidden_size"]),
                  intermediate_size=int(vc["intermediate_size"]))
    if style == "qwen2_5_vl":
        fields.update(window_size=int(vc["window_size"]),
                      fullatt_block_indexes=tuple(int(i) for i in vc["fullatt_block_indexes"]))
    else:
        fields.update(num_position_embeddings=int(vc["num_position_embeddings"]),
                      deepstack_visual_indexes=tuple(int(i) for i in vc["deepstack_visual_indexes"]))
    return fields


def tower_tensors(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, by their names inside the tower.

    A whole checkpoint (any name under `model.visual.` or `visual.`) gives the tensors under that
    prefix, the rest (decoder, lm_head) left out; a tower's own state dict is returned as it is."""
    for prefix in TOWER_PREFIXES:
        if any(name.startswith(prefix) for name in hf_tensors):
            return {name[len(prefix):]: t for name, t in hf_tensors.items() if name.startswith(prefix)}
    return dict(hf_tensors)


def load_native_vision_weights(tower: NativeVisionTower, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a HF Qwen-VL vision tower's tensors (a whole checkpoint's or the tower's own) into
    `tower`, strictly."""
    load_into(tower, tower_tensors(hf_tensors), NATIVE_VISION_KEYS[tower.config.style], source=source)


def load_native_vision(path: str | Path, dtype: torch.dtype = torch.float32) -> NativeVisionTower:
    """The vision tower of a local HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) directory, in eval mode."""
    path = Path(path)
    cfg = native_vision_config_from_hf(read_config(path), str(path))
    tower = uninitialised(lambda: NativeVisionTower(cfg)).to(dtype)
    load_native_vision_weights(tower, read_state_dict(path), source=str(path))
    return tower.eval()
