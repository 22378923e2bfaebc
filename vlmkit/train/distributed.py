"""torchrun / FSDP2 / DCP glue, applied to a model built for one device (torchtitan's order:
build, then activation checkpointing, then shard each block, then the root).

    torchrun --nproc_per_node 2 -m vlmkit train tiny --out runs/x

A single process needs no torchrun and none of this: `Dist.single()` is a world of one.
Backend: NCCL on CUDA, gloo on the CPU. Every rank holds a shard of each block's parameters;
gradients are reduce-scattered with averaging. Checkpoints go through
torch.distributed.checkpoint (each rank writes its shards; any world size can read them back, but
the data cursors beside them are per rank, so a run resumes with the number of processes that
wrote it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.errors import CheckpointError
from vlmkit.models.vlm import VLMModel


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

    def broadcast_object(self, obj):
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The stacks of repeated blocks (transformer layers of vision and LLM)."""
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
            and all(type(b) is type(m[0]) for b in m)]


def shard_model(model: VLMModel, ctx: Dist) -> VLMModel:
    """FSDP2: fully_shard every block, then the root (embeddings, norms, adapter, head)."""
    # Deferred (here and below): FSDP and DCP are slow to import and only multi-process runs use them.
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block)
    fully_shard(model)
    # Training calls compute_loss, not forward: give it the root's unshard / reshard hooks too.
    register_fsdp_forward_method(model, "compute_loss")
    return model


def full_state_dict(model: nn.Module, ctx: Dist) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict, on rank 0 (empty elsewhere); a plain state dict alone."""
    if not ctx.is_distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


MODEL_KEY, OPTIM_KEY = "model", "optim"
"""The two parts of a DCP checkpoint; DCP names each saved value by its dotted path under them
(e.g. `optim.state.llm.norm.weight.exp_avg`)."""


def dcp_save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank writes its shards of model (+ optimizer state) into path (a directory).

    An optimizer that has stepped no parameter yet holds no state, as a fresh one does, and is
    not written: DCP would give it some by stepping it with zero gradients, which changes the
    run that saves it."""
    import torch.distributed.checkpoint as dcp  # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {MODEL_KEY: get_model_state_dict(model)}
    if optimizer is not None and optimizer.state:
        state[OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def dcp_load_model(path: Path, model: nn.Module) -> None:
    """Read the weights of a checkpoint of `dcp_save` into the (sharded) model, strictly."""
    import torch.distributed.checkpoint as dcp  # deferred: see shard_model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {MODEL_KEY: get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state[MODEL_KEY])


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
