"""Image-text contrastive pretraining pieces: SigLIP's sigmoid loss and the heads it trains.

SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023) scores every image of
a batch against every caption with a learned scale t = exp(t') and bias b, and treats each pair
as its own binary problem: the matching pairs are positives (label +1), all others negatives
(-1), so the loss needs no softmax over the batch:

    z_i = x_i / |x_i|,  w_j = y_j / |y_j|,  logit_ij = t * <z_i, w_j> + b
    loss = -1/N * sum_ij log sigmoid(label_ij * logit_ij)

The heads are what a contrastive stage trains besides the vision tower (train/contrastive.py
drops them at the stage end; the tower is what carries over):

- `ImageHead`: the tower's patch features (the layer the adapter reads), each patch projected
  small, then all of them in their places projected into the shared embedding space;
- `TextTower`: a small decoder of models/llm.py's blocks with its own token embeddings, run on the
  captions as one packed sequence (`cu_seqlens`, positions restarting per caption); each caption
  is pooled at its last token (the end-of-text token the caption ends with), which under causal
  attention is the one token that has read the whole caption (CLIP's text tower pools the same
  way), then projected; with no blocks, a bag of its own word embeddings;
- the learned scale (as its log, t') and bias, initialised as SigLIP does (t = 10, b = -10: the
  bias offsets the many negatives of a batch at the start).

Shape suffixes: N pairs, P patches, Dv tower width, T caption tokens of a pack, D text width,
E shared embedding size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import LLMConfig
from vlmkit.models.llm import LLM

TEXT_MLP_RATIO = 4
"""The text tower's FFN width as a multiple of its hidden size."""
PROJECTION_INIT_STD = 0.02
"""Std of the heads' initial weights (projections, bag-of-words embeddings), as the towers' own linears."""


def sigmoid_contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                             logit_bias: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's sigmoid loss of N image-caption pairs (the formula in the module docstring).

    img_emb, txt_emb (N, E): embeddings, L2-normalised here; logit_scale: t' (the scale is
    exp(t'), as SigLIP and transformers' SiglipModel store it); logit_bias: b. positives (N, N)
    bool: which image-caption pairs match (default: the diagonal; a batch with identical captions
    marks those pairs too). Returns the loss summed over the N x N pairs, divided by N."""
    logits = image_text_logits(img_emb, txt_emb, logit_scale, logit_bias)  # (N, N)
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    labels = positives.to(logits.dtype) * 2 - 1  # +1 matching, -1 not
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def image_text_logits(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor) -> torch.Tensor:
    """(N, E), (M, E) -> (N, M): exp(t') * cosine similarity + b."""
    sims = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T
    return sims * logit_scale.exp() + logit_bias


class ImageHead(nn.Module):
    """Patch features (N, P, Dv) -> (N, E): LayerNorm, each patch projected to `patch_dim` values,
    then one linear map of all patches in their places (P * patch_dim -> E).

    The head keeps each patch's place: whatever a patch shows, the map knows where it is, so the
    tower only has to say what each patch holds, which is what the adapter reads from it later.
    A pooled head (a mean over patches) leaves the tower to bind content to place itself before
    the sum, and learned far slower here (docs/training.md, "Vision pretraining"). Projecting each
    patch first keeps the map small for large towers (729 patches x 1152 wide for SigLIP-so400m)."""

    def __init__(self, vision_width: int, num_patches: int, patch_dim: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.patch_proj = nn.Linear(vision_width, patch_dim)
        self.proj = nn.Linear(num_patches * patch_dim, embed_dim)
        for linear in (self.patch_proj, self.proj):
            nn.init.trunc_normal_(linear.weight, std=PROJECTION_INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.patch_proj(self.norm(features)).flatten(1))


class TextTower(nn.Module):
    """Packed captions -> (N, E), with embeddings of its own. With blocks: a small causal decoder
    (models/llm.py), each caption pooled at its last token. With none (`num_layers` 0): each
    caption is the mean of its token embeddings, a bag of words: nearly free, but blind to which
    word goes with which ("a red circle and a blue square" reads as "a blue circle and a red
    square"). Then a linear projection."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, max_tokens: int,
                 embed_dim: int):
        super().__init__()
        self.decoder = LLM(LLMConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                     intermediate_size=TEXT_MLP_RATIO * hidden_size, num_layers=num_layers,
                                     num_heads=num_heads, max_position_embeddings=max_tokens,
                                     tie_embeddings=True)) if num_layers else None  # tied: no unused output matrix
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size) if not num_layers else None
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, std=PROJECTION_INIT_STD)
        self.proj = nn.Linear(hidden_size, embed_dim)
        nn.init.trunc_normal_(self.proj.weight, std=PROJECTION_INIT_STD)
        nn.init.zeros_(self.proj.bias)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids (T,): the captions of a pack; cu_seqlens (N+1,)."""
        if self.decoder is None:
            return self.proj(segment_mean(self.embed_tokens(input_ids), cu_seqlens))
        hidden = self.decoder.decode(self.decoder.embed(input_ids), position_ids=position_ids,
                                     spec=AttnSpec.packed(cu_seqlens))  # (T, D)
        last = cu_seqlens[1:].long() - 1  # (N,) each caption's last token
        return self.proj(hidden[last])


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x (T, D) of N packed samples -> (N, D): each sample's mean."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (N,)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)  # (T,)
    sums = x.new_zeros(lengths.numel(), x.shape[-1]).index_add(0, segment, x)
    return sums / lengths[:, None].to(x.dtype)


class ContrastiveHeads(nn.Module):
    """Everything a contrastive stage trains besides the vision tower: the image head, the text
    tower, and the learned scale t' (`logit_scale`, log of t) and bias b (`logit_bias`)."""

    def __init__(self, *, vision_width: int, num_patches: int, patch_dim: int, vocab_size: int, embed_dim: int,
                 text_hidden_size: int, text_layers: int, text_heads: int, max_caption_tokens: int,
                 temperature_init: float, bias_init: float):
        super().__init__()
        self.image = ImageHead(vision_width, num_patches, patch_dim, embed_dim)
        self.text = TextTower(vocab_size, text_hidden_size, text_layers, text_heads, max_caption_tokens, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        return sigmoid_contrastive_loss(img_emb, txt_emb, self.logit_scale, self.logit_bias, positives)
