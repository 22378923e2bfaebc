"""Projections that read the same input, run as one matmul while decoding.

A decode step of a small model is bound by calls, not arithmetic: q / k / v are three matmuls of
one token, gate / up two more. `FusedLinears` concatenates their weights into one matrix the first
time a no-grad forward asks for them and splits the one product back, so a step makes 2 matmul
calls per block where it made 5 (plus o_proj and down_proj). The separate `nn.Linear` modules stay
the model's parameters (checkpoint names, freezing, FSDP and the optimiser see nothing new); the
fused copy is derived from them and rebuilt whenever one of them changes (an optimiser step or
`load_state_dict` bumps a tensor's version counter, `.to()` moves its storage).

It is opt-in (`LLM.fuse_projections()`; the inference engine turns it on) and costs a second copy of
the fused weights in memory, so it is used only under `torch.no_grad` / `inference_mode`: training
and anything that needs gradients always runs the separate modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FusedLinears:
    """Runs `linears` (same input width, all with or all without bias) as one `F.linear` when enabled."""

    def __init__(self, *linears: nn.Linear):
        # a tuple in a plain attribute: the modules stay registered (and owned) where they are
        self.linears = linears
        self.enabled = False
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._sizes = [m.out_features for m in linears]

    def _state(self) -> tuple:
        """What the fused copy was built from: every tensor's storage, version and dtype."""
        tensors = [m.weight for m in self.linears] + [m.bias for m in self.linears if m.bias is not None]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> one output per linear, as the separate modules would give them."""
        if not self.enabled or torch.is_grad_enabled():
            return tuple(m(x) for m in self.linears)
        key = self._state()
        if key != self._key:
            with torch.no_grad():
                self._weight = torch.cat([m.weight for m in self.linears])
                biased = self.linears[0].bias is not None
                self._bias = torch.cat([m.bias for m in self.linears]) if biased else None
            self._key = key
        return F.linear(x, self._weight, self._bias).split(self._sizes, dim=-1)

    def release(self) -> None:
        """Drop the fused copy (it is rebuilt on the next enabled no-grad call)."""
        self._key = self._weight = self._bias = None
