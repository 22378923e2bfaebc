"""Mixture-of-Experts feed-forward: routed top-k SwiGLU experts plus always-on shared experts.

Follows DeepSeek-V3 (arXiv:2412.19437, section 2.1.2): token-to-expert affinities s = sigmoid(x W_r)
(or softmax), experts picked by top-k of s + b where b is a per-expert bias used for *selection
only*; the gate weights are the unbiased affinities of the picked experts, renormalised. After
each optimiser step `update_bias()` nudges b by rate * sign(mean_load - load): overloaded experts
become less attractive, underloaded ones more ("auxiliary-loss-free load balancing"). An optional
auxiliary balance loss (Switch Transformer, arXiv:2101.03961, section 2.2: E * sum_e f_e * P_e,
here over top-k picks) is also offered.

Shape suffixes: N tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.models.config import MoEConfig
from vlmkit.models.fused import FusedLinears

MIN_GATE_SUM = 1e-20
"""Floor of the picked affinities' sum when renormalising gate weights: sigmoid affinities can
underflow to 0 in fp32, and 0 / 0 would give NaN gates."""


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, "GLU Variants Improve Transformer", 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up = FusedLinears(self.gate_proj, self.up_proj)  # one matmul when decoding (models/fused.py)
        self.down = FusedLinears(self.down_proj)  # a transposed copy when decoding on the CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)[0]


class Router(nn.Module):
    """Scores tokens against experts and picks K per token."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        # Selection bias of auxiliary-loss-free balancing: a buffer (saved, never trained by gradients).
        self.register_buffer("score_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> gate weights (N, K), expert indices (N, K), affinities (N, E)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 routing, also under autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(-1)
        _, idx = torch.topk(scores.detach() + self.score_bias, self.cfg.top_k, dim=-1)  # (N, K)
        weights = scores.gather(-1, idx)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=MIN_GATE_SUM)
        return weights, idx, scores


class MoE(nn.Module):
    """Routed experts + shared experts. Records the last forward's expert load and aux loss."""

    run_idle_experts: bool = False
    """Run an expert that no token chose on an empty batch, so that its weights get a (zero)
    gradient like every other expert's. Sharded training sets it (train/distributed.py): every rank
    must gather and reduce the same experts whatever its own tokens chose. Off otherwise, where an
    idle expert's missing gradient keeps it out of the optimizer step."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = nn.ModuleList(SwiGLU(dim, cfg.expert_intermediate_size) for _ in range(cfg.num_experts))
        # DeepSeek-V3 keeps shared experts as one wider FFN: same function, one matmul.
        self.shared_experts = (SwiGLU(dim, cfg.expert_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)
        self.last_load = torch.zeros(cfg.num_experts, device="cpu")  # (E,) tokens per expert, last forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., D) -> (output (..., D), aux loss scalar, tokens per expert (E,)).

        The load is not recorded here but by `record_load`, called outside gradient checkpointing
        so that a recomputed forward is not counted twice."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, idx, scores = self.router(x)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=self.cfg.num_experts)  # (E,)
        for e, n in enumerate(counts.tolist()):
            if n == 0 and not self.run_idle_experts:
                continue
            token, slot = torch.where(idx == e)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))  # dtypes differ under autocast
        return out.reshape(shape), self.balance_loss(scores, counts), counts

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        self.last_load = counts.float().cpu()
        if self.training:
            self.load_since_update += counts.float().to(self.load_since_update.device)

    def balance_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """aux_loss_coef * E * sum_e f_e * P_e (Switch Transformer's load-balancing loss with top-k
        routing): f_e the fraction of the N * K picks that went to e, P_e the mean over tokens of
        e's share of the token's affinities. Differentiable through P; 0 when the coefficient is 0."""
        if self.cfg.aux_loss_coef == 0 or scores.shape[0] == 0:
            return scores.new_zeros(())
        f = counts.float() / counts.sum().clamp(min=1)
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        return self.cfg.aux_loss_coef * self.cfg.num_experts * (f * p).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean_load - load) over the load seen since the last update."""
        load = self.load_since_update
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank must pick experts with the same bias
        if self.cfg.bias_update_rate > 0 and load.sum() > 0:
            self.router.score_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
