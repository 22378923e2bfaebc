"""Native-resolution vision tower of the Qwen2-VL family: images of any size and videos, packed.

One implementation for three towers (`NativeVisionConfig.style`), following transformers'
modeling_qwen2_vl.py, modeling_qwen2_5_vl.py and modeling_qwen3_vl.py (Wang et al., "Qwen2-VL",
2024; Bai et al., "Qwen2.5-VL", 2025; Qwen3-VL, 2025) so that their `model.visual` weights load by
renaming alone (models/hf/native_vision.py):

- Input: the processor's flattened patches (P, C * T * p * p), every image and video of a batch in
  one sequence, and `grid_thw` (N, 3): each item's frames-pairs t, patch rows h and columns w. An
  image is one frame pair (its frame repeated); a video has t pairs. The patches of a frame come in
  merge-window order: the merge x merge patches that become one LLM token are adjacent.
- Patch embedding: a Conv3d over (temporal_patch_size, p, p) with that stride: a linear map of
  each patch.
- Positions: 2-D rotary embedding (the first half of each head's rotated pairs turns with the
  patch row, the second with its column); Qwen3-VL also adds a learned position grid resized
  bilinearly (align_corners=True) to each item's grid; `position_grid: indexed` gives each patch
  the grid's entry at its own row and column instead (an absolute place, the same on every size).
- Attention never crosses a frame: the frames are the samples of a packed `AttnSpec`
  (models/attention.py). Qwen2.5-VL's window attention reorders the tokens so that each window
  of window_size pixels is contiguous and attends within windows, except in the blocks listed in
  `fullatt_block_indexes`, which attend over the whole frame.
- Merger: a norm, then merge x merge neighbouring patches concatenated, then Linear -> GELU ->
  Linear to the LLM width. Qwen3-VL's deepstack mergers (one per block in
  `deepstack_visual_indexes`) normalise after concatenating.

`forward` returns `NativeVisionOutput`: the merged tokens of every item in input order and the
deepstack features (the same token layout), which the decoder adds to its first layers'
hidden states.

Shape suffixes: P patches (all items together), M merged tokens (P / merge^2), D tower width,
Do output width, H heads, Dh head dim, N items (images / videos).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmkit.models.attention import AttentionBackend, AttnSpec, BackendName, select_backend
from vlmkit.models.config import NativeVisionConfig
from vlmkit.models.llm import RMSNorm, apply_rope, signed_sin
from vlmkit.models.vision import INIT_STD, activation, init_dense_and_norms

NORM_EPS = 1e-6
"""Epsilon of every norm of these towers (the reference hard-codes it)."""


@dataclass(frozen=True)
class TowerStyle:
    """What a `NativeVisionConfig.style` decides about the block structure."""

    rms_norm: bool
    """RMSNorm (weight only) instead of LayerNorm, in the blocks and the merger."""
    gated_mlp: bool
    """down(act(gate(x)) * up(x)) instead of fc2(act(fc1(x)))."""
    patch_bias: bool
    """The patch embedding has a bias."""


STYLES = {
    "qwen2_vl": TowerStyle(rms_norm=False, gated_mlp=False, patch_bias=False),
    "qwen2_5_vl": TowerStyle(rms_norm=True, gated_mlp=True, patch_bias=False),
    "qwen3_vl": TowerStyle(rms_norm=False, gated_mlp=False, patch_bias=True),
}


@dataclass(frozen=True)
class NativeVisionOutput:
    features: torch.Tensor
    """(M, Do): merged tokens, item after item in `grid_thw` order (t * h * w / merge^2 each)."""
    deepstack_features: tuple[torch.Tensor, ...] = ()
    """One (M, Do) tensor per block of `deepstack_visual_indexes`, in that order."""


# --- geometry of a packed batch, from grid_thw alone (built on the CPU: small index tensors) ---------


def check_grid(grid_thw: torch.Tensor, num_patches: int, cfg: NativeVisionConfig) -> None:
    """ValueError unless grid_thw is (N, 3) of positive sizes, h and w are multiples of the merge
    size, and the items hold `num_patches` patches together."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be (num_items, 3) rows of (t, h, w), got shape {tuple(grid_thw.shape)}")
    if (grid_thw < 1).any():
        raise ValueError(f"grid_thw sizes must be >= 1, got {grid_thw.tolist()}")
    merge = cfg.spatial_merge_size
    if (grid_thw[:, 1:] % merge).any():
        raise ValueError(f"grid_thw h and w must be multiples of spatial_merge_size {merge}, got {grid_thw.tolist()}")
    expected = int(grid_thw.prod(-1).sum())
    if expected != num_patches:
        raise ValueError(f"grid_thw {grid_thw.tolist()} describes {expected} patches but pixel_values holds "
                         f"{num_patches}")


