"""Vision-to-LLM adapters: turn an image's vision features into the LLM's visual tokens.

Three kinds (AdapterConfig.kind):

- mlp: LLaVA-1.5's `mlp2x_gelu` (Liu et al., "Improved Baselines with Visual Instruction Tuning",
  2023): Linear -> GELU -> Linear, one token per patch. Layers are named `linear_1`, `linear_2`, ...
  as llava-hf's `multi_modal_projector` names them.
- pixel_shuffle: space-to-depth by r, then LayerNorm and the MLP: each r x r block of neighbouring
  patches becomes one token of r^2 * Dv channels, so r^2 fewer tokens (InternVL, Idefics3, nanoVLM).
  The LayerNorm over the r^2 * Dv channels is InternVL's projector (`mlp1`: LayerNorm -> Linear ->
  GELU -> Linear): without it the raw vision features carry a large image-independent component
  that the MLP passes on, and after the LLM's RMSNorm the part that differs between images is tiny.
  Idefics3's and SmolVLM's connector is the shuffle and one linear layer without bias
  (`AdapterConfig.norm`, `bias`, depth 1); their tower's post-layernorm normalises the features
  instead. The channel order of a merged token (block row, block column, channel) is theirs and
  InternVL's.
- resampler: a fixed number of learned queries read the patches through one cross-attention layer
  (Qwen-VL, Bai et al. 2023, section 2.1; MiniCPM-V). Fixed 2-D sin-cos position embeddings of the
  patch grid are added to the keys, so any grid size works, and the output is always num_queries
  tokens.

All three take the patch grid (rows, cols) of the features, so images at a non-native size (a
different grid, from interpolated position embeddings) work too; a square grid is assumed when
it is not given.

Shape suffixes: N images (tiles), P patches, Dv vision width, D LLM width, Q queries.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from vlmkit.models.attention import AttnSpec, select_backend
from vlmkit.models.config import AdapterConfig
from vlmkit.models.vision import INIT_STD, activation, init_dense_and_norms


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class MLP(nn.Sequential):
    """linear_1 -> act -> linear_2 (-> act -> linear_3 ...): `depth` linear layers."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, act: str, bias: bool = True):
        layers: list[tuple[str, nn.Module]] = [("linear_1", nn.Linear(in_dim, out_dim, bias=bias))]
        for i in range(2, depth + 1):
            layers += [(f"act_{i - 1}", _Activation(act)), (f"linear_{i}", nn.Linear(out_dim, out_dim, bias=bias))]
        super().__init__(OrderedDict(layers))


def square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; pass grid=(rows, cols)")
    return side, side


