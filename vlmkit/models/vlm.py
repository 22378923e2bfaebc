"""The VLM: vision encoder -> adapter -> decoder LLM, with visual tokens placed at image placeholders.

Follows LLaVA (Liu et al. 2023; transformers' modeling_llava.py): the text holds one
`image_token_id` per visual token, and the adapter's outputs replace those embeddings in order.
Rows of `pixel_values` are image tiles (an image is one tile, or several with dynamic tiling); each
tile becomes `tokens_per_image` visual tokens, tiles in the order their tokens appear in the text.
So any number of images may sit anywhere in any sample (interleaved), and text-only input is the
same call without pixel values. The placeholder count is checked against the visual tokens, and a
mismatch names both numbers (and, for packed batches, the samples where they disagree).

Two calls: `forward(input_ids (B, T), pixel_values, attention_mask)` -> logits is the HF-style
padded call; `compute_loss(...)` takes a packed batch (one flat sequence, `cu_seqlens`, positions
restarting per sample, as data/packing.py builds it) and shifts labels within each sample only.

A native-resolution model (`VLMConfig.native_vision`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL; transformers'
modeling_qwen2_vl.py and its successors) is the same class: the tower (models/native_vision.py)
takes the processor's patch rows and `grid_thw` of images and videos, its merged tokens replace
the image and video tokens in order, positions are multimodal RoPE's (models/mrope.py), and
Qwen3-VL's deepstack features join the decoder's first layers (models/llm.py, `Deepstack`).
`forward` then takes transformers' keyword arguments (`image_grid_thw`, `pixel_values_videos`,
`video_grid_thw`, `second_per_grid_ts`).

A hybrid model (`VLMConfig.high_res_vision`: DeepSeek-VL's, transformers'
modeling_deepseek_vl_hybrid.py) runs models/sam.py's `HybridVisionTower`, whose aligner is its
adapter: each image is one tile seen at two resolutions. Prompts and packs carry both in one row
per image (`split_hybrid_rows`: the high-resolution pixels, then the low-resolution ones, each
channels-first and flattened, as data/padded_images.py writes them), so they flow wherever tiles
do; `forward` also takes transformers' two tensors (`pixel_values`, `high_res_pixel_values`).

An anyres model (`VLMConfig.tiling == "anyres"`: LLaVA-OneVision) takes its images' tiles and one
layout row per image (tiles, height, width; models/anyres.py) in the `image_grid_thw` slot, so prompts
and packs carry them unchanged; an image's tokens follow its size. `forward` also takes
transformers' tensors (`pixel_values` (I, N, 3, S, S), `image_sizes`, `batch_num_images`).

Shape suffixes: B rows, T tokens, S samples, N tiles, D LLM width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.constants import IGNORE_INDEX
from vlmkit.errors import BadRecordError
from vlmkit.models.adapter import build_adapter
from vlmkit.models.anyres import AnyResAdapter, AnyResGeometry
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import MROPE_AXES, VLMConfig
from vlmkit.models.llm import LLM, Deepstack
from vlmkit.models.loss import linear_cross_entropy, output_projection
from vlmkit.models.mrope import MRopeLayout, rope_positions
from vlmkit.models.native_vision import NativeVisionOutput, NativeVisionTower, merged_token_counts
from vlmkit.models.sam import HybridVisionTower, split_hybrid_rows
from vlmkit.models.vision import VisionEncoder, unpad_tiles
from vlmkit.models.weights import uninitialised


@dataclass
class LossOutput:
    """What `compute_loss` returns."""

    loss: torch.Tensor
    """Mean cross-entropy over supervised targets, plus the MoE auxiliary loss (what to backprop)."""
    loss_sum: torch.Tensor
    """Summed cross-entropy over supervised targets (for averaging across micro-batches / ranks)."""
    num_targets: torch.Tensor
    """Number of supervised targets (long scalar)."""
    token_loss: torch.Tensor
    """(T,) cross-entropy of the token at each position (0 where it is not a target). It carries the
    graph as `loss_sum` does, so an objective that weighs tokens apart (a policy gradient's
    per-token ratios) backpropagates through it; detach it to keep it."""
    aux_loss: torch.Tensor
    """MoE balance loss of this forward (0 without MoE)."""


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) targets for each position: the next token's label within the same sample, else ignored.

    targets[t] = labels[t + 1], except at the last token of every sample (whose next token starts
    another sample) and at the end of the pack.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    ends = cu_seqlens[1:].to(device=labels.device, dtype=torch.long) - 1  # last token of each sample
    targets[ends[ends >= 0]] = IGNORE_INDEX
    return targets


NO_TOKEN = -1
"""A token id no input holds: the video token of a native model that takes no video."""


def mrope_layout(cfg: VLMConfig) -> MRopeLayout:
    """What multimodal RoPE needs to know of a native model's prompts (models/mrope.py)."""
    return MRopeLayout(cfg.image_token_id, NO_TOKEN if cfg.video_token_id is None else cfg.video_token_id,
                       cfg.native_vision.spatial_merge_size, tokens_per_second=cfg.tokens_per_second,
                       video_frames_apart=cfg.video_frames_apart)


