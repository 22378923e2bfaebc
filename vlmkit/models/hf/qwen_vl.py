"""Load transformers checkpoints of the native-resolution VLMs: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

A directory of `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or
`Qwen3VLForConditionalGeneration` becomes one `VLMModel` with a native tower
(`VLMConfig.native_vision`): the tower's config is read by models/hf/native_vision.py, the
decoder's by models/hf/llm.py (`text_config`, or the top level of the flat configs transformers 4
wrote for Qwen2-VL and Qwen2.5-VL), the token ids and video spacing by `qwen_vl_config`.

Tensor names come in two layouts: transformers 5's modules (`model.visual.`,
`model.language_model.`, `lm_head.`) and the released files' (`visual.`, `model.`, `lm_head.`).
Both are first normalised to `visual.` + the tower's names and `language_model.` + a decoder
checkpoint's names, then mapped with the tower's and the decoder's key maps: one strict load of the
whole model that reports every missing, unexpected or mis-shaped tensor together.

Qwen3-VL-MoE is refused: its decoder's routing (softmax top-k, renormalised, no shared experts;
dense layers only where `mlp_only_layers` is a leading range) is what models/moe.py computes, but
the checkpoint stores each layer's experts fused in 3-D tensors (`experts.gate_up_proj`
(E, 2I, D) as transformers 5 writes it, `experts.down_proj` (E, D, I)), which a renaming load
cannot split into vlmkit's per-expert projections, and the router has no `score_bias` to load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.common import (KeyMap, architecture, load_into, prefixed, read_config, read_state_dict,
                                     rename)
from vlmkit.models.hf.llm import HF_TO_OURS, IGNORED, llm_config_from_hf
from vlmkit.models.hf.native_vision import NATIVE_VISION_KEYS, TOWER_PREFIXES, native_vision_config_from_hf
from vlmkit.models.vlm import VLMModel

@dataclass(frozen=True)
class VideoSpacing:
    """How a family lays video frames out on multimodal RoPE's axes (models/mrope.py's MRopeLayout)."""

    seconds_spaced: bool
    """Frame pairs tokens_per_second * seconds apart on the temporal axis (Qwen2.5-VL), else 1 apart."""
    frames_apart: bool
    """Each frame pair a block of its own in the text, its timestamp in between (Qwen3-VL)."""


FAMILIES = {
    "qwen2_vl": VideoSpacing(seconds_spaced=False, frames_apart=False),
    "qwen2_5_vl": VideoSpacing(seconds_spaced=True, frames_apart=False),
    "qwen3_vl": VideoSpacing(seconds_spaced=False, frames_apart=True),
}
# architectures / model_type -> family
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "qwen2_vl": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl", "qwen3_vl": "qwen3_vl",
}
MOE_REFUSAL = ("its decoder's experts are stored fused in 3-D tensors (experts.gate_up_proj, experts.down_proj, "
               "oriented differently by different releases) that vlmkit's loader does not split into "
               "per-expert projections")
REFUSED = {"Qwen3VLMoeForConditionalGeneration": MOE_REFUSAL, "qwen3_vl_moe": MOE_REFUSAL}

DEFAULT_TOKENS_PER_SECOND = 4
"""Qwen2.5-VL's vision config default, for configs that leave it out."""

# Step 1: either layout -> `visual.` (tower) and `language_model.` (a decoder checkpoint's names).
LAYOUTS: KeyMap = (
    [(re.escape(prefix) + r"(.*)", r"visual.\1") for prefix in TOWER_PREFIXES]
    + [(r"model\.language_model\.(.*)", r"language_model.model.\1"),
       (r"model\.(.*)", r"language_model.model.\1"),
       (r"lm_head\.(.*)", r"language_model.lm_head.\1"),
       (r"(.*)", r"\1")]
)


def qwen_vl_family(hf_config: dict, where: str) -> str | None:
    """The family of a Qwen-VL config ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), None for any other
    model; CheckpointError for a family vlmkit refuses, with the reason."""
    arch = architecture(hf_config, where)
    for name in (arch, hf_config.get("model_type")):
        if name in REFUSED:
            raise CheckpointError(f"{where}: {name} is not supported: {REFUSED[name]}")
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    return None


def text_config(hf_config: dict, family: str) -> dict:
    """The decoder's config: transformers 5 nests it under `text_config` (llm_config_from_hf reads
    it there); transformers 4 wrote Qwen2-VL's and Qwen2.5-VL's at the top level."""
    if "text_config" in hf_config:
        return hf_config
    flat = {k: v for k, v in hf_config.items() if k not in ("vision_config", "architectures")}
    return {**flat, "model_type": f"{family}_text"}


def qwen_vl_config(hf_config: dict, where: str) -> VLMConfig:
    """VLMConfig of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config.json."""
    family = qwen_vl_family(hf_config, where)
    if family is None:
        raise CheckpointError(f"{where}: architecture {architecture(hf_config, where)!r} is not a Qwen-VL model; "
                              f"vlmkit loads {sorted(k for k in ARCHITECTURES if k[0].isupper())} as one "
                              "directory (llava-hf directories: VLM.from_hf_llava)")
    spacing = FAMILIES[family]
    vision = native_vision_config_from_hf(hf_config, where)
    llm = llm_config_from_hf(text_config(hf_config, family), where=f"{where} (text config)")
    tokens_per_second = None
    if spacing.seconds_spaced:
        tokens_per_second = float((hf_config.get("vision_config") or {}).get("tokens_per_second",
                                                                             DEFAULT_TOKENS_PER_SECOND))
    try:
        return VLMConfig(native_vision=vision, llm=llm, image_token_id=int(hf_config["image_token_id"]),
                         video_token_id=int(hf_config["video_token_id"]), tokens_per_second=tokens_per_second,
                         video_frames_apart=spacing.frames_apart)
    except KeyError as e:
        raise CheckpointError(f"{where}: no {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def qwen_vl_key_map(cfg: VLMConfig) -> tuple[KeyMap, list[str]]:
    """(key map, ignore patterns) from normalised names (LAYOUTS) to VLMModel's."""
    key_map = (prefixed(NATIVE_VISION_KEYS[cfg.native_vision.style], "visual.", "vision.")
               + prefixed(HF_TO_OURS, "language_model.", "llm."))
    ignore = [re.escape("language_model.") + p for p in IGNORED]
    if cfg.llm.tie_embeddings:  # transformers ties lm_head to the embeddings and ignores the stored copy
        ignore.append(r"language_model\.lm_head\.weight")
    return key_map, ignore


def load_qwen_vl(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory -> `model_cls` (VLMModel or a subclass) in fp32,
    eval mode."""
    path = Path(path)
    cfg = qwen_vl_config(read_config(path), f"{path}/config.json")
    tensors = read_state_dict(path)
    mapping, _ = rename(tensors, LAYOUTS)  # the catch-all pattern renames every tensor
    normalised = {new_name: tensors[name] for name, new_name in mapping.items()}
    model = model_cls.empty(cfg)
    key_map, ignore = qwen_vl_key_map(cfg)
    load_into(model, normalised, key_map, source=str(path), ignore=ignore)
    return model.eval()
