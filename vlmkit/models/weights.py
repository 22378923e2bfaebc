"""State dicts in and out of safetensors files: every tensor once on save, strict all-or-nothing loads.

Three loaders use `load_state`: `VLM.from_pretrained` (a vlmkit checkpoint), the HF importers of
models/hf/ (after renaming by a key map) and a training run's resume (train/checkpoint.py). Each
gets the same guarantee: every missing, unexpected and mis-shaped tensor is reported in one
CheckpointError before anything is copied, so a failed load never leaves a half-loaded model.

Safetensors cannot hold two names for one storage. vlmkit's LLM keeps tied embeddings as a single
tensor; any other alias (a second name for the same storage, offset and shape) is left out on
save and filled by its first name on load.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import torch

from vlmkit.errors import CheckpointError

REPORTED_PER_KIND = 20
"""Names listed per kind of problem in a load error (the count is always complete)."""

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def uninitialised(build: Callable[[], ModuleT], device: str | torch.device = "cpu") -> ModuleT:
    """`build()` with storage allocated on `device` but no initialisation run, for a module whose
    weights come from a checkpoint next (random init of a large model costs seconds for nothing).
    Buffers no checkpoint holds (non-persistent ones) are zeroed, so nothing reads stale memory."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    persistent = set(module.state_dict())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name not in persistent:
                buf.zero_()
    return module


def distinct_names(module: torch.nn.Module) -> list[str]:
    """State-dict names, without the aliases of an earlier tensor (same storage, offset and shape)."""
    names, seen = [], set()
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as safetensors writes them: detached, on the CPU, contiguous."""
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def state_to_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict for a safetensors file: each tensor once, on the CPU, contiguous."""
    state = module.state_dict()
    return for_safetensors({name: state[name] for name in distinct_names(module)})


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
               unmatched: Iterable[str] = (), source_names: dict[str, str] | None = None) -> None:
    """Copy `state` (the module's own tensor names) into `module`, converting dtypes, or raise
    CheckpointError listing every problem; nothing is copied unless everything fits.

    unmatched: names in the source that no key map turned into one of ours (reported as unexpected).
    source_names: our name -> the name the source file gives that tensor, when a key map renamed
    it; messages then show both (`model.norm.weight (65,) -> norm.weight (64,)`).
    """
    ours = module.state_dict()
    renamed = source_names or {}
    aliases = set(ours) - set(distinct_names(module))
    missing = sorted(set(ours) - set(state) - aliases)
    unexpected = sorted(unmatched) + sorted(
        f"{renamed[name]} -> {name} (no such parameter)" if name in renamed else name
        for name in state if name not in ours)
    mis_shaped = [_shape_mismatch(name, state[name], ours[name], renamed.get(name))
                  for name in state if name in ours and state[name].shape != ours[name].shape]
    problems = [f"{label} ({len(items)}): {items[:REPORTED_PER_KIND]}"
                for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                     ("shape mismatches", mis_shaped)) if items]
    if problems:
        raise CheckpointError(f"cannot load {source}: " + "; ".join(problems))
    with torch.no_grad():
        for name, t in state.items():
            ours[name].copy_(t)


def _shape_mismatch(name: str, given: torch.Tensor, expected: torch.Tensor, source_name: str | None) -> str:
    if source_name is None:
        return f"{name} {tuple(given.shape)} vs {tuple(expected.shape)}"
    return f"{source_name} {tuple(given.shape)} -> {name} {tuple(expected.shape)}"
