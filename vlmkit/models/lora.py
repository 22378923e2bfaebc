"""LoRA: low-rank adapters on chosen linear layers of a VLM (Hu et al. 2021; peft's format).

`LoRAConfig` (models/config.py, free of torch: the run config reads it) is the one home of a LoRA's
settings (a run stage's `lora:` section, the adapter directory's adapter_config.json). `apply_lora` turns every `nn.Linear` whose name matches a pattern
into a `LoRALinear`: y = x W^T + b + (alpha / r) * B(A(dropout(x))), A (r, in) initialised as
peft does (kaiming-uniform), B (out, r) at zero so that the wrapped model starts equal to the base.

How a layer is wrapped, and why: its class becomes `LoRALinear` in place (`__class__`, as FSDP2's
`fully_shard` does) and A, B and the dropout become its submodules, so

- the module object stays the one its parent, the decoder's derived decode weights
  (models/fused.py, which hold the projections themselves) and any optimizer already hold;
- the base tensors keep their names (`llm.layers.0.attn.q_proj.weight`), which every loader, key
  map and the export use, and the adapters add `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`
  (peft's names). A checkpoint written inside a LoRA stage holds both and loads strictly
  (models/weights.py) into a freshly wrapped model.

`merge_lora` / `unmerge_lora` fold the update into the weights and back (unmerge restores the
weights bit for bit: the merge keeps the weights it replaced); `merge_and_unload` folds it for good
and leaves plain `nn.Linear`s; `lora_disabled` gives the base model's outputs (the free reference
model of preference and RL stages). `save_adapter` / `load_adapter` write and read peft's
adapter_config.json + adapter_model.safetensors, layers named as in the transformers export
(models/hf/peft.py), so peft loads the adapter onto that export.

While the adapters are attached and unmerged, the decoder's derived decode weights
(`LLM.fuse_projections`, models/fused.py) must stay off: they are copies of the base weights and
do not see the update.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import LoRAConfig, is_lora_parameter
from vlmkit.models.hf.peft import PEFT_PREFIX, adapter_module_names
from vlmkit.models.vlm import VLMModel
from vlmkit.models.weights import for_safetensors, load_state

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_MATRICES = ("lora_A", "lora_B")
"""The two matrices of each adapted layer, as peft names them in its files."""
PEFT_REFUSED = {"use_dora": "DoRA", "use_rslora": "rank-stabilised scaling", "rank_pattern": "per-layer ranks",
                "alpha_pattern": "per-layer alphas", "modules_to_save": "fully trained extra modules"}
"""adapter_config.json settings vlmkit does not compute (set to anything but off / empty)."""


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update: x W^T + b + scaling * B(A(dropout(x))).

    Made by `apply_lora` from an existing layer (its class changed in place), never constructed."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    alpha: float
    merged: bool
    """The update is folded into `weight`; `base_weight` holds the weight it replaced."""
    adapter_enabled: bool
    """False inside `lora_disabled`: the layer computes the base's output."""

    @property
    def rank(self) -> int:
        return self.lora_A.out_features

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.merged or not self.adapter_enabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) in fp32: what merging adds to the weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight with the update folded in, in the weight's dtype (summed in fp32)."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # A copy, not a subtraction, undoes the merge: (W + D) - D is not W in floating point.
        self.register_buffer("base_weight", self.weight.detach().clone(), persistent=False)
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self.base_weight)
        del self.base_weight
        self.merged = False


def _wrap(linear: nn.Linear, cfg: LoRAConfig) -> None:
    """Turn `linear` into a LoRALinear with fresh adapters, in place."""
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    linear.__class__ = LoRALinear
    # nn.Linear's own initialisation, kaiming-uniform with a = sqrt(5), is peft's for A.
    linear.lora_A = nn.Linear(linear.in_features, cfg.rank, bias=False, **factory)
    linear.lora_B = nn.Linear(cfg.rank, linear.out_features, bias=False, **factory)
    nn.init.zeros_(linear.lora_B.weight)
    linear.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    linear.alpha, linear.merged, linear.adapter_enabled = float(cfg.alpha), False, True


