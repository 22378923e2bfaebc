"""One attention call for every way tokens are laid out, and the KV cache for decoding.

An attention backend, picked once when a model is built (`select_backend(name)`), is called per
layer as `backend(q, k, v, spec)`: queries, keys and values shaped (B, T, H, Dh) (the flash-attn
layout) and an `AttnSpec` that says how tokens may attend:

- packed: many samples concatenated into one flat sequence (B = 1 or no batch dim) with
  `cu_seqlens`, no padding; attention never crosses a sample boundary. On the CPU one SDPA call
  per group of equal-length samples runs it (one call with a block-diagonal mask would spend most
  of its work on masked pairs; docs/models-llm.md has the figures); on CUDA a FlashAttention
  varlen kernel: flash-attn's `flash_attn_varlen_func` when installed, else PyTorch's
  `varlen_attn` (Dao, "FlashAttention-2", 2023).
- padded: a (B, T) batch with an attention mask (1 = real token), causal + key padding.
- causal: a (B, T) batch without padding.
- mask: an explicit boolean mask (B, 1, Tq, Tk); the KV cache builds one for steps whose rows
  hold different numbers of tokens (a decode step over equal-length rows needs none).

`causal=False` (the vision encoder) drops the causal part and keeps only sample / padding limits.
Grouped-query attention (fewer kv heads than query heads, Ainslie et al. 2023) is handled here:
query head h reads kv head h // (H / Hkv), as transformers' `repeat_kv` does.

`KVCache` holds per-layer keys / values of B rows with per-row lengths, so ragged prompts, one
token per row per step, and rows joining or leaving between steps (continuous batching) all work.
`StaticKVCache` holds them in storage allocated once, for decode steps of fixed shapes (the
steps infer/static_decode.py replays as CUDA graphs).

Shape suffixes: B batch rows, T tokens, H query heads, Hkv kv heads, Dh head dim, L cache length.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

BackendName = Literal["auto", "sdpa", "flash"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes the FlashAttention kernels take."""
FLASH_HEAD_DIM_MULTIPLE = 8
FLASH_MAX_HEAD_DIM = 256
"""The kernels' head-dim limits: a multiple of 8, at most 256."""
FLASH_MIN_COMPUTE_CAPABILITY = 8
"""Ampere: the oldest GPU generation the varlen kernels run on."""
FOLD_MAX_QUERIES = 16
"""Masked GQA with at most this many queries per row folds query heads into the query length
(decode steps); longer queries repeat the kv heads (`_sdpa_heads_first`)."""
MIN_CACHE_CAPACITY = 16
"""The smallest per-layer cache allocation, in tokens per row."""

_FLASH_NEEDS = ("attention backend 'flash' needs a CUDA GPU (Ampere or newer) and flash-attn "
                "or PyTorch >= 2.10 (torch.nn.attention.varlen)")


@functools.cache
def _flash_varlen():
    """A FlashAttention varlen kernel (q, k, v, cu_seqlens, max_seqlen, causal) -> out, or None.

    The flash-attn package's `flash_attn_varlen_func` when installed, else PyTorch's own
    `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10; older releases take `is_causal`,
    newer ones a `window_size` and `enable_gqa`). Both imports are deferred to the first packed
    call: flash-attn is an optional dependency."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        return lambda q, k, v, cu, n, causal: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=causal)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu, n, causal):
        kw = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return varlen_attn(q, k, v, cu, cu, n, n, **kw)

    return run


@functools.cache
def _runs_flash(device: torch.device) -> bool:
    """The device can run the varlen kernels (CUDA, Ampere or newer); asked once per device."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= FLASH_MIN_COMPUTE_CAPABILITY


def flash_available(device: torch.device) -> bool:
    """A varlen flash kernel exists and the device runs it (CUDA, Ampere or newer)."""
    return _flash_varlen() is not None and _runs_flash(device)


