"""Load and export transformers' InternVL checkpoints (`InternVLForConditionalGeneration`: InternVL2.5,
InternVL3).

A directory becomes one `VLMModel`: InternViT as the `VisionEncoder` (style `intern_vit`, with its
layer scale, norm and qk-norm switches), the projector as the pixel_shuffle adapter (downsample
ratio 0.5 = scale factor 2; LayerNorm, Linear, GELU, Linear: InternVL's `mlp1`, whose channel
order the adapter's shuffle shares) and the decoder through models/hf/llm.py (`text_config`:
Qwen2, Qwen3 or Llama). Images are tiled as transformers' InternVL processor tiles them
(GotOcr2's `crop_to_patches`: the grid of at most `max_patches` tiles closest to the image's
aspect ratio, then a thumbnail; the processor crops so whatever its image processor's own
`crop_to_patches` says), which is data/images.py's `ImageProcessor` with the model's `max_tiles`;
the tile size and normalisation come from preprocessor_config.json.

Tensor names are llava-hf's two layouts (`vision_tower.`, `multi_modal_projector.`,
`language_model.`, or transformers 5's modules under `model.`), normalised as models/hf/llava.py
does, then mapped by one table of name templates per part, read both ways (`common.key_map`).
The class token and the position table are stored with leading unit dimensions ((1, 1, D) and
(1, P + 1, D)) and reshaped on the way in and out.

What vlmkit computes differently is refused with the reason: several feature layers, a feature
select strategy keeping the class token, no absolute positions, a final LayerNorm that the feature
layer would pass through (`use_mean_pooling: false` with the last layer), tiles of another size
than the tower's, a processor that does not tile from one tile. Export (`export_hf_internvl`)
writes the layout transformers itself saves, the image processor's and processor's configs and an
InternVL-format tokenizer with the special-token names transformers' processor reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import IMG_CONTEXT, IMG_END, IMG_START, RESCALE_FACTOR
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import AdapterConfig, VisionConfig, VLMConfig
from vlmkit.models.hf.common import (BICUBIC, PROCESSOR_FILE, KeyMap, check_tokens_per_tile, config_family, key_map,
                                     load_into, prefixed, read_family_config, read_state_dict, rename, renamed,
                                     write_chat_template, write_json, write_weights)
from vlmkit.models.hf.llava import LAYOUTS
from vlmkit.models.hf.llm import (HF_TO_OURS, decoder_export_reasons, decoder_ignore, llm_config_from_hf,
                                  llm_config_to_hf, llm_state_dict_to_hf)
from vlmkit.models.hf.vision import read_preprocessor
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors

ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"
ARCHITECTURE_NAMES = {MODEL_TYPE: ARCHITECTURE}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The normalisation InternVL's image processor ships with."""
DEFAULT_MAX_PATCHES = 12
"""GotOcr2's tiles per image, for a preprocessor_config.json that does not say."""
TIED_BY_DEFAULT = True
DEFAULT_DOWNSAMPLE_RATIO = 0.5
"""InternVLConfig's defaults, for a config.json that leaves them out."""

# The defaults of HF's InternVLVisionConfig, for keys a config.json leaves out.
VISION_HF_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, attention_bias=False,
                          use_qk_norm=False, intermediate_size=4096, hidden_act="gelu", norm_type="layer_norm",
                          layer_norm_eps=1e-6, image_size=448, patch_size=14, num_channels=3,
                          use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True)

# (HF name under the tower / projector, ours under vision. / adapter.); `{field}`s as NAME_FIELDS.
VISION_NAMES = [
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding.weight"),
    ("embeddings.patch_embeddings.projection.{wb}", "embeddings.patch_embedding.{wb}"),
    ("encoder.layer.{i}.attention.{qkv}_proj.{wb}", "layers.{i}.self_attn.{qkv}_proj.{wb}"),
    ("encoder.layer.{i}.attention.projection_layer.{wb}", "layers.{i}.self_attn.out_proj.{wb}"),
    ("encoder.layer.{i}.attention.{qk}_norm.weight", "layers.{i}.self_attn.{qk}_norm.weight"),
    ("encoder.layer.{i}.mlp.fc{n}.{wb}", "layers.{i}.mlp.fc{n}.{wb}"),
    ("encoder.layer.{i}.layernorm_before.{wb}", "layers.{i}.layer_norm1.{wb}"),
    ("encoder.layer.{i}.layernorm_after.{wb}", "layers.{i}.layer_norm2.{wb}"),
    ("encoder.layer.{i}.lambda_{n}", "layers.{i}.layer_scale_{n}"),
]
PROJECTOR_NAMES = [("layer_norm.{wb}", "norm.{wb}"), ("linear_{n}.{wb}", "mlp.linear_{n}.{wb}")]
NAME_FIELDS = {"i": r"\d+", "n": "[12]", "wb": "weight|bias", "qkv": "[qkv]", "qk": "[qk]"}

