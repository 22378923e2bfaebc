"""torchrun / FSDP2 / DCP glue, applied to a model built for one device (torchtitan's order:
build, then activation checkpointing, then shard each block, then the root).

    torchrun --nproc_per_node 2 -m vlmkit train tiny --out runs/x

A single process needs no torchrun and none of this: `Dist.single()` is a world of one.
Backend: NCCL on CUDA, gloo on the CPU. Every rank holds a shard of each block's parameters;
gradients are reduce-scattered with averaging. Checkpoints go through
torch.distributed.checkpoint (each rank writes its shards; any world size can read them back, but
the data cursors beside them are per rank, so a run resumes with the number of processes that
wrote it).

`fully_shard` fixes the parameters it manages when it is called, so model surgery after the run's
start (a LoRA stage's adapters applied, then merged away) goes through an unsharded copy:
`unsharded_copy` gathers the weights on every rank into a plain model, the surgery changes it,
and `shard_model` shards it again. Work whose number of forward passes differs between ranks (a
GRPO rollout's decoding) runs on such a copy too, free of collectives; a sharded model's passes
must line up across ranks (`aligned_passes`).

A bf16 run shards with FSDP2's MixedPrecisionPolicy: bf16 parameters and compute, fp32 gradient
reduction, fp32 shards and optimizer state (train/precision.py).
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.api import VLM
from vlmkit.data.types import PackedBatch
from vlmkit.errors import CheckpointError
from vlmkit.models.compile import block_lists
from vlmkit.models.config import VLMConfig
from vlmkit.models.lora import LoRAConfig, apply_lora, has_lora, lora_config_of
from vlmkit.models.moe import MoE
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import load_state, uninitialised
from vlmkit.train.precision import fsdp_policy

PassT = TypeVar("PassT")


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls) -> "Dist":
        return cls(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_env(cls) -> "Dist":
        """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        rank = int(os.environ["RANK"])
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, device)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over ranks (float64 on the device)."""
        if not self.is_distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_reduce_named(self, values: dict[str, float]) -> dict[str, float]:
        """Sum named scalars over ranks; every rank passes the same names in the same order."""
        return dict(zip(values, self.all_reduce_sum(list(values.values()))))

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank (the others pass anything)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def shard_model(model: VLMModel, ctx: Dist, precision: str = "fp32") -> VLMModel:
    """FSDP2: fully_shard every block, then the root (embeddings, norms, adapter, head), all with
    the mixed-precision policy of the run's `precision` (train/precision.py's `fsdp_policy`)."""
    # Deferred (here and below): FSDP and DCP are slow to import and only multi-process runs use them.
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in model.modules():  # ranks whose tokens chose other experts still run the same units
        if isinstance(module, MoE):
            module.run_idle_experts = True
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mp_policy=fsdp_policy(precision, root=False))
    fully_shard(model, mp_policy=fsdp_policy(precision, root=True))
    # Training calls compute_loss, not forward: give it the root's unshard / reshard hooks too.
    register_fsdp_forward_method(model, "compute_loss")
    return model


def full_state_dict(model: nn.Module, ctx: Dist, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict: on rank 0 only, on the CPU (empty elsewhere), or with `every_rank`
    on every rank, on its device; a plain state dict alone. Every rank of a sharded model takes
    part."""
    if not ctx.is_distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_model` sharded `model`."""
    from torch.distributed.fsdp import FSDPModule  # deferred: see shard_model

    return isinstance(model, FSDPModule)


def unsharded_copy(model: VLM, ctx: Dist) -> VLM:
    """A plain VLM computing what `model` computes (its LoRA adapters attached, unmerged), in its
    train / eval mode: of a plain model a deep copy; of a sharded one a model built on this rank's
    device and loaded with the gathered weights (every rank must ask at once)."""
    if not ctx.is_distributed or not is_sharded(model):
        return copy.deepcopy(model)
    model.reshard()  # a forward leaves the root's parameters unsharded; the gather reads the shards
    state = full_state_dict(model, ctx, every_rank=True)
    lora = lora_config_of(model) if has_lora(model) else None
    twin = uninitialised(lambda: _plain_vlm(model.config, lora), ctx.device).to(next(model.parameters()).dtype)
    load_state(twin, state, "the gathered weights of the sharded model")
    twin.tokenizer, twin.processor_config = model.tokenizer, model.processor_config
    return twin.train(model.training)


def frozen_copy(model: VLM, ctx: Dist) -> VLM:
    """An unsharded copy of `model` that never trains (no gradients, eval mode): the reference
    model of preference and RL stages, whole on every rank, so its forwards need no collectives."""
    return unsharded_copy(model, ctx).requires_grad_(False).eval()


def _plain_vlm(config: VLMConfig, lora: LoRAConfig | None) -> VLM:
    """A VLM of `config` with adapters shaped by `lora` (built on the meta device by
    `uninitialised`, whose initialisation draws nothing from torch's generator)."""
    model = VLM(config)
    if lora is not None:
        apply_lora(model, lora)
    return model


def resharded(model: VLM, ctx: Dist, surgery: Callable[[VLM], object], precision: str) -> VLM:
    """`surgery` (e.g. LoRA applied or merged away) done on the unsharded weights of the sharded
    `model`, returned sharded again in the run's `precision` (module docstring); every rank calls
    it at once."""
    twin = unsharded_copy(model, ctx)
    surgery(twin)
    return shard_model(twin, ctx, precision)


def pass_kind(batch: PackedBatch) -> tuple[bool, bool]:
    """Which sharded modules a forward of `batch` runs besides the decoder's: the vision tower on
    images, on videos. Ranks whose passes differ in it would gather different modules."""
    return batch.pixel_values is not None, batch.pixel_values_videos is not None


def aligned_passes(items: list[PassT], ctx: Dist, kind: Callable[[PassT], Hashable]) -> list[tuple[PassT, bool]]:
    """This rank's forward / backward passes over `items` as (item, real) such that every rank runs
    as many passes of each `kind` (a sortable key, e.g. `pass_kind` of the item's batch), in the
    same order: FSDP gathers a module's parameters on every rank at each of its forwards, so the
    ranks' passes must pair up. A rank short of passes of a kind repeats one of its own, or one
    another rank lends it, as padding (real False) that must add nothing (weight 0). In one
    process: the items, all real, in their order."""
    if not ctx.is_distributed:
        return [(item, True) for item in items]
    mine: dict[Hashable, list[PassT]] = {}
    for item in items:
        mine.setdefault(kind(item), []).append(item)
    counts = ctx.all_gather_object({k: len(v) for k, v in mine.items()})
    passes = []
    for k in sorted({k for c in counts for k in c}):
        have = [c.get(k, 0) for c in counts]
        own = mine.get(k, [])
        filler = own[0] if own else None
        if min(have) == 0:  # a rank without one borrows the first of the lowest rank that has one
            lender = next(rank for rank, n in enumerate(have) if n)
            lent = ctx.broadcast_object(filler if ctx.rank == lender else None, src=lender)
            filler = filler if own else lent
        passes += [(item, True) for item in own] + [(filler, False)] * (max(have) - len(own))
    return passes


MODEL_KEY, OPTIM_KEY, HEADS_KEY = "model", "optim", "heads"
"""The parts of a DCP checkpoint; DCP names each saved value by its dotted path under them
(e.g. `optim.state.llm.norm.weight.exp_avg`)."""


def dcp_save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             heads: nn.Module | None = None) -> None:
    """Every rank writes its shards of model (+ optimizer state) into path (a directory); `heads`,
    a stage objective's modules (train/objective.py), unsharded and the same on every rank, are
    written once.

    An optimizer that has stepped no parameter yet holds no state, as a fresh one does, and is
    not written: DCP would give it some by stepping it with zero gradients, which changes the
    run that saves it."""
    import torch.distributed.checkpoint as dcp  # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {MODEL_KEY: get_model_state_dict(model)}
    if optimizer is not None and optimizer.state:
        state[OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
    if heads is not None:
        state[HEADS_KEY] = heads.state_dict()
    dcp.save(state, checkpoint_id=str(path))


def dcp_load_model(path: Path, model: nn.Module, heads: nn.Module | None = None) -> None:
    """Read the weights of a checkpoint of `dcp_save` into the (sharded) model and `heads`, strictly."""
    import torch.distributed.checkpoint as dcp  # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {MODEL_KEY: get_model_state_dict(model)}
    if heads is not None:
        state[HEADS_KEY] = heads.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state[MODEL_KEY])
    if heads is not None:
        heads.load_state_dict(state[HEADS_KEY])


def dcp_load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give `optimizer` (freshly built for the stage) the state saved in a checkpoint of `dcp_save`:
    exactly the parameters that had state when it was written.

    AdamW creates a parameter's state at its first gradient, so a trainable parameter that has
    had none yet has no state in the checkpoint: the vision tower after text steps only, or
    `vision.post_layernorm`, which the LLaVA-style features never pass through. DCP's template
    for loading holds state for every trainable parameter, so it is cut to what the checkpoint
    holds, and the other parameters stay without state, as in the run that wrote it."""
    import torch.distributed.checkpoint as dcp  # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    if not any(key.startswith(f"{OPTIM_KEY}.") for key in saved):
        return  # saved with no state: the fresh optimizer is what the run had
    # With the gradients None (as between steps), DCP fills the template by a zero-gradient step.
    template = get_optimizer_state_dict(model, optimizer)
    template["state"] = _entries_saved(template["state"], saved)
    wanted = sum(len(entries) for entries in template["state"].values())
    if wanted != sum(key.startswith(f"{OPTIM_KEY}.state.") for key in saved):
        raise CheckpointError(f"{path}: optimizer state for parameters this stage's optimizer does not train; "
                              "was the config changed since this run started?")
    state = {OPTIM_KEY: template}
    dcp.load(state, checkpoint_id=str(path))
    # strict=False: a parameter without saved state is expected (above). Loading replaces the
    # optimizer's whole state, so the zero-gradient state DCP gave it for the template is dropped.
    set_optimizer_state_dict(model, optimizer, state[OPTIM_KEY], options=StateDictOptions(strict=False))


def _entries_saved(state: dict[str, dict], saved: set[str]) -> dict[str, dict]:
    """The entries of an optimizer's per-parameter state ({FQN: {key: value}}) that a checkpoint
    holds (`saved`: its keys); a parameter with none left is dropped."""
    kept = {}
    for fqn, entries in state.items():
        held = {key: value for key, value in entries.items() if f"{OPTIM_KEY}.state.{fqn}.{key}" in saved}
        if held:
            kept[fqn] = held
    return kept
