"""SAM-style ViT, the high-resolution tower of DeepSeek-VL, and DeepSeek-VL's hybrid combination.

The tower follows the image encoder of SAM (Kirillov et al., "Segment Anything", 2023) as
transformers' modeling_sam.py writes it (`SamVisionEncoder`, the `high_res_vision_model` of
modeling_deepseek_vl_hybrid.py), so that its weights load by renaming alone (models/hf/sam.py):

- Patch embedding: a conv with bias; a learned absolute position grid added (no resizing: the tower
  takes images of `image_size` only, as the reference does).
- Blocks: pre-norm, fused qkv, an fc MLP. Most blocks attend within non-overlapping windows of
  `window_size` x `window_size` patches (the grid zero-padded to a multiple of the window after
  the norm; the padding tokens are attended to, as in the reference, and cut off after); the
  blocks in `global_attn_indexes` attend over the whole grid.
- Decomposed relative position bias (from MViTv2, Li et al., 2022): each attention adds
  q . R_h[row_q - row_k] + q . R_w[col_q - col_k] to its logits, one table per axis sized for its
  window (or the grid).
- Neck: conv 1x1 -> LayerNorm over channels -> conv 3x3 -> LayerNorm over channels, to
  `output_channels` (both convs without bias).

DeepSeek-VL's hybrid vision (Lu et al., "DeepSeek-VL", 2024; `DeepseekVLHybridModel.
get_image_features` in transformers) runs a SigLIP `VisionEncoder` on the low-resolution image
and this tower on the high-resolution one, and `HybridCombiner` joins them:

- high-resolution branch: the neck's output, plus `global_scale` (the reference's
  `high_res_vision_alpha`, zero at initialisation) times the output of the first global block
  through a second neck; both branches reduced by the same downsampler (bilinear resize to
  4x the low-resolution grid, then two stride-2 3x3 convs, each doubling the channels) to one
  feature per low-resolution patch;
- combination: each tower's tokens projected to half the LLM width, concatenated (high-resolution
  first), GELU, one linear layer (the reference's aligner).

`HybridVisionTower.parallel_streams` (off by default) runs the two towers concurrently on two CUDA
streams (models/streams.py), in training and inference; on the CPU they run one after the other.

In a `VLMModel` (models/vlm.py) an image is one row holding both resolutions, the high-resolution
pixels then the low-resolution ones, each channels-first and flattened (`split_hybrid_rows`; the
data side's processor, data/padded_images.py, writes them so), so prompts and packs carry it as
they carry any tile.

Shape suffixes: N images, g patches per side, D tower width, Co neck channels, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmkit.models.config import HYBRID_DOWNSAMPLE, HybridVisionConfig, SamVisionConfig
from vlmkit.models.streams import run_branches
from vlmkit.models.vision import INIT_STD, VisionEncoder, activation, init_dense_and_norms

NECK_NORM_EPS = 1e-6
"""Epsilon of the necks' channel norms (the reference hard-codes it, whatever layer_norm_eps says)."""


@dataclass(frozen=True)
class SamVisionOutput:
    features: torch.Tensor
    """(N, Co, g, g): the neck's output (HF's `last_hidden_state`), channels first."""
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Block index -> that block's output (N, g, g, D), for the blocks the caller asked to keep."""


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamNeck(nn.Module):
    """(N, g, g, D) -> (N, Co, g, g): conv 1x1 -> norm -> conv 3x3 -> norm, convs without bias."""

    def __init__(self, cfg: SamVisionConfig):
        super().__init__()
        Co = cfg.output_channels
        self.conv1 = nn.Conv2d(cfg.hidden_size, Co, kernel_size=1, bias=False)
        self.norm1 = ChannelLayerNorm(Co, eps=NECK_NORM_EPS)
        self.conv2 = nn.Conv2d(Co, Co, kernel_size=3, padding=1, bias=False)
        self.norm2 = ChannelLayerNorm(Co, eps=NECK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1(x.permute(0, 3, 1, 2)))
        return self.norm2(self.conv2(x))


