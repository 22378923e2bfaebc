"""Load and export transformers' Idefics3 and SmolVLM checkpoints (`Idefics3ForConditionalGeneration`:
Idefics3-8B; `SmolVLMForConditionalGeneration`: SmolVLM, SmolVLM2), two classes that compute alike.

A directory becomes one `VLMModel`: the SigLIP tower as the `VisionEncoder` (style siglip, its
features taken after the post-layernorm, its position table read NaViT's way: `post_norm_features`,
`positions="bucketed"`), the connector as the pixel_shuffle adapter (`scale_factor`; no LayerNorm,
one linear layer without bias, `modality_projection.proj`; the shuffle's channel order is the
adapter's) and the decoder through models/hf/llm.py (`text_config`: Llama, or the Qwen families
it names). Images are split as transformers' Idefics3 / SmolVLM image processors split them
(`VLMConfig.tiling == "split"`, data/split_images.py): tiles of `max_image_size.longest_edge`
(the tower's image size) after the longer side is resized to `size.longest_edge`, a whole number
of tiles (`max_tiles` is its square); the chat format is the tokenizer's (data/tokenizer.py,
`template == "idefics3"`).

Tensor names: `model.vision_model.` (SigLIP's names, models/hf/vision.py's tables),
`model.connector.modality_projection.proj.weight`, and the decoder's as a causal LM's
(models/hf/llm.py's table) with `model.text_model.` for its `model.`; one table per part, read
both ways.

What vlmkit computes differently is refused with the reason: a processor that does not split
images (`do_image_splitting: false` resizes them to one tile through another size), resamples with
anything but LANCZOS, has tiles of another size than the tower's or a longest edge that is not a
whole number of tiles, or whose `image_seq_len` is not a tile's tokens. A tile size that is not a
multiple of the patch size (SmolVLM-Instruct's 384 / 14) loads: the tower's patch conv drops the part
patch, as the reference's does. Export (`export_hf_idefics3`)
writes the layout transformers saves, as the architecture the model was imported as
(`VLMConfig.hf_architecture`, else Idefics3), with its image processor's and processor's configs
and an Idefics3-format tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, RESCALE_FACTOR
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import AdapterConfig, VisionConfig, VLMConfig
from vlmkit.models.hf.common import (PROCESSOR_FILE, KeyMap, check_tokens_per_tile, config_family, key_map, load_into,
                                     prefixed, read_family_config, read_state_dict, rename, renamed,
                                     write_chat_template, write_json, write_weights)
from vlmkit.models.hf.llm import (HF_TO_OURS, decoder_export_reasons, decoder_ignore, llm_config_from_hf,
                                  llm_config_to_hf, llm_state_dict_to_hf)
from vlmkit.models.hf.vision import VISION_EXPORT_KEYS, VISION_KEYS, read_preprocessor, vision_tower_hf_config
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors

ARCHITECTURE_NAMES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
"""Family (config.json's model type) -> architecture name."""
IMAGE_PROCESSOR_CLASSES = {"idefics3": "Idefics3ImageProcessor", "smolvlm": "SmolVLMImageProcessor"}
PROCESSOR_CLASSES = {"idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}

LANCZOS = 1
"""PIL's LANCZOS filter: the image processors' resample, and data/split_images.py's."""

# The defaults of transformers' Idefics3Config / SmolVLMConfig (alike), for keys a config.json
# leaves out: the top level, the vision tower, the decoder (a Llama with its own RMSNorm epsilon).
TOP_HF_DEFAULTS = dict(image_token_id=128257, scale_factor=2, tie_word_embeddings=False)
VISION_HF_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                          num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6)
TEXT_HF_DEFAULTS = dict(model_type="llama", rms_norm_eps=1e-5)
# The defaults of the image processors (alike), for keys preprocessor_config.json leaves out.
PREPROCESSOR_DEFAULTS = dict(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364},
                             resample=LANCZOS, do_image_splitting=True, do_resize=True, do_rescale=True,
                             rescale_factor=RESCALE_FACTOR, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5])

TEXT_LAYOUT: KeyMap = [(r"model\.text_model\.(.*)", r"language_model.model.\1"),
                       (r"lm_head\.(.*)", r"language_model.lm_head.\1"), (r"(.*)", r"\1")]
"""Saved names -> the decoder's as a causal LM's (models/hf/llm.py) under `language_model.`; the
tower's and connector's stay."""
SAVED_LAYOUT: KeyMap = [(r"language_model\.model\.(.*)", r"model.text_model.\1"),
                        (r"language_model\.(lm_head\..*)", r"\1"), (r"(.*)", r"\1")]
"""TEXT_LAYOUT read backwards: the names transformers saves, which are also its module names."""
CONNECTOR_NAMES = [("modality_projection.proj.weight", "mlp.linear_1.weight")]
PARTS = [("model.vision_model.", "vision.", VISION_KEYS, VISION_EXPORT_KEYS),
         ("model.connector.", "adapter.", key_map(CONNECTOR_NAMES, {}), key_map(CONNECTOR_NAMES, {}, reverse=True))]