@dataclass
class NativeInputs:
    """A native model's decoder inputs: `embed_native`'s result."""

    embeds: torch.Tensor
    """(..., D) token embeddings with the visual tokens placed."""
    deepstack: Deepstack | None
    """Qwen3-VL's deepstack features at the visual positions (None without deepstack or images)."""


@dataclass
class DecoderInputs:
    """A padded batch as the decoder takes it (`VLMModel.decoder_inputs`)."""

    embeds: torch.Tensor
    """(B, T, D) token embeddings with the visual tokens placed."""
    position_ids: torch.Tensor | None = None
    """(3, B, T) M-RoPE positions of a native model; None: the decoder's own (from the spec or cache)."""
    deepstack: Deepstack | None = None
    """Qwen3-VL's deepstack features (None without)."""
    rope_deltas: torch.Tensor | None = None
    """(B, 1) native models: each row's next position minus its length, for decoding past the prompt
    (models/mrope.py, `continue_positions`)."""


class VLMModel(nn.Module):
    """vision -> adapter -> llm, or a native tower -> llm. See the module docstring for the calls."""

    fused_loss: bool = False
    """`compute_loss` runs the output head and cross-entropy together, chunk by chunk
    (models/loss.py's `linear_cross_entropy`) instead of materialising the (M, V) logits; the
    trainer sets it from a stage's `fused_loss`."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        if cfg.is_native:
            self.vision = NativeVisionTower(cfg.native_vision)
            self.adapter = nn.Identity()  # the tower's merger already maps to the LLM width
        elif cfg.is_hybrid:
            self.vision = HybridVisionTower(cfg.hybrid_vision)
            self.adapter = nn.Identity()  # the tower ends in its aligner
        else:
            self.vision = VisionEncoder(cfg.vision)
            make_adapter = AnyResAdapter if cfg.tiling == "anyres" else build_adapter
            self.adapter = make_adapter(cfg.adapter, cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.llm = LLM(cfg.llm)

    @classmethod
    def empty(cls, cfg: VLMConfig) -> "VLMModel":
        """The model with storage allocated but not initialised, for weights that come from a
        checkpoint (models/weights.py, `uninitialised`)."""
        return uninitialised(lambda: cls(cfg))

    # --- images -> visual tokens ------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor, high_res_pixel_values: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """(N, 3, H, W) tiles -> (N, tokens per tile, D) visual tokens in the LLM's space. A hybrid
        model takes its rows of both resolutions (N, R), or the low-resolution tiles with
        `high_res_pixel_values` (N, 3, S_hi, S_hi)."""
        if self.config.is_hybrid:
            if high_res_pixel_values is None:
                pixel_values, high_res_pixel_values = split_hybrid_rows(pixel_values, self.config.hybrid_vision)
            return self.vision(pixel_values, high_res_pixel_values)  # (N, g * g, D)
        features = self.vision.features(pixel_values)  # (N, P, Dv)
        return self.adapter(features, grid=self.vision.grid(pixel_values))  # (N, tokens, D)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None, high_res_pixel_values: torch.Tensor | None = None,
                     image_layouts: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image-token position replaced by the next visual token.

        input_ids (B, T) or (T,) -> (..., D). Raises BadRecordError (reason "placeholder_mismatch")
        when the image tokens in input_ids differ from the visual tokens of pixel_values; with
        `cu_seqlens` (packed input) the message also names the samples that hold image tokens.
        An anyres model also takes each image's layout (I, 3) (models/anyres.py), which sets how
        many tokens its tiles give.
        """
        embeds = self.llm.embed(input_ids)  # (..., D)
        is_image = input_ids == self.config.image_token_id  # (...)
        n_placeholders = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_placeholders:
                raise BadRecordError("placeholder_mismatch", _count_message(
                    n_placeholders, 0, "no pixel_values", is_image, cu_seqlens))
            return embeds
        visual = self.image_features(pixel_values, high_res_pixel_values)  # (N, tokens, D)
        visual_desc = f"{visual.shape[0]} tile(s) x {visual.shape[1]} tokens"
        if self.config.tiling == "anyres":
            if image_layouts is None:
                raise ValueError("an anyres model's pixel_values need their image layouts (image_grid_thw: one "
                                 "row of tiles, height, width per image)")
            visual = self.anyres_geometry.visual_tokens(visual, image_layouts, self.adapter.image_newline)
            visual_desc = f"{len(image_layouts)} image(s) of {image_layouts[:, 0].tolist()} tile(s)"
        visual = visual.reshape(-1, visual.shape[-1])  # (N * tokens, D)
        if visual.shape[0] != n_placeholders:
            raise BadRecordError("placeholder_mismatch", _count_message(
                n_placeholders, visual.shape[0], visual_desc, is_image, cu_seqlens))
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))

    @property
    def anyres_geometry(self) -> AnyResGeometry:
        """Where an anyres model's image tiles lie and what tokens they give (models/anyres.py)."""
        return AnyResGeometry.of(self.config)

    # --- native models: images and videos of any size -> visual tokens -------------------------------

    @property
    def mrope_layout(self) -> MRopeLayout:
        return mrope_layout(self.config)

    def embed_native(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None) -> NativeInputs:
        """A native model's token embeddings, input_ids (B, T) or (T,), with the tower's merged
        tokens of the images (pixel_values (P, C*T*p*p), image_grid_thw (N, 3)) at the image tokens
        and those of the videos at the video tokens, each in order; plus the deepstack features.

        Raises BadRecordError (reason "placeholder_mismatch") naming both numbers when the image
        (video) tokens differ from the merged tokens their grids give."""
        embeds = self.llm.embed(input_ids)  # (..., D)
        placed = []  # (positions, deepstack features) of images, then videos
        for kind, token_id, pixels, grid_thw in (
                ("image", self.config.image_token_id, pixel_values, image_grid_thw),
                ("video", self.mrope_layout.video_token_id, pixel_values_videos, video_grid_thw)):
            is_kind = input_ids == token_id  # (...)
            visual = self._native_features(kind, is_kind, pixels, grid_thw)
            if visual is None:
                continue
            embeds = embeds.masked_scatter(is_kind.unsqueeze(-1), visual.features.to(embeds.dtype))
            placed.append((is_kind, visual.deepstack_features))
        return NativeInputs(embeds, _joint_deepstack(placed))

    def _native_features(self, kind: str, is_kind: torch.Tensor, pixels: torch.Tensor | None,
                         grid_thw: torch.Tensor | None) -> NativeVisionOutput | None:
        """The tower's output for one kind of visual input (None without any), once its token
        count is checked against the text's."""
        n_tokens = int(is_kind.sum())
        if pixels is None:
            if n_tokens:
                raise BadRecordError("placeholder_mismatch", f"the text holds {n_tokens} {kind} token(s) "
                                     f"but no {kind} pixel values were given")
            return None
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values need {kind}_grid_thw (the patch grid of each {kind})")
        counts = merged_token_counts(grid_thw, self.config.native_vision.spatial_merge_size)
        if sum(counts) != n_tokens:
            raise BadRecordError("placeholder_mismatch", (
                f"the text holds {n_tokens} {kind} token(s) but {kind}_grid_thw gives {sum(counts)} merged "
                f"token(s) ({len(counts)} {kind}(s) of {counts}); each {kind} needs exactly its tokens in the text"))
        return self.vision(pixels, grid_thw)

    # --- the two calls -----------------------------------------------------------------------------

    def decoder_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, *, image_grid_thw: torch.Tensor | None = None,
                       pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                       second_per_grid_ts: torch.Tensor | list[float] | None = None,
                       high_res_pixel_values: torch.Tensor | None = None) -> DecoderInputs:
        """What the decoder takes for a padded batch input_ids (B, T): the embeddings with the
        visual tokens placed, and for native models their M-RoPE positions, deepstack features and
        per-row rope deltas (the HF-style call and the generation engine's prefill share this).

        LLaVA-shaped models take image tiles (N, 3, H, W) as pixel_values. Native models take what
        transformers' Qwen-VL processors make: pixel_values (P, C*T*p*p) with image_grid_thw (N, 3),
        pixel_values_videos with video_grid_thw, and second_per_grid_ts (Qwen2.5-VL, one per video).
        A hybrid model takes its rows of both resolutions as pixel_values, or transformers' low- and
        high-resolution images (pixel_values, high_res_pixel_values)."""
        if high_res_pixel_values is not None and not self.config.is_hybrid:
            raise ValueError("high_res_pixel_values are an input of hybrid models (VLMConfig.high_res_vision)")
        if not self.config.is_native:
            # an anyres model's image layouts travel where native models' grids do (models/anyres.py)
            layouts = image_grid_thw if self.config.tiling == "anyres" else None
            if (image_grid_thw is not None and layouts is None) or pixel_values_videos is not None or (
                    video_grid_thw is not None):
                raise ValueError("grids and videos are inputs of native-resolution models; this model "
                                 "takes image tiles as pixel_values (an anyres model with their layouts)")
            return DecoderInputs(self.embed_inputs(input_ids, pixel_values, image_layouts=layouts,
                                                   high_res_pixel_values=high_res_pixel_values))
        native = self.embed_native(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if second_per_grid_ts is not None and not torch.is_tensor(second_per_grid_ts):
            second_per_grid_ts = torch.tensor(second_per_grid_ts, dtype=torch.float32) if second_per_grid_ts else None
        positions, deltas = rope_positions(input_ids, self.mrope_layout, image_grid_thw=image_grid_thw,
                                           video_grid_thw=video_grid_thw, video_seconds_per_grid=second_per_grid_ts,
                                           attention_mask=attention_mask)  # (3, B, T), (B, 1)
        return DecoderInputs(native.embeds, positions, native.deepstack, deltas)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | None = None,
                pixel_attention_mask: torch.Tensor | None = None,
                high_res_pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        """HF-style padded call: input_ids (B, T), attention_mask (B, T) 1 = real -> logits (B, T, V);
        the inputs as `decoder_inputs` takes them, or the padded images of transformers' Idefics3 /
        SmolVLM processors, pixel_values (B, I, 3, S, S) with pixel_attention_mask (B, I, S, S), or
        those of its LLaVA-OneVision processor, pixel_values (I, N, 3, S, S) with image_sizes (I, 2)
        and batch_num_images (B,)."""
        if image_sizes is not None and pixel_values is not None:
            if self.config.tiling != "anyres":
                raise ValueError("image_sizes are an input of anyres models (VLMConfig.tiling 'anyres')")
            pixel_values, image_grid_thw = self.anyres_geometry.hf_inputs(pixel_values, image_sizes, batch_num_images)
        if pixel_values is not None and pixel_values.dim() == 5:
            pixel_values = unpad_tiles(pixel_values, pixel_attention_mask)
        spec = AttnSpec.causal() if attention_mask is None else AttnSpec.padded(attention_mask)
        inputs = self.decoder_inputs(input_ids, pixel_values, attention_mask, image_grid_thw=image_grid_thw,
                                     pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                     second_per_grid_ts=second_per_grid_ts,
                                     high_res_pixel_values=high_res_pixel_values)
        hidden = self.llm.decode(inputs.embeds, position_ids=inputs.position_ids, spec=spec,
                                 deepstack=inputs.deepstack)
        return self.llm.logits(hidden)

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                     cu_seqlens: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                     image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None) -> LossOutput:
        """Loss of a packed batch: input_ids, labels (unshifted), position_ids (T,); cu_seqlens (S+1,).

        A native model takes its M-RoPE positions (3, T) (models/mrope.py's `packed_rope_positions`)
        and the pack's images and videos as `forward` does; an anyres model its images' layouts as
        image_grid_thw. Logits are computed only at positions
        that have a target, which saves the (T, V) matrix.
        """
        positions_shape = (MROPE_AXES, *input_ids.shape) if self.config.is_native else input_ids.shape
        if input_ids.dim() != 1 or labels.shape != input_ids.shape or position_ids.shape not in (
                input_ids.shape, positions_shape):
            raise ValueError(f"compute_loss takes flat (T,) input_ids, labels and position_ids (or (3, T) M-RoPE "
                             f"positions of a native model); got {tuple(input_ids.shape)}, {tuple(labels.shape)}, "
                             f"{tuple(position_ids.shape)}")
        T = input_ids.shape[0]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must run from 0 to the {T} tokens, got {cu_seqlens.tolist()}")
        if self.config.is_native:
            native = self.embed_native(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
            embeds, deepstack = native.embeds, native.deepstack  # (T, D)
        else:
            embeds = self.embed_inputs(input_ids, pixel_values, cu_seqlens=cu_seqlens, image_layouts=image_grid_thw)
            deepstack = None
        hidden = self.llm.decode(embeds, position_ids=position_ids, spec=AttnSpec.packed(cu_seqlens),
                                 deepstack=deepstack)  # (T, D)
        targets = shift_labels(labels, cu_seqlens)  # (T,)
        supervised = targets != IGNORE_INDEX
        ce = self._target_losses(hidden[supervised], targets[supervised])  # (M,)
        loss_sum = ce.sum()
        num_targets = supervised.sum()
        aux = self.llm.aux_loss()
        # token_loss[t] is the loss of predicting token t, so it sits on the label's own position
        token_loss = torch.zeros(T, dtype=torch.float32, device=input_ids.device)
        token_loss[1:][supervised[:-1]] = ce
        loss = loss_sum / num_targets.clamp(min=1) + aux
        return LossOutput(loss=loss, loss_sum=loss_sum, num_targets=num_targets, token_loss=token_loss, aux_loss=aux)

    def _target_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (M,) of each target under the output head, hidden (M, D). The fused path
        takes a head that is a plain linear map; one that adds terms (LoRA) takes the plain path."""
        projection = output_projection(self.llm.head.modules[0]) if self.fused_loss else None
        if projection is not None:
            weight, bias = projection
            return linear_cross_entropy(hidden, weight, targets, bias=bias)
        return F.cross_entropy(self.llm.logits(hidden).float(), targets, reduction="none")

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each vision and LLM block in the backward pass instead of storing activations."""
        self.vision.gradient_checkpointing = bool(on)
        self.llm.gradient_checkpointing = bool(on)


def _joint_deepstack(placed: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]) -> Deepstack | None:
    """One `Deepstack` over the image and video positions together: each level's features of both
    kinds in the order of their tokens (the reference's joint image / video deepstack)."""
    if not placed or not placed[0][1]:
        return None
    visual = placed[0][0]
    for is_kind, _ in placed[1:]:
        visual = visual | is_kind
    levels = []
    for features in zip(*(deepstack for _, deepstack in placed)):  # one level: images', videos'
        joint = features[0].new_zeros(int(visual.sum()), features[0].shape[-1])  # (M, D)
        for (is_kind, _), kind_features in zip(placed, features):
            joint[is_kind[visual]] = kind_features
        levels.append(joint)
    return Deepstack(visual, tuple(levels))


def _count_message(n_placeholders: int, n_visual: int, visual_desc: str, is_image: torch.Tensor,
                   cu_seqlens: torch.Tensor | None) -> str:
    msg = (f"the text holds {n_placeholders} image token(s) but the images give {n_visual} visual "
           f"token(s) ({visual_desc}); each image tile needs exactly its visual tokens in the text")
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        flat = is_image.reshape(-1)
        per_sample = {i: int(flat[cu[i]:cu[i + 1]].sum()) for i in range(len(cu) - 1)}
        msg += f"; image tokens per packed sample: {({i: n for i, n in per_sample.items() if n})}"
    return msg
