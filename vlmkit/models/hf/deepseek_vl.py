"""Load and export transformers' DeepSeek-VL checkpoints: `DeepseekVLForConditionalGeneration`
(DeepSeek-VL 1.3B: a SigLIP tower, the aligner, a Llama decoder) and
`DeepseekVLHybridForConditionalGeneration` (DeepSeek-VL 7B: a SAM tower on the high-resolution
image beside the SigLIP one, models/sam.py).

A directory becomes one `VLMModel`. DeepSeek-VL: the SigLIP tower as the `VisionEncoder` read after
its post-layernorm (`post_norm_features`: transformers takes its `last_hidden_state`), the aligner
(linear, GELU, linear) as the mlp adapter of depth 2. The hybrid: `VLMConfig.high_res_vision` (the
SAM tower) beside `vision`, its combination ending in its own aligner (models/sam.py's
`HybridVisionTower`, key maps in models/hf/sam.py). The decoder goes through models/hf/llm.py
(`text_config`, Llama by default). Images are prepared as the families' image processors do
(`VLMConfig.tiling == "pad"`, data/padded_images.py): resized whole, padded to a square of the
mean colour, for the hybrid at both resolutions; the chat format is the tokenizer's
(data/tokenizer.py, `template == "deepseek_vl"`).

Tensor names: transformers saves `model.vision_model.` (SigLIP's names), `model.aligner.`,
`model.high_res_vision_*` and the decoder as `model.language_model.` with `lm_head.`; the layout is
normalised to a causal LM's under `language_model.` (models/hf/llm.py's table) and back.

What vlmkit computes differently is refused with the reason: an image processor that does not
resize, pad, rescale by 1/255 and normalise, resamples with anything but bicubic, keeps another
minimum side, or makes tiles of another size than the towers'; a processor whose
`num_image_tokens` is not a tile's tokens. Export (`export_hf_deepseek_vl`) writes the class the
model's shape is, its image processor's and processor's configs and a DeepSeek-VL-format tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vlmkit.constants import DEEPSEEK_VL_IMAGE_TOKEN, RESCALE_FACTOR
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import AdapterConfig, VLMConfig
from vlmkit.models.hf.common import (BICUBIC, PROCESSOR_FILE, KeyMap, check_tokens_per_tile, config_family, key_map,
                                     load_into, prefixed, read_family_config, read_state_dict, rename, renamed,
                                     write_chat_template, write_json, write_weights)
from vlmkit.models.hf.llm import (HF_TO_OURS, decoder_export_reasons, decoder_ignore, llm_config_from_hf,
                                  llm_config_to_hf, llm_state_dict_to_hf)
from vlmkit.models.hf.sam import HYBRID_EXPORT_KEYS, HYBRID_KEYS, hybrid_vision_config_from_hf, sam_vision_config_to_hf
from vlmkit.models.hf.vision import (VISION_EXPORT_KEYS, VISION_IGNORE, VISION_KEYS, read_preprocessor,
                                     siglip_hf_config, vision_config_from_hf)
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors

ARCHITECTURE_NAMES = {"deepseek_vl": "DeepseekVLForConditionalGeneration",
                      "deepseek_vl_hybrid": "DeepseekVLHybridForConditionalGeneration"}
"""Family (config.json's model type) -> architecture name."""
IMAGE_PROCESSOR_CLASSES = {"deepseek_vl": "DeepseekVLImageProcessor",
                           "deepseek_vl_hybrid": "DeepseekVLHybridImageProcessor"}
PROCESSOR_CLASSES = {"deepseek_vl": "DeepseekVLProcessor", "deepseek_vl_hybrid": "DeepseekVLHybridProcessor"}

MIN_SIZE = 14
"""The image processors' `min_size`, which data/padded_images.py keeps (MIN_SIDE)."""
# The defaults of transformers' DeepseekVLConfig / DeepseekVLHybridConfig and their image
# processors, for keys a config.json or preprocessor_config.json leaves out.
TOP_HF_DEFAULTS = dict(image_token_id=100015, tie_word_embeddings=True)
TEXT_HF_DEFAULTS = dict(model_type="llama")
VISION_HF_DEFAULTS = dict(model_type="siglip_vision_model")
HIGH_RES_HF_DEFAULTS = dict(model_type="sam_vision_model")
OPENAI_CLIP = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
PREPROCESSOR_DEFAULTS = dict(size={"height": 384, "width": 384}, min_size=MIN_SIZE, resample=BICUBIC,
                             do_resize=True, do_pad=True, do_rescale=True, rescale_factor=RESCALE_FACTOR,
                             do_normalize=True, **OPENAI_CLIP, high_res_size={"height": 1024, "width": 1024},
                             high_res_resample=BICUBIC, high_res_image_mean=OPENAI_CLIP["image_mean"],
                             high_res_image_std=OPENAI_CLIP["image_std"])
DEFAULT_NUM_IMAGE_TOKENS = 576
"""The processors' default image tokens per image."""

TEXT_LAYOUT: KeyMap = [(r"model\.language_model\.(.*)", r"language_model.model.\1"),
                       (r"lm_head\.(.*)", r"language_model.lm_head.\1"), (r"model\.(.*)", r"\1"), (r"(.*)", r"\1")]
"""Saved names -> the decoder's as a causal LM's (models/hf/llm.py) under `language_model.`, the
vision parts without `model.` (transformers 4's layout, already so, stays)."""
SAVED_LAYOUT: KeyMap = [(r"language_model\.model\.(.*)", r"model.language_model.\1"),
                        (r"language_model\.(lm_head\..*)", r"\1"), (r"(.+)", r"model.\1")]  # .+: one match
"""TEXT_LAYOUT read backwards: the names transformers saves."""
ALIGNER_NAMES = [("aligner.linear{n}.{wb}", "adapter.mlp.linear_{n}.{wb}")]
ALIGNER_FIELDS = {"n": "[12]", "wb": "weight|bias"}
SIGLIP_HEAD = [r"vision_model\." + p for p in VISION_IGNORE["siglip"]]
"""SigLIP's pooling head, which feeds no visual token."""


def deepseek_vl_family(hf_config: dict, where: str) -> str | None:
    """"deepseek_vl" or "deepseek_vl_hybrid" for such a config.json (by its architecture, else its
    model type), None for any other model."""
    return config_family(hf_config, ARCHITECTURE_NAMES, where)


def vision_key_maps(hybrid: bool) -> tuple[KeyMap, KeyMap]:
    """(HF -> ours, ours -> HF) of the vision side, names as TEXT_LAYOUT leaves them."""
    if hybrid:
        return prefixed(HYBRID_KEYS, "", "vision."), prefixed(HYBRID_EXPORT_KEYS, "vision.", "")
    return ([*prefixed(VISION_KEYS, "vision_model.", "vision."), *key_map(ALIGNER_NAMES, ALIGNER_FIELDS)],
            [*prefixed(VISION_EXPORT_KEYS, "vision.", "vision_model."),
             *key_map(ALIGNER_NAMES, ALIGNER_FIELDS, reverse=True)])


# --- config -----------------------------------------------------------------------------------------


def _side(size: dict, name: str, reasons: list[str]) -> int | None:
    """A square {"height", "width"} size's side, else a reason."""
    if not isinstance(size, dict) or size.get("height") != size.get("width") or size.get("height") is None:
        reasons.append(f"{name} {size} is not a square; the towers take square images")
        return None
    return int(size["height"])


def _check_preprocessor(pre: dict, cfg: VLMConfig, family: str, where: str) -> None:
    """CheckpointError for an image processor config that prepares images otherwise than
    data/padded_images.py does for `cfg`."""
    kind = str(pre.get("image_processor_type", IMAGE_PROCESSOR_CLASSES[family]))
    reasons = []
    if not kind.startswith(IMAGE_PROCESSOR_CLASSES[family]):
        reasons.append(f"image processor {kind!r}: vlmkit prepares images as {IMAGE_PROCESSOR_CLASSES[family]}")
    if not all(pre[k] for k in ("do_resize", "do_pad", "do_rescale", "do_normalize")) or (
            pre["rescale_factor"] != RESCALE_FACTOR):
        reasons.append("vlmkit resizes, pads, rescales pixels by 1/255 and normalises them")
    if pre["min_size"] != MIN_SIZE:
        reasons.append(f"min_size {pre['min_size']}: vlmkit keeps sides of at least {MIN_SIZE} pixels")
    sizes = [("size", "resample", cfg.vision.image_size)]
    if cfg.is_hybrid:
        sizes.append(("high_res_size", "high_res_resample", cfg.high_res_vision.image_size))
    for size_key, resample_key, tower in sizes:
        if pre[resample_key] != BICUBIC:
            reasons.append(f"{resample_key} {pre[resample_key]} is not bicubic ({BICUBIC})")
        side = _side(pre[size_key], size_key, reasons)
        if side is not None and side != tower:
            reasons.append(f"{size_key} {pre[size_key]} differs from the tower's {tower}x{tower} images")
    if reasons:
        raise CheckpointError(f"{where}: " + "; ".join(reasons))


def deepseek_vl_config(path: str | Path) -> VLMConfig:
    """VLMConfig of a DeepSeek-VL (hybrid) directory: config.json, preprocessor_config.json (sizes,
    normalisation) and processor_config.json (image tokens per image, checked)."""
    path = Path(path)
    where = f"{path}/config.json"
    hf, family = read_family_config(path, ARCHITECTURE_NAMES)
    top = {**TOP_HF_DEFAULTS, **hf}
    pre = {**PREPROCESSOR_DEFAULTS, **(read_preprocessor(path) or {})}
    vision_hf = {**VISION_HF_DEFAULTS, **(hf.get("vision_config") or {})}
    text = {**TEXT_HF_DEFAULTS, **(hf.get("text_config") or {})}
    llm = llm_config_from_hf({"text_config": text, "tie_word_embeddings": top["tie_word_embeddings"]},
                             where=f"{where} (text_config)")
    high_res, adapter = None, AdapterConfig(kind="mlp", depth=2, hidden_act="gelu")
    if family == "deepseek_vl_hybrid":
        hybrid = hybrid_vision_config_from_hf(
            {**top, "vision_config": vision_hf, "text_config": text,
             "high_res_vision_config": {**HIGH_RES_HF_DEFAULTS, **(hf.get("high_res_vision_config") or {})}},
            where, pre)
        vision, high_res, adapter = hybrid.low_res, hybrid.high_res, None
    else:
        vision = vision_config_from_hf(vision_hf, where, preprocessor=pre)
    try:
        cfg = VLMConfig(vision=dataclasses.replace(vision, post_norm_features=True), adapter=adapter, llm=llm,
                        high_res_vision=high_res, image_token_id=int(top["image_token_id"]), tiling="pad",
                        hf_architecture=ARCHITECTURE_NAMES[family])
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    _check_preprocessor(pre, cfg, family, f"{path}/preprocessor_config.json")
    # the processor's image tokens per image
    check_tokens_per_tile(path, "num_image_tokens", cfg.tokens_per_image, "the SigLIP tower's patches")
    return cfg


# --- load ---------------------------------------------------------------------------------------------


def load_deepseek_vl(path: str | Path, model_cls: type[VLMModel] = VLMModel) -> VLMModel:
    """A DeepSeek-VL (hybrid) directory -> `model_cls` (VLMModel or a subclass) in fp32, eval mode."""
    path = Path(path)
    cfg = deepseek_vl_config(path)
    model = model_cls.empty(cfg)
    to_ours, _ = vision_key_maps(cfg.is_hybrid)
    ignore = decoder_ignore("language_model.", cfg.llm) + SIGLIP_HEAD
    load_into(model, renamed(read_state_dict(path), TEXT_LAYOUT),
              to_ours + prefixed(HF_TO_OURS, "language_model.", "llm."), source=str(path), ignore=ignore)
    return model.eval()


# --- export ------------------------------------------------------------------------------------------


def check_deepseek_vl_exportable(cfg: VLMConfig) -> None:
    """Raise ConfigError saying why DeepseekVLForConditionalGeneration (or its hybrid) cannot compute
    this model (nothing when it can)."""
    if cfg.is_native:
        raise ConfigError("cannot export to DeepSeek-VL: the model has a native-resolution tower")
    v, reasons = cfg.vision, []
    siglip = ("siglip", "learned", True, "layer_norm", "fc", True, True, False, False, None)
    if (v.style, v.positions, v.post_norm_features, v.norm, v.mlp, v.linear_bias, v.qkv_bias, v.patch_norm,
            v.qk_norm, v.layer_scale) != siglip:
        reasons.append("DeepSeek-VL's tower is SigLIP's (LayerNorms, biases, an fc1 / fc2 MLP, a learned position "
                       "table) read after its post-layernorm (vision.post_norm_features)")
    adapter = cfg.adapter
    aligner = ("mlp", 2, "gelu", True)
    if not cfg.is_hybrid and (adapter.kind, adapter.depth, adapter.hidden_act, adapter.bias) != aligner:
        reasons.append(f"the adapter is {adapter.kind!r} with {adapter.depth} layer(s); DeepSeek-VL's aligner is "
                       "linear, GELU, linear with biases (adapter.kind 'mlp', depth 2, hidden_act 'gelu')")
    if cfg.tiling != "pad":
        reasons.append("DeepSeek-VL's image processor pads each image to one square tile (tiling 'pad')")
    reasons += decoder_export_reasons(cfg.llm)
    if reasons:
        raise ConfigError("cannot export to DeepSeek-VL: " + "; ".join(reasons))


def _family(cfg: VLMConfig) -> str:
    return "deepseek_vl_hybrid" if cfg.is_hybrid else "deepseek_vl"


def deepseek_vl_hf_config(cfg: VLMConfig) -> dict[str, Any]:
    """The family's config.json for `cfg` (check_deepseek_vl_exportable first)."""
    family = _family(cfg)
    text = llm_config_to_hf(cfg.llm)
    text.pop("architectures")
    out = {"architectures": [ARCHITECTURE_NAMES[family]], "model_type": family,
           "vision_config": siglip_hf_config(cfg.vision), "text_config": text,
           "image_token_id": cfg.image_token_id, "tie_word_embeddings": cfg.llm.tie_embeddings}
    if cfg.is_hybrid:
        out["high_res_vision_config"] = sam_vision_config_to_hf(cfg.high_res_vision)
    return out


def deepseek_vl_state_dict(model: VLMModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names transformers saves the family with."""
    state = {name: t for name, t in model.state_dict().items() if not name.startswith("llm.")}
    mapping, unmatched = rename(state, vision_key_maps(model.config.is_hybrid)[1])
    if unmatched:
        raise ConfigError(f"no DeepSeek-VL name for {unmatched}")
    out = {hf: state[ours] for ours, hf in mapping.items()}
    out.update({"language_model." + name: t for name, t in llm_state_dict_to_hf(model.llm).items()})
    return renamed(out, SAVED_LAYOUT)


def image_processor_config(cfg: VLMConfig) -> dict[str, Any]:
    """preprocessor_config.json: the family's image processor, preparing images as
    data/padded_images.py does."""
    v = cfg.vision
    out = {"image_processor_type": IMAGE_PROCESSOR_CLASSES[_family(cfg)], "do_convert_rgb": True,
           "do_resize": True, "size": {"height": v.image_size, "width": v.image_size}, "min_size": MIN_SIZE,
           "resample": BICUBIC, "do_pad": True, "do_rescale": True, "rescale_factor": RESCALE_FACTOR,
           "do_normalize": True, "image_mean": list(v.image_mean), "image_std": list(v.image_std)}
    if cfg.is_hybrid:
        h = cfg.high_res_vision
        out.update(high_res_size={"height": h.image_size, "width": h.image_size}, high_res_resample=BICUBIC,
                   high_res_image_mean=list(h.image_mean), high_res_image_std=list(h.image_std))
    return out


def export_hf_deepseek_vl(model: VLMModel, out_dir: str | Path) -> Path:
    """Write `model` as a directory DeepseekVLForConditionalGeneration (a hybrid model:
    DeepseekVLHybridForConditionalGeneration) loads: config.json, model.safetensors,
    preprocessor_config.json; with a tokenizer (which must be in the DeepSeek-VL chat format), its
    files with the processor's image token, processor_config.json and chat_template.jinja, so that
    the family's processor reads the directory too."""
    cfg = model.config
    check_deepseek_vl_exportable(cfg)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.template != "deepseek_vl":
        raise ConfigError(f"cannot export to DeepSeek-VL: the tokenizer's chat format is {tokenizer.template!r}; "
                          f"transformers' DeepSeek-VL processor writes an image as {DEEPSEEK_VL_IMAGE_TOKEN} tokens "
                          "in `User: ...` turns")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out, for_safetensors(deepseek_vl_state_dict(model)), deepseek_vl_hf_config(cfg))
    write_json(out / "preprocessor_config.json", image_processor_config(cfg))
    if tokenizer is not None:
        tokenizer.save(out)
        token_config = out / "tokenizer_config.json"
        settings = json.loads(token_config.read_text())
        write_json(token_config, {"extra_special_tokens": {"image_token": DEEPSEEK_VL_IMAGE_TOKEN}, **settings})
        write_json(out / PROCESSOR_FILE, {"processor_class": PROCESSOR_CLASSES[_family(cfg)],
                                         "num_image_tokens": cfg.tokens_per_image})
        write_chat_template(out, tokenizer.chat_template)
    return out