"""(HF prefix, our prefix, key map HF -> ours, key map ours -> HF) of the tower and the connector."""


def idefics3_family(hf_config: dict, where: str) -> str | None:
    """"idefics3" or "smolvlm" for such a config.json (by its architecture, else its model type),
    None for any other model."""
    return config_family(hf_config, ARCHITECTURE_NAMES, where)


# --- config -----------------------------------------------------------------------------------------


def _vision_config(vc: dict, where: str, preprocessor: dict) -> VisionConfig:
    try:
        return VisionConfig(
            style="siglip", image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
            num_channels=int(vc["num_channels"]), hidden_size=int(vc["hidden_size"]),
            intermediate_size=int(vc["intermediate_size"]), num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]), hidden_act=str(vc["hidden_act"]),
            layer_norm_eps=float(vc["layer_norm_eps"]), feature_layer=-1, post_norm_features=True,
            positions="bucketed", image_mean=tuple(preprocessor["image_mean"]),
            image_std=tuple(preprocessor["image_std"]))
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{where}: cannot map the vision config to vlmkit: {e}") from None


def _tiles_per_side(preprocessor: dict, image_size: int, where: str) -> int:
    """How many tiles an image's longer side spans in an image processor config, or CheckpointError
    for one that splits differently from data/split_images.py."""
    kind = str(preprocessor.get("image_processor_type", IMAGE_PROCESSOR_CLASSES["idefics3"]))
    tile = preprocessor["max_image_size"].get("longest_edge")
    longest = preprocessor["size"].get("longest_edge")
    reasons = []
    if not kind.startswith(tuple(IMAGE_PROCESSOR_CLASSES.values())):
        reasons.append(f"image processor {kind!r}: vlmkit splits images as {sorted(IMAGE_PROCESSOR_CLASSES.values())}")
    if not (preprocessor["do_image_splitting"] and preprocessor["do_resize"]):
        reasons.append("do_image_splitting / do_resize false: vlmkit splits images into tiles and the whole image")
    if not (preprocessor["do_rescale"] and preprocessor["do_normalize"]) or (
            preprocessor["rescale_factor"] != RESCALE_FACTOR):
        reasons.append("vlmkit rescales pixels by 1/255 and normalises them")
    if preprocessor["resample"] != LANCZOS:
        reasons.append(f"resample {preprocessor['resample']} is not LANCZOS ({LANCZOS})")
    if tile != image_size:
        reasons.append(f"max_image_size {preprocessor['max_image_size']}: tiles differ from the tower's "
                       f"{image_size}x{image_size} images")
    elif not isinstance(longest, int) or longest % tile or longest < tile:
        reasons.append(f"size {preprocessor['size']}: the longest edge is not a whole number of {tile}-pixel tiles")
    if reasons:
        raise CheckpointError(f"{where}: " + "; ".join(reasons))
    return longest // tile


def idefics3_config(path: str | Path) -> VLMConfig:
    """VLMConfig of an Idefics3 / SmolVLM directory: config.json, preprocessor_config.json (tiles,
    normalisation) and processor_config.json (visual tokens per tile, checked)."""
    path = Path(path)
    where = f"{path}/config.json"
    hf, family = read_family_config(path, ARCHITECTURE_NAMES)
    top = {**TOP_HF_DEFAULTS, **hf}
    preprocessor = {**PREPROCESSOR_DEFAULTS, **(read_preprocessor(path) or {})}
    vision = _vision_config({**VISION_HF_DEFAULTS, **(hf.get("vision_config") or {})}, where, preprocessor)
    text = {**TEXT_HF_DEFAULTS, **(hf.get("text_config") or {})}
    llm = llm_config_from_hf({"text_config": text, "tie_word_embeddings": top["tie_word_embeddings"]},
                             where=f"{where} (text_config)")
    per_side = _tiles_per_side(preprocessor, vision.image_size, f"{path}/preprocessor_config.json")
    adapter = AdapterConfig(kind="pixel_shuffle", scale_factor=int(top["scale_factor"]), depth=1, norm=False,
                            bias=False)
    try:
        cfg = VLMConfig(vision=vision, adapter=adapter, llm=llm, image_token_id=int(top["image_token_id"]),
                        max_tiles=per_side ** 2, use_thumbnail=True, tiling="split",
                        hf_architecture=ARCHITECTURE_NAMES[family])
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    # the processor's <image> tokens per tile
    check_tokens_per_tile(path, "image_seq_len", cfg.tokens_per_image, "patches per tile / scale_factor^2")
    return cfg


# --- load ---------------------------------------------------------------------------------------------


def idefics3_key_map(reverse: bool = False) -> KeyMap:
    """HF names of the tower and connector -> VLMModel names, or the other way with `reverse`."""
    out: KeyMap = []
    for hf_prefix, our_prefix, to_ours, to_hf in PARTS:
        out += prefixed(to_hf, our_prefix, hf_prefix) if reverse else prefixed(to_ours, hf_prefix, our_prefix)
    return out


