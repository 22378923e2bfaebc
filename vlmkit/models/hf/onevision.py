"""Load and export transformers' LLaVA-OneVision checkpoints (`LlavaOnevisionForConditionalGeneration`).

A directory becomes one `VLMModel`: the SigLIP tower, the two-layer MLP projector and the decoder
(Qwen2 in the published checkpoints) as a llava-hf directory's (models/hf/llava.py reads the config
and names), with any-resolution tiling (`VLMConfig.tiling == "anyres"`, models/anyres.py): the
canvases of `image_grid_pinpoints`, the pooling budget of `vision_aspect_ratio` (`anyres_max_N`)
and the newline embedding (`image_newline`, kept in the adapter). Images are tiled as transformers'
LlavaOnevisionImageProcessor tiles them (data/anyres.py), normalised as preprocessor_config.json
says (CLIP's mean and std where it is silent, the processor's defaults).

Tensor names are llava-hf's two layouts plus `image_newline` (`model.image_newline` in transformers
5's module layout), normalised as models/hf/llava.py does. Export writes the layout transformers
saves (`vision_tower.`, `multi_modal_projector.`, `language_model.`, `image_newline`).

What vlmkit computes differently is refused with the reason: a tower other than SigLIP, a
`vision_aspect_ratio` other than `anyres_max_N`, canvases that are not whole tiles, a feature
select strategy other than "full" (in the model's or the processor's config), a processor whose
`num_image_tokens` is not a tile's patches, an image processor that tiles, resizes or normalises
otherwise. Videos are refused too: vlmkit's OneVision takes images (the data side refuses video
parts as `unexpected_video`, the model refuses `pixel_values_videos`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import IMAGE_TOKEN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE_FACTOR
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.common import (BICUBIC, PROCESSOR_FILE, KeyMap, check_tokens_per_tile, config_family, load_into,
                                     prefixed, read_family_config, read_state_dict, rename, renamed,
                                     write_chat_template, write_json, write_weights)
from vlmkit.models.hf.llava import LAYOUTS, PROJECTOR_EXPORT_KEYS, llava_config, llava_hf_config, llava_key_map
from vlmkit.models.hf.llm import decoder_export_reasons, llm_state_dict_to_hf
from vlmkit.models.hf.vision import VISION_EXPORT_KEYS, read_preprocessor
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
MODEL_TYPE = "llava_onevision"
ARCHITECTURE_NAMES = {MODEL_TYPE: ARCHITECTURE}
IMAGE_PROCESSOR_CLASS = "LlavaOnevisionImageProcessor"
PROCESSOR_CLASS = "LlavaOnevisionProcessor"
POOLING = re.compile(r"anyres_max_(\d+)")
"""`vision_aspect_ratio`: pool past N tiles' patches (the only form the reference computes)."""
FULL = "full"
"""The feature select strategy vlmkit computes for a SigLIP tower: every patch kept."""

# The defaults of transformers' LlavaOnevisionConfig, for keys a config.json leaves out.
TOP_HF_DEFAULTS = dict(image_token_index=151646, projector_hidden_act="gelu", vision_feature_select_strategy=FULL,
                       vision_feature_layer=-1, multimodal_projector_bias=True, vision_aspect_ratio="anyres_max_9",
                       image_grid_pinpoints=[[h * 384, w * 384] for h in range(1, 7) for w in range(1, 7)])
VISION_HF_DEFAULTS = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                          image_size=384, num_hidden_layers=26, num_attention_heads=16)
TEXT_HF_DEFAULTS = dict(model_type="qwen2")
# The image processor's defaults, for keys preprocessor_config.json leaves out.
PREPROCESSOR_DEFAULTS = dict(image_processor_type=IMAGE_PROCESSOR_CLASS, size={"height": 384, "width": 384},
                             resample=BICUBIC, do_resize=True, do_rescale=True, rescale_factor=RESCALE_FACTOR,
                             do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))

NEWLINE_LAYOUT: KeyMap = [(r"model\.image_newline", "image_newline")] + LAYOUTS
"""Either layout -> llava-hf's older one, the newline embedding at the top."""
NEWLINE_KEYS: KeyMap = [(r"image_newline", "adapter.image_newline")]
EXPORT_KEYS: KeyMap = (prefixed(VISION_EXPORT_KEYS, "vision.", "vision_tower.")
                       + prefixed(PROJECTOR_EXPORT_KEYS, "adapter.", "multi_modal_projector.")
                       + [(r"adapter\.image_newline", "image_newline")])
"""vlmkit names of the tower and the adapter -> the names transformers saves."""


def is_onevision(hf_config: dict, where: str) -> bool:
    return config_family(hf_config, ARCHITECTURE_NAMES, where) is not None


