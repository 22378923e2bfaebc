"""What a stage's `precision` (config.Stage) means for its forward passes and for sharding: the
one home of that rule (`forward_precision` is the context every forward of a stage runs in).

fp32: every op in fp32, no autocast (the default; its numbers never change).

bf16: mixed precision, bf16 compute over fp32 master weights and fp32 optimizer state.
- One process: the parameters stay fp32 and the forward runs under `torch.autocast(bf16)`, so
  matmuls and attention run in bf16; the decoder's residual stream is bf16 too
  (models/llm.py's `bf16_autocast`), RMSNorm takes its statistics in fp32 and returns bf16, the
  RoPE tables and the cross-entropy stay fp32.
- Sharded (FSDP2, train/distributed.py's `shard_model`): every unit is sharded with
  `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (`fsdp_policy`): parameters are
  gathered in bf16 (half the all-gather bytes, no per-op cast of the weights), gradients are
  reduce-scattered in fp32 into the fp32 shards, which are all the optimizer sees. Autocast
  stays on there as well, although the matmuls are bf16 without it: it keeps the ops on its fp32
  list (softmax and log-softmax outside the attention kernel, LayerNorm on CUDA) in fp32, it is
  what makes the decoder keep its RoPE tables in fp32, and so the sharded forward is the
  single-process one op for op; on tensors already bf16 its casts are no-ops.

The policy is fixed when a model is sharded, and a run shards its model once (at its start, and
again only around a LoRA stage's surgery), so a sharded run trains every stage in one precision
(`sharded_precision` refuses a mix before any work); a single process may mix them freely.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from vlmkit.config import Stage
from vlmkit.errors import ConfigError

BF16 = "bf16"
"""The mixed-precision setting of `Stage.precision`."""


def forward_precision(precision: str, device: torch.device) -> AbstractContextManager:
    """The context a stage's forward passes run in on `device`: bf16 autocast for a bf16 stage,
    nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == BF16 else nullcontext()


def sharded_precision(stages: list[Stage]) -> str:
    """The one precision of a sharded run's stages (the module docstring says why it is one);
    ConfigError when they mix."""
    precisions = {stage.precision for stage in stages}
    if len(precisions) > 1:
        named = ", ".join(f"{stage.name!r}: {stage.precision}" for stage in stages)
        raise ConfigError(f"a sharded run trains every stage in one precision (FSDP's mixed-precision policy is "
                          f"fixed when the model is sharded); the stages set {named}: give them the same "
                          "`precision`, or run this config without torchrun")
    return precisions.pop()


def fsdp_policy(precision: str, *, root: bool):
    """FSDP2's MixedPrecisionPolicy of one unit for `precision`: for bf16, bf16 parameters and
    compute with fp32 gradient reduction (the shards and the optimizer state stay fp32); for fp32,
    FSDP's default (no casts).

    Only the root casts its forward inputs to bf16 (the pixels: a forward outside autocast, such
    as an objective's evaluation, then still meets bf16 weights with bf16 inputs); a block would
    receive the RoPE tables in bf16, where the single-process path applies them in fp32."""
    # Deferred: FSDP is slow to import and only multi-process runs shard (train/distributed.py).
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != BF16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=root)
