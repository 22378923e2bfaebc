"""Decoder-only LLM of the Llama family: Llama / SmolLM2, Mistral, Qwen2, Qwen3, with optional MoE.

Pre-norm blocks x + attn(norm(x)), x + ffn(norm(x)) with RMSNorm (Zhang & Sennrich 2019), rotary
positions (Su et al. 2021, the "rotate half" layout of transformers' modeling_llama.py), grouped-query
attention, SwiGLU FFN; Qwen2's q/k/v bias, Qwen3's RMSNorm over head_dim on q and k before RoPE,
tied input / output embeddings, DeepSeek-V3-style MoE FFNs (models/moe.py), and the multimodal RoPE
of Qwen2-VL / Qwen3-VL (three position axes per token, models/mrope.py).

The model takes embeddings and an `AttnSpec` (models/attention.py), so one code path serves packed
training (positions restart per sample), padded batches and KV-cache decoding; the attention
backend (SDPA, or a FlashAttention varlen kernel for packed specs) is picked once, when the model
is built. A decode step (a cache and one new token per row) runs each block's `step` method: the
same arithmetic as `forward` without nn.Module's call machinery (`Block.step` says what that
skips). Parameter names follow transformers' with the `model.` prefix dropped
(`layers.{i}.attn.q_proj`, `layers.{i}.mlp.gate_proj`) so that HF key maps stay one line per
tensor kind (models/hf/llm.py).

Mixed-precision training runs the model under bf16 autocast (`bf16_autocast`): the residual
stream, norms' outputs and attention are bf16, RMSNorm's statistics and the RoPE tables fp32.

Shape suffixes: B batch, T tokens, D hidden, H heads, Hkv kv heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vlmkit.models.attention import (AttentionBackend, AttnSpec, BackendName, KVCache, StaticKVCache, decode_attention,
                                    select_backend)
from vlmkit.models.config import MROPE_AXES, LLMConfig
from vlmkit.models.fused import FusedLinears
from vlmkit.models.moe import MoE, SwiGLU
from vlmkit.models.mrope import frequency_axes


class RMSNorm(nn.Module):
    """x / rms(x) * weight: the statistics in fp32 like the reference, the result in x's dtype (a
    bf16 residual stream stays bf16 with fp32 master weights, `bf16_autocast`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            # PyTorch's own op: the same arithmetic in fewer calls (decode steps are call-bound);
            # not under autocast, whose op lists could run it in half precision on some devices
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (weight * h.to(x.dtype)).to(x.dtype)  # an fp32 weight would promote bf16 x (no-op otherwise)