# --- config -----------------------------------------------------------------------------------------


def _pooling_tiles(vision_aspect_ratio: object, where: str) -> int:
    match = POOLING.fullmatch(str(vision_aspect_ratio))
    if match is None:
        raise CheckpointError(f"{where}: vision_aspect_ratio {vision_aspect_ratio!r} is not 'anyres_max_N', the "
                              "pooling vlmkit computes")
    return int(match.group(1))


def _check_preprocessor(preprocessor: dict, cfg: VLMConfig, where: str) -> None:
    """CheckpointError unless the image processor tiles, resizes and rescales as data/anyres.py does."""
    tile = cfg.vision.image_size
    reasons = []
    if not str(preprocessor["image_processor_type"]).startswith(IMAGE_PROCESSOR_CLASS):
        reasons.append(f"image processor {preprocessor['image_processor_type']!r}: vlmkit tiles images as "
                       f"{IMAGE_PROCESSOR_CLASS}")
    if preprocessor["size"] != {"height": tile, "width": tile}:
        reasons.append(f"size {preprocessor['size']}: tiles differ from the tower's {tile}x{tile} images")
    if preprocessor["resample"] != BICUBIC or not preprocessor["do_resize"]:
        reasons.append(f"resample {preprocessor['resample']} (do_resize {preprocessor['do_resize']}): vlmkit "
                       f"resizes bicubically ({BICUBIC})")
    if not (preprocessor["do_rescale"] and preprocessor["do_normalize"]) or (
            preprocessor["rescale_factor"] != RESCALE_FACTOR):
        reasons.append("vlmkit rescales pixels by 1/255 and normalises them")
    pinpoints = preprocessor.get("image_grid_pinpoints")
    if pinpoints is not None and [tuple(c) for c in pinpoints] != list(cfg.grid_pinpoints):
        reasons.append("image_grid_pinpoints differ from config.json's")
    if reasons:
        raise CheckpointError(f"{where}: " + "; ".join(reasons))


def _check_processor(path: Path, cfg: VLMConfig) -> None:
    """processor_config.json, where there is one: a tile's tokens, every patch kept, the model's pooling."""
    check_tokens_per_tile(path, "num_image_tokens", cfg.tokens_per_image, "patches per tile")
    file = path / PROCESSOR_FILE
    if not file.is_file():
        return
    processor = json.loads(file.read_text())
    strategy = processor.get("vision_feature_select_strategy")
    if strategy not in (None, FULL):
        raise CheckpointError(f"{file}: vision_feature_select_strategy {strategy!r}: vlmkit counts every patch "
                              f"of a SigLIP tile ({FULL!r})")
    pooling = processor.get("vision_aspect_ratio")
    if pooling is not None and _pooling_tiles(pooling, str(file)) != cfg.anyres_max_tiles:
        raise CheckpointError(f"{file}: vision_aspect_ratio {pooling!r} differs from config.json's "
                              f"anyres_max_{cfg.anyres_max_tiles}")


