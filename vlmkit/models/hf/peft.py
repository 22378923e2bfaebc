"""The module names a LoRA adapter's files use: peft's, on the transformers model of the export.

peft saves an adapter by module name (`base_model.model.<module>.lora_A.weight`) and wraps, when
it loads one, the modules its `target_modules` name, both as the transformers model names its
modules at run time. Those run-time names are not the tensor names `save_pretrained` writes: a
llava-hf file holds `language_model.model.layers.0...` where the module is
`model.language_model.layers.0...`, and peft 0.21 loads an adapter under the file's names into
nothing (its keys are reported missing). So an adapter vlmkit saves names each layer as the
transformers model loaded from `VLM.export_hf` (the model's family, else llava-hf) names it:
vlmkit's name -> the export's tensor name by the export's own key maps (models/hf/llava.py,
models/hf/qwen_vl.py, models/hf/internvl.py, models/hf/idefics3.py, models/hf/onevision.py,
models/hf/deepseek_vl.py, and the tower and decoder maps they use) -> the module layout
transformers 5 runs (`model.language_model.`, `model.vision_tower.`, `model.multi_modal_projector.`,
`model.visual.`, DeepSeek-VL's `model.vision_model.` / `model.aligner.` / `model.high_res_vision_*`,
`lm_head.`).

A model the export cannot express (e.g. another adapter kind or an MoE decoder: the export's
`check_*_exportable` says why) has no transformers counterpart; its adapters keep vlmkit's own
names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vlmkit.errors import ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.common import KeyMap, prefixed, rename
from vlmkit.models.hf.deepseek_vl import SAVED_LAYOUT as DEEPSEEK_VL_LAYOUT
from vlmkit.models.hf.deepseek_vl import check_deepseek_vl_exportable, vision_key_maps
from vlmkit.models.hf.idefics3 import SAVED_LAYOUT, check_idefics3_exportable, idefics3_key_map
from vlmkit.models.hf.internvl import check_internvl_exportable, internvl_key_map
from vlmkit.models.hf.llava import PROJECTOR_EXPORT_KEYS, check_llava_exportable
from vlmkit.models.hf.llm import OURS_TO_HF
from vlmkit.models.hf.native_vision import NATIVE_VISION_EXPORT_KEYS
from vlmkit.models.hf.onevision import EXPORT_KEYS as ONEVISION_EXPORT_KEYS
from vlmkit.models.hf.onevision import check_onevision_exportable
from vlmkit.models.hf.qwen_vl import MODULE_LAYOUT, check_qwen_vl_exportable
from vlmkit.models.hf.vision import VISION_EXPORT_KEYS

PEFT_PREFIX = "base_model.model."
"""What peft puts before a module name in an adapter's tensor names (the PeftModel's own modules)."""

LLAVA_MODULE_LAYOUT: KeyMap = [
    (r"language_model\.model\.(.*)", r"model.language_model.\1"),
    (r"language_model\.(lm_head\..*)", r"\1"),
    (r"(vision_tower|multi_modal_projector)\.(.*)", r"model.\1.\2"),
]
"""llava-hf's file names -> transformers 5's module names: models/hf/llava.py's LAYOUTS read
backwards (tests/test_lora.py checks that the two agree)."""

ExportCheck = Callable[[VLMConfig], None]


def _export_names(cfg: VLMConfig) -> tuple[ExportCheck, KeyMap, KeyMap]:
    """What `VLM.export_hf` writes `cfg`'s model as: (its refusal check, vlmkit tensor names -> the
    export's names in the normalised file layout, that layout -> transformers' module names).
    The families are told apart as `VLM.export_hf` tells them; the key maps are the export's own,
    composed as llava_state_dict, qwen_vl_state_dict, internvl_state_dict, idefics3_state_dict,
    onevision_state_dict and deepseek_vl_state_dict compose them."""
    llm = prefixed(OURS_TO_HF, "llm.", "language_model.")
    if cfg.is_native:
        tower = prefixed(NATIVE_VISION_EXPORT_KEYS[cfg.native_vision.style], "vision.", "visual.")
        return check_qwen_vl_exportable, tower + llm, MODULE_LAYOUT
    if cfg.vision.style == "intern_vit":
        return check_internvl_exportable, internvl_key_map(reverse=True) + llm, LLAVA_MODULE_LAYOUT
    if cfg.tiling == "split":
        return check_idefics3_exportable, idefics3_key_map(reverse=True) + llm, SAVED_LAYOUT
    if cfg.tiling == "anyres":  # llava-hf's file layout, and so its module layout
        return check_onevision_exportable, ONEVISION_EXPORT_KEYS + llm, LLAVA_MODULE_LAYOUT
    if cfg.tiling == "pad":  # transformers runs DeepSeek-VL's modules under the names it saves
        _, vision_to_hf = vision_key_maps(cfg.is_hybrid)
        return check_deepseek_vl_exportable, vision_to_hf + llm, DEEPSEEK_VL_LAYOUT
    llava = (prefixed(VISION_EXPORT_KEYS, "vision.", "vision_tower.")
             + prefixed(PROJECTOR_EXPORT_KEYS, "adapter.", "multi_modal_projector.") + llm)
    return check_llava_exportable, llava, LLAVA_MODULE_LAYOUT


def exportable(cfg: VLMConfig) -> bool:
    """Whether `VLM.export_hf` can write this model (so its adapters get transformers' names)."""
    check, _, _ = _export_names(cfg)
    try:
        check(cfg)
    except ConfigError:
        return False
    return True


def transformers_module_names(cfg: VLMConfig, names: Iterable[str]) -> dict[str, str]:
    """vlmkit module names (`llm.layers.0.attn.q_proj`) of linear layers -> the names of the same
    modules in the transformers model of the export (`model.language_model.layers.0.self_attn.q_proj`).
    ConfigError naming the layers the export has no name for."""
    _, to_export, to_modules = _export_names(cfg)
    weights = {f"{name}.weight": name for name in names}
    exported, unnamed = rename(weights, to_export)
    if unnamed:
        raise ConfigError(f"the transformers export has no name for the linear layer(s) "
                          f"{[weights[w] for w in unnamed]}")
    modules, _ = rename(exported.values(), to_modules)  # each layout's patterns cover every export name
    return {weights[w]: modules[hf].removesuffix(".weight") for w, hf in exported.items()}


def adapter_module_names(cfg: VLMConfig, names: Iterable[str]) -> dict[str, str]:
    """vlmkit module names -> the names an adapter file gives those modules: transformers' (above)
    for a model the export can write, else vlmkit's own."""
    names = list(names)
    if exportable(cfg):
        return transformers_module_names(cfg, names)
    return {name: name for name in names}