# Parts of the whole model: (HF prefix after LAYOUTS, our prefix, name table).
PARTS = [("vision_tower.", "vision.", VISION_NAMES), ("multi_modal_projector.", "adapter.", PROJECTOR_NAMES)]
UNIT_DIMS = {"vision.embeddings.class_embedding": 2, "vision.embeddings.position_embedding.weight": 1}
"""Our tensors HF stores with leading unit dimensions, and how many."""
NOT_USED = [r"vision_tower\.embeddings\.mask_token", r"vision_tower\.layernorm\..*"]
"""Masked-image-modelling's mask token, and the final LayerNorm of a tower without mean pooling,
which no feature layer but the refused last one passes through."""

EXTRA_SPECIAL_TOKENS = {"start_image_token": IMG_START, "end_image_token": IMG_END,
                        "context_image_token": IMG_CONTEXT, "video_token": "<video>"}
"""The tokenizer attributes transformers' InternVLProcessor reads (tokenizer_config.json)."""


def is_internvl(hf_config: dict, where: str) -> bool:
    """Whether a config.json is an InternVL model's (by its architecture, else its model type)."""
    return config_family(hf_config, ARCHITECTURE_NAMES, where) is not None


# --- config -----------------------------------------------------------------------------------------


def _square(value: Any, name: str, where: str) -> int:
    """An image or patch size given as one int or as [height, width] with both equal."""
    sides = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(sides) != 2 or sides[0] != sides[1]:
        raise CheckpointError(f"{where}: vision_config.{name} {value} is not square; vlmkit's tiles are square")
    return int(sides[0])


def _vision_config(hf: dict, where: str, preprocessor: dict) -> VisionConfig:
    vc = {**VISION_HF_DEFAULTS, **(hf.get("vision_config") or {})}
    layer = hf.get("vision_feature_layer", -1)
    reasons = []
    if not isinstance(layer, int):
        reasons.append(f"vision_feature_layer {layer} concatenates several layers; vlmkit reads one feature layer")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        reasons.append("vision_feature_select_strategy keeps the class token; InternVL's pixel shuffle needs it "
                       "dropped ('default')")
    if not vc["use_absolute_position_embeddings"]:
        reasons.append("use_absolute_position_embeddings=false: vlmkit's InternViT has a learned position table")
    if not vc["use_mean_pooling"] and layer == -1:
        reasons.append("use_mean_pooling=false puts a final LayerNorm on the last layer's features, which vlmkit's "
                       "tower does not build")
    if reasons:
        raise CheckpointError(f"{where}: " + "; ".join(reasons))
    try:
        return VisionConfig(
            style="intern_vit", image_size=_square(vc["image_size"], "image_size", where),
            patch_size=_square(vc["patch_size"], "patch_size", where), num_channels=int(vc["num_channels"]),
            hidden_size=int(vc["hidden_size"]), intermediate_size=int(vc["intermediate_size"]),
            num_layers=int(vc["num_hidden_layers"]), num_heads=int(vc["num_attention_heads"]),
            hidden_act=str(vc["hidden_act"]), layer_norm_eps=float(vc["layer_norm_eps"]), feature_layer=layer,
            norm=vc["norm_type"], qkv_bias=bool(vc["attention_bias"]), qk_norm=bool(vc["use_qk_norm"]),
            layer_scale=float(vc["layer_scale_init_value"]),
            image_mean=tuple(preprocessor.get("image_mean", IMAGENET_MEAN)),
            image_std=tuple(preprocessor.get("image_std", IMAGENET_STD)))
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot map the InternViT config to vlmkit: {e}") from None


