"""torch.compile of a model's repeated blocks, one block at a time.

`compile_blocks(model)` compiles the `forward` of every transformer block of the vision tower(s)
and the LLM (`block_lists`: the stacks of repeated blocks, which FSDP2 also shards one unit each).
Per block, not the whole model: compile time stays that of one block whatever the depth (the
blocks of a stack share their code, so the compiled graphs are reused across them), the
embeddings, the packing bookkeeping and the loss stay eager, and the parts around a block keep
working as they are:

- FSDP2 gathers and frees a block's parameters in hooks around its call; only `forward` is
  compiled, so those hooks run eagerly outside the graph (train/distributed.py shards first, the
  trainer compiles after).
- gradient checkpointing calls the block (`torch.utils.checkpoint`), which runs the compiled
  forward in the forward pass and again in the recomputation.
- a call with a KV cache (prefill, decoding, also inside a training run: GRPO's rollouts, a stage's
  generation eval) runs the eager forward: the cache's bookkeeping is Python state that changes
  every step.
- packed attention is one opaque op inside the graph (`models/attention.py`,
  `vlmkit::packed_attention`); a pack's length changes every step, so a block compiles again once
  when a second length arrives, with the token count symbolic from then on (dynamo's automatic
  dynamic shapes), and never again for new lengths.

A copy of a compiled block (`copy.deepcopy`, pickling: e.g. a frozen reference model) is eager:
compiled code belongs to the module it was traced from. Compiling changes no result beyond float
rounding (the fused kernels may order sums differently; tests/test_compile.py bounds it).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn as nn

from vlmkit.models.attention import KVCache
from vlmkit.models.moe import MoE


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The stacks of repeated blocks (transformer layers of vision and LLM): FSDP2's units
    (train/distributed.py) and what `compile_blocks` compiles. An MoE layer's experts
    are not one: they stay in their layer's unit (a unit inside another one would have to be
    sharded first), where every rank gathers and reduces them together."""
    experts = {id(m.experts) for m in model.modules() if isinstance(m, MoE)}
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and id(m) not in experts
            and all(type(b) is type(m[0]) for b in m)]


class CompiledForward:
    """A block's `forward` replaced by its compiled version, set as the block's instance attribute
    `forward` (nn.Module's call runs it between the block's hooks). Calls with a `KVCache`
    argument run the eager forward."""

    def __init__(self, block: nn.Module, options: dict):
        self.eager: Callable = types.MethodType(type(block).forward, block)
        self.compiled: Callable = torch.compile(self.eager, **options)
        self.options = options

    def __call__(self, *args, **kwargs):
        if any(isinstance(a, KVCache) for a in (*args, *kwargs.values())):
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __reduce__(self):
        # A copy (deepcopy, pickle) gets the eager forward of the copied block: the compiled
        # function holds the original block and cannot be copied with it.
        return types.MethodType, (self.eager.__func__, self.eager.__self__)


def compile_blocks(model: nn.Module, enabled: bool = True, **options) -> int:
    """Compile (enabled) or restore to eager (not enabled) the `forward` of every block of
    `model`'s `block_lists`; returns how many blocks are compiled now. `options` go to
    `torch.compile` (e.g. `mode`, `backend`, `dynamic`); a block compiled with the same options
    keeps its compiled code, so calling this again at each stage start costs nothing."""
    compiled = 0
    for blocks in block_lists(model):
        for block in blocks:
            current = block.__dict__.get("forward")
            if not enabled:
                if _set_here(block, current):
                    del block.forward  # back to the class's forward
                continue
            if not (isinstance(current, CompiledForward) and current.options == options):
                block.forward = CompiledForward(block, options)
            compiled += 1
    return compiled


def _set_here(block: nn.Module, forward) -> bool:
    """`forward` (the block's instance attribute, or None) is a `CompiledForward`, or the eager
    method a copy of one became: no one else's replacement of the block's forward."""
    return isinstance(forward, CompiledForward) or getattr(forward, "__func__", None) is type(block).forward


def compiled_blocks(model: nn.Module) -> int:
    """How many of `model`'s blocks run a compiled forward."""
    return sum(isinstance(block.__dict__.get("forward"), CompiledForward)
               for blocks in block_lists(model) for block in blocks)