def bf16_autocast(device_type: str) -> bool:
    """Whether the model runs under bf16 autocast on `device_type`: mixed-precision training
    (train/precision.py). There the decoder's residual stream is bf16 (`LLM.decode`), as it is
    under FSDP2's bf16 parameters, while RoPE tables, norm statistics and the loss stay fp32."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, T, 1, Dh), computed in fp32 then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, T, 1, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


MIN_ROPE_TABLE = 256
"""Positions a RoPE table holds at least (it grows by doubling past that)."""


class RopeTable:
    """cos / sin of every position up to a bound, built once (per device) and indexed each step.

    The table holds exactly what `rope_cos_sin` computes (position * inv_freq in fp32, then cos /
    sin), so looking positions up gives the same values as computing them; it grows by doubling
    when a position past its end is asked for. The sine comes with its first half negated, the
    form `apply_rope` takes.

    dim_axes (Dh,) makes it a multimodal (M-RoPE) table as well: rotary dimension d follows
    position axis dim_axes[d] (models/mrope.py), looked up by `axes`."""

    def __init__(self, head_dim: int, theta: float, dim_axes: torch.Tensor | None = None):
        self.head_dim, self.theta, self.dim_axes = head_dim, theta, dim_axes
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, position_ids: torch.Tensor, bound: int, dtype: torch.dtype):
        """position_ids (B, T), every one < bound -> cos, signed sin (B, T, 1, Dh) in dtype."""
        cos, sin = self._table(position_ids.device, bound)
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, Dh)
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)

    def axes(self, position_ids: torch.Tensor, bound: int, dtype: torch.dtype):
        """M-RoPE: position_ids (3, B, T) (temporal, height, width), every one < bound -> cos,
        signed sin (B, T, 1, Dh) in dtype, each rotary dimension at the position of its own axis."""
        if self.dim_axes is None:
            raise ValueError("position ids with an axis dimension (3, B, T) need llm.mrope_section")
        cos, sin = self._table(position_ids.device, bound)
        dim_axes = self.dim_axes.to(position_ids.device)
        positions = position_ids[dim_axes].movedim(0, -1)  # (B, T, Dh): each dimension's position
        dims = torch.arange(self.head_dim, device=position_ids.device)
        cos, sin = cos[positions, dims], sin[positions, dims]  # (B, T, Dh)
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)

    def _table(self, device: torch.device, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (N, Dh) on `device` for N >= bound positions."""
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < bound:
            size = max(bound, 2 * (table[0].shape[0] if table is not None else 0), MIN_ROPE_TABLE)
            cos, sin = rope_cos_sin(torch.arange(size, device=device)[None], self.head_dim, self.theta, torch.float32)
            table = self._tables[device] = (cos[0, :, 0], signed_sin(sin[0, :, 0]))  # (N, Dh) each
        return table


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (..., Dh) -> the same with its first half negated: rotate_half(x) * sin, the reference's
    (-x2, x1) * sin, equals roll(x, Dh/2) * signed_sin(sin), one op fewer per rotation."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh), cos and signed sin (`signed_sin`) broadcastable to it: rotate pairs
    (i, i + Dh/2) by the position's angle, x * cos + rotate_half(x) * sin."""
    # The product is taken in cos/sin's precision but returned in x's, so that under autocast the
    # bf16 q / k stay bf16 (fp32 here would push attention off the flash kernels onto slow paths).
    out = torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class Attention(nn.Module):
    """Self-attention with RoPE and GQA, through `attend` (the model's attention backend)."""

    def __init__(self, cfg: LLMConfig, attend: AttentionBackend):
        super().__init__()
        self.attend = attend
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, D, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # (q|k, v): one matmul when decoding (models/fused.py), q and k side by side for RoPE
        self.qkv = FusedLinears(self.q_proj, self.k_proj, self.v_proj, groups=(2, 1))
        self.out = FusedLinears(self.o_proj)  # a transposed copy when decoding on the CPU

    def forward(self, x, cos, sin, spec: AttnSpec, cache: KVCache | None, layer: int) -> torch.Tensor:
        """x (B, T, D), cos / sin (B, T, 1, Dh) -> (B, T, D)."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x)
        q, k = self._rotate(qk.view(B, T, H + Hkv, Dh), cos, sin).split([H, Hkv], dim=2)  # (B, T, H | Hkv, Dh)
        v = v.view(B, T, Hkv, Dh)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, L, Hkv, Dh): every stored key of each row
        out = self.attend(q, k, v, spec, causal=True)  # (B, T, H, Dh)
        return self.out(out.reshape(B, T, H * Dh))[0]

    def step(self, x, cos, sin, spec: AttnSpec, cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` for one new token per row against the cache (a decode step, from `Block.step`):
        x (B, D), cos / sin (B, 1, Dh) -> (B, D).

        The same arithmetic as `forward` on (B, 1, D), in SDPA's layout from end to end: the new
        key goes into the cache with `KVCache.append` (one slot write when the rows are aligned)
        and the query attends with `decode_attention`, which every backend uses for a single
        query. `spec` is what `KVCache.begin` returned: causal (no mask, every stored key) or a
        mask over the cache slots."""
        B = x.shape[0]
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x)
        qk = self._rotate(qk.view(B, H + Hkv, Dh), cos, sin)  # (B, H + Hkv, Dh)
        k, v = cache.append(layer, qk[:, H:], v.view(B, Hkv, Dh))  # (B, Hkv, L, Dh)
        out = decode_attention(qk[:, :H, None], k, v, spec.mask)  # (B, H, 1, Dh); no mask: every key
        return self.out(out.view(B, H * Dh))[0]

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk (..., H + Hkv, Dh): Qwen3's qk-norm, then RoPE with q and k rotated as one tensor
        (half the ops of rotating each: a decode step is call-bound)."""
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-2)
        return apply_rope(qk, cos, sin)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x)), the FFN dense or MoE."""

    def __init__(self, cfg: LLMConfig, layer: int, attend: AttentionBackend):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, attend)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.moe is not None and layer >= cfg.moe.first_dense_layers
        self.mlp = MoE(cfg.hidden_size, cfg.moe) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, spec: AttnSpec, cache: KVCache | None):
        """x (B, T, D) -> (x (B, T, D), aux loss scalar or None, expert counts (E,) or None); None for a dense FFN."""
        x = x + self.attn(self.attn_norm(x), cos, sin, spec, cache, self.layer)
        if isinstance(self.mlp, MoE):
            y, aux, counts = self.mlp(self.mlp_norm(x))
            return x + y, aux, counts
        return x + self.mlp(self.mlp_norm(x)), None, None

    def step(self, x, cos, sin, spec: AttnSpec, cache: KVCache):
        """The decode step path: `forward` for one new token per row against the cache, on x (B, D)
        with cos / sin (B, 1, Dh); returns what `forward` returns, on (B, D).

        `LLM.decode` calls it directly, not through `nn.Module.__call__`, for every cache step of
        one token per row, and it calls the block's norms, attention and FFN the same way. What
        that skips is the call machinery: forward hooks and pre-hooks (global ones included) of
        the block, its norms, attention and FFN; submodules those call as modules (the MoE router
        and experts, the separate projections when derived weights are off) still run theirs.
        Why: a small model's decode step is bound by Python calls, and that machinery was a
        measurable part of it (docs/design-notes.md).

        Why it is safe: the arithmetic is `forward`'s on (B, D) instead of (B, 1, D), so the
        tokens are the same (tests/test_decode_paths.py decodes greedily through both paths and
        compares tokens and logits); vlmkit registers no hooks on the decoder, and prefill and
        training run `forward`, hooks included. A decoder whose blocks rely on hooks (FSDP2
        gathers sharded parameters in one) must not decode through a KV cache; vlmkit shards
        models for training only."""
        x = x + self.attn.step(self.attn_norm.forward(x), cos, sin, spec, cache, self.layer)
        if isinstance(self.mlp, MoE):
            y, aux, counts = self.mlp.forward(self.mlp_norm.forward(x))
            return x + y, aux, counts
        return x + self.mlp.forward(self.mlp_norm.forward(x)), None, None