def relative_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(2 * size - 1, Dh) table -> (size, size, Dh): entry [i, j] is the row for offset i - j."""
    offsets = torch.arange(size, device=rel_pos.device)
    return rel_pos[offsets[:, None] - offsets[None, :] + size - 1]


def relative_position_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           h: int, w: int) -> torch.Tensor:
    """Decomposed relative position bias: q (B, h * w, Dh) -> (B, h * w, h * w), the logit bias
    q . R_h[row_q - row_k] + q . R_w[col_q - col_k] of every query-key pair."""
    B, _, Dh = q.shape
    q = q.reshape(B, h, w, Dh)
    rel_h = torch.einsum("bhwc,hkc->bhwk", q, relative_table(rel_pos_h, h))  # (B, h, w, h): per key row
    rel_w = torch.einsum("bhwc,wkc->bhwk", q, relative_table(rel_pos_w, w))  # (B, h, w, w): per key column
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, h * w, h * w)


class SamAttention(nn.Module):
    """Self-attention over a (B, h, w, D) map (a window or the whole grid) with the relative bias."""

    def __init__(self, cfg: SamVisionConfig, side: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_heads
        if cfg.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, D = x.shape
        H, L = self.num_heads, h * w
        q, k, v = self.qkv(x).reshape(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
        bias = None
        if self.rel_pos_h is not None:
            bias = relative_position_bias(q.reshape(B * H, L, -1), self.rel_pos_h, self.rel_pos_w, h, w)
            bias = bias.reshape(B, H, L, L)
        # The attention entry point (models/attention.py) takes boolean masks only; the relative
        # bias is additive, so SDPA is called directly.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, L, Dh)
        return self.proj(out.permute(0, 2, 1, 3).reshape(B, h, w, D))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, h, w, D) -> (N * nh * nw, window, window, D), the map zero-padded at the bottom and right
    to a multiple of the window, windows in raster order per image."""
    N, h, w, D = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    nh, nw = x.shape[1] // window, x.shape[2] // window
    x = x.reshape(N, nh, window, nw, window, D).transpose(2, 3)
    return x.reshape(N * nh * nw, window, window, D)


def window_unpartition(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `window_partition`: (N * nh * nw, window, window, D) -> (N, h, w, D), padding cut off."""
    nh, nw = -(-h // window), -(-w // window)
    D = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, window, window, D).transpose(2, 3)
    return x.reshape(-1, nh * window, nw * window, D)[:, :h, :w]


class SamMLP(nn.Module):
    def __init__(self, cfg: SamVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SamBlock(nn.Module):
    """x + attn(norm1(x)) within windows (or globally), then x + mlp(norm2(x))."""

    def __init__(self, cfg: SamVisionConfig, window: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = SamAttention(cfg, side=window or cfg.grid_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SamMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window:
            height, width = h.shape[1:3]
            h = window_unpartition(self.attn(window_partition(h, self.window)), self.window, height, width)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class SamVisionTower(nn.Module):
    """`forward(pixel_values (N, C, S, S), keep_blocks) -> SamVisionOutput`, S = `image_size`."""

    def __init__(self, cfg: SamVisionConfig):
        super().__init__()
        self.config = cfg
        g = cfg.grid_size
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, cfg.hidden_size)) if cfg.use_abs_pos else None
        self.layers = nn.ModuleList(SamBlock(cfg, cfg.block_window(i)) for i in range(cfg.num_layers))
        self.neck = SamNeck(cfg)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (loading a checkpoint overwrites it): linear and
        conv weights truncated normal, std 0.02, biases 0, norms weight 1 and bias 0; the position
        grid normal, std 0.02; the relative tables 0 (as SAM)."""
        init_dense_and_norms(self)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=INIT_STD)
        for layer in self.layers:
            if layer.attn.rel_pos_h is not None:
                nn.init.zeros_(layer.attn.rel_pos_h)
                nn.init.zeros_(layer.attn.rel_pos_w)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (N, {', '.join(map(str, expected))}), "
                             f"got shape {tuple(pixel_values.shape)}")

    def forward(self, pixel_values: torch.Tensor, keep_blocks: tuple[int, ...] = ()) -> SamVisionOutput:
        """The neck's features, and the outputs of the blocks in `keep_blocks` (their indexes)."""
        self._check_pixels(pixel_values)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).permute(0, 2, 3, 1)  # (N, g, g, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        kept = {}
        for i, block in enumerate(self.layers):
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
            if i in keep_blocks:
                kept[i] = x
        return SamVisionOutput(features=self.neck(x), block_outputs=kept)


# --- DeepSeek-VL's hybrid combination ---------------------------------------------------------------


