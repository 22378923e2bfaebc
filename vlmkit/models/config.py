"""Model configuration: one small dataclass per component, validated in `__post_init__`.

Every field has a default so that a config.json written by an older vlmkit (missing fields added
later) still loads; `from_dict` reads a config.json mapping with vlmkit.schema's `build`, so an
unknown key or a wrong type fails loudly with its dotted path (`llm.hidden_size`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmkit.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlmkit.errors import ConfigError
from vlmkit.schema import build, require_at_least


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


VISION_STYLES = ("siglip", "clip", "intern_vit")
CLASS_TOKEN_STYLES = ("clip", "intern_vit")
"""The vision styles whose tower puts a class token in front of the patches."""


@dataclass
class VisionConfig:
    """ViT encoder (models/vision.py); field names follow HF SiglipVisionConfig / CLIPVisionConfig."""

    style: Literal["siglip", "clip", "intern_vit"] = "siglip"
    """siglip: no class token, learned positions, post-layernorm. clip: class token, pre-layernorm,
    patch conv without bias. intern_vit (InternVL's InternViT): class token, patch conv with bias,
    neither pre- nor post-layernorm."""
    image_size: int = 48
    """Side in pixels the encoder was built for; other sizes interpolate position embeddings. It
    need not be a multiple of patch_size: the patch conv then drops the pixels past the last whole
    patch, as transformers' towers do (SmolVLM-Instruct's 384-pixel tiles of 14-pixel patches)."""
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
    post_norm_features: bool = False
    """The adapter reads the last layer's output after the post-layernorm (HF's `last_hidden_state`,
    as Idefics3 and SmolVLM do); needs a siglip tower and feature_layer -1."""
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel normalisation (one value per channel, checked against num_channels)."""
    position_init_std: float = 0.02
    """Std of the learned position embeddings at initialisation (ViT's 0.02). A tower trained from
    scratch learns its positions; a random tower kept frozen (the demo's) keeps them, and a larger
    std makes where a patch is a larger share of its features."""
    norm: Literal["layer_norm", "rms_norm"] = "layer_norm"
    """Every norm of the tower (blocks, pre / post, patch norm): LayerNorm (SigLIP, CLIP) or
    weight-only RMSNorm (AIMv2), both with layer_norm_eps."""
    mlp: Literal["fc", "gated"] = "fc"
    """fc2(act(fc1(x))) (SigLIP, CLIP) or down(act(gate(x)) * up(x)) (AIMv2's SwiGLU)."""
    linear_bias: bool = True
    """Biases on the attention and MLP linears (AIMv2 has none)."""
    patch_norm: bool = False
    """A norm on the patch embeddings before the positions are added (AIMv2)."""
    positions: Literal["learned", "sincos", "bucketed"] = "learned"
    """learned: a position table, resized for other grids. sincos: fixed 2-D sine-cosine positions
    computed for each grid, no table (AIMv2's native-resolution checkpoints). bucketed: the table
    read at each patch's fractional place in its grid, rounded down onto the table's grid, no
    resizing (Idefics2, Idefics3, SmolVLM; NaViT's lookup)."""
    qkv_bias: bool = True
    """Biases on q, k and v (with `linear_bias`); InternViT-6B has none there but keeps those of its
    output projection and MLP."""
    qk_norm: bool = False
    """An RMSNorm over the whole width on q and on k before the heads are split (InternViT-6B)."""
    layer_scale: float | None = None
    """None: plain residual branches. A value: a learned per-channel scale on the output of each
    attention and MLP branch, initialised to it (InternViT's layer scale, CaiT)."""

    def __post_init__(self):
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        require_at_least(self, ("position_init_std",), 0, "vision.")
        for name, allowed in (("norm", ("layer_norm", "rms_norm")), ("mlp", ("fc", "gated")),
                              ("positions", ("learned", "sincos", "bucketed"))):
            _check(getattr(self, name) in allowed,
                   f"vision.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        _check(self.positions != "sincos" or (self.style == "siglip" and self.hidden_size % 4 == 0),
               "vision.positions 'sincos' needs a tower without a class token (style siglip) and a "
               f"hidden_size divisible by 4, got style {self.style!r}, hidden_size {self.hidden_size}")
        _check(self.style in VISION_STYLES, f"vision.style must be one of {list(VISION_STYLES)}, got {self.style!r}")
        _check(self.image_size >= self.patch_size,
               f"vision.image_size {self.image_size} must hold at least one patch of {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        _check(-self.num_layers - 1 <= self.feature_layer <= self.num_layers,
               f"vision.feature_layer {self.feature_layer} is outside the {self.num_layers + 1} hidden states")
        _check(not self.post_norm_features or (self.style == "siglip" and self.feature_layer in (-1, self.num_layers)),
               "vision.post_norm_features needs the post-layernorm of a siglip tower and the last layer's "
               f"features (feature_layer -1), got style {self.style!r}, feature_layer {self.feature_layer}")
        _check(len(self.image_mean) == self.num_channels and len(self.image_std) == self.num_channels,
               "vision.image_mean / image_std need one value per channel")

    @property
    def has_class_token(self) -> bool:
        """A class token in front of the patches (CLIP, InternViT); the adapter never sees it."""
        return self.style in CLASS_TOKEN_STYLES

    @property
    def grid_size(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


NATIVE_VISION_STYLES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
POSITION_GRIDS = ("resized", "indexed")
"""How a native tower's learned position grid meets an image (NativeVisionConfig.position_grid)."""


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
    """Learned position grid, a square number of entries added to the patch embeddings; 0 = rotary
    positions only."""
    position_grid: Literal["resized", "indexed"] = "resized"
    """How the learned grid meets an image. resized (Qwen3-VL): resized bilinearly to the image's
    patch grid, so an entry stands for a fraction of the image's height and width. indexed (the
    factorised absolute positions of Pix2Struct / NaViT, in one table): the patch in row i, column j
    takes entry (i, j), so an entry stands for a place counted in patches from the top left, the
    same on every image size; rows and columns past the grid's side take its last entry."""
    position_init_std: float = 0.02
    """Standard deviation of the learned grid at initialisation (training from scratch)."""
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
        _check(self.position_grid in POSITION_GRIDS,
               f"native_vision.position_grid must be one of {list(POSITION_GRIDS)}, got {self.position_grid!r}")
        _check(self.position_init_std > 0, f"native_vision.position_init_std must be > 0, got {self.position_init_std}")
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
    norm: bool = True
    """pixel_shuffle: a LayerNorm over the shuffled channels before the MLP (InternVL's projector);
    Idefics3's and SmolVLM's connector has none."""
    bias: bool = True
    """Biases on the MLP's linear layers (mlp, pixel_shuffle); Idefics3's connector is one linear
    layer without."""

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


TILINGS = ("grid", "split", "pad", "anyres")
"""How an image may become tiles (`VLMConfig.tiling`)."""

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
class SamVisionConfig:
    """SAM-style ViT (models/sam.py): the high-resolution tower of DeepSeek-VL. Field names follow
    HF SamVisionConfig, except `intermediate_size` (its `mlp_dim`) and `num_layers`."""

    image_size: int = 64
    """The one side in pixels the tower takes (its absolute position grid has no resizing)."""
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_abs_pos: bool = True
    """A learned absolute position grid added to the patch embeddings."""
    use_rel_pos: bool = True
    """Decomposed relative position bias (one table per axis) in every attention."""
    window_size: int = 4
    """Blocks attend within window_size x window_size patch windows (the grid zero-padded to a
    multiple), except the global blocks; 0 = every block is global."""
    global_attn_indexes: tuple[int, ...] = (1, 3)
    """The blocks that attend over the whole grid."""
    output_channels: int = 32
    """Channels of the neck (conv 1x1 -> norm -> conv 3x3 -> norm) after the blocks."""
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    """Per-channel normalisation of the high-resolution pixels (DeepSeek-VL's processor: CLIP's)."""

    def __post_init__(self):
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        require_at_least(self, ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                                "num_layers", "num_heads", "output_channels"), 1, "sam_vision.")
        require_at_least(self, ("window_size",), 0, "sam_vision.")
        _check(self.image_size % self.patch_size == 0,
               f"sam_vision.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"sam_vision.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        indexes = self.global_attn_indexes
        _check(all(0 <= i < self.num_layers for i in indexes) and len(set(indexes)) == len(indexes),
               f"sam_vision.global_attn_indexes {list(indexes)} must be distinct blocks in 0..{self.num_layers - 1}")
        _check(len(self.image_mean) == self.num_channels and len(self.image_std) == self.num_channels,
               "sam_vision.image_mean / image_std need one value per channel")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def block_window(self, index: int) -> int:
        """The window side of block `index` in patches; 0 = it attends over the whole grid."""
        return 0 if index in self.global_attn_indexes else self.window_size


HYBRID_DOWNSAMPLE = 4
"""DeepSeek-VL's hybrid tower resizes the high-resolution features to 4x the low-resolution grid,
then halves it twice with stride-2 convolutions, landing on the low-resolution grid."""


@dataclass
class HybridVisionConfig:
    """DeepSeek-VL's hybrid vision (models/sam.py's `HybridVisionTower`): a SigLIP tower on the
    low-resolution image, a SAM tower on the high-resolution one, their features combined into
    one token per low-resolution patch of the LLM's width."""

    low_res: VisionConfig = field(default_factory=VisionConfig)
    high_res: SamVisionConfig = field(default_factory=SamVisionConfig)
    out_hidden_size: int = 192
    """Width of the combined tokens: the LLM's hidden size (each tower is projected to half)."""

    def __post_init__(self):
        self.low_res = build(VisionConfig, self.low_res, "hybrid_vision.low_res")
        self.high_res = build(SamVisionConfig, self.high_res, "hybrid_vision.high_res")
        _check(self.low_res.style == "siglip",
               f"hybrid_vision.low_res.style must be 'siglip' (one token per patch), got {self.low_res.style!r}")
        _check(bool(self.high_res.global_attn_indexes),
               "hybrid_vision.high_res needs a global block (its first one's output is combined too)")
        _check(self.out_hidden_size >= 2 and self.out_hidden_size % 2 == 0,
               f"hybrid_vision.out_hidden_size {self.out_hidden_size} must be even (half per tower)")

    @property
    def high_res_block(self) -> int:
        """The SAM block whose output feeds the second (global) branch of the combination."""
        return self.high_res.global_attn_indexes[0]

    @property
    def high_res_channels(self) -> int:
        """Channels of the reduced high-resolution features: each stride-2 conv doubles the neck's
        channels as it halves the side."""
        return self.high_res.output_channels * HYBRID_DOWNSAMPLE


@dataclass
class VLMConfig:
    """The whole model (models/vlm.py), saved as config.json. Two shapes:

    - LLaVA-shaped: `vision` (a ViT of fixed image size) -> `adapter` -> `llm`, images as tiles of
      `tokens_per_image` visual tokens each;
    - native-resolution (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `native_vision`, whose merger already
      maps to the LLM width (so no adapter), -> `llm` with multimodal RoPE; images of any size and
      videos, each as many tokens as its grid gives.

    `native_vision` set makes the second: `vision` and `adapter` are then None. Left out, a
    LLaVA-shaped config gets the default `vision` and `adapter`. `high_res_vision` set makes a
    LLaVA-shaped model hybrid (DeepSeek-VL's, models/sam.py): `vision` (SigLIP) reads the image at
    its low resolution, the SAM tower at its own high one, and their combination (`hybrid_vision`)
    ends in its own aligner, so `adapter` is None."""

    vision: VisionConfig | None = None
    adapter: AdapterConfig | None = None
    llm: LLMConfig = field(default_factory=LLMConfig)
    native_vision: NativeVisionConfig | None = None
    high_res_vision: SamVisionConfig | None = None
    """DeepSeek-VL's hybrid vision: the SAM tower on the high-resolution image beside `vision` on
    the low-resolution one (class docstring); needs tiling 'pad'. None: one tower."""
    image_token_id: int = 0
    """Token id that marks visual-token positions in input_ids (one per visual token)."""
    max_tiles: int = 1
    """Dynamic high-resolution tiling: at most this many tiles per image (as `tiling` cuts it); 1 =
    no tiling."""
    use_thumbnail: bool = True
    """With tiling (max_tiles > 1), add a global thumbnail tile after the grid tiles."""
    tiling: Literal["grid", "split", "pad", "anyres"] = "grid"
    """How an image becomes tiles (data/images.py, data/split_images.py, data/padded_images.py).
    grid (InternVL): the grid of at most max_tiles tiles closest to the image's aspect ratio. split
    (Idefics3, SmolVLM): the image resized so its longer side spans sqrt(max_tiles) tiles (max_tiles
    a square), then up to whole tiles on both sides and cut row-major, always followed by the whole
    image as one tile (use_thumbnail); the prompt names each tile's row and column
    (data/template.py). pad (DeepSeek-VL): one tile, the image resized so its longer side is the
    tile's, then centred on a square of the normalisation's mean colour (max_tiles 1). anyres
    (LLaVA-OneVision, data/anyres.py): the whole image as one tile, then the tiles of the
    `grid_pinpoints` canvas that fits it best; the features are unpadded, maybe pooled and each row
    closed by a newline embedding (models/anyres.py), so an image's tokens depend on its size."""
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """anyres: the (height, width) canvases in pixels an image may be tiled at, each a whole number
    of the tower's tiles (LLaVA-OneVision's `image_grid_pinpoints`)."""
    anyres_max_tiles: int = 9
    """anyres: an image's unpadded feature grid is pooled bilinearly down to about this many tiles'
    patches when it holds more than 1.1 times as many (LLaVA-OneVision's `anyres_max_9`)."""
    hf_architecture: str | None = None
    """The transformers architecture a model was imported as, which `export_hf` writes back where
    several compute alike (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration);
    None: the exporter's default for the model's shape."""
    video_token_id: int | None = None
    """Native models: the token id of a video's visual tokens (None: the model takes no video)."""
    tokens_per_second: float | None = None
    """Native models, Qwen2.5-VL: video frames are spaced on the temporal position axis by
    tokens_per_second * seconds per frame pair (models/mrope.py's `MRopeLayout`); None = by 1."""
    video_frames_apart: bool = False
    """Native models, Qwen3-VL: each video frame is a block of its own in the text (its timestamp
    in between), laid out as a grid of one frame pair on the position axes."""

    def __post_init__(self):
        # VLMConfig(vision={...}) written by hand: sections given as mappings are built here.
        self.llm = build(LLMConfig, self.llm, "llm")
        if self.native_vision is not None:
            self._check_native()
        elif self.high_res_vision is not None:
            self._check_hybrid()
        else:
            self.vision = build(VisionConfig, self.vision, "vision")
            self.adapter = build(AdapterConfig, self.adapter, "adapter")
        if not self.is_native:
            _check(self.video_token_id is None and self.tokens_per_second is None and not self.video_frames_apart,
                   "video_token_id, tokens_per_second and video_frames_apart need a native_vision tower")
        _check(0 <= self.image_token_id < self.llm.vocab_size,
               f"image_token_id {self.image_token_id} is outside the vocabulary ({self.llm.vocab_size})")
        if self.adapter is not None and self.adapter.kind == "pixel_shuffle":
            _check(self.vision.grid_size % self.adapter.scale_factor == 0,
                   f"pixel_shuffle scale_factor {self.adapter.scale_factor} must divide the patch grid "
                   f"{self.vision.grid_size}x{self.vision.grid_size}")
        _check(self.tiling in TILINGS, f"tiling must be one of {list(TILINGS)}, got {self.tiling!r}")
        _check(self.tiling != "pad" or (self.max_tiles == 1 and not self.is_native),
               f"tiling 'pad' makes one tile of a fixed-size tower, got max_tiles {self.max_tiles}")
        self.grid_pinpoints = tuple(tuple(canvas) for canvas in self.grid_pinpoints)
        if self.tiling == "anyres":
            self._check_anyres()
        if self.tiling == "split":
            _check(math.isqrt(self.max_tiles) ** 2 == self.max_tiles and self.use_thumbnail and not self.is_native,
                   "tiling 'split' cuts at most k x k tiles and always adds the whole image after them: it needs "
                   f"a square max_tiles, use_thumbnail and a fixed-size tower, got max_tiles {self.max_tiles}, "
                   f"use_thumbnail {self.use_thumbnail}")

    def _check_anyres(self) -> None:
        _check(not self.is_native and not self.is_hybrid and self.adapter.kind == "mlp",
               "tiling 'anyres' lays one token per patch out on the image's grid: it needs one fixed-size tower "
               f"and an 'mlp' adapter, got adapter {self.adapter.kind if self.adapter else None!r}")
        tile = self.vision.image_size
        _check(bool(self.grid_pinpoints) and all(len(c) == 2 and min(c) >= tile and not c[0] % tile and not c[1] % tile
                                                 for c in self.grid_pinpoints),
               "tiling 'anyres' needs grid_pinpoints: (height, width) canvases, each a whole number of the tower's "
               f"{tile}-pixel tiles, got {[list(c) for c in self.grid_pinpoints]}")
        require_at_least(self, ("anyres_max_tiles",), 1)

    def _check_native(self) -> None:
        self.native_vision = build(NativeVisionConfig, self.native_vision, "native_vision")
        _check(self.vision is None and self.adapter is None,
               "a native_vision model has no vision or adapter section (its merger maps to the LLM width)")
        _check(self.high_res_vision is None, "a native_vision model has no high_res_vision section")
        _check(self.native_vision.out_hidden_size == self.llm.hidden_size,
               f"native_vision.out_hidden_size {self.native_vision.out_hidden_size} must equal "
               f"llm.hidden_size {self.llm.hidden_size}")
        _check(self.llm.mrope_section is not None, "a native_vision model needs llm.mrope_section (M-RoPE)")
        _check(len(self.native_vision.deepstack_visual_indexes) <= self.llm.num_layers,
               f"{len(self.native_vision.deepstack_visual_indexes)} deepstack levels need as many decoder "
               f"layers, the llm has {self.llm.num_layers}")
        _check(self.video_token_id is None or 0 <= self.video_token_id < self.llm.vocab_size,
               f"video_token_id {self.video_token_id} is outside the vocabulary ({self.llm.vocab_size})")
        _check(self.video_token_id != self.image_token_id, "video_token_id must differ from image_token_id")

    def _check_hybrid(self) -> None:
        self.vision = build(VisionConfig, self.vision, "vision")
        self.high_res_vision = build(SamVisionConfig, self.high_res_vision, "high_res_vision")
        _check(self.adapter is None, "a hybrid model (high_res_vision) has no adapter section (its aligner "
               "is the combination's)")
        _check(self.tiling == "pad", f"a hybrid model (high_res_vision) takes images as DeepSeek-VL's processor "
               f"pads them (tiling 'pad'), got tiling {self.tiling!r}")
        _ = self.hybrid_vision  # built once here for the combination's own checks

    @property
    def is_hybrid(self) -> bool:
        """DeepSeek-VL's hybrid vision (`high_res_vision` beside `vision`)."""
        return self.high_res_vision is not None

    @property
    def hybrid_vision(self) -> HybridVisionConfig:
        """The hybrid tower's config (models/sam.py's `HybridVisionTower`) of a hybrid model."""
        try:
            return HybridVisionConfig(low_res=self.vision, high_res=self.high_res_vision,
                                      out_hidden_size=self.llm.hidden_size)
        except ConfigError as e:
            raise ConfigError(str(e).replace("hybrid_vision.low_res", "vision")
                              .replace("hybrid_vision.high_res", "high_res_vision")
                              .replace("hybrid_vision.out_hidden_size", "llm.hidden_size")) from None

    @property
    def is_native(self) -> bool:
        """A native-resolution model (`native_vision` tower, M-RoPE decoder)."""
        return self.native_vision is not None

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image tile becomes in the LLM (at the encoder's native size)."""
        if self.is_native:
            raise ValueError("a native_vision model has no fixed tokens per image: each image gives "
                             "t * h * w / spatial_merge_size^2 tokens of its own patch grid")
        if self.is_hybrid:  # one combined token per low-resolution patch
            return self.vision.num_patches
        if self.adapter.kind == "resampler":
            return self.adapter.num_queries
        if self.adapter.kind == "pixel_shuffle":
            return self.vision.num_patches // self.adapter.scale_factor ** 2
        return self.vision.num_patches

    @property
    def tiles_per_side(self) -> int:
        """Split tiling: how many tiles an image's longer side spans (sqrt(max_tiles))."""
        return math.isqrt(self.max_tiles)

    @property
    def tokens_per_tile(self) -> int:
        """What the data side's `encode_images` takes as visual tokens per image tile:
        `tokens_per_image`, or 0 for a native model, whose processor counts each image's own grid."""
        return 0 if self.is_native else self.tokens_per_image

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        """A config.json mapping -> VLMConfig; unknown keys and wrong types name their dotted path."""
        return build(cls, data)


# ---------------------------------------------------------------------------------------------
# LoRA (the adapters themselves: models/lora.py; kept here, free of torch, because the run config
# reads these settings and `vlmkit ... --help` should not load torch)
# ---------------------------------------------------------------------------------------------

DEFAULT_TARGETS = ("llm.layers.*.attn.*_proj", "llm.layers.*.mlp.*_proj")
"""The decoder's attention and MLP projections (vision tower and adapter only when asked)."""


@dataclass
class LoRAConfig:
    """Which linear layers get adapters, and their shape."""

    rank: int = 16
    """r: the inner dimension of each adapter (A: in -> r, B: r -> out)."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """fnmatch patterns over vlmkit module names (e.g. `llm.layers.*.attn.q_proj`,
    `vision.layers.*.self_attn.*_proj`, `adapter.*`); a linear layer matching any one is adapted."""

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets: at least one module name pattern is required")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


LORA_PARAMETER_PARTS = (".lora_A.", ".lora_B.")
"""What the names of adapter parameters hold (peft's naming)."""


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name (as `named_parameters` gives it) is an adapter's."""
    return any(part in name for part in LORA_PARAMETER_PARTS)