def onevision_config(path: str | Path) -> VLMConfig:
    """VLMConfig of a LLaVA-OneVision directory: config.json, preprocessor_config.json (tiles,
    normalisation) and processor_config.json (tokens per tile, checked)."""
    path = Path(path)
    where = f"{path}/config.json"
    hf, _ = read_family_config(path, ARCHITECTURE_NAMES)
    top = {**TOP_HF_DEFAULTS, **hf, "vision_config": {**VISION_HF_DEFAULTS, **(hf.get("vision_config") or {})},
           "text_config": {**TEXT_HF_DEFAULTS, **(hf.get("text_config") or {})}}
    top["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or top["text_config"].get("tie_word_embeddings"))
    if top["vision_config"]["model_type"] != "siglip_vision_model":
        raise CheckpointError(f"{where}: vision tower {top['vision_config']['model_type']!r}: vlmkit's OneVision "
                              "reads a SigLIP tower (siglip_vision_model)")
    llava = llava_config(top, path)  # the tower, projector, decoder and image token as llava-hf's
    preprocessor = {**PREPROCESSOR_DEFAULTS, **(read_preprocessor(path) or {})}
    vision = dataclasses.replace(llava.vision, image_mean=tuple(preprocessor["image_mean"]),
                                 image_std=tuple(preprocessor["image_std"]))
    canvases = [tuple(c) for c in top["image_grid_pinpoints"]]
    try:
        cfg = dataclasses.replace(
            llava, vision=vision, tiling="anyres", grid_pinpoints=tuple(canvases),
            anyres_max_tiles=_pooling_tiles(top["vision_aspect_ratio"], where), hf_architecture=ARCHITECTURE,
            max_tiles=max(h * w for h, w in canvases) // vision.image_size ** 2)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    _check_preprocessor(preprocessor, cfg, f"{path}/preprocessor_config.json")
    _check_processor(path, cfg)
    return cfg


# --- load ---------------------------------------------------------------------------------------------


def load_onevision(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A LLaVA-OneVision directory -> `model_cls` (VLMModel or a subclass) in fp32, eval mode."""
    path = Path(path)
    cfg = onevision_config(path)
    model = model_cls.empty(cfg)
    key_map, ignore = llava_key_map(cfg)
    load_into(model, renamed(read_state_dict(path), NEWLINE_LAYOUT), key_map + NEWLINE_KEYS, source=str(path),
              ignore=ignore)
    return model.eval()


# --- export ------------------------------------------------------------------------------------------


def check_onevision_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why LlavaOnevisionForConditionalGeneration cannot compute this model
    (nothing when it can)."""
    if cfg.is_native or cfg.tiling != "anyres":
        raise ConfigError("cannot export to LLaVA-OneVision: the model does not tile images at any resolution "
                          "(tiling 'anyres')")
    v, adapter = cfg.vision, cfg.adapter
    reasons = []
    siglip = ("siglip", "learned", False, "layer_norm", "fc", True, True, False, False, None)
    if (v.style, v.positions, v.post_norm_features, v.norm, v.mlp, v.linear_bias, v.qkv_bias, v.patch_norm,
            v.qk_norm, v.layer_scale) != siglip:
        reasons.append("OneVision's tower is SigLIP's (LayerNorms, biases, an fc1 / fc2 MLP, learned positions), "
                       "read before its post-layernorm")
    if (adapter.depth, adapter.bias) != (2, True):
        reasons.append(f"the MLP adapter has {adapter.depth} layer(s) (bias {adapter.bias}); OneVision's projector "
                       "has 2 with biases")
    reasons += decoder_export_reasons(cfg.llm)
    if reasons:
        raise ConfigError("cannot export to LLaVA-OneVision: " + "; ".join(reasons))


def onevision_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    """LlavaOnevisionConfig's config.json for `cfg` (check_onevision_exportable first)."""
    hf = llava_hf_config(cfg)
    del hf["image_seq_length"]  # llava-hf's fixed count; a OneVision image's tokens follow its size
    return {**hf, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
            "image_grid_pinpoints": [list(c) for c in cfg.grid_pinpoints],
            "vision_aspect_ratio": f"anyres_max_{cfg.anyres_max_tiles}"}


def onevision_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers saves LLaVA-OneVision with."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith("llm.")}
    mapping, unmatched = rename(state, EXPORT_KEYS)
    if unmatched:
        raise ConfigError(f"no LLaVA-OneVision name for {unmatched}")
    out = {hf: state[ours] for ours, hf in mapping.items()}
    out.update({"language_model." + name: t for name, t in llm_state_dict_to_hf(model.llm).items()})
    return out


def image_processor_config(cfg: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json: the image processor tiling as data/anyres.py does."""
    v = cfg.vision
    return {"image_processor_type": IMAGE_PROCESSOR_CLASS, "do_convert_rgb": True, "do_resize": True,
            "size": {"height": v.image_size, "width": v.image_size}, "resample": BICUBIC, "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "do_pad": True,
            "image_grid_pinpoints": [list(c) for c in cfg.grid_pinpoints]}


def export_hf_onevision(model: VLMModel, out_dir: str | Path) -> Path:
    """Write `model` as a directory LlavaOnevisionForConditionalGeneration loads: config.json,
    model.safetensors, preprocessor_config.json; with a tokenizer (one that writes an image as a run
    of <image> tokens), its files, processor_config.json and chat_template.jinja, so that
    transformers' processor reads the directory too."""
    cfg = model.config
    check_onevision_exportable(cfg)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and (tokenizer.image_token != IMAGE_TOKEN or tokenizer.template in (
            "qwen_vl", "internvl", "idefics3")):
        raise ConfigError(f"cannot export to LLaVA-OneVision: the tokenizer's chat format {tokenizer.template!r} "
                          f"writes images otherwise than transformers' processor, a run of {IMAGE_TOKEN} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, for_safetensors(onevision_state_dict(model)), onevision_hf_config(cfg))
    write_json(out / "preprocessor_config.json", image_processor_config(cfg))
    if tokenizer is not None:
        tokenizer.save(out)
        write_json(out / PROCESSOR_FILE, {"processor_class": PROCESSOR_CLASS, "num_image_tokens": cfg.tokens_per_image,
                                         "vision_feature_select_strategy": FULL,
                                         "vision_aspect_ratio": f"anyres_max_{cfg.anyres_max_tiles}",
                                         "image_token": IMAGE_TOKEN})
        write_chat_template(out, tokenizer.chat_template)
    return out
