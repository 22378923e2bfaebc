"""Reading HF checkpoint directories: config.json + safetensors (one file or sharded with an index).

Key maps are data: a list of (regex, replacement) pairs per family, applied to every HF tensor
name; the first pattern that matches wins. A tensor no pattern matches is "unexpected". Loading is
all-or-nothing (models/weights.py's `load_state`): missing, unexpected and mis-shaped tensors are
collected and reported together before any weight is copied, so a failed load never leaves a
half-loaded model behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmkit.errors import CheckpointError
from vlmkit.models.weights import load_state

KeyMap = list[tuple[str, str]]

BICUBIC = 3
"""PIL's bicubic filter, as image processor configs name their `resample`."""
PROCESSOR_FILE = "processor_config.json"


def key_map(names: list[tuple[str, str]], fields: dict[str, str], reverse: bool = False) -> KeyMap:
    """(regex, replacement) pairs from name templates ("layers.{i}.{wb}", ours), HF -> ours, or
    ours -> HF with `reverse`; `fields` gives each {field}'s regex. One table serves both ways."""
    out = []
    for hf, ours in names:
        src, dst = (ours, hf) if reverse else (hf, ours)
        parts = re.split(r"\{(\w+)\}", src)  # literal, field, literal, field, ...
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{fields[p]})" for i, p in enumerate(parts))
        out.append((pattern, re.sub(r"\{(\w+)\}", r"\\g<\1>", dst)))
    return out


def prefixed(key_map: KeyMap, src: str, dst: str) -> KeyMap:
    """A component's key map under a prefix on each side, e.g. vision_tower. -> vision."""
    return [(re.escape(src) + pattern, dst + repl) for pattern, repl in key_map]


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a HF model directory saved with save_pretrained")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a directory: model.safetensors, or the shards its index names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; vlmkit loads safetensors only. "
                              "Convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{path}: no safetensors weights (model.safetensors or an index json)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, by its HF name (CPU, stored dtype)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def rename(hf_names: Iterable[str], key_map: KeyMap, ignore: Iterable[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Map HF names to ours. Returns ({hf_name: our_name}, [unmatched hf names]).

    Names matching a pattern in `ignore` (e.g. rotary inv_freq buffers) are dropped silently.
    """
    compiled = [(re.compile(p), r) for p, r in key_map]
    ignored = [re.compile(p) for p in ignore]
    mapping, unmatched = {}, []
    for name in hf_names:
        if any(p.fullmatch(name) for p in ignored):
            continue
        for pattern, repl in compiled:
            if pattern.fullmatch(name):
                mapping[name] = pattern.sub(repl, name)
                break
        else:
            unmatched.append(name)
    return mapping, unmatched


def renamed(tensors: dict[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """`tensors` under their new names, by a key map whose catch-all pattern renames every tensor
    (a layout normalisation)."""
    mapping, _ = rename(tensors, key_map)
    return {new: tensors[old] for old, new in mapping.items()}


def load_into(module: torch.nn.Module, hf_tensors: dict[str, torch.Tensor], key_map: KeyMap, *,
              source: str, ignore: Iterable[str] = ()) -> None:
    """Rename HF tensors by `key_map` and copy them into `module` strictly (`load_state`): every
    missing, unexpected or mis-shaped tensor is reported in one CheckpointError, naming both the
    HF name and ours."""
    mapping, unmatched = rename(hf_tensors, key_map, ignore)
    state = {ours: hf_tensors[hf] for hf, ours in mapping.items()}
    source_names = {ours: hf for hf, ours in mapping.items()}
    load_state(module, state, source, unmatched=unmatched, source_names=source_names)


def architecture(config: dict, path: str | Path) -> str:
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    model_type = config.get("model_type")
    if model_type:
        return model_type
    raise CheckpointError(f"{path}/config.json names no architecture (no 'architectures' or 'model_type')")


def config_family(hf_config: dict, architectures: dict[str, str], where: str) -> str | None:
    """The family of a config.json among `architectures` ({model type: architecture name}; the
    model type names the family): by its architecture, else its model type; None for any other."""
    names = {**{model_type: model_type for model_type in architectures},
             **{name: model_type for model_type, name in architectures.items()}}
    return named_family(hf_config, names, where)


def named_family(hf_config: dict, names: dict[str, str], where: str) -> str | None:
    """The family `names` ({architecture or model type: family}) gives a config.json's
    architecture, else its model type; None when it gives neither."""
    for name in (architecture(hf_config, where), hf_config.get("model_type")):
        if name in names:
            return names[name]
    return None


def read_family_config(path: Path, architectures: dict[str, str]) -> tuple[dict, str]:
    """A directory's config.json and its family (`config_family`), or CheckpointError naming the
    architectures accepted."""
    where = f"{path}/config.json"
    hf = read_config(path)
    family = config_family(hf, architectures, where)
    if family is None:
        names = sorted(architectures.values())
        expected = names[0] if len(names) == 1 else f"one of {names}"
        raise CheckpointError(f"{where}: architecture {architecture(hf, where)!r} is not {expected}")
    return hf, family


def check_tokens_per_tile(path: Path, key: str, tokens_per_tile: int, rule: str) -> None:
    """A processor_config.json's `key` (its image tokens per tile), where the file gives it, must be
    the model's `tokens_per_tile`; `rule` says how the model counts them."""
    file = path / PROCESSOR_FILE
    if not file.is_file():
        return
    try:
        given = json.loads(file.read_text()).get(key)
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a JSON object ({e})") from None
    if given is not None and given != tokens_per_tile:
        raise CheckpointError(f"{file}: {key} {given} differs from the {tokens_per_tile} tokens a tile gives ({rule})")


# --- export ------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_weights(out: Path, tensors: dict[str, torch.Tensor], hf_config: dict) -> None:
    """model.safetensors and config.json, the config naming the tensors' dtype as transformers does."""
    hf_config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", hf_config)


def write_chat_template(out: Path, chat_template: object) -> None:
    """chat_template.jinja, where the tokenizer's template is one string: processors read their own copy
    (AutoProcessor.apply_chat_template)."""
    if isinstance(chat_template, str):
        (out / "chat_template.jinja").write_text(chat_template)
