"""Load HF decoder checkpoints (Llama / SmolLM2, Mistral, Qwen2, Qwen3, Qwen3-MoE) into `LLM`, and export back.

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

MoE decoders (Qwen3-MoE, and Qwen3-VL-MoE's text model) route by softmax top-k without shared
experts, which is models/moe.py's `MoE` with `score_func="softmax"`, `num_shared_experts=0` and no
selection bias. vlmkit keeps one `SwiGLU` per expert (its decode path, LoRA and FSDP2 all work on
those per-expert linears), so the loaders meet experts in two layouts: one tensor per expert and
projection (`mlp.experts.{e}.gate_proj.weight`, what transformers writes for Qwen3-MoE) is a plain
renaming; experts fused in 3-D tensors (`mlp.experts.gate_up_proj` (E, 2I, D) and
`mlp.experts.down_proj` (E, D, I) as transformers 5 holds them, Qwen3-VL-MoE's layout; the released
files store both transposed) are split first (`moe_tensors_from_hf`) and fused again on export
(`fused_experts`). A transformers router has no selection bias: the load fills vlmkit's
`score_bias` with zeros, and an export refuses a model whose bias moved off zero. Dense layers must
be a leading range (`MoEConfig.first_dense_layers`); other `mlp_only_layers` / `decoder_sparse_step`
patterns are refused by name.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import LLMConfig, MoEConfig
from vlmkit.models.hf.common import KeyMap, architecture, key_map, load_into, read_config, read_state_dict, rename
from vlmkit.models.llm import LLM
from vlmkit.models.weights import uninitialised

# architectures / model_type -> family. The four share tensor names; they differ in config only.
FAMILIES = {
    "LlamaForCausalLM": "llama", "llama": "llama",
    "MistralForCausalLM": "mistral", "mistral": "mistral",
    "Qwen2ForCausalLM": "qwen2", "qwen2": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "qwen3": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe", "qwen3_moe": "qwen3_moe",
    # the decoders of the native-resolution VLMs (their `text_config` model types)
    "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3",
    "qwen3_vl_moe_text": "qwen3_moe",
}
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
ALWAYS_RENORMALISED = ("qwen3_vl_moe_text",)
"""Decoders whose router renormalises the top-k weights whatever `norm_topk_prob` says (transformers'
Qwen3-VL-MoE router has no such switch)."""

DEFAULT_ROPE_TYPES = ("default", "mrope")
"""RoPE types computed as plain rotary embeddings (4.x configs of Qwen2-VL name M-RoPE "mrope")."""

# One table of (HF name, our name) templates; both key maps are generated from it. A `{field}`
# stands for the regex in NAME_FIELDS and is carried across by name.
NAMES = [
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.layers.{i}.self_attn.{qkvo}_proj.{wb}", "layers.{i}.attn.{qkvo}_proj.{wb}"),
    ("model.layers.{i}.self_attn.{qk}_norm.weight", "layers.{i}.attn.{qk}_norm.weight"),
    ("model.layers.{i}.mlp.{ffn}_proj.weight", "layers.{i}.mlp.{ffn}_proj.weight"),
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight"),
    # the selection bias under DeepSeek-V3's name; for Qwen's bias-free routers `moe_tensors_from_hf` adds zeros
    ("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers.{i}.mlp.router.score_bias"),
    ("model.layers.{i}.mlp.experts.{e}.{ffn}_proj.weight", "layers.{i}.mlp.experts.{e}.{ffn}_proj.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
NAME_FIELDS = {"i": r"\d+", "e": r"\d+", "qkvo": "[qkvo]", "qk": "[qk]", "wb": "weight|bias", "ffn": "gate|up|down"}
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
            qk_norm=family in QK_NORM_FAMILIES,
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            initializer_range=get("initializer_range", 0.02),
            moe=moe_config_from_hf(hf_config, arch, where) if family == "qwen3_moe" else None,
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build an LLM config: {e}") from None


def sparse_layers(hf_config: dict[str, Any]) -> list[int]:
    """The layers transformers' Qwen3-MoE decoders give experts: those not in `mlp_only_layers`
    whose number (from 1) is a multiple of `decoder_sparse_step`."""
    get = hf_config.get
    dense, step = set(get("mlp_only_layers") or ()), get("decoder_sparse_step", 1)
    if not get("num_experts", get("num_local_experts", 0)):
        return []
    return [i for i in range(get("num_hidden_layers")) if i not in dense and (i + 1) % step == 0]


def moe_config_from_hf(hf_config: dict[str, Any], arch: str, where: str) -> MoEConfig | None:
    """The MoEConfig of a Qwen3-MoE / Qwen3-VL-MoE decoder config (None when no layer has experts):
    softmax routing, no shared experts, no selection bias; the balance loss transformers adds when
    `output_router_logits` is set. CheckpointError when the dense layers are not a leading range."""
    get = hf_config.get
    sparse = sparse_layers(hf_config)
    if not sparse:
        return None
    first_sparse = sparse[0]
    if sparse != list(range(first_sparse, get("num_hidden_layers"))):
        dense = sorted(set(range(get("num_hidden_layers"))) - set(sparse))
        raise CheckpointError(
            f"{where}: dense layers {dense} (mlp_only_layers {get('mlp_only_layers') or []}, decoder_sparse_step "
            f"{get('decoder_sparse_step', 1)}) are not supported: vlmkit's MoE decoder keeps dense FFNs in the "
            "first layers only (moe.first_dense_layers)")
    return MoEConfig(
        num_experts=get("num_experts", get("num_local_experts")),
        top_k=get("num_experts_per_tok"),
        num_shared_experts=0,
        expert_intermediate_size=get("moe_intermediate_size"),
        score_func="softmax",
        norm_topk_prob=arch in ALWAYS_RENORMALISED or bool(get("norm_topk_prob", False)),
        bias_update_rate=0.0,
        aux_loss_coef=float(get("router_aux_loss_coef", 0.0)) if get("output_router_logits") else 0.0,
        first_dense_layers=first_sparse,
    )


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32) -> LLM:
    """A HF decoder directory (config.json + safetensors, single or sharded) -> LLM in eval mode."""
    path = Path(path)
    cfg = llm_config_from_hf(read_config(path), where=str(path))
    tensors = moe_tensors_from_hf(read_state_dict(path), cfg, str(path))
    model = uninitialised(lambda: LLM(cfg)).to(dtype)
    load_into(model, tensors, HF_TO_OURS, source=str(path), ignore=decoder_ignore("", cfg))
    return model.eval()


# --- MoE experts: fused 3-D tensors <-> one SwiGLU per expert ----------------------------------------

FUSED_EXPERTS = re.compile(r"(?P<experts>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)")
ROUTER_WEIGHT = re.compile(r"(?P<router>.*\.mlp\.gate)\.weight")
ROUTER_BIAS = "e_score_correction_bias"
EXPERT_WEIGHT = re.compile(r"(?P<experts>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<ffn>gate|up|down)_proj\.weight")


def moe_tensors_from_hf(tensors: dict[str, torch.Tensor], cfg: LLMConfig, where: str) -> dict[str, torch.Tensor]:
    """A decoder checkpoint's tensors with fused experts split into one gate / up / down weight per
    expert (the names Qwen3-MoE's files give them) and a zero selection bias beside each router;
    unchanged for a dense decoder. Either orientation of a fused tensor is read, as transformers
    reads it: as it is when it has the module's shape (E, 2I, D) / (E, D, I), else transposed."""
    if cfg.moe is None:
        return tensors
    out = {}
    for name, t in tensors.items():
        fused = FUSED_EXPERTS.fullmatch(name)
        if fused is None:
            out[name] = t
            continue
        kind = fused["kind"]
        t = _module_oriented(t, name, cfg, where)
        for e, weight in enumerate(t):
            if kind == "down_proj":
                out[f"{fused['experts']}.{e}.down_proj.weight"] = weight
            else:
                gate, up = weight.chunk(2, dim=0)
                out[f"{fused['experts']}.{e}.gate_proj.weight"] = gate
                out[f"{fused['experts']}.{e}.up_proj.weight"] = up
    for name in list(out):
        router = ROUTER_WEIGHT.fullmatch(name)
        if router is not None:
            out.setdefault(f"{router['router']}.{ROUTER_BIAS}", torch.zeros(out[name].shape[0]))
    return out


def _module_oriented(t: torch.Tensor, name: str, cfg: LLMConfig, where: str) -> torch.Tensor:
    """A fused expert tensor as transformers' module holds it: gate_up_proj (E, 2I, D), down_proj (E, D, I)."""
    moe, d = cfg.moe, cfg.hidden_size
    width = 2 * moe.expert_intermediate_size if name.endswith("gate_up_proj") else moe.expert_intermediate_size
    module_shape = (moe.num_experts, width, d) if name.endswith("gate_up_proj") else (moe.num_experts, d, width)
    if tuple(t.shape) == module_shape:
        return t
    if t.dim() == 3 and tuple(t.transpose(1, 2).shape) == module_shape:
        return t.transpose(1, 2)
    raise CheckpointError(f"cannot load {where}: {name} has shape {tuple(t.shape)}, expected {module_shape} "
                          f"or its last two dimensions swapped")


def fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each layer's per-expert weights fused as transformers 5 holds them
    (`experts.gate_up_proj` (E, 2I, D), `experts.down_proj` (E, D, I)): Qwen3-VL-MoE's layout."""
    out, experts = {}, {}
    for name, t in tensors.items():
        match = EXPERT_WEIGHT.fullmatch(name)
        if match is None:
            out[name] = t
        else:
            experts.setdefault(match["experts"], {}).setdefault(match["ffn"], {})[int(match["e"])] = t
    for prefix, by_ffn in experts.items():
        out[f"{prefix}.gate_up_proj"] = torch.cat([_stacked(by_ffn["gate"]), _stacked(by_ffn["up"])], dim=1)
        out[f"{prefix}.down_proj"] = _stacked(by_ffn["down"])
    return out


def _stacked(by_expert: dict[int, torch.Tensor]) -> torch.Tensor:
    """One projection of every expert, in expert order: (E, out, in)."""
    return torch.stack([by_expert[e] for e in sorted(by_expert)])


def llm_state_dict_to_hf(llm: LLM) -> dict[str, torch.Tensor]:
    """Our state dict under HF Llama / Qwen2 / Qwen3 / Qwen3-MoE names (tied models carry no
    lm_head; an MoE decoder's experts one tensor per expert, without the routers' zero selection
    biases, which transformers' routers do not have)."""
    state = llm.state_dict()
    moved = [name for name, t in state.items() if name.endswith(".router.score_bias") and t.any()]
    if moved:
        raise ConfigError(f"the MoE routers' selection biases {moved[:3]} are not zero (auxiliary-loss-free "
                          "balancing moved them); transformers' Qwen3-MoE routers have none")
    state = {name: t for name, t in state.items() if not name.endswith(".router.score_bias")}
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
        return [("the LLM has MoE layers; vlmkit exports dense Llama-family decoders (an MoE one only as "
                 "Qwen3-MoE, or inside Qwen3-VL-MoE)")]
    try:
        llm_config_to_hf(cfg)
    except ConfigError as e:
        return [str(e)]
    return []


def moe_export_reasons(cfg: LLMConfig) -> list[str]:
    """Why an MoE decoder is not a Qwen3-MoE one (nothing when it is, or when it is dense)."""
    if cfg.moe is None:
        return []
    attention = [] if cfg.qk_norm and not cfg.qkv_bias else ["Qwen3-MoE's attention has q/k norms and no q/k/v bias"]
    return attention + moe_routing_reasons(cfg.moe)


def moe_routing_reasons(moe: MoEConfig) -> list[str]:
    """Why transformers' Qwen3-MoE routing is not `moe`'s (nothing when it is)."""
    reasons = []
    if moe.num_shared_experts:
        reasons.append(f"Qwen3-MoE has no shared experts (moe.num_shared_experts is {moe.num_shared_experts})")
    if moe.score_func != "softmax":
        reasons.append(f"Qwen3-MoE's router scores experts by softmax, not {moe.score_func}")
    return reasons


def moe_config_to_hf(moe: MoEConfig) -> dict[str, Any]:
    """The MoE settings of a Qwen3-MoE / Qwen3-VL-MoE decoder config (`moe_config_from_hf` reads them back)."""
    return {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_dense_layers)),
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": moe.aux_loss_coef > 0,
    }


def llm_config_to_hf(cfg: LLMConfig) -> dict[str, Any]:
    """An HF config dict for our config: Qwen3-MoE with MoE layers, Qwen3 with qk-norm, Qwen2 with
    qkv bias, Llama otherwise."""
    reasons = moe_export_reasons(cfg)
    if reasons:
        raise ConfigError("an MoE LLM exports as Qwen3-MoE only: " + "; ".join(reasons))
    if cfg.qk_norm and cfg.qkv_bias:
        raise ConfigError("qk_norm together with qkv_bias matches no HF family (Qwen3 has no q/k/v-only bias)")
    arch, model_type = (("Qwen3MoeForCausalLM", "qwen3_moe") if cfg.moe is not None else
                        ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama"))
    moe = moe_config_to_hf(cfg.moe) if cfg.moe is not None else {}
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
        **moe,
    }