@dataclass(frozen=True, eq=False)
class AttnSpec:
    """How tokens attend to each other. Build it with one of the constructors."""

    kind: Literal["causal", "packed", "padded", "mask"]
    cu_seqlens: torch.Tensor | None = None  # (S+1,) int32, packed
    max_seqlen: int = 0  # packed
    attention_mask: torch.Tensor | None = None  # (B, T) 1 = real token, padded
    mask: torch.Tensor | None = None  # (B, 1, Tq, Tk) bool, True = may attend, mask

    @classmethod
    def causal(cls) -> "AttnSpec":
        return cls("causal")

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> "AttnSpec":
        cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        return cls("packed", cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))

    @classmethod
    def padded(cls, attention_mask: torch.Tensor) -> "AttnSpec":
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
        return cls("padded", attention_mask=attention_mask)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "AttnSpec":
        """An explicit boolean mask (B, 1, Tq, Tk), True where a query may attend; `causal` is ignored."""
        return cls("mask", mask=mask)

    @functools.cached_property
    def seqlens(self) -> list[int]:
        """Sample lengths of a packed spec (one host sync, computed once)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def position_ids(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Default positions (B, T): 0.. per row, per packed sample, or per real token of a padded row."""
        if self.kind == "packed":
            seqlens = torch.diff(self.cu_seqlens.to(device=device, dtype=torch.long))
            starts = torch.repeat_interleave(self.cu_seqlens[:-1].to(device=device, dtype=torch.long), seqlens)
            return (torch.arange(length, device=device) - starts).unsqueeze(0)  # (1, T)
        if self.kind == "padded":
            return (self.attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, length)


# --- backends ---------------------------------------------------------------------------------------