@torch.no_grad()
def _unwrap(layer: LoRALinear, fold: bool = True) -> None:
    """Make `layer` a plain nn.Linear again: its weight with the update folded in (`fold`), or
    the base weight (the adapters dropped)."""
    if layer.merged:
        if not fold:
            layer.weight.copy_(layer.base_weight)
        del layer.base_weight
    elif fold:
        layer.weight.copy_(layer.merged_weight())
    del layer.lora_A, layer.lora_B, layer.lora_dropout
    del layer.alpha, layer.merged, layer.adapter_enabled
    layer.__class__ = nn.Linear


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the plain `nn.Linear` layers of `model` (what LoRA can adapt)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of `model`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Attach adapters to every linear layer of `model` whose name (relative to `model`, e.g.
    `llm.layers.0.attn.q_proj`) matches one of `cfg.targets`; returns how many. The adapters are
    trainable; the base parameters keep their `requires_grad` (the trainer's `apply_freezing`
    decides). The initialisation draws from torch's global generator."""
    if has_lora(model):
        raise ConfigError("the model already has LoRA adapters; merge_and_unload them before applying others")
    linears = linear_layers(model)
    chosen = [name for name in linears if any(fnmatchcase(name, pattern) for pattern in cfg.targets)]
    if not chosen:
        raise ConfigError(f"lora.targets {cfg.targets} match no linear layer of the model; its linear layers "
                          f"are named like {linears[:3]}")
    for name in chosen:
        _wrap(model.get_submodule(name), cfg)
    llm = getattr(model, "llm", None)
    if llm is not None:  # its derived decode weights are copies of the base and would skip the adapters
        llm.fuse_projections(False)
    return len(chosen)


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter's update into its layer's weight, in place; `unmerge_lora` undoes it
    exactly. The model then computes what it computed unmerged, without the adapters' extra
    matmuls (and the decoder's derived decode weights see the update)."""
    for layer in _require_lora(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore the weights `merge_lora` replaced, bit for bit; the adapters apply again."""
    for layer in _require_lora(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and remove the adapters: `model` is then a plain
    model whose state dict has the base's keys. Returns `model`."""
    for layer in _require_lora(model).values():
        _unwrap(layer)
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes the base model's outputs (adapters switched off, merged
    layers unmerged): the reference model of preference and RL stages, without a second copy."""
    layers = list(_require_lora(model).values())
    previous = [(layer, layer.adapter_enabled, layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled, merged in previous:
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()


# --- peft's files ------------------------------------------------------------------------------


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig of the attached adapters (targets: the adapted layers' names)."""
    layers = _require_lora(model)
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return LoRAConfig(rank=first.rank, alpha=first.alpha, dropout=dropout, targets=list(layers))


def save_adapter(model: VLMModel, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the attached adapters as peft does: adapter_config.json and adapter_model.safetensors,
    each layer under its name in the transformers export (models/hf/peft.py). Returns `path`.

    state: the model's whole state dict to take the matrices from, for a sharded model whose
    parameters are shards (train/distributed.py's `full_state_dict` gathers it); default: the
    model's own parameters."""
    cfg = lora_config_of(model)
    layers = lora_layers(model)
    names = adapter_module_names(model.config, layers)
    if state is None:
        state = {f"{name}.{matrix}.weight": getattr(layer, matrix).weight
                 for name, layer in layers.items() for matrix in ADAPTER_MATRICES}
    tensors = {adapter_key(names[name], matrix): state[f"{name}.{matrix}.weight"]
               for name in layers for matrix in ADAPTER_MATRICES}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(for_safetensors(tensors), str(path / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": sorted(names.values()), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "task_type": None, "base_model_name_or_path": None, "inference_mode": True}
    (path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def adapter_key(module: str, matrix: str) -> str:
    """The tensor name peft's files give `matrix` (lora_A / lora_B) of the layer named `module`."""
    return f"{PEFT_PREFIX}{module}.{matrix}.weight"


ADAPTER_KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(?P<module>.+)\.(?P<matrix>{'|'.join(ADAPTER_MATRICES)})\.weight")
"""`adapter_key` read back."""


def load_adapter(model: VLMModel, path: str | Path) -> int:
    """Attach the adapter saved in `path` (by `save_adapter`, or by peft on the transformers export
    of the same base) to `model`, strictly: every tensor of the file must be a matrix of one of the
    model's linear layers, and every layer it names gets both matrices, of the right shapes; else
    CheckpointError listing every problem, and the model is left as it was. Returns how many layers
    it adapts."""
    path = Path(path)
    source = str(path / ADAPTER_WEIGHTS_FILE)
    settings = _read_adapter_config(path)
    tensors = _read_adapter_tensors(path)
    ours_by_saved = {saved: ours for ours, saved in adapter_module_names(model.config, linear_layers(model)).items()}
    state, source_names, unmatched = {}, {}, []
    for key, tensor in tensors.items():
        match = ADAPTER_KEY.fullmatch(key)
        ours = ours_by_saved.get(match["module"]) if match else None
        if ours is None:
            unmatched.append(key)
            continue
        name = f"{ours}.{match['matrix']}.weight"
        state[name], source_names[name] = tensor, key
    if not state:
        raise CheckpointError(f"cannot load {source}: no tensor names a linear layer of this model "
                              f"(the file's first names: {sorted(tensors)[:3]})")
    try:
        cfg = LoRAConfig(rank=int(settings["r"]), alpha=float(settings["lora_alpha"]),
                         dropout=float(settings.get("lora_dropout") or 0.0),
                         targets=sorted({name.rpartition(".lora_")[0] for name in state}))
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG_FILE}: {e}") from None
    count = apply_lora(model, cfg)
    # The base tensors go in as the model's own, so that the strict load checks the adapters only.
    base = {name: t for name, t in model.state_dict().items() if not is_lora_parameter(name)}
    try:
        load_state(model, {**base, **state}, source, unmatched=unmatched, source_names=source_names)
    except CheckpointError:
        for layer in lora_layers(model).values():
            _unwrap(layer, fold=False)
        raise
    return count


def _read_adapter_config(path: Path) -> dict:
    """adapter_config.json of an adapter directory, checked for what vlmkit computes."""
    file = path / ADAPTER_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG_FILE}; not a LoRA adapter directory")
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    refused = [what for key, what in PEFT_REFUSED.items() if settings.get(key)]
    if settings.get("peft_type") != "LORA":
        refused.insert(0, f"peft_type {settings.get('peft_type')!r} (vlmkit loads LORA)")
    if settings.get("bias", "none") != "none":
        refused.append(f"trained biases (bias {settings['bias']!r})")
    if settings.get("fan_in_fan_out"):
        refused.append("fan_in_fan_out layers (transposed weights)")
    if "r" not in settings or "lora_alpha" not in settings:
        refused.append("no r or lora_alpha")
    if refused:
        raise CheckpointError(f"{file}: not supported: {'; '.join(refused)}")
    return settings


def _read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS_FILE}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
