"""Per-stage policy: which modules learn, their optimizer, and the learning-rate schedule.

A stage gives each of vision / adapter / llm its own peak learning rate; 0 freezes the module
(requires_grad off, no optimizer state, no weight decay drift). The optimizer is AdamW over the
trainable parameters only, one param group per (module, decay / no-decay), as nanoVLM and
LLaVA do; with `optimizer: muon` each group's linear-layer weights step with Muon instead
(train/optim.py). Each stage builds a fresh optimizer: stage hand-off carries the weights, not the
moments (LLaVA and DeepSeek-VL restart the schedule per stage).

A native-resolution model has no separate adapter: its tower's mergers (the patch merger and
Qwen3-VL's deepstack mergers) map patches to the LLM width, so they are its adapter here, and
`vision` is the rest of the tower. An alignment stage (adapter_lr only) then trains the mergers,
as it trains a LLaVA-shaped model's projector. A hybrid model (DeepSeek-VL's SigLIP + SAM tower)
has its aligner at the end of its tower: the aligner's three linear layers are its adapter, and
`vision` is both towers with the high-resolution branch's reduction (second neck, downsampler,
global scale), as DeepSeek-VL's own training groups them.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from vlmkit.config import MODULES, RunConfig, Stage
from vlmkit.errors import ConfigError
from vlmkit.models.lora import is_lora_parameter
from vlmkit.train.optim import MuonAdamW, muon_parameters, split_muon_groups

STAGE_SEED_STRIDE = 1000
"""Stage i of a run seeds with `stage.seed * STAGE_SEED_STRIDE + i`: stages that share a `seed`
setting still draw different streams, and no two (seed, index) pairs of a run of up to 1000
stages collide."""


def stage_seed(cfg: RunConfig, index: int) -> int:
    """The seed of stage `index`: its torch RNG at the stage start, its data order and mixture."""
    return cfg.stages[index].seed * STAGE_SEED_STRIDE + index


NATIVE_ADAPTER_PARTS = ("merger", "deepstack_mergers")
"""The children of a native tower that count as the adapter (module docstring)."""


HYBRID_ADAPTER_PARTS = ("combiner.low_res_proj.", "combiner.high_res_proj.", "combiner.out_proj.")
"""The parameters of a hybrid tower that count as the adapter (its aligner; module docstring)."""


def module_parameters(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of one of MODULES; every parameter belongs to exactly one."""
    cfg = model.config
    if not (cfg.is_native or cfg.is_hybrid) or name == "llm":
        return list(getattr(model, name).named_parameters())
    wants_adapter = name == "adapter"
    if cfg.is_hybrid:
        return [(n, p) for n, p in model.vision.named_parameters()
                if n.startswith(HYBRID_ADAPTER_PARTS) == wants_adapter]
    return [(n, p) for n, p in model.vision.named_parameters()
            if (n.split(".", 1)[0] in NATIVE_ADAPTER_PARTS) == wants_adapter]


def apply_freezing(model: nn.Module, stage: Stage) -> dict[str, int]:
    """Set requires_grad per module by the stage's lrs (in a LoRA stage, only the adapters of the
    modules it trains learn), then freeze what `stage.frozen` names; returns trainable parameter
    counts."""
    counts, matched = {}, set()
    full_names = {id(p): n for n, p in model.named_parameters()}  # a native tower's adapter lives in `vision`
    for name in MODULES:
        count = 0
        for param_name, p in module_parameters(model, name):
            full_name = full_names[id(p)]
            named_frozen = {pattern for pattern in stage.frozen if fnmatch.fnmatchcase(full_name, pattern)}
            matched |= named_frozen
            trainable = (stage.lr_of(name) > 0 and (stage.lora is None or is_lora_parameter(param_name))
                         and not named_frozen)
            p.requires_grad_(trainable)
            count += p.numel() if trainable else 0
        counts[name] = count
    unmatched = [pattern for pattern in stage.frozen if pattern not in matched]
    if unmatched:
        raise ConfigError(f"stage {stage.name!r}: frozen pattern(s) {unmatched} match no parameter of the model "
                          "(full names such as vision.low_res.blocks.0.attn.qkv.weight; see VLMModel.named_parameters)")
    return counts


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Norm weights, biases and 1-D scales are not decayed (AdamW practice since BERT / GPT-2).
    return p.ndim < 2 or name.endswith(".bias")


def _decay_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, label: str) -> list[dict]:
    """The trainable ones of `named` as a decayed and a non-decayed param group at peak rate `lr`."""
    named = [(n, p) for n, p in named if p.requires_grad]
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    return [{"params": params, "lr": lr, "peak_lr": lr, "weight_decay": wd, "name": f"{label}.{tag}"}
            for params, wd, tag in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")) if params]


def param_groups(model: nn.Module, stage: Stage) -> list[dict]:
    groups = []
    for module in MODULES:
        lr = stage.lr_of(module)
        if lr > 0:
            groups += _decay_groups(module_parameters(model, module), lr, stage.weight_decay, module)
    return groups


def build_optimizer(model: nn.Module, stage: Stage, heads: nn.Module | None = None,
                    heads_lr: float = 0.0) -> torch.optim.Optimizer:
    """The stage's optimizer over its trainable parameters only (and a stage objective's own
    `heads`): AdamW, or with `optimizer: muon` Muon for the linear layers' weights and AdamW for
    the rest (train/optim.py), in the same param groups split in two."""
    groups = param_groups(model, stage)
    if heads is not None and heads_lr > 0:
        groups += _decay_groups(list(heads.named_parameters()), heads_lr, stage.weight_decay, "heads")
    if not groups:
        raise ConfigError(f"stage {stage.name!r}: nothing to train (every module frozen and no heads)")
    if stage.optimizer == "muon":
        hidden = muon_parameters(model) | (muon_parameters(heads) if heads is not None else set())
        return MuonAdamW(split_muon_groups(groups, hidden, stage.muon_lr_scale), lr=groups[0]["lr"],
                         betas=stage.betas, eps=stage.eps, momentum=stage.muon_momentum)
    # foreach=False: the same kernel path every time, so a resumed run matches bit for bit.
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=stage.betas, eps=stage.eps, foreach=False)


def lr_factor(stage: Stage, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of the stage."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return 1.0
    after = step - stage.warmup_steps
    if stage.schedule == "step":
        return stage.step_gamma ** (after // stage.step_every)
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, after / span)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, stage: Stage, step: int) -> float:
    """Set every group's lr for `step`; returns the factor (for logging)."""
    factor = lr_factor(stage, step)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
    return factor

