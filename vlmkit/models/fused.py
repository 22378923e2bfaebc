"""Inference-only copies of the decoder's weights: projections that read the same input fused into
one matmul, and on the CPU the weights prepacked for oneDNN.

A decode step of a small model is bound by calls, not arithmetic: q / k / v are three matmuls of
one token, gate / up two more. `FusedLinears` concatenates their weights into one matrix the first
time a no-grad forward asks for them and splits the one product back, so a step makes 2 matmul
calls per block where it made 5 (plus o_proj and down_proj, and the output head, each wrapped
alone). The separate modules stay the model's parameters (checkpoint names, freezing, FSDP and
the optimiser see nothing new); the copies are derived from them and rebuilt whenever one of
them changes (an optimiser step or `load_state_dict` bumps a tensor's version counter, `.to()`
moves its storage).

Prepacking. On the CPU in fp32, a matmul of several rows through `F.linear` (MKL sgemm) reorders
the weight into its blocked layout on every call. oneDNN can take a weight reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, the op torch.compile's CPU backend uses for frozen
linears). Measured on this project's 2-core CPU, one thread, 192 x 1024 weight: 48.6 -> 27.9 us at
8 rows and 259 -> 123 us at 64 rows. At 1-2 rows the plain call (a matrix-vector product) is as
fast or faster (12 vs 20 us at 1 row), so rows below `PACK_MIN_ROWS` keep it. The outputs are
identical at >= 4 rows in that measurement; tests compare within fp32 rounding.

Both are opt-in (`LLM.fuse_projections()`; the inference engine turns them on for models up to
`infer.engine.DERIVED_WEIGHTS_MAX_BYTES`) and cost memory: the fused copy of q/k/v and gate/up, and
on the CPU a packed copy of every wrapped weight. They are used only under `torch.no_grad` /
`inference_mode`: training and anything that needs gradients runs the separate modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PACK_MIN_ROWS = 4
"""Rows of input from which a CPU fp32 matmul runs on the prepacked weight."""
PACK_HINT_ROWS = 8
"""The row count oneDNN packs for; the packed weight serves any row count (measured 2-64)."""


def packing_available() -> bool:
    """oneDNN linear with prepacked weights is in this build of PyTorch."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class FusedLinears:
    """Runs `modules` (nn.Linear with the same input width, all with or all without bias; or one
    nn.Embedding used as a tied output head, x @ E^T) as one matmul when enabled."""

    def __init__(self, *modules: nn.Module):
        # a tuple in a plain attribute: the modules stay registered (and owned) where they are
        self.modules = modules
        self.enabled = False
        self.pack = False
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None
        self._packable = False
        self._sizes = [m.weight.shape[0] for m in modules]

    @property
    def fused(self) -> bool:
        """Whether the matmul runs on a concatenated copy (more than one module)."""
        return len(self.modules) > 1

    def _state(self) -> tuple:
        """What the copies were built from: every tensor's storage, version and dtype."""
        tensors = [m.weight for m in self.modules] + [b for m in self.modules if (b := _bias(m)) is not None]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def _separate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # nn.Linear through its module (so that its hooks run); the head through F.linear
        return tuple(m(x) if isinstance(m, nn.Linear) else F.linear(x, m.weight) for m in self.modules)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> one output per module, as the separate modules would give them."""
        if not self.enabled or torch.is_grad_enabled():
            return self._separate(x)
        key = self._state()
        if key != self._key:
            with torch.no_grad():
                if self.fused:
                    self._weight = torch.cat([m.weight for m in self.modules])
                    biased = _bias(self.modules[0]) is not None
                    self._bias = torch.cat([_bias(m) for m in self.modules]) if biased else None
                else:  # one module: its own tensors, no copy
                    self._weight, self._bias = self.modules[0].weight, _bias(self.modules[0])
            self._packed = None
            # decided once per build: a decode step makes ~20 of these calls
            self._packable = self.pack and self._weight.device.type == "cpu" and self._weight.dtype == torch.float32
            self._key = key
        if self._packable and x.dtype == torch.float32 and x.numel() >= PACK_MIN_ROWS * x.shape[-1]:
            if self._packed is None:
                with torch.no_grad():
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(self._weight.detach(), PACK_HINT_ROWS)
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, self._bias, "none", [], "")
        else:
            out = F.linear(x, self._weight, self._bias)
        return out.split(self._sizes, dim=-1) if self.fused else (out,)

    def configure(self, enabled: bool, pack: bool) -> None:
        """Turn the derived weights on or off (off drops them), prepacking with them or not."""
        if pack != self.pack:
            self._key = None  # rebuilt (and re-decided) on the next call
        self.enabled, self.pack = enabled, enabled and pack
        if not enabled:
            self.release()

    def release(self) -> None:
        """Drop the derived copies (they are rebuilt on the next enabled no-grad call)."""
        self._key = self._weight = self._bias = self._packed = None
        self._packable = False


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