def load_idefics3(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """An Idefics3 / SmolVLM directory -> `model_cls` (VLMModel or a subclass) in fp32, eval mode."""
    path = Path(path)
    cfg = idefics3_config(path)
    tensors = read_state_dict(path)
    model = model_cls.empty(cfg)
    key_map_ = idefics3_key_map() + prefixed(HF_TO_OURS, "language_model.", "llm.")
    load_into(model, renamed(tensors, TEXT_LAYOUT), key_map_, source=str(path),
              ignore=decoder_ignore("language_model.", cfg.llm))
    return model.eval()


# --- export ------------------------------------------------------------------------------------------


def _family(cfg: VLMConfig) -> str:
    """The family an export writes: the one imported, else Idefics3."""
    return next((family for family, name in ARCHITECTURE_NAMES.items() if name == cfg.hf_architecture), "idefics3")


def check_idefics3_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration
    cannot compute this model (nothing when it can)."""
    if cfg.is_native:
        raise ConfigError("cannot export to Idefics3: the model has a native-resolution tower")
    v, adapter = cfg.vision, cfg.adapter
    reasons = []
    siglip = ("siglip", "bucketed", True, "layer_norm", "fc", True, True, False, False, None)
    if (v.style, v.positions, v.post_norm_features, v.norm, v.mlp, v.linear_bias, v.qkv_bias, v.patch_norm,
            v.qk_norm, v.layer_scale) != siglip:
        reasons.append("Idefics3's tower is SigLIP's (LayerNorms, biases, an fc1 / fc2 MLP) with bucketed positions, "
                       "read after its post-layernorm (vision.positions 'bucketed', post_norm_features)")
    if (adapter.kind, adapter.depth, adapter.norm, adapter.bias) != ("pixel_shuffle", 1, False, False):
        reasons.append(f"the adapter is {adapter.kind!r} with {adapter.depth} layer(s); Idefics3's connector is a "
                       "pixel shuffle and one linear layer, without LayerNorm or bias (adapter.kind 'pixel_shuffle', "
                       "depth 1, norm and bias false)")
    if cfg.tiling != "split":
        reasons.append("Idefics3's image processor splits images into tiles and the whole image (tiling 'split')")
    reasons += decoder_export_reasons(cfg.llm)
    if reasons:
        raise ConfigError("cannot export to Idefics3: " + "; ".join(reasons))


def idefics3_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    """Idefics3's (or SmolVLM's) config.json for `cfg` (check_idefics3_exportable first)."""
    family = _family(cfg)
    text = llm_config_to_hf(cfg.llm)
    text.pop("architectures")
    return {"architectures": [ARCHITECTURE_NAMES[family]], "model_type": family,
            "vision_config": vision_tower_hf_config(cfg.vision, f"{family}_vision"),
            "text_config": text, "image_token_id": cfg.image_token_id, "scale_factor": cfg.adapter.scale_factor,
            "tie_word_embeddings": cfg.llm.tie_embeddings}


def idefics3_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers saves Idefics3 and SmolVLM with."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith("llm.")}
    mapping, unmatched = rename(state, idefics3_key_map(reverse=True))
    if unmatched:
        raise ConfigError(f"no Idefics3 name for {unmatched}")
    out = {hf: state[ours] for ours, hf in mapping.items()}
    out.update({"language_model." + name: t for name, t in llm_state_dict_to_hf(model.llm).items()})
    return renamed(out, SAVED_LAYOUT)


def image_processor_config(cfg: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json: the family's image processor splitting as data/split_images.py does."""
    v = cfg.vision
    return {"image_processor_type": IMAGE_PROCESSOR_CLASSES[_family(cfg)], "do_convert_rgb": True, "do_resize": True,
            "size": {"longest_edge": cfg.tiles_per_side * v.image_size}, "resample": LANCZOS, "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "do_pad": True, "do_image_splitting": True,
            "max_image_size": {"longest_edge": v.image_size}}


def export_hf_idefics3(model: VLMModel, out_dir: str | Path) -> Path:
    """Write `model` as a directory Idefics3ForConditionalGeneration (or SmolVLM's class, as
    imported) loads: config.json, model.safetensors, preprocessor_config.json; with a tokenizer
    (which must be in the Idefics3 chat format), its files, processor_config.json and
    chat_template.jinja, so that the family's processor reads the directory too."""
    cfg = model.config
    check_idefics3_exportable(cfg)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.template != "idefics3":
        raise ConfigError(f"cannot export to Idefics3: the tokenizer's chat format is {tokenizer.template!r}; "
                          f"transformers' Idefics3 processor writes an image as {FAKE_IMAGE_TOKEN} + tile names "
                          f"+ {IMAGE_TOKEN} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, for_safetensors(idefics3_state_dict(model)), idefics3_hf_config(cfg))
    write_json(out / "preprocessor_config.json", image_processor_config(cfg))
    if tokenizer is not None:
        tokenizer.save(out)
        write_json(out / PROCESSOR_FILE, {"processor_class": PROCESSOR_CLASSES[_family(cfg)],
                                         "image_seq_len": cfg.tokens_per_image})
        write_chat_template(out, tokenizer.chat_template)
    return out