class AttentionBackend:
    """Scaled dot-product attention (scale 1/sqrt(Dh)) as an `AttnSpec` allows; this base class is
    the "sdpa" backend: PyTorch's SDPA for every spec, packed ones as one call per group of
    equal-length samples. Subclasses run packed specs on a FlashAttention varlen kernel.

    A model picks its backend once, when it is built, and calls it in every layer:
    backend(q (B, T, H, Dh), k / v (B, Tk, Hkv, Dh), spec, causal) -> (B, T, H, Dh); packed specs
    also take (T, H, Dh). Backends hold no state (a model that holds one still deep-copies and
    pickles)."""

    name: str = "sdpa"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec,
                 causal: bool = True) -> torch.Tensor:
        q, k, v = _in_autocast_dtype(q, k, v)
        if spec.kind != "packed":
            return self._unpacked(q, k, v, spec, causal)
        # Under torch.compile the packed call is one opaque op (`packed_attention`): its eager
        # implementation reads the sample lengths on the host, which would break the graph.
        packed = self._packed_op if torch.compiler.is_compiling() else self._packed
        if q.dim() == 3:
            return packed(q, k, v, spec, causal)
        if q.shape[0] != 1:
            raise ValueError(f"packed attention takes one flat sequence (B = 1), got B = {q.shape[0]}")
        return packed(q[0], k[0], v[0], spec, causal).unsqueeze(0)

    def _packed_op(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        """`_packed` through the `vlmkit::packed_attention` custom op (what a compiled block calls)."""
        return packed_attention(q, k, v, spec.cu_seqlens, spec.max_seqlen, causal, self.name)

    def _packed(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        """q (T, H, Dh), k / v (T, Hkv, Dh) -> (T, H, Dh)."""
        return _packed_sdpa(q, k, v, spec.seqlens, causal)

    def _unpacked(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        if spec.kind == "causal":
            return _sdpa(q, k, v, mask=None, causal=causal and q.shape[1] > 1)
        if spec.kind == "padded":
            return _sdpa(q, k, v, mask=padding_mask(spec.attention_mask.to(q.device), causal), causal=False)
        return _sdpa(q, k, v, mask=spec.mask, causal=False)


class FlashBackend(AttentionBackend):
    """The "flash" backend: packed specs always on the varlen kernel, which must run on the
    device; other specs are refused (the kernel takes no padding mask)."""

    name = "flash"

    def __init__(self):
        if _flash_varlen() is None:
            raise RuntimeError(_FLASH_NEEDS)

    def _packed(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        if not _runs_flash(q.device):
            raise RuntimeError(_FLASH_NEEDS)
        return _flash_packed(q, k, v, spec, causal)

    def _unpacked(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        raise ValueError(f"the flash backend runs packed specs only, got a {spec.kind} spec")


class AutoBackend(AttentionBackend):
    """The "auto" backend (the default): packed specs on the varlen kernel where it runs them (fp16
    / bf16 on an Ampere or newer GPU, head dim within the kernel's limits), SDPA otherwise. What
    decides is the tensors' device and dtype, which a model changes after it is built (`.to()`,
    autocast), so those are read per call; the kernel lookup and device query are cached."""

    name = "auto"

    def _packed(self, q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
        head_dim = q.shape[-1]
        if (q.dtype in HALF_DTYPES and head_dim % FLASH_HEAD_DIM_MULTIPLE == 0 and head_dim <= FLASH_MAX_HEAD_DIM
                and flash_available(q.device)):
            return _flash_packed(q, k, v, spec, causal)
        return super()._packed(q, k, v, spec, causal)


BACKENDS: dict[str, type[AttentionBackend]] = {"auto": AutoBackend, "sdpa": AttentionBackend, "flash": FlashBackend}


# --- the packed call as one custom op (torch.compile) --------------------------------------------------


@torch.library.custom_op("vlmkit::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     causal: bool, backend: str) -> torch.Tensor:
    """Packed attention as one op that dynamo does not trace into: q (T, H, Dh), k / v (T, Hkv,
    Dh), cu_seqlens (S+1,) -> (T, H, Dh), computed by backend `backend`'s eager packed path (SDPA
    per group of equal-length samples, or a varlen kernel). A compiled block calls it (the eager
    path reads `spec.seqlens` on the host, a graph break); the backward recomputes the forward
    (`packed_attention_backward`)."""
    return _eager_packed(q, k, v, cu_seqlens, max_seqlen, causal, backend).contiguous()


@packed_attention.register_fake
def _packed_attention_fake(q, k, v, cu_seqlens, max_seqlen, causal, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("vlmkit::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `packed_attention` for q, k, v: its eager forward run again and
    differentiated (an opaque op too, so the compiled backward graph holds it whole)."""
    # torch.func.vjp, not torch.autograd.grad: an op's kernel runs below the autograd dispatch
    # key, where plain autograd records nothing; functorch's transform brings it back.
    _, vjp = torch.func.vjp(lambda *qkv: _eager_packed(*qkv, cu_seqlens, max_seqlen, causal, backend), q, k, v)
    return tuple(g.contiguous() for g in vjp(grad))


@packed_attention_backward.register_fake
def _packed_attention_backward_fake(grad, q, k, v, cu_seqlens, max_seqlen, causal, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _packed_attention_setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal, backend = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.backend = max_seqlen, causal, backend


def _packed_attention_grad(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = packed_attention_backward(grad, q, k, v, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.backend)
    return dq, dk, dv, None, None, None, None


packed_attention.register_autograd(_packed_attention_grad, setup_context=_packed_attention_setup)


def _eager_packed(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, backend: str) -> torch.Tensor:
    """The packed path of backend `backend` (a `BACKENDS` name), as an uncompiled call runs it."""
    return BACKENDS[backend]()._packed(q, k, v, AttnSpec.packed(cu_seqlens, max_seqlen), causal)


def select_backend(name: BackendName = "auto") -> AttentionBackend:
    """The attention backend called `name`: auto (a flash varlen kernel for fp16 / bf16 packed specs
    on CUDA when one exists, SDPA otherwise), sdpa, or flash (packed specs only, CUDA only)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be auto, sdpa or flash, got {name!r}")
    return BACKENDS[name]()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row against the KV cache, in SDPA's layout (`KVCache.append` returns it):
    q (B, H, 1, Dh), k / v (B, Hkv, L, Dh), mask (B, 1, 1, L) bool or None (every key) -> (B, H, 1, Dh).
    Every backend decodes this way: a step's single query has no packed layout to exploit."""
    q, k, v = _in_autocast_dtype(q, k, v)
    return _sdpa_heads_first(q, k, v, mask, causal=False)


def _in_autocast_dtype(q, k, v):
    """RoPE leaves q / k in fp32 under autocast while v is in half precision; SDPA would cast all
    three to the autocast dtype, so do it here for every backend (the flash kernels need it)."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _flash_packed(q, k, v, spec: AttnSpec, causal: bool) -> torch.Tensor:
    """q (T, H, Dh), k / v (T, Hkv, Dh) through the varlen kernel -> (T, H, Dh)."""
    cu = spec.cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _flash_varlen()(q, k, v, cu, spec.max_seqlen, causal)


def padding_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, T) 1 = real -> (B, 1, T, T) bool. Every query also sees itself, so that a pad query never
    has an empty row (SDPA would return NaN there); real queries always see themselves anyway."""
    T = attention_mask.shape[1]
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    if causal:
        keys = keys & torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return keys | eye


def _sdpa(q, k, v, mask, causal: bool) -> torch.Tensor:
    """(B, T, H, Dh) in and out; SDPA's layout is (B, H, T, Dh). A mask already holds causality."""
    return _sdpa_heads_first(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, causal).transpose(1, 2)


def _sdpa_heads_first(q, k, v, mask, causal: bool) -> torch.Tensor:
    """q (B, H, T, Dh), k / v (B, Hkv, Tk, Dh) -> (B, H, T, Dh). A mask already holds causality."""
    B, H, T, Dh = q.shape
    Hkv = k.shape[1]
    if H != Hkv and mask is not None:
        # SDPA's GQA runs in the flash and math kernels only, and flash takes no mask: with a mask
        # it falls back to math, which materialises (B, H, T, Tk) scores (several times slower and
        # larger; docs/models-llm.md has the figures). Long queries therefore repeat kv; short
        # ones (decode steps against a long cache) fold the query heads of each kv head into the
        # query length, which avoids copying the whole cache every step.
        rep = H // Hkv
        if T <= FOLD_MAX_QUERIES:
            # one query per row (a decode step): its (B, 1, 1, Tk) mask broadcasts over the folded
            # heads as it is, with the same result as a repeated copy and without the copy
            fold_mask = mask if T == 1 else mask.repeat(1, 1, rep, 1)
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv, rep * T, Dh), k, v,
                                                 attn_mask=fold_mask)  # (B, Hkv, rep*T, Dh)
            return out.reshape(B, H, T, Dh)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != H)


def _packed_sdpa(q, k, v, seqlens: list[int], causal: bool) -> torch.Tensor:
    """q (T, H, Dh): one SDPA call per group of samples of equal length.

    split / stack / unbind / cat keep the backward O(T): slicing each sample out of the pack or
    writing into a preallocated output would make autograd build a full-size gradient per sample."""
    qs, ks, vs = q.split(seqlens), k.split(seqlens), v.split(seqlens)
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(seqlens):
        groups.setdefault(n, []).append(i)
    pieces: list[torch.Tensor] = list(qs)  # zero-length samples stay as they are
    for n, members in groups.items():
        if n == 0:
            continue
        if len(members) == 1:
            i = members[0]
            pieces[i] = _sdpa(qs[i][None], ks[i][None], vs[i][None], None, causal)[0]
            continue
        o = _sdpa(*(torch.stack([xs[i] for i in members]) for xs in (qs, ks, vs)), None, causal)  # (G, n, H, Dh)
        for i, oi in zip(members, o.unbind(0)):
            pieces[i] = oi
    return torch.cat(pieces)


# --- KV cache -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AlignedStep:
    """A cache step over rows that all hold `start` tokens and all add `end - start` real ones:
    every row writes slots start .. end - 1, one slice of the cache (e.g. a decode step over rows
    of equal length)."""

    start: int
    end: int
    """Tokens in every row after the step: keys are read up to here."""
    new_lengths: torch.Tensor  # (B,) on the step's device


@dataclass(frozen=True, eq=False)
class RaggedStep:
    """A cache step whose rows hold different numbers of tokens, or whose batch holds pads: each
    real token goes to its own (row, slot)."""

    rows: torch.Tensor
    """Row of each new token: (B, T), or (N,) for the N real tokens of a padded step."""
    slots: torch.Tensor
    """Cache slot of each new token, shaped like `rows`."""
    valid: torch.Tensor | None
    """(B, T) bool, the real tokens of a padded step; None: every token is real."""
    end: int
    """Tokens in the longest row after the step: keys are read up to here."""
    new_lengths: torch.Tensor  # (B,) on the step's device
    new_host_lengths: list[int]


class KVCache:
    """Keys and values of every layer for B rows, each row with its own length.

    A forward step with a cache: `begin(valid)` with the step's (B, T) mask of real tokens (ragged
    prompts are right- or left-padded; each row's real tokens are stored contiguously after its
    previous ones), then each layer calls `update(layer, k, v)` (or `append` for one token per
    row) and attends with the spec `begin` returned, then `end()` advances the lengths. Between
    steps, `keep_rows` / `remove_rows` drop finished rows and `add_rows(*others)` appends rows
    prefilled in other caches (continuous batching).

    Storage per layer: k, v (B, Hkv, L, Dh), allocated on first use and grown by doubling;
    `capacity` sets the first allocation's length (the tokens a row is known to need, so that
    decoding never reallocates: a reallocation zero-fills fresh memory and copies every row).
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.initial_capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros(0, dtype=torch.long)  # (B,) tokens stored per row
        self._host_lengths: list[int] = []  # the same lengths on the host, so a step never reads them back
        self._step: AlignedStep | RaggedStep | None = None  # between begin() and end()

    def __len__(self) -> int:
        """Number of rows."""
        return len(self._host_lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    @property
    def max_length(self) -> int:
        """Tokens stored in the longest row (known on the host, no device read)."""
        return max(self._host_lengths, default=0)

    def position_ids(self, valid: torch.Tensor | None = None, length: int = 1) -> torch.Tensor:
        """Positions (B, T) of the next tokens: each row continues from its own length.
        valid (B, T) bool marks real tokens (pads get a clamped, unused position)."""
        lengths = self.lengths.to(valid.device if valid is not None else self.lengths.device)
        if valid is None:
            return lengths[:, None] + torch.arange(length, device=lengths.device)
        return lengths[:, None] + (valid.long().cumsum(-1) - 1).clamp(min=0)

    def begin(self, batch: int, length: int, valid: torch.Tensor | None = None,
              device: torch.device | None = None) -> AttnSpec:
        """Start a step that adds `length` tokens to each of `batch` rows; returns the spec to attend with.

        valid (B, T) bool marks the real tokens of a padded step (ragged prompts); None: every
        token is real (a causal step, e.g. decoding), and nothing is read back from the device.
        When every row also holds the same number of tokens, the step is aligned: the new keys go
        to one slice of the cache, and a single-token query (or a fresh cache) needs no mask."""
        device = valid.device if valid is not None else device if device is not None else self.lengths.device
        if len(self) == 0 and self.k[0] is None:
            self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
            self._host_lengths = [0] * batch
        if batch != len(self):
            raise ValueError(f"KV cache holds {len(self)} rows but the step has {batch}")
        host = self._host_lengths
        if valid is None and batch and all(n == host[0] for n in host):
            return self._begin_aligned(batch, length, device)
        return self._begin_ragged(batch, length, valid, device)

    def _begin_aligned(self, batch: int, length: int, device: torch.device) -> AttnSpec:
        start = self._host_lengths[0]
        end = start + length
        self._step = AlignedStep(start=start, end=end, new_lengths=self.lengths.to(device) + length)
        if start == 0 or length == 1:  # plain causal from slot 0, or one query that sees every key
            return AttnSpec.causal()
        slot = start + torch.arange(length, device=device).expand(batch, length)  # (B, T)
        return AttnSpec.from_mask(_slot_mask(slot, end))

    def _begin_ragged(self, batch: int, length: int, valid: torch.Tensor | None, device: torch.device) -> AttnSpec:
        B, T = batch, length
        lengths = self.lengths.to(device)
        if valid is None:
            slot = lengths[:, None] + torch.arange(T, device=device).expand(B, T)  # (B, T) where each token goes
            rows, slots, q_slot = torch.arange(B, device=device)[:, None].expand(B, T), slot, slot
            counts = [T] * B
        else:
            slot = lengths[:, None] + valid.long().cumsum(-1) - 1
            rows, slots = valid.nonzero(as_tuple=True)[0], slot[valid]
            q_slot = torch.where(valid, slot, torch.zeros_like(slot))  # a pad query sees slot 0 only (finite, unused)
            counts = valid.long().sum(-1).tolist()
        new_host = [n + c for n, c in zip(self._host_lengths, counts)]
        end = max(new_host, default=0)
        self._step = RaggedStep(rows=rows, slots=slots, valid=valid, end=end, new_host_lengths=new_host,
                                new_lengths=lengths + torch.tensor(counts, dtype=torch.long, device=device))
        return AttnSpec.from_mask(_slot_mask(q_slot, end))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k / v (B, T, Hkv, Dh) of `layer`; return all keys / values (B, L, Hkv, Dh)."""
        keys, values = self._store(layer, k, v)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for one token per row, in SDPA's layout: k / v (B, Hkv, Dh) -> all keys / values
        (B, Hkv, L, Dh) as stored, with no transposes on the way (a decode step is call-bound)."""
        step = self._step
        if not isinstance(step, AlignedStep):  # per-row slots (or no step begun: _store says so)
            return self._store(layer, k[:, None], v[:, None])
        self._reserve(layer, k[:, None], step.end)
        keys, values = self.k[layer], self.v[layer]
        keys[:, :, step.start] = k  # every row writes the same slot
        values[:, :, step.start] = v
        return keys[:, :, :step.end], values[:, :, :step.end]

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k / v (B, T, Hkv, Dh) into this step's slots -> the stored keys / values (B, Hkv, L, Dh)."""
        step = self._step
        if step is None:
            raise RuntimeError("KVCache.update / append called outside begin() / end()")
        self._reserve(layer, k, step.end)
        if isinstance(step, AlignedStep):
            self.k[layer][:, :, step.start:step.end] = k.transpose(1, 2)
            self.v[layer][:, :, step.start:step.end] = v.transpose(1, 2)
        else:
            valid = step.valid
            self.k[layer][step.rows, :, step.slots] = k if valid is None else k[valid]
            self.v[layer][step.rows, :, step.slots] = v if valid is None else v[valid]
        return self.k[layer][:, :, :step.end], self.v[layer][:, :, :step.end]

    def end(self) -> None:
        step = self._step
        self.lengths = step.new_lengths
        self._host_lengths = ([step.end] * len(self) if isinstance(step, AlignedStep) else step.new_host_lengths)
        self._step = None

    def _reserve(self, layer: int, like: torch.Tensor, needed: int) -> None:
        B, _, Hkv, Dh = like.shape
        cur = self.k[layer]
        if cur is not None and cur.shape[2] >= needed:
            return
        cap = max(needed, 2 * cur.shape[2] if cur is not None else self.initial_capacity, MIN_CACHE_CAPACITY)
        for store in (self.k, self.v):
            new = like.new_zeros(B, Hkv, cap, Dh)
            if store[layer] is not None:
                new[:, :, :store[layer].shape[2]] = store[layer]
            store[layer] = new

    def keep_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Keep only `rows` (in that order), e.g. drop finished sequences."""
        rows = torch.as_tensor(rows, dtype=torch.long).tolist()
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths = self.lengths[idx]
        self._host_lengths = [self._host_lengths[i] for i in rows]
        # the capacity stays: it was reserved for what the remaining rows will still write
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t[idx.to(t.device)]

    def remove_rows(self, rows: list[int] | torch.Tensor) -> None:
        drop = set(torch.as_tensor(rows).tolist())
        self.keep_rows([i for i in range(len(self)) if i not in drop])

    def add_rows(self, *others: "KVCache") -> None:
        """Append the rows of `others` (e.g. freshly prefilled prompts), in order, after this
        cache's rows: one copy of every row, however many caches join."""
        for other in others:
            if other.num_layers != self.num_layers:
                raise ValueError(f"cannot merge a {other.num_layers}-layer cache into a {self.num_layers}-layer one")
        parts = [c for c in (self, *others) if c.k[0] is not None]  # caches holding rows
        if not parts:
            return
        if len(parts) == 1:
            self.k, self.v = list(parts[0].k), list(parts[0].v)
        else:
            L = max(c.capacity for c in parts)
            device = parts[0].k[0].device
            for name in ("k", "v"):
                stores = [getattr(c, name) for c in parts]
                setattr(self, name, [torch.cat([_pad_to(store[i].to(device), L) for store in stores])
                                     for i in range(self.num_layers)])
        self.lengths = torch.cat([c.lengths.to(parts[0].lengths.device) for c in parts])
        self._host_lengths = [n for c in parts for n in c._host_lengths]


class StaticKVCache:
    """Keys and values of every layer in storage allocated once, for decode steps whose tensor
    shapes depend on their batch size only (so that one step per batch size can be captured in a
    CUDA graph and replayed: infer/static_decode.py).

    Storage per layer: k, v (R, Hkv, L + 1, Dh) for R rows of `capacity` = L tokens, allocated by
    the first `add_rows` (in the dtype and on the device of the prefilled rows it copies) and
    never moved. Rows 0 .. len - 1 are live, in order; the others are free. Slot L is scratch:
    a row whose length is L or more (a free row, or a pad row of a step padded to a larger batch)
    writes its key there and attends to every slot, finite and ignored.

    A step over the first B rows (`begin(B, 1)`, then each layer's `append`, then `end()`)
    computes everything from per-row lengths on the device: a row's new key is scattered into
    slot length, the query attends to all L + 1 slots through a mask of slots <= length, its
    position is length + offset (a native model's rope delta, models/mrope.py), and `end` adds
    one to every length. Nothing is read back to the host. Prefill stays in a `KVCache`
    (variable length); `add_rows` copies its rows in.
    """

    def __init__(self, num_layers: int, rows: int, capacity: int, position_bound: int):
        self.num_layers = num_layers
        self.rows = rows
        self.capacity = capacity
        self.position_bound = max(position_bound, capacity + 1)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths: torch.Tensor | None = None  # (R,) tokens stored per row; >= L for free rows
        self.offsets: torch.Tensor | None = None  # (R,) position minus slot per row
        self._live = 0
        self._step_slot: torch.Tensor | None = None  # (B,) the slot each row writes; between begin() and end()

    def __len__(self) -> int:
        """Number of live rows."""
        return self._live

    @property
    def max_length(self) -> int:
        """An upper bound on the positions of a step, not the longest row: `LLM.decode` sizes its
        RoPE table from it, and a fixed bound keeps that table from being rebuilt (moved) between
        captured steps; the exact longest row would be a device read."""
        return self.position_bound - 1

    def begin(self, batch: int, length: int, valid: torch.Tensor | None = None,
              device: torch.device | None = None) -> AttnSpec:
        """Start a decode step over rows 0 .. batch - 1 (one new token each); returns the spec
        (a mask over the L + 1 slots) to attend with."""
        if length != 1 or valid is not None:
            raise ValueError("a static KV cache takes decode steps of one token per row; prefill into a KVCache")
        slot = self.lengths[:batch].clamp(max=self.capacity)  # (B,); free and pad rows -> scratch
        self._step_slot = slot
        keys = torch.arange(self.capacity + 1, device=slot.device)
        return AttnSpec.from_mask((keys[None] <= slot[:, None])[:, None, None])  # (B, 1, 1, L + 1)

    def position_ids(self, valid: torch.Tensor | None = None, length: int = 1) -> torch.Tensor:
        """Positions (B, 1) of the step's tokens: each row's slot plus its offset."""
        slot = self._step_slot
        return (slot + self.offsets[:slot.shape[0]])[:, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row, k / v (B, Hkv, Dh), at each row's slot; return all keys /
        values (B, Hkv, L + 1, Dh) of those rows, the same storage every step."""
        B, Hkv, Dh = k.shape
        index = self._step_slot.view(B, 1, 1, 1).expand(B, Hkv, 1, Dh)
        keys, values = self.k[layer][:B], self.v[layer][:B]
        keys.scatter_(2, index, k[:, :, None].to(keys.dtype))
        values.scatter_(2, index, v[:, :, None].to(values.dtype))
        return keys, values

    def end(self) -> None:
        self.lengths[:self._step_slot.shape[0]].add_(1)
        self._step_slot = None

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) as the live rows 0 .. len(rows) - 1, in place."""
        n = len(rows)
        if self.lengths is not None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
            for store in (self.k, self.v):
                for t in store:
                    t[:n] = t[idx]
            self.lengths[:n] = self.lengths[idx]
            self.offsets[:n] = self.offsets[idx]
            self.lengths[n:] = self.capacity
            self.offsets[n:] = 0
        self._live = n

    def add_rows(self, *others: "KVCache | StaticKVCache", offsets: list[int] | None = None) -> None:
        """Copy the live rows of `others` (e.g. prompts prefilled in a `KVCache` each), in order,
        after the live rows; `offsets` gives each added row's position offset (default 0)."""
        count = sum(len(o) for o in others)
        if self._live + count > self.rows:
            raise ValueError(f"static KV cache of {self.rows} rows cannot take {count} more after {self._live}")
        offsets = offsets if offsets is not None else [0] * count
        for other in others:
            n = len(other)
            if n == 0:
                continue
            if self.lengths is None:
                self._allocate(other)
            slots = min(other.capacity, self.capacity)
            start, stop = self._live, self._live + n
            for store, source in ((self.k, other.k), (self.v, other.v)):
                for layer in range(self.num_layers):
                    store[layer][start:stop, :, :slots] = source[layer][:n, :, :slots]
            self.lengths[start:stop] = other.lengths[:n]
            self.offsets[start:stop] = torch.tensor(offsets[:n], dtype=torch.long)
            offsets = offsets[n:]
            self._live = stop

    def resized(self, rows: int, capacity: int) -> "StaticKVCache":
        """A new cache of `rows` x `capacity` holding this one's live rows (each cut to `capacity`)."""
        new = StaticKVCache(self.num_layers, rows, capacity, self.position_bound)
        if self.lengths is not None:
            new.add_rows(self, offsets=self.offsets[:self._live].tolist())
        return new

    def _allocate(self, like: "KVCache | StaticKVCache") -> None:
        """Storage for every layer in the dtype and on the device of `like`'s tensors."""
        for store, source in ((self.k, like.k), (self.v, like.v)):
            for layer, t in enumerate(source):
                store[layer] = t.new_zeros(self.rows, t.shape[1], self.capacity + 1, t.shape[3])
        device = like.k[0].device
        self.lengths = torch.full((self.rows,), self.capacity, dtype=torch.long, device=device)
        self.offsets = torch.zeros(self.rows, dtype=torch.long, device=device)


def _slot_mask(q_slot: torch.Tensor, length: int) -> torch.Tensor:
    """q_slot (B, T) cache slot of each query -> (B, 1, T, length) bool: keys up to that slot."""
    key_pos = torch.arange(length, device=q_slot.device)
    return (key_pos[None, None, :] <= q_slot[:, :, None])[:, None]


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the cache length dim of (B, Hkv, L, Dh) to `length`."""
    return F.pad(t, (0, 0, 0, length - t.shape[2])) if t.shape[2] < length else t