class HighResDownsample(nn.Module):
    """(N, Co, g_hi, g_hi) -> (N, 4 Co, g, g), g the low-resolution grid: a bilinear resize to 4g,
    then two stride-2 3x3 convs without bias, each doubling the channels."""

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.size = HYBRID_DOWNSAMPLE * grid
        self.conv1 = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * channels, 4 * channels, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class HybridCombiner(nn.Module):
    """The two towers' outputs -> (N, g * g, out_hidden_size): one token per low-resolution patch."""

    def __init__(self, cfg: HybridVisionConfig):
        super().__init__()
        self.config = cfg
        half = cfg.out_hidden_size // 2
        self.global_neck = SamNeck(cfg.high_res)
        self.downsample = HighResDownsample(cfg.high_res.output_channels, cfg.low_res.grid_size)
        self.global_scale = nn.Parameter(torch.zeros(1))
        self.low_res_proj = nn.Linear(cfg.low_res.hidden_size, half)
        self.high_res_proj = nn.Linear(cfg.high_res_channels, half)
        self.out_proj = nn.Linear(cfg.out_hidden_size, cfg.out_hidden_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Dense and conv weights truncated normal, std 0.02, biases 0, norms 1 / 0; `global_scale`
        0, so the global branch starts switched off (as the reference)."""
        init_dense_and_norms(self)
        nn.init.zeros_(self.global_scale)

    def high_res_tokens(self, high_res: SamVisionOutput) -> torch.Tensor:
        """(N, g * g, 4 Co): the neck's features plus `global_scale` times the first global block's
        output through the second neck, both downsampled to the low-resolution grid."""
        final = self.downsample(high_res.features)
        global_ = self.downsample(self.global_neck(high_res.block_outputs[self.config.high_res_block]))
        x = final + global_ * self.global_scale
        return x.flatten(2).transpose(1, 2)

    def forward(self, low_res: torch.Tensor, high_res: SamVisionOutput) -> torch.Tensor:
        """low_res (N, g * g, Dl): the SigLIP tower's last hidden state (post-layernormed)."""
        g = self.config.low_res.grid_size
        if low_res.shape[1] != g * g:
            raise ValueError(f"the low-resolution tokens must be its native {g}x{g} grid "
                             f"({g * g} tokens), got {low_res.shape[1]}")
        high = self.high_res_proj(self.high_res_tokens(high_res))
        return self.out_proj(F.gelu(torch.cat([high, self.low_res_proj(low_res)], dim=-1)))


def split_hybrid_rows(rows: torch.Tensor, cfg: HybridVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R) rows of both resolutions (module docstring) -> the low-resolution images (N, C, S_lo,
    S_lo) and the high-resolution ones (N, C, S_hi, S_hi)."""
    C, lo, hi = cfg.high_res.num_channels, cfg.low_res.image_size, cfg.high_res.image_size
    if rows.dim() != 2 or rows.shape[1] != C * (hi * hi + lo * lo):
        raise ValueError(f"a hybrid model takes one row per image of {C} x ({hi}^2 + {lo}^2) values (its "
                         f"high- then low-resolution pixels), got shape {tuple(rows.shape)}")
    high, low = rows.split([C * hi * hi, C * lo * lo], dim=1)
    return low.reshape(-1, C, lo, lo), high.reshape(-1, C, hi, hi)


class HybridVisionTower(nn.Module):
    """Both towers and the combiner: `forward(pixel_values, high_res_pixel_values) -> (N, g * g, Do)`."""

    def __init__(self, cfg: HybridVisionConfig):
        super().__init__()
        self.config = cfg
        self.low_res = VisionEncoder(cfg.low_res)
        self.high_res = SamVisionTower(cfg.high_res)
        self.combiner = HybridCombiner(cfg)
        self.parallel_streams = False
        """On a CUDA device, run the two towers concurrently on two CUDA streams (models/streams.py);
        elsewhere, and when off, one after the other. Same results either way."""

    @property
    def gradient_checkpointing(self) -> bool:
        return self.low_res.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """Both towers recompute their blocks in the backward pass (`VLMModel.set_gradient_checkpointing`)."""
        self.low_res.gradient_checkpointing = self.high_res.gradient_checkpointing = on

    def forward(self, pixel_values: torch.Tensor, high_res_pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, S_lo, S_lo) for SigLIP, high_res_pixel_values (N, C, S_hi, S_hi) for SAM."""
        keep = self.config.high_res_block

        def high_res_branch() -> tuple[torch.Tensor, torch.Tensor]:  # the tensors the combiner reads
            out = self.high_res(high_res_pixel_values, keep_blocks=(keep,))
            return out.features, out.block_outputs[keep]

        if self.parallel_streams:
            (features, kept), low_res = run_branches(high_res_branch, lambda: self.low_res(pixel_values),
                                                     side_inputs=(high_res_pixel_values,))
        else:
            (features, kept), low_res = high_res_branch(), self.low_res(pixel_values)
        return self.combiner(low_res, SamVisionOutput(features, {keep: kept}))