def _max_tiles(preprocessor: dict, image_size: int, where: str) -> int:
    """Tiles per image of a GotOcr2 image processor config, or CheckpointError for one that tiles
    differently from data/images.py's ImageProcessor."""
    kind = preprocessor.get("image_processor_type", "GotOcr2ImageProcessor")
    size = preprocessor.get("size") or {"height": image_size, "width": image_size}
    reasons = []
    if not kind.startswith("GotOcr2ImageProcessor"):
        reasons.append(f"image processor {kind!r}: vlmkit tiles as GotOcr2ImageProcessor does")
    if (size.get("height"), size.get("width")) != (image_size, image_size):
        reasons.append(f"tiles of {size} differ from the tower's {image_size}x{image_size} images")
    if preprocessor.get("resample", BICUBIC) != BICUBIC:
        reasons.append(f"resample {preprocessor['resample']} is not bicubic ({BICUBIC})")
    if preprocessor.get("min_patches", 1) != 1:
        reasons.append(f"min_patches {preprocessor['min_patches']}: vlmkit tiles from one tile")
    if reasons:
        raise CheckpointError(f"{where}: " + "; ".join(reasons))
    return int(preprocessor.get("max_patches", DEFAULT_MAX_PATCHES))


def internvl_config(path: str | Path) -> VLMConfig:
    """VLMConfig of an InternVL directory: config.json, preprocessor_config.json (tiling,
    normalisation) and processor_config.json (visual tokens per tile, checked)."""
    path = Path(path)
    where = f"{path}/config.json"
    hf, _ = read_family_config(path, ARCHITECTURE_NAMES)
    preprocessor = read_preprocessor(path) or {}
    vision = _vision_config(hf, where, preprocessor)
    ratio = float(hf.get("downsample_ratio", DEFAULT_DOWNSAMPLE_RATIO))
    if not (1 / ratio).is_integer():
        raise CheckpointError(f"{where}: downsample_ratio {ratio} is not 1 / an integer (the pixel shuffle's factor)")
    adapter = AdapterConfig(kind="pixel_shuffle", scale_factor=int(1 / ratio), depth=2,
                            hidden_act=hf.get("projector_hidden_act", "gelu"))
    llm = llm_config_from_hf({**hf, "tie_word_embeddings": hf.get("tie_word_embeddings", TIED_BY_DEFAULT)},
                             where=f"{where} (text_config)")
    max_tiles = _max_tiles(preprocessor, vision.image_size, f"{path}/preprocessor_config.json")
    try:
        cfg = VLMConfig(vision=vision, adapter=adapter, llm=llm, image_token_id=int(hf["image_token_id"]),
                        max_tiles=max_tiles, use_thumbnail=True)
    except KeyError as e:
        raise CheckpointError(f"{where}: no {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    # the processor's <IMG_CONTEXT> tokens per tile
    check_tokens_per_tile(path, "image_seq_length", cfg.tokens_per_image, "patches per tile / downsample_ratio^-2")
    return cfg


# --- load ---------------------------------------------------------------------------------------------


def internvl_key_map(reverse: bool = False) -> KeyMap:
    """Normalised HF names (llava's LAYOUTS) -> VLMModel names of the vision tower and projector, or
    the other way with `reverse`."""
    out: KeyMap = []
    for hf_prefix, our_prefix, names in PARTS:
        src, dst = (our_prefix, hf_prefix) if reverse else (hf_prefix, our_prefix)
        out += prefixed(key_map(names, NAME_FIELDS, reverse=reverse), src, dst)
    return out


def load_internvl(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """An InternVL directory -> `model_cls` (VLMModel or a subclass) in fp32, eval mode."""
    path = Path(path)
    cfg = internvl_config(path)
    tensors = read_state_dict(path)
    normalised = renamed(tensors, LAYOUTS)
    for hf_name, ours in rename(normalised, internvl_key_map())[0].items():
        if ours in UNIT_DIMS:  # (1, 1, D) -> (D,), (1, P + 1, D) -> (P + 1, D)
            normalised[hf_name] = normalised[hf_name].flatten(0, UNIT_DIMS[ours])
    ignore = NOT_USED + decoder_ignore("language_model.", cfg.llm)
    model = model_cls.empty(cfg)
    key_map_ = internvl_key_map() + prefixed(HF_TO_OURS, "language_model.", "llm.")
    load_into(model, normalised, key_map_, source=str(path), ignore=ignore)
    return model.eval()


# --- export ------------------------------------------------------------------------------------------


def check_internvl_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why InternVLForConditionalGeneration cannot compute this model
    (nothing when it can)."""
    if cfg.is_native:
        raise ConfigError("cannot export to InternVL: the model has a native-resolution tower")
    v, adapter = cfg.vision, cfg.adapter
    reasons = []
    if v.style != "intern_vit":
        reasons.append(f"the vision tower is {v.style!r}; InternVL's is InternViT (vision.style 'intern_vit')")
    if v.layer_scale is None or v.positions != "learned" or v.mlp != "fc" or not v.linear_bias or v.patch_norm:
        reasons.append("InternViT always has layer scales, a learned position table, an fc1 / fc2 MLP, biases on "
                       "its output projection and MLP, and no patch norm")
    if adapter.kind != "pixel_shuffle" or adapter.depth != 2:
        reasons.append(f"the adapter is {adapter.kind!r} with {adapter.depth} layers; InternVL's projector is a "
                       "pixel shuffle, a LayerNorm and 2 linear layers (adapter.kind 'pixel_shuffle', depth 2)")
    if cfg.max_tiles > 1 and not cfg.use_thumbnail:
        reasons.append("transformers' InternVL image processor always adds a thumbnail to several tiles")
    reasons += decoder_export_reasons(cfg.llm)
    if reasons:
        raise ConfigError("cannot export to InternVL: " + "; ".join(reasons))


def internvl_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    """InternVL's config.json for `cfg` (check_internvl_exportable first)."""
    v = cfg.vision
    text = llm_config_to_hf(cfg.llm)
    text.pop("architectures")
    vision = {
        "model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size, "hidden_act": v.hidden_act,
        "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm, "norm_type": v.norm, "layer_norm_eps": v.layer_norm_eps,
        "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
        "num_channels": v.num_channels, "use_absolute_position_embeddings": True,
        "layer_scale_init_value": v.layer_scale, "use_mean_pooling": True,
    }
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vision_config": vision, "text_config": text,
        "image_token_id": cfg.image_token_id, "image_seq_length": cfg.tokens_per_image,
        "downsample_ratio": 1 / cfg.adapter.scale_factor, "projector_hidden_act": cfg.adapter.hidden_act,
        "vision_feature_layer": v.feature_layer, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


def internvl_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names (and shapes) transformers saves InternVL with."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith("llm.")}
    mapping, unmatched = rename(state, internvl_key_map(reverse=True))
    if unmatched:
        raise ConfigError(f"no InternVL name for {unmatched}")
    out = {hf: state[ours].reshape((1,) * UNIT_DIMS.get(ours, 0) + tuple(state[ours].shape))
           for ours, hf in mapping.items()}
    out.update({"language_model." + name: t for name, t in llm_state_dict_to_hf(model.llm).items()})
    return out


def image_processor_config(cfg: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json: GotOcr2's processor tiling as the model's ImageProcessor does."""
    v = cfg.vision
    return {"image_processor_type": "GotOcr2ImageProcessor", "do_resize": True,
            "size": {"height": v.image_size, "width": v.image_size}, "resample": BICUBIC, "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "do_convert_rgb": True, "crop_to_patches": True, "min_patches": 1,
            "max_patches": cfg.max_tiles}


def export_hf_internvl(model: VLMModel, out_dir: str | Path) -> Path:
    """Write `model` as a directory InternVLForConditionalGeneration loads: config.json,
    model.safetensors, preprocessor_config.json; with a tokenizer (which must be in the InternVL
    chat format), its files with the processor's special-token names, processor_config.json and
    chat_template.jinja, so that AutoProcessor reads the directory too."""
    cfg = model.config
    check_internvl_exportable(cfg)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.template != "internvl":
        raise ConfigError(f"cannot export to InternVL: the tokenizer's chat format is {tokenizer.template!r}; "
                          f"transformers' InternVL processor writes an image as {IMG_START}{IMG_CONTEXT}...{IMG_END}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, for_safetensors(internvl_state_dict(model)), internvl_hf_config(cfg))
    write_json(out / "preprocessor_config.json", image_processor_config(cfg))
    if tokenizer is not None:
        tokenizer.save(out)
        token_config = out / "tokenizer_config.json"
        settings = json.loads(token_config.read_text())
        write_json(token_config, {"extra_special_tokens": EXTRA_SPECIAL_TOKENS, **settings})
        write_json(out / PROCESSOR_FILE, {"processor_class": "InternVLProcessor",
                                         "image_seq_length": cfg.tokens_per_image})
        write_chat_template(out, tokenizer.chat_template)
    return out
