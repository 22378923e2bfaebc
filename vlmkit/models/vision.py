"""ViT vision encoder, compatible with HF `SiglipVisionModel`, `CLIPVisionModel`, `Aimv2VisionModel`,
`InternVLVisionModel` and `Idefics3VisionTransformer` (SmolVLM's too).

Follows transformers' modeling_siglip.py / modeling_clip.py / modeling_aimv2.py /
modeling_internvl.py / modeling_idefics3.py (vision towers) so that their weights load by renaming
(models/hf/vision.py, models/hf/aimv2.py, models/hf/internvl.py, models/hf/idefics3.py):

- siglip (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): patch conv with bias,
  learned position embeddings, no class token, gelu-tanh MLP, `post_layernorm` applied to the last
  hidden state.
- clip (Radford et al., 2021): patch conv without bias, a class token in front, `pre_layernorm`
  ("pre_layrnorm" in HF) on the embeddings, quick-gelu MLP. HF's `last_hidden_state` is the last
  layer's output as is (CLIP's post-layernorm only feeds the pooled output, which vlmkit does not
  use), so the CLIP encoder here has no post-layernorm.
- AIMv2 (Fini et al., "Multimodal Autoregressive Pre-training of Large Vision Encoders", 2024;
  SAIL-VL2's tower): the siglip style with config switches: RMSNorm everywhere (`norm`), an RMSNorm
  on the patch embeddings before the positions (`patch_norm`), a SwiGLU MLP (`mlp="gated"`), no
  biases on the attention and MLP linears (`linear_bias`), and for the native-resolution
  checkpoints fixed 2-D sine-cosine positions computed per grid (`positions="sincos"`). Its
  weights load through models/hf/aimv2.py; the attention-pooling head is not used.
- InternViT (Chen et al., "InternVL: Scaling up Vision Foundation Models and Aligning for Generic
  Visual-Linguistic Tasks", 2024; `style="intern_vit"`): a class token and a patch conv with bias,
  no pre- or post-layernorm, exact-gelu MLP, and as switches a learned per-channel layer scale on
  each residual branch (`layer_scale`), LayerNorm or RMSNorm (`norm`), and for InternViT-6B an
  RMSNorm over the whole width on q and k (`qk_norm`) with no q/k/v biases (`qkv_bias`).
- Idefics3 / SmolVLM (Laurençon et al., "Building and better understanding vision-language models",
  2024): the siglip style whose features are taken after the post-layernorm
  (`post_norm_features`), with the position table read NaViT's way (`positions="bucketed"`,
  `bucketed_position_ids`). transformers' processors pad each row's images to one count; such a
  5-D batch becomes tiles with `unpad_tiles`.

Other image sizes work: the learned position grid is resized bicubically (align_corners=False), as
HF's `interpolate_pos_encoding=True` does (from DINO). The adapter gets `features()`: the hidden
state `cfg.feature_layer` in HF `hidden_states` indexing (0 = embeddings), the class token (CLIP,
InternViT) dropped (LLaVA's and InternVL's "default" feature-select strategy).

Shape suffixes: N images (tiles), P patches (+1 with a class token), Dv hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmkit.models.attention import AttnSpec, select_backend
from vlmkit.models.config import VisionConfig
from vlmkit.models.llm import RMSNorm


INIT_STD = 0.02
"""Std of the truncated-normal weights and of the class embedding at initialisation (ViT)."""
QK_NORM_EPS = 1e-6
"""Epsilon of InternViT's q / k RMSNorms (the reference builds them with its default, whatever the
tower's layer_norm_eps)."""
BUCKET_EDGE = 1.0 - 1e-6
"""The largest fractional coordinate of a bucketed position (the reference clamps to it)."""
SINCOS_TEMPERATURE = 10000.0
"""Base of the frequency decay of the 2-D sine-cosine positions (as in MAE / AIMv2)."""
QUICK_GELU_SCALE = 1.702
"""CLIP's quick-gelu, x * sigmoid(1.702 x): a sigmoid approximation of gelu."""


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Activation names as transformers' ACT2FN spells them.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    """The activation function called `name` (HF ACT2FN names)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@torch.no_grad()
def init_dense_and_norms(root: nn.Module, std: float = INIT_STD) -> None:
    """Linear / conv weights: truncated normal (ViT); biases 0; layer norms: weight 1, bias 0."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def norm_layer(cfg: VisionConfig, dim: int) -> nn.Module:
    """The tower's norm (`cfg.norm`): LayerNorm or weight-only RMSNorm, eps `cfg.layer_norm_eps`."""
    if cfg.norm == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