def merged_token_counts(grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """Merged tokens of each item (t * h * w / merge^2): how `features` splits per image / video."""
    return (grid_thw.prod(-1) // spatial_merge_size ** 2).tolist()


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """(F + 1,) int32 boundaries of every frame pair of every item: each attends within itself."""
    frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(frame_sizes.cumsum(0), (1, 0)).to(torch.int32)


def merge_order(h: int, w: int, merge: int) -> torch.Tensor:
    """(h * w,) raster index of each patch of an h x w frame, in merge-window order (the merge x
    merge patches of one merged token adjacent, tokens in raster order)."""
    raster = torch.arange(h * w).view(h // merge, merge, w // merge, merge)
    return raster.transpose(1, 2).flatten()


def patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(P, 2) row and column of every patch, in the processor's order (merge-window order per frame,
    frames after each other)."""
    pieces = []
    for t, h, w in grid_thw.tolist():
        order = merge_order(h, w, merge)
        pieces.append(torch.stack([order // w, order % w], dim=-1).repeat(t, 1))  # (t * h * w, 2)
    return torch.cat(pieces)


def window_layout(grid_thw: torch.Tensor, cfg: NativeVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Window attention: (index (M,), cu_window_seqlens (W + 1,) int32).

    index[j] is the merged token placed j-th when each frame's tokens are regrouped window by
    window (windows of window_size pixels, in raster order; tokens in raster order within a window;
    windows at the right and bottom edges are cut short). cu_window_seqlens bounds each window in
    patches (merge^2 per token)."""
    merge = cfg.spatial_merge_size
    order, window_sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        frame_order, frame_windows = _frame_windows(h // merge, w // merge, cfg.window_size // (merge * cfg.patch_size))
        frame_tokens = frame_order.numel()
        order += [frame_order + offset + i * frame_tokens for i in range(t)]
        window_sizes += frame_windows * t
        offset += t * frame_tokens
    cu = F.pad(torch.tensor(window_sizes).cumsum(0) * merge * merge, (1, 0)).to(torch.int32)
    return torch.cat(order), cu


def _frame_windows(rows: int, cols: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens of a rows x cols frame regrouped into side x side windows: (order, tokens
    per window)."""
    tokens = torch.arange(rows * cols).view(rows, cols)
    windows = [tokens[top:top + side, left:left + side].flatten()
               for top in range(0, rows, side) for left in range(0, cols, side)]
    return torch.cat(windows), [len(window) for window in windows]


def rotary_cos_sin(rows_cols: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 2) rows and columns -> cos, signed sin (P, 1, Dh) for `apply_rope` (fp32).

    Each position's angles are [row * f, col * f] with f the Dh / 4 frequencies of a Dh / 2 RoPE,
    repeated for both halves of the head: the pairs (i, i + Dh / 2) of the first quarter turn with
    the row, those of the second quarter with the column."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=rows_cols.device, dtype=torch.float32) / half)
    angles = (rows_cols.float()[:, :, None] * inv_freq).flatten(1)  # (P, Dh / 2): row angles, column angles
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # (P, 1, Dh)
    return angles.cos(), signed_sin(angles.sin())


def _packed_spec(cu_seqlens: torch.Tensor, device: torch.device) -> AttnSpec:
    """A packed spec on `device` from CPU boundaries; the longest sample is measured on the CPU,
    so building it never waits for the device."""
    return AttnSpec.packed(cu_seqlens.to(device), max_seqlen=int(cu_seqlens.diff().max()))


# --- modules ----------------------------------------------------------------------------------------


def _norm(cfg: NativeVisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, NORM_EPS) if STYLES[cfg.style].rms_norm else nn.LayerNorm(dim, eps=NORM_EPS)


class PatchEmbed(nn.Module):
    """Flattened patches (P, C * T * p * p) -> (P, D) by a Conv3d whose kernel and stride are the
    whole patch (the reference's parameter, so its weights load as they are)."""

    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel,
                              bias=STYLES[cfg.style].patch_bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # One kernel position per patch: the convolution is exactly a matrix product with the
        # flattened kernel, run as one on the rows the processor already flattened.
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.proj.bias)


class NativeVisionAttention(nn.Module):
    """Bidirectional attention within each sample of a packed spec (frames or windows), with 2-D RoPE."""

    def __init__(self, cfg: NativeVisionConfig, attend: AttentionBackend):
        super().__init__()
        self.attend = attend
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        P, D = x.shape
        q, k, v = self.qkv(x).view(P, 3, self.num_heads, D // self.num_heads).unbind(1)  # (P, H, Dh) each
        out = self.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, spec, causal=False)
        return self.proj(out.reshape(P, D))


class NativeVisionMLP(nn.Module):
    """fc2(act(fc1(x))) (Qwen2-VL, Qwen3-VL) or down(act(gate(x)) * up(x)) (Qwen2.5-VL); all with biases."""

    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.gated = STYLES[cfg.style].gated_mlp
        D, I = cfg.hidden_size, cfg.intermediate_size
        if self.gated:
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, I), nn.Linear(D, I), nn.Linear(I, D)
        else:
            self.fc1, self.fc2 = nn.Linear(D, I), nn.Linear(I, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class NativeVisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: NativeVisionConfig, attend: AttentionBackend):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.attn = NativeVisionAttention(cfg, attend)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.mlp = NativeVisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, spec)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """(P, D) -> (P / merge^2, Do): norm, merge^2 adjacent patches concatenated, Linear -> GELU -> Linear.

    The final merger normalises each patch before concatenating; Qwen3-VL's deepstack mergers
    (`norm_after_merge`) normalise the concatenated merge^2 * D channels instead."""

    def __init__(self, cfg: NativeVisionConfig, norm_after_merge: bool = False):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_merge = norm_after_merge
        self.norm = _norm(cfg, self.merged_dim if norm_after_merge else cfg.hidden_size)
        self.fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.fc2 = nn.Linear(self.merged_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_merge:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.fc2(F.gelu(self.fc1(x)))


class NativeVisionTower(nn.Module):
    """The tower: `forward(pixel_values (P, C*T*p*p), grid_thw (N, 3)) -> NativeVisionOutput`."""

    def __init__(self, cfg: NativeVisionConfig, attention_backend: BackendName = "auto"):
        super().__init__()
        self.config = cfg
        attend = select_backend(attention_backend)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = (nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
                          if cfg.num_position_embeddings else None)
        self.blocks = nn.ModuleList(NativeVisionBlock(cfg, attend) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.deepstack_mergers = nn.ModuleList(PatchMerger(cfg, norm_after_merge=True)
                                               for _ in cfg.deepstack_visual_indexes)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (loading a checkpoint overwrites it): linear and
        patch weights truncated normal, std 0.02; biases 0; norms weight 1 (bias 0); the learned
        position grid normal, std `position_init_std`."""
        init_dense_and_norms(self)  # linears and every norm, RMSNorm included
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=INIT_STD)  # a Conv3d: not covered there
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=self.config.position_init_std)

    def learned_positions(self, grid_thw: torch.Tensor, rows_cols: torch.Tensor | None = None) -> torch.Tensor:
        """(P, D): the learned position grid at every patch, in the processor's patch order, repeated
        for every frame pair: resized bilinearly (align_corners=True) to each item's h x w, or
        indexed by each patch's row and column (`NativeVisionConfig.position_grid`; `rows_cols`,
        patch_rows_cols' result where the caller has it). grid_thw and rows_cols on the CPU."""
        side = self.config.position_grid_side
        weight = self.pos_embed.weight
        if self.config.position_grid == "indexed":
            if rows_cols is None:
                rows_cols = patch_rows_cols(grid_thw, self.config.spatial_merge_size)
            rows_cols = rows_cols.clamp(max=side - 1)
            return weight[(rows_cols[:, 0] * side + rows_cols[:, 1]).to(weight.device)]
        table = weight.t().reshape(1, -1, side, side)  # (1, D, side, side)
        pieces = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)  # (1, D, h, w)
            order = merge_order(h, w, self.config.spatial_merge_size).to(weight.device)
            pieces.append(grid.flatten(2)[0].t()[order].repeat(t, 1))  # (t * h * w, D)
        return torch.cat(pieces)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> NativeVisionOutput:
        """pixel_values (P, C * T * p * p), grid_thw (N, 3) -> merged tokens (and deepstack features)."""
        cfg = self.config
        grid_thw = grid_thw.cpu()
        check_grid(grid_thw, pixel_values.shape[0], cfg)
        x = self.patch_embed(pixel_values)  # (P, D)
        device = x.device
        rows_cols = patch_rows_cols(grid_thw, cfg.spatial_merge_size)  # the rotary and the indexed grid's places
        if self.pos_embed is not None:
            x = x + self.learned_positions(grid_thw, rows_cols).to(x.dtype)
        cos, sin = rotary_cos_sin(rows_cols.to(device), cfg.head_dim, cfg.rope_theta)
        frame_spec = _packed_spec(frame_cu_seqlens(grid_thw), device)
        block_specs = [frame_spec] * cfg.depth
        window_index = None
        if cfg.window_size:
            window_index, cu_windows = window_layout(grid_thw, cfg)
            window_index = window_index.to(device)
            x, cos, sin = (self._to_windows(t, window_index) for t in (x, cos, sin))
            window_spec = _packed_spec(cu_windows, device)
            block_specs = [frame_spec if i in cfg.fullatt_block_indexes else window_spec for i in range(cfg.depth)]
        x, deepstack = self._run_blocks(x, cos, sin, block_specs)
        merged = [self.merger(x), *deepstack]
        if window_index is not None:  # back to the input's token order
            inverse = torch.argsort(window_index)
            merged = [m[inverse] for m in merged]
        return NativeVisionOutput(features=merged[0], deepstack_features=tuple(merged[1:]))

    def _to_windows(self, t: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Reorder the rows of t (P, ...) by merged token, each token's merge^2 patches kept together."""
        unit = self.config.spatial_merge_size ** 2
        return t.reshape(t.shape[0] // unit, unit, *t.shape[1:])[window_index].reshape(t.shape)

    def _run_blocks(self, x, cos, sin, block_specs: list[AttnSpec]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks, each under its spec; the deepstack blocks' outputs merged on the way."""
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        deepstack_at = {layer: i for i, layer in enumerate(self.config.deepstack_visual_indexes)}
        deepstack = []
        for i, (block, spec) in enumerate(zip(self.blocks, block_specs)):
            if use_checkpoint:
                x = checkpoint(block, x, cos, sin, spec, use_reentrant=False)
            else:
                x = block(x, cos, sin, spec)
            if i in deepstack_at:
                deepstack.append(self.deepstack_mergers[deepstack_at[i]](x))
        return x, deepstack
