"""Load and export transformers checkpoints of the native-resolution VLMs: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE.

A directory of `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
`Qwen3VLForConditionalGeneration` or `Qwen3VLMoeForConditionalGeneration` becomes one `VLMModel`
with a native tower
(`VLMConfig.native_vision`): the tower's config is read by models/hf/native_vision.py, the
decoder's by models/hf/llm.py (`text_config`, or the top level of the flat configs transformers 4
wrote for Qwen2-VL and Qwen2.5-VL), the token ids and video spacing by `qwen_vl_config`.

Tensor names come in two layouts: transformers 5's modules (`model.visual.`,
`model.language_model.`, `lm_head.`) and the released files' (`visual.`, `model.`, `lm_head.`).
Both are first normalised to `visual.` + the tower's names and `language_model.` + a decoder
checkpoint's names, then mapped with the tower's and the decoder's key maps: one strict load of the
whole model that reports every missing, unexpected or mis-shaped tensor together.

Qwen3-VL-MoE is Qwen3-VL's tower and layout with a Qwen3-MoE decoder (softmax top-k routing,
always renormalised, no shared experts): models/moe.py's `MoE`. Its checkpoint stores each layer's
experts fused in 3-D tensors, which models/hf/llm.py splits into vlmkit's per-expert projections
before the renaming load (`moe_tensors_from_hf`) and fuses again on export (`fused_experts`); what
vlmkit's MoE cannot compute (dense layers other than a leading range) is refused by name there.

Export (`export_hf_qwen_vl`) writes a native model back as its family's transformers directory:
config.json, model.safetensors in the layout transformers itself saves for that family (the
released files' for Qwen2-VL and Qwen2.5-VL, transformers 5's modules for Qwen3-VL), the processor
configs from the model's processor settings and its tokenizer when it has one. A Qwen3-VL-style
model with an MoE decoder is written as Qwen3-VL-MoE. What the family's class cannot compute is
refused with the reason (`check_qwen_vl_exportable`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import VISION_END, VISION_START
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import MoEConfig, VLMConfig
from vlmkit.models.hf.common import (BICUBIC, PROCESSOR_FILE, KeyMap, architecture, load_into, named_family, prefixed,
                                     read_config, read_state_dict, rename, renamed, write_chat_template, write_json,
                                     write_weights)
from vlmkit.models.hf.llm import (HF_TO_OURS, decoder_ignore, fused_experts, llm_config_from_hf, llm_config_to_hf,
                                  llm_state_dict_to_hf, moe_routing_reasons, moe_tensors_from_hf)
from vlmkit.models.hf.native_vision import (NATIVE_VISION_EXPORT_KEYS, NATIVE_VISION_KEYS, TOWER_PREFIXES,
                                            load_native_vision_weights, native_vision_config_from_hf, tower_tensors)
from vlmkit.models.llm import LLM
from vlmkit.models.native_vision import NativeVisionTower
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors, load_state

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
MOE_ARCHITECTURE, MOE_MODEL_TYPE = "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe"
MOE_ARCHITECTURES = {MOE_ARCHITECTURE: "qwen3_vl", MOE_MODEL_TYPE: "qwen3_vl"}
"""Qwen3-VL-MoE: Qwen3-VL's family (tower, video spacing) with an MoE decoder."""
LOADED_ARCHITECTURES = {**ARCHITECTURES, **MOE_ARCHITECTURES}

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
    """The family of a Qwen-VL config ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"; Qwen3-VL-MoE's is
    "qwen3_vl"), None for any other model."""
    return named_family(hf_config, LOADED_ARCHITECTURES, where)


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
                              f"vlmkit loads {sorted(k for k in LOADED_ARCHITECTURES if k[0].isupper())} as one "
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
    return key_map, decoder_ignore("language_model.", cfg.llm)


