"""Load HF decoder checkpoints (Llama / SmolLM2, Mistral, Qwen2, Qwen3) into `LLM`, and export back.

`llm_config_from_hf` reads a transformers config.json (4.x keeps `rope_theta` at the top level,
5.x writes it under `rope_parameters`; a multimodal model's decoder config nested under
`text_config`, with multimodal RoPE's `mrope_section`) and refuses what `LLM` would compute
differently: RoPE scaling, biased output projections, MLP bias, non-silu activations. `load_llm`
builds the model on
the meta device, allocates it without initialising, checks every tensor against the key map
(common.load_into: missing, unexpected and mis-shaped tensors are all reported together) and only
then copies the weights, so a failed load leaves nothing half-loaded. The key maps are data, one
table per direction, shared by the four families because they name their tensors alike
(transformers' modeling_llama.py and its copies).

Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is not implemented: such a
checkpoint loads, with a warning, and matches the reference for sequences up to the window length;
longer sequences attend to the whole prefix where the reference would not.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import LLMConfig
from vlmkit.models.hf.common import KeyMap, architecture, key_map, load_into, read_config, read_state_dict, rename
from vlmkit.models.llm import LLM
from vlmkit.models.weights import uninitialised

# architectures / model_type -> family. The four share tensor names; they differ in config only.
FAMILIES = {
    "LlamaForCausalLM": "llama", "llama": "llama",
    "MistralForCausalLM": "mistral", "mistral": "mistral",
    "Qwen2ForCausalLM": "qwen2", "qwen2": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "qwen3": "qwen3",
    # the decoders of the native-resolution VLMs (their `text_config` model types)
    "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3",
}

DEFAULT_ROPE_TYPES = ("default", "mrope")
"""RoPE types computed as plain rotary embeddings (4.x configs of Qwen2-VL name M-RoPE "mrope")."""

# One table of (HF name, our name) templates; both key maps are generated from it. A `{field}`
# stands for the regex in NAME_FIELDS and is carried across by name.
NAMES = [
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.layers.{i}.self_attn.{qkvo}_proj.{wb}", "layers.{i}.attn.{qkvo}_proj.{wb}"),
    ("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),
    ("model.layers.{i}.mlp.{ffn}_proj.weight", "layers.{i}.mlp.{ffn}_proj.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
NAME_FIELDS = {"i": r"\d+", "qkvo": "[qkvo]", "qk": "[qk]", "wb": "weight|bias", "ffn": "gate|up|down"}
IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"]


HF_TO_OURS: KeyMap = key_map(NAMES, NAME_FIELDS)
OURS_TO_HF: KeyMap = key_map(NAMES, NAME_FIELDS, reverse=True)


def _rope_parameters(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The RoPE settings of a 4.x (top level, rope_scaling) or 5.x (rope_parameters) config, as one
    mapping with `rope_theta`; rejects scaling."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):  # per-layer-type form
        params = params["full_attention"]
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in DEFAULT_ROPE_TYPES:
        raise CheckpointError(f"{where}: RoPE scaling {rope_type!r} is not supported (only the default rotary "
                              "embedding); the logits would differ from the reference")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return {**scaling, **params, "rope_theta": float(theta) if theta is not None else 10000.0}


def decoder_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a config: a multimodal model's `text_config` (with the top level's
    `tie_word_embeddings`, where transformers 5 keeps it), else the config itself."""
    text = hf_config.get("text_config")
    if text is None:
        return hf_config
    if "tie_word_embeddings" in hf_config:
        text = {**text, "tie_word_embeddings": hf_config["tie_word_embeddings"]}
    return text


def llm_config_from_hf(hf_config: dict[str, Any], where: str = "config") -> LLMConfig:
    """Translate a transformers config dict of a supported family into an LLMConfig; a multimodal
    config's decoder is read from its `text_config`. `where` names the source in error messages
    (load_llm passes the directory)."""
    hf_config = decoder_config(hf_config)
    arch = architecture(hf_config, where)
    family = FAMILIES.get(arch)
    if family is None:
        raise CheckpointError(f"{where}: architecture {arch!r} is not supported; vlmkit loads "
                              f"{sorted(k for k in FAMILIES if k[0].isupper())}")
    get = hf_config.get
    act = get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias=true is not supported")
    # Qwen2 always biases q/k/v and never o; Llama / Mistral / Qwen3 `attention_bias` biases all four.
    if family != "qwen2" and get("attention_bias"):
        raise CheckpointError(f"{where}: attention_bias=true (a bias on o_proj) is not supported")
    window = get("sliding_window") if (family == "mistral" or get("use_sliding_window")) else None
    if window is not None and window < get("max_position_embeddings", 0):
        warnings.warn(f"{where}: sliding-window attention (window {window}) is not implemented; results match "
                      f"the reference only for sequences of at most {window} tokens", stacklevel=2)
    heads = get("num_attention_heads")
    rope = _rope_parameters(hf_config, where)
    try:
        return LLMConfig(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or None,
            rope_theta=rope["rope_theta"],
            mrope_section=list(rope["mrope_section"]) if rope.get("mrope_section") else None,
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings", 4096),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            initializer_range=get("initializer_range", 0.02),
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build an LLM config: {e}") from None


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32) -> LLM:
    """A HF decoder directory (config.json + safetensors, single or sharded) -> LLM in eval mode."""
    path = Path(path)
    cfg = llm_config_from_hf(read_config(path), where=str(path))
    tensors = read_state_dict(path)
    model = uninitialised(lambda: LLM(cfg)).to(dtype)
    load_into(model, tensors, HF_TO_OURS, source=str(path), ignore=decoder_ignore("", cfg))
    return model.eval()


def llm_state_dict_to_hf(llm: LLM) -> dict[str, torch.Tensor]:
    """Our state dict under HF Llama / Qwen2 / Qwen3 names (tied models carry no lm_head)."""
    if llm.config.moe is not None:
        raise ConfigError("an MoE LLM has no Llama-family HF layout to export to")
    state = llm.state_dict()
    mapping, unmatched = rename(state, OURS_TO_HF)
    if unmatched:
        raise ConfigError(f"no HF name for parameter(s) {unmatched}")
    return {hf: state[ours] for ours, hf in mapping.items()}


def decoder_ignore(prefix: str, cfg: LLMConfig) -> list[str]:
    """Patterns of the stored decoder tensors a load skips, under `prefix`: rotary buffers, and the
    lm_head of a tied model (transformers ties it to the embeddings and ignores a stored copy)."""
    tied = [r"lm_head\.weight"] if cfg.tie_embeddings else []
    return [re.escape(prefix) + p for p in IGNORED + tied]


def decoder_export_reasons(cfg: LLMConfig) -> list[str]:
    """Why a VLM's decoder has no Llama-family HF config (nothing when it has one)."""
    if cfg.moe is not None:
        return ["the LLM has MoE layers; vlmkit exports dense Llama-family decoders"]
    try:
        llm_config_to_hf(cfg)
    except ConfigError as e:
        return [str(e)]
    return []


def llm_config_to_hf(cfg: LLMConfig) -> dict[str, Any]:
    """An HF config dict for our config: Qwen3 with qk-norm, Qwen2 with qkv bias, Llama otherwise."""
    if cfg.moe is not None:
        raise ConfigError("an MoE LLM has no Llama-family HF config to export to")
    if cfg.qk_norm and cfg.qkv_bias:
        raise ConfigError("qk_norm together with qkv_bias matches no HF family (Qwen3 has no q/k/v-only bias)")
    arch, model_type = (("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama"))
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
    }