class MLPAdapter(nn.Module):
    """One visual token per patch (LLaVA-1.5)."""

    def __init__(self, cfg: AdapterConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        self.mlp = MLP(vision_dim, llm_dim, cfg.depth, cfg.hidden_act, cfg.bias)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.mlp(features)  # (N, P, Dv) -> (N, P, D)


class PixelShuffleAdapter(nn.Module):
    """Space-to-depth by `scale_factor` r, LayerNorm (`cfg.norm`), then an MLP: (N, h*w, Dv) ->
    (N, h/r * w/r, D)."""

    def __init__(self, cfg: AdapterConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.norm = nn.LayerNorm(vision_dim * cfg.scale_factor ** 2) if cfg.norm else nn.Identity()
        self.mlp = MLP(vision_dim * cfg.scale_factor ** 2, llm_dim, cfg.depth, cfg.hidden_act, cfg.bias)

    def shuffle(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        N, P, Dv = features.shape
        h, w = grid
        r = self.scale_factor
        if h * w != P:
            raise ValueError(f"grid {h}x{w} does not match {P} patches")
        if h % r or w % r:
            raise ValueError(f"pixel_shuffle scale_factor {r} must divide the patch grid {h}x{w}; "
                             f"use an image size whose patch grid is a multiple of {r}")
        x = features.reshape(N, h // r, r, w // r, r, Dv)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h/r, w/r, r, r, Dv): each r x r block together
        return x.reshape(N, (h // r) * (w // r), r * r * Dv)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = grid or square_grid(features.shape[1])
        return self.mlp(self.norm(self.shuffle(features, grid)))  # (N, P / r^2, D)


def sincos_2d(grid: tuple[int, int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE, He et al. 2021): (h*w, dim), row-major.

    Half the channels encode the row, half the column; each half is [sin(p w_i), cos(p w_i)] with
    w_i = 1 / 10000^(i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embeddings need a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4))
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    parts = []
    for pos in (rows, cols):
        angle = pos[:, None] * omega[None, :]  # (h*w, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(dtype)  # (h*w, dim)


class ResamplerAdapter(nn.Module):
    """num_queries learned queries cross-attend to the patches: (N, P, Dv) -> (N, Q, D)."""

    def __init__(self, cfg: AdapterConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        if llm_dim % cfg.num_heads:
            raise ValueError(f"resampler num_heads {cfg.num_heads} must divide the LLM width {llm_dim}")
        self.num_heads = cfg.num_heads
        self.attend = select_backend("sdpa")  # queries and patches of equal count per image: no packed layout
        self.query = nn.Parameter(torch.zeros(cfg.num_queries, llm_dim))
        self.kv_proj = nn.Linear(vision_dim, llm_dim, bias=False)
        self.ln_q = nn.LayerNorm(llm_dim)
        self.ln_kv = nn.LayerNorm(llm_dim)
        self.q_proj = nn.Linear(llm_dim, llm_dim)
        self.k_proj = nn.Linear(llm_dim, llm_dim)
        self.v_proj = nn.Linear(llm_dim, llm_dim)
        self.out_proj = nn.Linear(llm_dim, llm_dim)
        self.ln_post = nn.LayerNorm(llm_dim)
        self.proj = nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        N, P, _ = features.shape
        grid = grid or square_grid(P)
        if grid[0] * grid[1] != P:
            raise ValueError(f"grid {grid[0]}x{grid[1]} does not match {P} patches")
        kv = self.ln_kv(self.kv_proj(features))  # (N, P, D)
        D = kv.shape[-1]
        pos = sincos_2d(grid, D, device=kv.device, dtype=kv.dtype)  # (P, D)
        q = self.ln_q(self.query).expand(N, -1, -1)  # (N, Q, D)
        Dh = D // self.num_heads
        q_h = self.q_proj(q).unflatten(-1, (self.num_heads, Dh))  # (N, Q, H, Dh)
        k_h = self.k_proj(kv + pos).unflatten(-1, (self.num_heads, Dh))  # (N, P, H, Dh)
        v_h = self.v_proj(kv).unflatten(-1, (self.num_heads, Dh))
        out = self.attend(q_h, k_h, v_h, AttnSpec.causal(), causal=False)  # (N, Q, H, Dh)
        out = self.out_proj(out.flatten(-2))  # (N, Q, D)
        return self.proj(self.ln_post(out))


ADAPTERS = {"mlp": MLPAdapter, "pixel_shuffle": PixelShuffleAdapter, "resampler": ResamplerAdapter}


def build_adapter(cfg: AdapterConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    """The adapter of kind `cfg.kind`, with its weights initialised (see `init_adapter_weights`)."""
    adapter = ADAPTERS[cfg.kind](cfg, vision_dim, llm_dim)
    init_adapter_weights(adapter)
    return adapter


@torch.no_grad()
def init_adapter_weights(adapter: nn.Module) -> None:
    """Linear weights: truncated normal, std 0.02; biases 0; layer norms 1 / 0; resampler queries:
    truncated normal, std 0.02 (Qwen-VL)."""
    init_dense_and_norms(adapter)
    if isinstance(adapter, ResamplerAdapter):
        nn.init.trunc_normal_(adapter.query, std=INIT_STD)
