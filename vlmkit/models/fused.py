"""Inference-only copies of the decoder's weights, laid out for decoding: projections that read the
same input fused into one matmul, and on the CPU every matrix stored transposed.

A decode step of a small model is bound by calls, not arithmetic: q / k / v are three matmuls of
one token, gate / up two more. `FusedLinears` concatenates their weights into one matrix the first
time a no-grad forward asks for them and splits the one product back, so a step makes 2 matmul
calls per block where it made 5 (plus o_proj and down_proj, and the output head, each wrapped
alone). The separate modules stay the model's parameters (checkpoint names, freezing, FSDP and
the optimiser see nothing new); the copies are derived from them and rebuilt whenever one of
them changes (an optimiser step or `load_state_dict` bumps a tensor's version counter, `.to()`
moves its storage, `to_empty` or `load_state_dict(assign=True)` replaces the parameter).

Transposed weights: `F.linear(x, W)` multiplies by W (out, in) as stored, which MKL's sgemm runs
as a transposed-B product; with W^T stored contiguous (in, out), `x @ W^T` is a plain product,
faster for the few rows of a decode step and never slower for many, through public ops only
(docs/benchmarks.md, decode section, has the figures). Other devices keep W as stored: cuBLAS
runs both layouts alike.

Opt-in (`LLM.fuse_projections()`; the inference engine turns it on for decoders up to
`infer.engine.DERIVED_WEIGHTS_MAX_BYTES`) and costs memory: a copy of every wrapped weight on the
CPU, of the fused ones elsewhere. Used only under `torch.no_grad` / `inference_mode`: training and
anything that needs gradients runs the separate modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FusedLinears:
    """Runs `modules` (nn.Linear with the same input width, all with or all without bias; or one
    nn.Embedding used as a tied output head, x @ E^T) as one matmul when enabled.

    `groups` splits the outputs: group sizes in modules, in order (default one output per module);
    the outputs of a group come concatenated, e.g. (2, 1) over q / k / v gives (q|k, v)."""

    def __init__(self, *modules: nn.Module, groups: tuple[int, ...] | None = None):
        groups = groups or (1,) * len(modules)
        if sum(groups) != len(modules):
            raise ValueError(f"groups {groups} do not cover the {len(modules)} modules")
        # a tuple in a plain attribute: the modules stay registered (and owned) where they are
        self.modules = modules
        self.enabled = False
        self._key: list | None = None
        self._weight: torch.Tensor | None = None  # (out, in), or (in, out) when self._transposed
        self._bias: torch.Tensor | None = None
        self._transposed = False
        # Where each source tensor lives: its module's parameter dict, read on every call so that
        # a replaced parameter (`to_empty`, `load_state_dict(assign=True)`) is seen. This is the
        # private `_parameters` because the public reads, `module.weight` (nn.Module.__getattr__)
        # or `get_parameter`, cost an order of magnitude more per lookup, and a decode step makes
        # several lookups per block (docs/benchmarks.md, decode section).
        self._sources = [(m._parameters, name) for m in modules for name in ("weight", "bias")
                         if m._parameters.get(name) is not None]
        widths = [m.weight.shape[0] for m in modules]
        bounds = [sum(groups[:i]) for i in range(len(groups) + 1)]
        self._group_modules = [modules[a:b] for a, b in zip(bounds, bounds[1:])]
        self._sizes = [sum(widths[a:b]) for a, b in zip(bounds, bounds[1:])]
        self._split = self._sizes if len(self._sizes) > 1 else None  # None: one output, no split

    @property
    def fused(self) -> bool:
        """Whether the matmul runs on a concatenated copy (more than one module)."""
        return len(self.modules) > 1

    def _state(self) -> list:
        """What the copies were built from: every tensor's storage and version (a dtype or device
        change makes a new storage). The version counter is the private `Tensor._version`: no
        public API tells that a tensor was changed in place (an optimiser step, `copy_` from
        `load_state_dict`, a `mul_` under no_grad)."""
        return [(params[name].data_ptr(), params[name]._version) for params, name in self._sources]

    def _separate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # nn.Linear through its module (so that its hooks run); the head through F.linear
        outs = [[m(x) if isinstance(m, nn.Linear) else F.linear(x, m.weight) for m in group]
                for group in self._group_modules]
        return tuple(o[0] if len(o) == 1 else torch.cat(o, dim=-1) for o in outs)

    def _build(self) -> None:
        weight = torch.cat([m.weight for m in self.modules]) if self.fused else self.modules[0].weight
        biased = _bias(self.modules[0]) is not None
        bias = torch.cat([_bias(m) for m in self.modules]) if biased and self.fused else _bias(self.modules[0])
        self._transposed = weight.device.type == "cpu"
        self._weight = weight.detach().t().contiguous() if self._transposed else weight.detach()
        self._bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> one output per group, as the separate modules would give them."""
        if not self.enabled or torch.is_grad_enabled():
            return self._separate(x)
        key = self._state()
        if key != self._key:
            self._build()
            self._key = key
        weight, bias = self._weight, self._bias
        if not self._transposed:
            out = F.linear(x, weight, bias)
        elif bias is None:
            out = torch.matmul(x, weight)
        else:  # addmm takes matrices
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return (out,) if self._split is None else out.split_with_sizes(self._split, dim=-1)

    def configure(self, enabled: bool) -> None:
        """Turn the derived weights on or off (off drops them)."""
        self.enabled = enabled
        if not enabled:
            self.release()

    def release(self) -> None:
        """Drop the derived copies (they are rebuilt on the next enabled no-grad call)."""
        self._key = self._weight = self._bias = None


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
