"""Model configuration: one small dataclass per component, validated in `__post_init__`.

Every field has a default so that a config.json written by an older vlmkit (missing fields added
later) still loads; `from_dict` reads a config.json mapping with vlmkit.schema's `build`, so an
unknown key or a wrong type fails loudly with its dotted path (`llm.hidden_size`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmkit.errors import ConfigError
from vlmkit.schema import build, require_at_least


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class VisionConfig:
    """ViT encoder (models/vision.py); field names follow HF SiglipVisionConfig / CLIPVisionConfig."""

    style: Literal["siglip", "clip"] = "siglip"
    """siglip: no class token, learned positions, post-layernorm. clip: class token, pre-layernorm."""
    image_size: int = 48
    """Side in pixels the encoder was built for; other sizes interpolate position embeddings."""
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 3
    num_heads: int = 4
    hidden_act: str = "gelu_pytorch_tanh"
    """gelu_pytorch_tanh (SigLIP), quick_gelu (CLIP), gelu."""
    layer_norm_eps: float = 1e-6
    feature_layer: int = -1
    """Which hidden state feeds the adapter, indexed like HF `hidden_states` (0 = embeddings,
    -1 = last layer output before post-layernorm, -2 = second to last as LLaVA does)."""
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel normalisation (one value per channel, checked against num_channels)."""
    position_init_std: float = 0.02
    """Std of the learned position embeddings at initialisation (ViT's 0.02). A tower trained from
    scratch learns its positions; a random tower kept frozen (the demo's) keeps them, and a larger
    std makes where a patch is a larger share of its features."""

    def __post_init__(self):
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        require_at_least(self, ("position_init_std",), 0, "vision.")
        _check(self.style in ("siglip", "clip"), f"vision.style must be 'siglip' or 'clip', got {self.style!r}")
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        _check(-self.num_layers - 1 <= self.feature_layer <= self.num_layers,
               f"vision.feature_layer {self.feature_layer} is outside the {self.num_layers + 1} hidden states")
        _check(len(self.image_mean) == self.num_channels and len(self.image_std) == self.num_channels,
               "vision.image_mean / image_std need one value per channel")

    @property
    def grid_size(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


NATIVE_VISION_STYLES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class NativeVisionConfig:
    """Native-resolution vision tower (models/native_vision.py): Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

    Field names follow HF's Qwen2_5_VLVisionConfig / Qwen3VLVisionConfig. Qwen2-VL's config names
    the tower width `embed_dim` and the LLM width `hidden_size`; here they are `hidden_size` and
    `out_hidden_size` for every style (models/hf/native_vision.py converts)."""

    style: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen2_5_vl"
    """Block structure. qwen2_vl: LayerNorm, fc1/fc2 MLP, patch conv without bias. qwen2_5_vl:
    RMSNorm, gated (SwiGLU-style) MLP with biases. qwen3_vl: LayerNorm, fc1/fc2 MLP, patch conv
    with bias."""
    depth: int = 4
    hidden_size: int = 128
    intermediate_size: int = 512
    num_heads: int = 4
    hidden_act: str = "silu"
    """quick_gelu (Qwen2-VL), silu (Qwen2.5-VL), gelu_pytorch_tanh (Qwen3-VL)."""
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    """Frames per patch: an image is its frame repeated, a video is cut into frame pairs."""
    spatial_merge_size: int = 2
    """The merger joins merge x merge neighbouring patches into one LLM token."""
    out_hidden_size: int = 192
    """Width of the merged tokens: the LLM's hidden size."""
    rope_theta: float = 10000.0
    window_size: int = 0
    """Window attention (Qwen2.5-VL): windows of window_size x window_size pixels, a multiple of
    patch_size * spatial_merge_size; 0 = every block attends over a whole frame."""
    fullatt_block_indexes: tuple[int, ...] = ()
    """With window attention: the blocks that attend over the whole frame instead."""
    num_position_embeddings: int = 0
    """Learned position grid (Qwen3-VL), a square number of entries resized to each image's grid;
    0 = rotary positions only."""
    deepstack_visual_indexes: tuple[int, ...] = ()
    """Blocks whose output is also merged and returned for the decoder's early layers (Qwen3-VL)."""

    def __post_init__(self):
        self.fullatt_block_indexes = tuple(self.fullatt_block_indexes)
        self.deepstack_visual_indexes = tuple(self.deepstack_visual_indexes)
        _check(self.style in NATIVE_VISION_STYLES,
               f"native_vision.style must be one of {list(NATIVE_VISION_STYLES)}, got {self.style!r}")
        require_at_least(self, ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                "patch_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size"),
                         1, "native_vision.")
        require_at_least(self, ("window_size", "num_position_embeddings"), 0, "native_vision.")
        _check(self.hidden_size % self.num_heads == 0,
               f"native_vision.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        _check(self.head_dim % 4 == 0,
               f"native_vision head dim {self.head_dim} must be a multiple of 4 (rows and columns each "
               "rotate half of it in pairs)")
        merge_pixels = self.patch_size * self.spatial_merge_size
        _check(self.window_size % merge_pixels == 0,
               f"native_vision.window_size {self.window_size} must be a multiple of patch_size * "
               f"spatial_merge_size = {merge_pixels}")
        _check(self.window_size > 0 or not self.fullatt_block_indexes,
               "native_vision.fullatt_block_indexes needs window attention (window_size > 0)")
        side = round(self.num_position_embeddings ** 0.5)
        _check(side * side == self.num_position_embeddings,
               f"native_vision.num_position_embeddings {self.num_position_embeddings} must be a square number")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            indexes = getattr(self, name)
            _check(all(0 <= i < self.depth for i in indexes) and len(set(indexes)) == len(indexes),
                   f"native_vision.{name} {list(indexes)} must be distinct blocks in 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid_side(self) -> int:
        """Entries per side of the learned position grid (0 without one)."""
        return round(self.num_position_embeddings ** 0.5)


@dataclass
class AdapterConfig:
    """Vision-to-LLM adapter (models/adapter.py)."""

    kind: Literal["mlp", "pixel_shuffle", "resampler"] = "pixel_shuffle"
    depth: int = 2
    """Linear layers in the MLP (mlp, pixel_shuffle): 2 is LLaVA-1.5's mlp2x_gelu."""
    hidden_act: str = "gelu"
    scale_factor: int = 2
    """pixel_shuffle: merge r x r neighbouring patches into one token (r^2 fewer tokens)."""
    num_queries: int = 64
    """resampler: fixed number of output tokens (learned queries)."""
    num_heads: int = 4
    """resampler: heads of the cross-attention."""

    def __post_init__(self):
        _check(self.kind in ("mlp", "pixel_shuffle", "resampler"),
               f"adapter.kind must be mlp, pixel_shuffle or resampler, got {self.kind!r}")
        require_at_least(self, ("depth", "scale_factor", "num_queries"), 1, "adapter.")


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN (DeepSeek-V3 style: routed top-k experts + shared experts)."""

    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 1
    expert_intermediate_size: int = 256
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    """Router affinity: DeepSeek-V3 uses sigmoid with normalised top-k weights."""
    norm_topk_prob: bool = True
    bias_update_rate: float = 1e-3
    """Auxiliary-loss-free balancing: after each step, bias += rate * sign(mean_load - load).
    0 disables it."""
    aux_loss_coef: float = 0.0
    """Weight of the optional auxiliary balance loss (Switch / DeepSeek style); 0 disables it."""
    first_dense_layers: int = 0
    """The first k decoder layers keep a dense FFN (DeepSeek-V3 keeps 3)."""

    def __post_init__(self):
        _check(1 <= self.top_k <= self.num_experts,
               f"moe.top_k {self.top_k} must be between 1 and num_experts {self.num_experts}")
        _check(self.score_func in ("softmax", "sigmoid"), "moe.score_func must be softmax or sigmoid")
        require_at_least(self, ("num_shared_experts",), 0, "moe.")


MROPE_AXES = 3
"""Position axes of multimodal RoPE: temporal, height, width."""


@dataclass
class LLMConfig:
    """Decoder LLM (models/llm.py): Llama / Qwen2 / Qwen3 / Mistral / SmolLM2 family."""

    vocab_size: int = 1024
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int | None = None
    """Grouped-query attention: None means num_heads (plain multi-head)."""
    head_dim: int | None = None
    """None means hidden_size // num_heads (Qwen3 sets it explicitly)."""
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = None
    """Multimodal RoPE (Qwen2-VL and later, models/mrope.py): how many of the head_dim / 2 rotary
    frequencies follow each position axis (temporal, height, width); None = 1-D RoPE."""
    mrope_interleaved: bool = False
    """Qwen3-VL: the axes' frequencies interleaved (t, h, w, t, h, w, ...) rather than in
    contiguous sections (Qwen2-VL, Qwen2.5-VL)."""
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    """Qwen2: bias on q, k, v projections."""
    qk_norm: bool = False
    """Qwen3: RMSNorm over head_dim on q and k before RoPE."""
    tie_embeddings: bool = False
    hidden_act: str = "silu"
    moe: MoEConfig | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if isinstance(self.moe, dict):  # LLMConfig(moe={...}) written by hand
            self.moe = build(MoEConfig, self.moe, "llm.moe")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0,
                   f"llm.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        _check(self.num_heads % self.num_kv_heads == 0,
               f"llm.num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, f"llm.head_dim {self.head_dim} must be even for RoPE")
        _check(self.vocab_size > 0, "llm.vocab_size must be > 0")
        self._check_mrope()

    def _check_mrope(self) -> None:
        _check(self.mrope_section is not None or not self.mrope_interleaved,
               "llm.mrope_interleaved needs llm.mrope_section")
        if self.mrope_section is None:
            return
        _check(len(self.mrope_section) == MROPE_AXES and all(n > 0 for n in self.mrope_section),
               f"llm.mrope_section {self.mrope_section} must give {MROPE_AXES} positive frequency counts "
               "(temporal, height, width)")
        _check(sum(self.mrope_section) == self.head_dim // 2,
               f"llm.mrope_section {self.mrope_section} must add up to head_dim / 2 = {self.head_dim // 2}")


@dataclass
class VLMConfig:
    """The whole model: vision -> adapter -> llm (models/vlm.py). Saved as config.json."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token_id: int = 0
    """Token id that marks visual-token positions in input_ids (one per visual token)."""
    max_tiles: int = 1
    """Dynamic high-resolution tiling (InternVL): at most this many tiles per image; 1 = no tiling."""
    use_thumbnail: bool = True
    """With tiling (max_tiles > 1), add a global thumbnail tile after the grid tiles."""

    def __post_init__(self):
        # VLMConfig(vision={...}) written by hand: sections given as mappings are built here.
        self.vision = build(VisionConfig, self.vision, "vision")
        self.adapter = build(AdapterConfig, self.adapter, "adapter")
        self.llm = build(LLMConfig, self.llm, "llm")
        _check(0 <= self.image_token_id < self.llm.vocab_size,
               f"image_token_id {self.image_token_id} is outside the vocabulary ({self.llm.vocab_size})")
        if self.adapter.kind == "pixel_shuffle":
            _check(self.vision.grid_size % self.adapter.scale_factor == 0,
                   f"pixel_shuffle scale_factor {self.adapter.scale_factor} must divide the patch grid "
                   f"{self.vision.grid_size}x{self.vision.grid_size}")

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image tile becomes in the LLM (at the encoder's native size)."""
        if self.adapter.kind == "resampler":
            return self.adapter.num_queries
        if self.adapter.kind == "pixel_shuffle":
            return self.vision.num_patches // self.adapter.scale_factor ** 2
        return self.vision.num_patches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        """A config.json mapping -> VLMConfig; unknown keys and wrong types name their dotted path."""
        return build(cls, data)