def load_qwen_vl(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE directory -> `model_cls` (VLMModel or a
    subclass) in fp32, eval mode."""
    path = Path(path)
    cfg = qwen_vl_config(read_config(path), f"{path}/config.json")
    tensors = moe_tensors_from_hf(renamed(read_state_dict(path), LAYOUTS), cfg.llm, str(path))
    model = model_cls.empty(cfg)
    key_map, ignore = qwen_vl_key_map(cfg)
    load_into(model, tensors, key_map, source=str(path), ignore=ignore)
    return model.eval()


# --- export ------------------------------------------------------------------------------------------

ARCHITECTURE_NAMES = {**{family: name for name, family in ARCHITECTURES.items() if name[0].isupper()},
                      MOE_MODEL_TYPE: MOE_ARCHITECTURE}
"""model_type (a family, or Qwen3-VL-MoE's) -> its transformers class name (config.json's `architectures`)."""
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen3_vl": "Qwen3VLProcessor"}
VIDEO_PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                           "qwen3_vl": "Qwen3VLVideoProcessor"}
VIDEO_RULES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl"}
"""family -> how its video processor sizes and samples frames (NativeProcessorConfig.video_rules)."""
IMAGE_PROCESSOR_CLASS = "Qwen2VLImageProcessor"  # all three families size images alike

# Step 2 of export: normalised names (`visual.`, `language_model.`, as LAYOUTS makes them) -> the
# file layout transformers' save_pretrained writes for the family.
RELEASED_LAYOUT: KeyMap = [(r"language_model\.(.*)", r"\1"), (r"(.*)", r"\1")]
MODULE_LAYOUT: KeyMap = [
    (r"visual\.(.*)", r"model.visual.\1"),
    (r"language_model\.model\.(.*)", r"model.language_model.\1"),
    (r"language_model\.(.*)", r"\1"),
]
EXPORT_LAYOUTS = {"qwen2_vl": RELEASED_LAYOUT, "qwen2_5_vl": RELEASED_LAYOUT, "qwen3_vl": MODULE_LAYOUT}


def hf_model_type(cfg: VLMConfig) -> str:
    """The transformers model_type a native model exports as: its family (the tower's style), or
    Qwen3-VL-MoE's for a Qwen3-VL-style model with an MoE decoder."""
    style = cfg.native_vision.style
    return MOE_MODEL_TYPE if cfg.llm.moe is not None and style == "qwen3_vl" else style


def check_qwen_vl_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why the family's transformers class cannot compute this model
    (nothing when it can); the family is the tower's style."""
    if not cfg.is_native:
        raise ConfigError("cannot export to a Qwen-VL family: the model has no native-resolution tower")
    reasons = _decoder_reasons(cfg) + _tower_reasons(cfg)
    if reasons:
        raise ConfigError(f"cannot export to {ARCHITECTURE_NAMES[hf_model_type(cfg)]}: " + "; ".join(reasons))


def _decoder_reasons(cfg: VLMConfig) -> list[str]:
    family, llm = cfg.native_vision.style, cfg.llm
    qwen3 = family == "qwen3_vl"
    if llm.moe is not None and not qwen3:
        return [f"the decoder has MoE layers; {family}'s text model is dense (an MoE decoder exports as Qwen3-VL-MoE)"]
    reasons = [] if llm.moe is None else _moe_reasons(llm.moe)
    if llm.qk_norm != qwen3 or llm.qkv_bias == qwen3:
        reasons.append("Qwen3-VL's decoder has q/k norms and no q/k/v bias" if qwen3 else
                       f"{family}'s decoder has a q/k/v bias and no q/k norms")
    if llm.mrope_interleaved != qwen3:
        reasons.append(f"{family} {'interleaves' if qwen3 else 'does not interleave'} M-RoPE's axes "
                       f"(llm.mrope_interleaved is {llm.mrope_interleaved})")
    if not qwen3 and llm.head_dim * llm.num_heads != llm.hidden_size:
        reasons.append(f"{family}'s attention has head_dim = hidden_size / num_heads, not {llm.head_dim}")
    if cfg.video_token_id is None:
        reasons.append("the model has no video_token_id, which the family's config requires")
    if (cfg.tokens_per_second is not None) != (family == "qwen2_5_vl"):
        reasons.append("Qwen2.5-VL, and only it, spaces video frames by tokens_per_second")
    if cfg.video_frames_apart != qwen3:
        reasons.append("Qwen3-VL, and only it, writes each video frame pair apart (video_frames_apart)")
    return reasons


def _moe_reasons(moe: MoEConfig) -> list[str]:
    renormalised = [] if moe.norm_topk_prob else [
        "Qwen3-VL-MoE's router always renormalises the top-k weights (moe.norm_topk_prob is false)"]
    return moe_routing_reasons(moe) + renormalised


def _tower_reasons(cfg: VLMConfig) -> list[str]:
    v, family = cfg.native_vision, cfg.native_vision.style
    reasons = []
    if family == "qwen2_5_vl" and v.window_size == 0:
        reasons.append("Qwen2.5-VL's tower always uses window attention (native_vision.window_size is 0)")
    if family != "qwen2_5_vl" and v.window_size:
        reasons.append(f"{family}'s tower has no window attention")
    if family == "qwen3_vl" and v.num_position_embeddings == 0:
        reasons.append("Qwen3-VL's tower always has a learned position grid (num_position_embeddings is 0)")
    if family != "qwen3_vl" and (v.num_position_embeddings or v.deepstack_visual_indexes):
        reasons.append(f"{family}'s tower has no learned position grid or deepstack")
    if v.num_position_embeddings and v.position_grid != "resized":
        reasons.append(f"Qwen-VL towers resize their position grid to each image (native_vision.position_grid "
                       f"is {v.position_grid!r})")
    if family == "qwen2_vl" and int(v.hidden_size * _mlp_ratio(cfg)) != v.intermediate_size:
        reasons.append(f"Qwen2-VL's tower MLP width is a ratio of its width; {v.intermediate_size} is not "
                       f"expressible from {v.hidden_size}")
    return reasons


def _mlp_ratio(cfg: VLMConfig) -> float | int:
    v = cfg.native_vision
    ratio = v.intermediate_size / v.hidden_size
    return int(ratio) if ratio.is_integer() else ratio


def qwen_vl_hf_config(cfg: VLMConfig, token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The family's config.json for `cfg` (check_qwen_vl_exportable first). token_ids: extra
    top-level ids (vision_start_token_id, vision_end_token_id) where the tokenizer knows them."""
    family, model_type = cfg.native_vision.style, hf_model_type(cfg)
    text = llm_config_to_hf(cfg.llm)
    for key in ("architectures", "rope_theta", "tie_word_embeddings"):  # the top level holds the tie
        text.pop(key)
    if family != "qwen3_vl":  # the Qwen2 decoders have no head_dim or attention_bias setting
        text.pop("head_dim")
        text.pop("attention_bias")
    if model_type == MOE_MODEL_TYPE:  # its router always renormalises: no switch in its config
        text.pop("norm_topk_prob")
    rope = {"rope_type": "default", "rope_theta": cfg.llm.rope_theta, "mrope_section": list(cfg.llm.mrope_section)}
    if cfg.llm.mrope_interleaved:
        rope["mrope_interleaved"] = True
    text.update(model_type=f"{model_type}_text", rope_parameters=rope)
    return {
        "architectures": [ARCHITECTURE_NAMES[model_type]],
        "model_type": model_type,
        "text_config": text,
        "vision_config": _vision_hf_config(cfg),
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        **(token_ids or {}),
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


def _vision_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    v, family = cfg.native_vision, cfg.native_vision.style
    out: dict[str, Any] = {
        "model_type": f"{hf_model_type(cfg)}_vision", "depth": v.depth, "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size, "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    if family == "qwen2_vl":  # tower width `embed_dim`, LLM width `hidden_size`, MLP width by ratio
        out.update(embed_dim=v.hidden_size, hidden_size=v.out_hidden_size, mlp_ratio=_mlp_ratio(cfg))
        return out
    out.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size)
    if family == "qwen2_5_vl":
        seconds = cfg.tokens_per_second
        out.update(window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                   tokens_per_second=int(seconds) if seconds.is_integer() else seconds)
    else:
        out.update(num_position_embeddings=v.num_position_embeddings,
                   deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    return out


def qwen_vl_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers' save_pretrained writes for its family."""
    style = model.config.native_vision.style
    tower = model.vision.state_dict()
    mapping, unmatched = rename(tower, NATIVE_VISION_EXPORT_KEYS[style])
    if unmatched:
        raise ConfigError(f"no {style} tower name for {unmatched}")
    normalised = {"visual." + hf: tower[ours] for ours, hf in mapping.items()}
    decoder = llm_state_dict_to_hf(model.llm)
    if model.config.llm.moe is not None:  # Qwen3-VL-MoE's experts are fused 3-D tensors
        decoder = fused_experts(decoder)
    normalised.update({"language_model." + name: t for name, t in decoder.items()})
    return renamed(normalised, EXPORT_LAYOUTS[style])


def processor_hf_configs(family: str, settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(preprocessor_config.json, video_preprocessor_config.json) for a native model's processor
    settings (data/native_images.py's NativeProcessorConfig, which reads them back)."""
    common = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": settings.rescale_factor,
              "do_normalize": True, "image_mean": list(settings.mean), "image_std": list(settings.std),
              "do_convert_rgb": True, "patch_size": settings.patch_size,
              "temporal_patch_size": settings.temporal_patch_size, "merge_size": settings.merge_size}
    image = {"image_processor_type": IMAGE_PROCESSOR_CLASS, **common,
             "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels}}
    video = {"video_processor_type": VIDEO_PROCESSOR_CLASSES[family], **common,
             "size": {"shortest_edge": settings.video_min_pixels, "longest_edge": settings.video_max_pixels},
             "do_sample_frames": settings.video_fps is not None,
             "min_frames": settings.min_frames, "max_frames": settings.max_frames,
             # read back by vlmkit only: qwen-vl-utils' cap on a video's pixels
             "cap_pixels_per_frame": settings.cap_frame_pixels, "max_video_tokens": settings.max_video_tokens}
    if settings.video_fps is not None:
        video["fps"] = settings.video_fps
    return image, video


def export_hf_qwen_vl(model: VLMModel, out_dir: str | Path, processor: Any) -> Path:
    """Write a native `model` as a directory its family's transformers class
    (`AutoModelForImageTextToText`) loads: config.json, model.safetensors, preprocessor_config.json
    and video_preprocessor_config.json from `processor` (the model's NativeProcessorConfig); and
    when the model has a tokenizer, its files plus processor_config.json and chat_template.jinja."""
    cfg = model.config
    check_qwen_vl_exportable(cfg)
    family = cfg.native_vision.style
    if processor.video_rules != VIDEO_RULES[family]:
        raise ConfigError(f"cannot export to {ARCHITECTURE_NAMES[hf_model_type(cfg)]}: its video processor follows "
                          f"{VIDEO_RULES[family]}'s rules, the model's processor {processor.video_rules}'s")
    tensors = for_safetensors(qwen_vl_state_dict(model))  # before writing anything: it refuses moved router biases
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = getattr(model, "tokenizer", None)
    hf_config = qwen_vl_hf_config(cfg, _vision_token_ids(tokenizer))
    write_weights(out, tensors, hf_config)
    image, video = processor_hf_configs(family, processor)
    write_json(out / "preprocessor_config.json", image)
    write_json(out / "video_preprocessor_config.json", video)
    if tokenizer is not None:
        tokenizer.save(out)
        write_json(out / PROCESSOR_FILE, {"processor_class": PROCESSOR_CLASSES[family]})
        write_chat_template(out, getattr(tokenizer, "chat_template", None))
    return out


def _vision_token_ids(tokenizer) -> dict[str, int]:
    """vision_start_token_id / vision_end_token_id where the tokenizer has the tokens (transformers'
    processors and generate read them; the forward pass does not)."""
    if tokenizer is None:
        return {}
    ids = {"vision_start_token_id": tokenizer.token_id(VISION_START),
           "vision_end_token_id": tokenizer.token_id(VISION_END)}
    return {key: i for key, i in ids.items() if i is not None}


# --- assembly: a Qwen-VL directory's tower in front of another decoder ---------------------------------

MERGER_PREFIXES = ("merger.", "deepstack_mergers.")
"""The tower's mergers: what maps its features to the decoder's width (a native model's adapter)."""


def assemble_native(vision_dir: str | Path, llm: LLM, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A native-resolution VLM of a Qwen-VL directory's tower and `llm` (any decoder `load_llm`
    gives, an MoE one included: Seed1.5-VL's shape), in eval mode. The decoder keeps its weights and
    takes the directory's M-RoPE layout (`mrope_section`, interleaving; on text alone M-RoPE is its
    1-D RoPE), the model the directory's token ids and video spacing. The tower keeps its weights;
    its mergers too when they already map to the decoder's width, else they are new (initialised),
    like the adapter of a LLaVA-shaped build."""
    path = Path(vision_dir)
    source = qwen_vl_config(read_config(path), f"{path}/config.json")
    tower_cfg = dataclasses.replace(source.native_vision, out_hidden_size=llm.config.hidden_size)
    try:
        llm_cfg = dataclasses.replace(llm.config, mrope_section=source.llm.mrope_section,
                                      mrope_interleaved=source.llm.mrope_interleaved)
        cfg = dataclasses.replace(source, native_vision=tower_cfg, llm=llm_cfg)
    except ConfigError as e:
        raise CheckpointError(f"cannot put {path}'s tower in front of this decoder: {e}") from None
    model = model_cls.empty(cfg)
    load_state(model.llm, llm.state_dict(), source="the decoder")
    _load_tower(model.vision, read_state_dict(path), keep_mergers=tower_cfg == source.native_vision,
                source=str(path))
    return model.eval()


def _load_tower(tower: NativeVisionTower, hf_tensors: dict[str, torch.Tensor], keep_mergers: bool,
                source: str) -> None:
    """A Qwen-VL checkpoint's tower weights into `tower`, strictly; without `keep_mergers` the
    mergers are initialised instead (their stored weights map to another width)."""
    if keep_mergers:
        load_native_vision_weights(tower, hf_tensors, source)
        return
    tower.init_weights()
    stored = tower_tensors(hf_tensors)
    mapping, unmatched = rename(stored, NATIVE_VISION_KEYS[tower.config.style])
    state = {ours: stored[hf] for hf, ours in mapping.items() if not ours.startswith(MERGER_PREFIXES)}
    fresh = {name: t.clone() for name, t in tower.state_dict().items() if name.startswith(MERGER_PREFIXES)}
    load_state(tower, {**state, **fresh}, source, unmatched=unmatched)
