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
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import VLMConfig
from vlmkit.models.llm import LLM
from vlmkit.models.vision import VisionEncoder
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
    """(T,) detached cross-entropy of the token at each position (0 where it is not a target)."""
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


class VLMModel(nn.Module):
    """vision -> adapter -> llm. See the module docstring for the two calls."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.adapter = build_adapter(cfg.adapter, cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.llm = LLM(cfg.llm)

    @classmethod
    def empty(cls, cfg: VLMConfig) -> "VLMModel":
        """The model with storage allocated but not initialised, for weights that come from a
        checkpoint (models/weights.py, `uninitialised`)."""
        return uninitialised(lambda: cls(cfg))

    # --- images -> visual tokens ------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) tiles -> (N, tokens per tile, D) visual tokens in the LLM's space."""
        features = self.vision.features(pixel_values)  # (N, P, Dv)
        return self.adapter(features, grid=self.vision.grid(pixel_values))  # (N, tokens, D)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image-token position replaced by the next visual token.

        input_ids (B, T) or (T,) -> (..., D). Raises BadRecordError (reason "placeholder_mismatch")
        when the image tokens in input_ids differ from the visual tokens of pixel_values; with
        `cu_seqlens` (packed input) the message also names the samples that hold image tokens.
        """
        embeds = self.llm.embed(input_ids)  # (..., D)
        is_image = input_ids == self.config.image_token_id  # (...)
        n_placeholders = int(is_image.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_placeholders:
                raise BadRecordError("placeholder_mismatch", _count_message(
                    n_placeholders, 0, "no pixel_values", is_image, cu_seqlens))
            return embeds
        visual = self.image_features(pixel_values)  # (N, tokens, D)
        n_visual = visual.shape[0] * visual.shape[1]
        if n_visual != n_placeholders:
            raise BadRecordError("placeholder_mismatch", _count_message(
                n_placeholders, n_visual, f"{visual.shape[0]} tile(s) x {visual.shape[1]} tokens",
                is_image, cu_seqlens))
        visual = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)  # (N * tokens, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual)

    # --- the two calls -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """HF-style padded call: input_ids (B, T), attention_mask (B, T) 1 = real -> logits (B, T, V)."""
        embeds = self.embed_inputs(input_ids, pixel_values)  # (B, T, D)
        spec = AttnSpec.causal() if attention_mask is None else AttnSpec.padded(attention_mask)
        return self.llm.logits(self.llm.decode(embeds, spec=spec))

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                     cu_seqlens: torch.Tensor, pixel_values: torch.Tensor | None = None) -> LossOutput:
        """Loss of a packed batch: input_ids, labels (unshifted), position_ids (T,); cu_seqlens (S+1,).

        Logits are computed only at positions that have a target, which saves the (T, V) matrix.
        """
        if input_ids.dim() != 1 or labels.shape != input_ids.shape or position_ids.shape != input_ids.shape:
            raise ValueError(f"compute_loss takes flat (T,) input_ids, labels and position_ids; got "
                             f"{tuple(input_ids.shape)}, {tuple(labels.shape)}, {tuple(position_ids.shape)}")
        T = input_ids.shape[0]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must run from 0 to the {T} tokens, got {cu_seqlens.tolist()}")
        embeds = self.embed_inputs(input_ids, pixel_values, cu_seqlens=cu_seqlens)  # (T, D)
        hidden = self.llm.decode(embeds, position_ids=position_ids, spec=AttnSpec.packed(cu_seqlens))  # (T, D)
        targets = shift_labels(labels, cu_seqlens)  # (T,)
        supervised = targets != IGNORE_INDEX
        logits = self.llm.logits(hidden[supervised])  # (M, V)
        ce = F.cross_entropy(logits.float(), targets[supervised], reduction="none")  # (M,)
        loss_sum = ce.sum()
        num_targets = supervised.sum()
        aux = self.llm.aux_loss()
        # token_loss[t] is the loss of predicting token t, so it sits on the label's own position
        token_loss = torch.zeros(T, dtype=torch.float32, device=input_ids.device)
        token_loss[1:][supervised[:-1]] = ce.detach()
        loss = loss_sum / num_targets.clamp(min=1) + aux
        return LossOutput(loss=loss, loss_sum=loss_sum, num_targets=num_targets, token_loss=token_loss, aux_loss=aux)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Recompute each vision and LLM block in the backward pass instead of storing activations."""
        self.vision.gradient_checkpointing = bool(on)
        self.llm.gradient_checkpointing = bool(on)


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