def sincos_positions(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D positions in raster order, laid out as [sin(col * f),
    cos(col * f), sin(row * f), cos(row * f)] with f the dim / 4 frequencies 1 / T^(i / (dim / 4)).

    Computed in float64 on the CPU (the reference's precision; some devices have no float64) and
    returned in float32; the caller moves it."""
    quarter = dim // 4
    freqs = 1.0 / SINCOS_TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    row_angles = rows.flatten().outer(freqs)  # (gh*gw, dim / 4)
    col_angles = cols.flatten().outer(freqs)
    return torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1).float()


def bucketed_position_ids(grid_h: int, grid_w: int, side: int) -> torch.Tensor:
    """(grid_h * grid_w,) rows of a side x side position table for a grid_h x grid_w grid (raster
    order): each patch's fractional coordinate (index / grid) rounded down onto the table's grid.

    Computed in float32 as transformers' Idefics2 / Idefics3 embeddings compute it: for some sides
    (19, 25, 29, 31, ...) that rounding reads some patches of the native grid from the row or column
    before their own, and the checkpoints were trained so."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side, dtype=torch.float32)

    def axis(n: int) -> torch.Tensor:
        step = 1.0 / torch.tensor(n)  # float32, as the reference divides by its patch count
        coords = (torch.arange(n, dtype=torch.float32) * step).clamp(max=BUCKET_EDGE)
        return torch.bucketize(coords, boundaries, right=True)

    return (axis(grid_h)[:, None] * side + axis(grid_w)[None, :]).flatten()


def unpad_tiles(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' padded image batch (Idefics3 and SmolVLM processors: every row's images padded
    to one count) -> the real tiles: (B, I, C, H, W) pixel values and their (B, I, H, W) pixel mask
    -> (N, C, H, W) in order. A padding image is one whose pixels are all 0, the reference's own
    test; a real tile with padded pixels is refused, since the tower takes whole tiles."""
    tiles = pixel_values.flatten(0, 1)  # (B*I, C, H, W)
    real = tiles.flatten(1).ne(0).any(dim=1)  # (B*I,)
    if pixel_attention_mask is not None and not pixel_attention_mask.flatten(0, 1)[real].bool().all():
        raise ValueError("pixel_attention_mask marks padded pixels inside an image tile; vlmkit's vision "
                         "tower takes whole tiles, as transformers' Idefics3 / SmolVLM processors make them")
    return tiles[real]


class VisionEmbeddings(nn.Module):
    """Patches -> tokens (maybe normed), plus (clip, intern_vit) a class token, plus position embeddings
    (a learned table, resized or bucketed off-native, or fixed sine-cosine positions)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.has_class_token = cfg.has_class_token
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=cfg.style != "clip")
        self.patch_norm = norm_layer(cfg, cfg.hidden_size) if cfg.patch_norm else None
        if self.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = (None if cfg.positions == "sincos" else
                                   nn.Embedding(cfg.num_patches + int(self.has_class_token), cfg.hidden_size))

    def patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(grid_h * grid_w, Dv) position embeddings of the patches: sine-cosine positions of this
        grid, or the learned table, bucketed or (off-native) resized bicubically."""
        if self.position_embedding is None:
            weight = self.patch_embedding.weight
            return sincos_positions(grid_h, grid_w, self.cfg.hidden_size).to(weight.device, weight.dtype)
        weight = self.position_embedding.weight
        patch_pos = weight[1:] if self.has_class_token else weight  # (g*g, Dv)
        g = self.cfg.grid_size
        if self.cfg.positions == "bucketed":
            return patch_pos[bucketed_position_ids(grid_h, grid_w, g).to(weight.device)]
        if (grid_h, grid_w) == (g, g):
            return patch_pos
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, Dv, g, g)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, Dv, gh, gw)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, gh*gw, Dv)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        x = x + self.patch_positions(grid_h, grid_w)
        if self.has_class_token:
            cls = (self.class_embedding + self.position_embedding.weight[0]).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + gh*gw, Dv)
        return x


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention (all patches of an image see each other). The images
    of a batch all have P patches, never a packed layout, so the backend is SDPA. With
    `cfg.qk_norm`, q and k are RMS-normed over the whole width before the heads are split."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attend = select_backend("sdpa")
        self.num_heads = cfg.num_heads
        D, bias = cfg.hidden_size, cfg.linear_bias
        qkv_bias = bias and cfg.qkv_bias
        self.q_proj = nn.Linear(D, D, bias=qkv_bias)
        self.k_proj = nn.Linear(D, D, bias=qkv_bias)
        self.v_proj = nn.Linear(D, D, bias=qkv_bias)
        self.out_proj = nn.Linear(D, D, bias=bias)
        self.q_norm = RMSNorm(D, QK_NORM_EPS) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, QK_NORM_EPS) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, D = x.shape
        shape = (N, P, self.num_heads, D // self.num_heads)
        q, k = self.q_proj(x), self.k_proj(x)  # (N, P, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(shape), k.view(shape)  # (N, P, H, Dh)
        v = self.v_proj(x).view(shape)
        out = self.attend(q, k, v, AttnSpec.causal(), causal=False)  # (N, P, H, Dh)
        return self.out_proj(out.reshape(N, P, D))


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))), or with `cfg.mlp == "gated"` down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.linear_bias
        self.gated = cfg.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(D, I, bias=bias)
            self.up_proj = nn.Linear(D, I, bias=bias)
            self.down_proj = nn.Linear(I, D, bias=bias)
        else:
            self.fc1 = nn.Linear(D, I, bias=bias)
            self.fc2 = nn.Linear(I, D, bias=bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); with `cfg.layer_scale`
    each branch's output is first scaled per channel by a learned vector (`layer_scale_1`, `_2`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = norm_layer(cfg, cfg.hidden_size)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = norm_layer(cfg, cfg.hidden_size)
        self.mlp = VisionMLP(cfg)
        scaled = cfg.layer_scale is not None
        self.layer_scale_1 = nn.Parameter(torch.ones(cfg.hidden_size)) if scaled else None
        self.layer_scale_2 = nn.Parameter(torch.ones(cfg.hidden_size)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.layer_norm1(x))
        x = x + (attn if self.layer_scale_1 is None else self.layer_scale_1 * attn)
        mlp = self.mlp(self.layer_norm2(x))
        return x + (mlp if self.layer_scale_2 is None else self.layer_scale_2 * mlp)


class VisionEncoder(nn.Module):
    """The ViT. `forward` gives HF's `last_hidden_state`; `features` gives what the adapter reads."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layernorm = norm_layer(cfg, cfg.hidden_size) if cfg.style == "clip" else None
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = norm_layer(cfg, cfg.hidden_size) if cfg.style == "siglip" else None
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (loading a checkpoint overwrites it).

        Linear and conv weights: truncated normal, std 0.02 (ViT); biases 0; position and class
        embeddings: normal, std 0.02 (a learned position table: `position_init_std`); norms: weight 1,
        bias 0; layer scales: `cfg.layer_scale`.
        """
        init_dense_and_norms(self)
        if self.embeddings.position_embedding is not None:
            nn.init.normal_(self.embeddings.position_embedding.weight, std=self.config.position_init_std)
        if self.embeddings.has_class_token:
            nn.init.normal_(self.embeddings.class_embedding, std=INIT_STD)
        if self.config.layer_scale is not None:
            for block in self.layers:
                nn.init.constant_(block.layer_scale_1, self.config.layer_scale)
                nn.init.constant_(block.layer_scale_2, self.config.layer_scale)

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(patches down, patches across) for these pixel values. Sides are whole patches, except
        the tower's own image size, whose pixels past the last whole patch the patch conv drops (as
        the reference towers do)."""
        H, W = pixel_values.shape[-2:]
        p, native = self.config.patch_size, self.config.image_size
        if any(side % p and side != native for side in (H, W)):
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p} "
                             f"(nor the tower's image size {native})")
        return H // p, W // p

    def _run(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """hidden_states[num_layers] in HF indexing: embeddings, then `num_layers` blocks."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (N, {self.config.num_channels}, H, W), "
                             f"got shape {tuple(pixel_values.shape)}")
        self.grid(pixel_values)
        x = self.embeddings(pixel_values)  # (N, P, Dv)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers[:num_layers]:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, Dv): HF `last_hidden_state` (post-layernormed for siglip)."""
        x = self._run(pixel_values, len(self.layers))
        return self.post_layernorm(x) if self.post_layernorm is not None else x

    def feature_layer_index(self) -> int:
        """`cfg.feature_layer` as a non-negative index into the num_layers + 1 hidden states."""
        layer = self.config.feature_layer
        return layer if layer >= 0 else len(self.layers) + 1 + layer

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P', Dv): hidden state `cfg.feature_layer`, class token dropped, or
        with `cfg.post_norm_features` the post-layernormed last one.

        Blocks after the feature layer do not change the result, so they are not run.
        """
        if self.config.post_norm_features:
            return self(pixel_values)
        x = self._run(pixel_values, self.feature_layer_index())
        return x[:, 1:] if self.embeddings.has_class_token else x