@dataclass(frozen=True)
class Deepstack:
    """Qwen3-VL's deepstack: visual features added to the hidden states at the visual positions
    after each of the first len(features) decoder layers (features[i] after layer i), so that the
    vision tower's intermediate blocks reach the decoder's early layers."""

    mask: torch.Tensor
    """(B, T), or (T,) for flat inputs: True at the visual tokens."""
    features: tuple[torch.Tensor, ...]
    """One (M, D) tensor per level, M = mask.sum(), in the order of the visual tokens (row by row)."""

    def add(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """x (B, T, D) with level `level`'s features added at the visual positions (out of place)."""
        mask = self.mask.to(x.device).reshape(x.shape[:2])
        return x.index_put((mask,), self.features[level].to(x.dtype), accumulate=True)


class LLM(nn.Module):
    """The decoder. `forward(input_ids, attention_mask)` is the HF-style call; training and decoding
    go through `embed` -> `decode` -> `logits`.

    attention_backend: "auto" (a FlashAttention varlen kernel for fp16 / bf16 packed specs on a
    GPU that runs one, SDPA otherwise), "sdpa" or "flash" (models/attention.py); every layer
    uses the one picked here."""

    def __init__(self, cfg: LLMConfig, attention_backend: BackendName = "auto"):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"llm.hidden_act {cfg.hidden_act!r} is not supported; the SwiGLU FFN uses silu")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.attend = select_backend(attention_backend)
        self.layers = nn.ModuleList(Block(cfg, i, self.attend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: no lm_head module at all, so the state dict holds the matrix once (safetensors refuses
        # shared tensors) and logits read embed_tokens.weight.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head = FusedLinears(self.embed_tokens if self.lm_head is None else self.lm_head)
        self.gradient_checkpointing = False
        dim_axes = None
        if cfg.mrope_section is not None:  # the frequency axes, twice: dimensions d and d + Dh/2 rotate together
            # an index table, not a weight: on the CPU also when the model is built on the meta
            # device to be loaded (models/weights.py's `uninitialised`), where it would hold no values
            with torch.device("cpu"):
                dim_axes = frequency_axes(cfg.mrope_section, cfg.mrope_interleaved).repeat(2)
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta, dim_axes)
        self._aux_loss: torch.Tensor | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place.

        Linear and embedding weights ~ N(0, initializer_range) as in transformers' Llama; the two
        projections that write into the residual stream (attn.o_proj, mlp.down_proj and each
        expert's down_proj) are further scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al.
        2019) so the residual variance does not grow with depth. Biases start at 0, norms at 1,
        MoE selection biases at 0.
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                nn.init.normal_(module.router.weight, mean=0.0, std=std)
                module.router.score_bias.zero_()

    # --- the three stages -------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...) -> (..., D)."""
        return self.embed_tokens(input_ids)

    def decode(self, inputs_embeds: torch.Tensor, *, position_ids: torch.Tensor | None = None,
               spec: AttnSpec | None = None, cache: KVCache | None = None,
               deepstack: Deepstack | None = None) -> torch.Tensor:
        """Run the blocks and the final norm. inputs_embeds (B, T, D), or (T, D) for a packed spec.

        position_ids (B, T) or (T,); None derives them from the spec (restarting per packed sample,
        counting real tokens of padded rows) or from the cache (each row continues from its length).
        A model with multimodal RoPE (`mrope_section`) also takes them per axis (temporal, height,
        width; models/mrope.py): (3, B, T), or (3, T) for flat (T, D) inputs.
        With a cache, spec must be causal or padded (ragged prompts): the step's real tokens are
        appended to each row; with one token per row (a decode step) the blocks run their `step`
        path (`Block.step`); a `StaticKVCache` (models/attention.py) takes only such steps, with
        shapes that never change (`new_static_cache`). `deepstack` (Qwen3-VL) adds visual features after the first layers; the
        prompt's visual tokens carry it, so it goes with a whole-prompt call, never a decode step.
        Returns the final-normed hidden states, shaped like inputs_embeds.
        """
        flat = inputs_embeds.dim() == 2
        x = inputs_embeds[None] if flat else inputs_embeds  # (B, T, D)
        if flat and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == MROPE_AXES:
            position_ids = position_ids[:, None]  # M-RoPE positions of a pack: (3, T) -> (3, 1, T)
        mixed = bf16_autocast(x.device.type)
        spec, cos, sin = self._attention_and_rope(x, spec or AttnSpec.causal(), position_ids, cache,
                                                  torch.float32 if mixed else x.dtype)
        if mixed:  # the residual adds and norms on bf16 tensors: half the bytes of an fp32 stream
            x = x.to(torch.bfloat16)
        if cache is not None and x.shape[1] == 1 and deepstack is None:  # a decode step
            hidden, aux = self._decode_step(x[:, 0], cos[:, 0], sin[:, 0], spec, cache)
            hidden = self.norm(hidden)[:, None]
        else:
            hidden, aux = self._run_blocks(x, cos, sin, spec, cache, deepstack)
            hidden = self.norm(hidden)
        if cache is not None:
            cache.end()
        self._aux_loss = aux
        return hidden[0] if flat else hidden

    def _attention_and_rope(self, x: torch.Tensor, spec: AttnSpec, position_ids: torch.Tensor | None,
                            cache: KVCache | None, rope_dtype: torch.dtype
                            ) -> tuple[AttnSpec, torch.Tensor, torch.Tensor]:
        """The spec the blocks attend with and RoPE's cos / sin (B, T, 1, Dh, in `rope_dtype`) for
        x (B, T, D).

        With a cache this begins the cache step (`KVCache.begin`: the spec becomes the cache's)
        and positions continue each row's length; without one, positions come from the spec,
        unless the caller gave them."""
        B, T, _ = x.shape
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids[None]
        bound = None if position_ids is not None else T  # every position < bound (None: not known)
        if cache is not None:
            if spec.kind not in ("causal", "padded"):
                raise ValueError(f"decoding with a KV cache takes a causal or padded spec, got {spec.kind}")
            valid = spec.attention_mask.to(device=x.device, dtype=torch.bool) if spec.kind == "padded" else None
            cache_spec = cache.begin(B, T, valid, x.device)
            if position_ids is None:
                position_ids = cache.position_ids(valid, T)
                bound = cache.max_length + T
            spec = cache_spec
        elif position_ids is None:
            position_ids = spec.position_ids(B, T, x.device)
        position_ids = position_ids.to(x.device)
        if bound is None:  # positions given by the caller: one read of their maximum
            bound = int(position_ids.max()) + 1 if position_ids.numel() else 1
        if position_ids.dim() == 3:  # M-RoPE: (3, B, T)
            cos, sin = self.rope.axes(position_ids.expand(MROPE_AXES, B, T), bound, rope_dtype)
        else:
            cos, sin = self.rope(position_ids.expand(B, T), bound, rope_dtype)
        return spec, cos, sin

    def _run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttnSpec,
                    cache: KVCache | None, deepstack: Deepstack | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The module path: every block's `forward` (checkpointed when training with gradient
        checkpointing) on x (B, T, D), deepstack features added after the first layers ->
        (hidden (B, T, D), summed MoE aux loss)."""
        aux = x.new_zeros((), dtype=torch.float32)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        levels = len(deepstack.features) if deepstack is not None else 0
        for i, block in enumerate(self.layers):
            if use_ckpt:
                x, block_aux, counts = checkpoint(block, x, cos, sin, spec, None, use_reentrant=False)
            else:
                x, block_aux, counts = block(x, cos, sin, spec, cache)
            aux = _add_moe_outputs(block, aux, block_aux, counts)
            if i < levels:
                x = deepstack.add(x, i)
        return x, aux

    def _decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttnSpec,
                     cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The step path: one new token per row, x (B, D), cos / sin (B, 1, Dh), through every
        block's `step` -> (hidden (B, D), summed MoE aux loss)."""
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, block_aux, counts = block.step(x, cos, sin, spec, cache)
            aux = _add_moe_outputs(block, aux, block_aux, counts)
        return x, aux

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> (..., V)."""
        return self.head(hidden)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """HF-style call: input_ids (B, T), attention_mask (B, T) 1 = real token -> logits (B, T, V)."""
        spec = AttnSpec.causal() if attention_mask is None else AttnSpec.padded(attention_mask)
        return self.logits(self.decode(self.embed(input_ids), spec=spec))

    # --- decoding and MoE -------------------------------------------------------------------------

    def fuse_projections(self, enabled: bool = True) -> None:
        """Decode with derived weights under no-grad (models/fused.py): q/k/v and each dense FFN's
        gate/up as one matmul each, and on the CPU every dense matmul of the decoder on a
        transposed copy of its weight.

        Costs copies of those weights, built on the first no-grad forward that needs them;
        `enabled=False` drops them. MoE experts are left as they are."""
        for f in self.derived_weights():
            f.configure(enabled)

    def derived_weights(self) -> list[FusedLinears]:
        """Every FusedLinears that `fuse_projections` drives: per block q/k/v, o_proj, and a dense
        FFN's gate/up and down_proj; the output head."""
        out = []
        for block in self.layers:
            out += [block.attn.qkv, block.attn.out]
            if isinstance(block.mlp, SwiGLU):
                out += [block.mlp.gate_up, block.mlp.down]
        return out + [self.head]

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty KV cache; `capacity` tokens per row are allocated on first use."""
        return KVCache(self.config.num_layers, capacity)

    def new_static_cache(self, rows: int, capacity: int) -> StaticKVCache:
        """An empty static KV cache of `rows` rows x `capacity` tokens (models/attention.py), for
        decode steps of fixed shapes; its RoPE bound is the model's context, so the RoPE table
        never grows while steps are replayed."""
        return StaticKVCache(self.config.num_layers, rows, capacity, self.config.max_position_embeddings)

    def aux_loss(self) -> torch.Tensor:
        """MoE balance loss of the last forward (0 without MoE or with aux_loss_coef = 0)."""
        if self._aux_loss is None:
            return self.embed_tokens.weight.new_zeros(())
        return self._aux_loss

    def moe_layers(self) -> dict[str, MoE]:
        return {f"layers.{i}": b.mlp for i, b in enumerate(self.layers) if isinstance(b.mlp, MoE)}

    def moe_load(self) -> dict[str, list[float]]:
        """Per MoE layer, the fraction of routed picks each expert got in the last forward."""
        return {name: (m.last_load / m.last_load.sum().clamp(min=1)).tolist() for name, m in self.moe_layers().items()}

    def update_moe_bias(self) -> None:
        """Auxiliary-loss-free balancing step; call after each optimiser step (no-op without MoE)."""
        for m in self.moe_layers().values():
            m.update_bias()


def _add_moe_outputs(block: Block, aux: torch.Tensor, block_aux: torch.Tensor | None,
                  counts: torch.Tensor | None) -> torch.Tensor:
    """aux + a MoE block's balance loss, recording the block's expert load (outside any gradient
    checkpoint, so that a recomputed forward is not counted); a dense block (None, None) adds nothing."""
    if counts is None:
        return aux
    block.mlp.record_load(counts)
    return aux + block_aux
