"""Training checkpoints: written atomically, pruned to the last K, and resumed exactly.

A training checkpoint is a directory `DIR/checkpoints/step-00000123/` holding

    model.safetensors       the model's state dict, each tensor once (single process), or
    dcp/                    a torch.distributed.checkpoint of model + optimizer (FSDP2, N ranks)
    optimizer.safetensors   every optimizer state tensor, flattened as `state.<param>.<key>`
    optimizer.json          the optimizer's param_groups (lrs, betas, ...)
    heads.safetensors       a stage objective's own modules, inside such a stage (train/objective.py)
    trainer.json            stage, step, stage history, data cursors, RNG states (python, numpy)
    rng.safetensors         torch RNG state (CPU, and CUDA when present), per rank
    manifest.json           size and sha256 of every other file, written last

It is written into a temporary sibling directory and renamed into place with os.replace, so a
run killed at any moment leaves either the previous checkpoints or the new one, never half of
one. Resuming restores model, optimizer, schedule position, RNG states and data cursors, so the
resumed run computes bit for bit what the uninterrupted run would have (same device and threads).

Damage after the fact (a truncated file, a flipped byte on disk) is caught by the manifest: a
resume checks the newest checkpoint against it and, when it does not match, moves it aside as
`corrupt-step-...` and takes the one before (`resumable_checkpoint`). A write that fails (full
disk, permissions) removes its temporary directory and leaves every earlier checkpoint as it was;
`retry_write` tries it again before giving up with an error that says so.

No pickle: tensors go to safetensors; everything else to JSON. Follows torchtitan's checkpointer
(model, optimizer, dataloader, step and RNG in one place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmkit.constants import WEIGHTS_FILE
from vlmkit.errors import CheckpointError
from vlmkit.models.weights import load_state, state_to_save

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d{8})")
MANIFEST_FILE = "manifest.json"
"""Size and sha256 of every file of a checkpoint, written last (`write_manifest`)."""
CORRUPT_PREFIX = "corrupt-"
"""A damaged checkpoint found at resume is renamed `corrupt-step-...`: kept to look at, never resumed from."""
HASH_CHUNK_BYTES = 8 << 20
"""Files are hashed in chunks of this size (checkpoint files can be larger than memory allows)."""

log = logging.getLogger("vlmkit.train")


@dataclass
class TrainerState:
    """Where the run is: enough, with the tensors, to continue exactly."""

    stage: int = 0
    """Index of the stage to run next (== len(stages) when all are done)."""
    step: int = 0
    """Optimizer steps already done in that stage."""
    global_step: int = 0
    """Optimizer steps done over the whole run."""
    history: list[dict] = field(default_factory=list)
    """One entry per finished stage: name, steps, tokens, final loss, wall seconds."""
    data: dict = field(default_factory=dict)
    """The data stream's cursor (its state_dict), per rank: {"0": {...}, "1": {...}}."""
    tokens: int = 0
    """Non-pad training tokens seen in the current stage."""
    wall_seconds: float = 0.0
    """Training wall time accumulated over every process that worked on this run."""
    nonfinite_total: int = 0
    """Steps skipped over the whole run because their loss or gradient was not finite."""
    nonfinite_steps: list[int] = field(default_factory=list)
    """Global steps of the skipped steps still inside the counting window (RunConfig.nonfinite_window)."""


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part: python + numpy, tensor part: torch CPU / CUDA) of every RNG a step uses."""
    py = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    py = json_part["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_part["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---------------------------------------------------------------------------------------------
# Optimizer state as safetensors + JSON
# ---------------------------------------------------------------------------------------------


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            name = f"state.{param_id}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().clone()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[Any, dict] = {}
    for name, value in list(tensors.items()) + list(rest.get("scalars", {}).items()):
        _, param_id, key = name.split(".", 2)
        pid = int(param_id) if param_id.lstrip("-").isdigit() else param_id
        state.setdefault(pid, {})[key] = value
    groups = rest["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# Directories
# ---------------------------------------------------------------------------------------------


HEADS_FILE = "heads.safetensors"
"""A stage objective's own trained modules (train/objective.py), in checkpoints inside that stage."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def clean_temporaries(out_dir: str | Path) -> None:
    """Remove half-written checkpoints a killed run left behind."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def commit_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written directory into place (replacing an older one, which is put
    back if the new one cannot take its place)."""
    _fsync_tree(tmp)
    if final.exists():  # e.g. a stage-end checkpoint rewritten after a resume
        old = final.with_name(f".tmp-old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def commit_checkpoint(tmp: Path, out_dir: str | Path, global_step: int, keep_last: int) -> Path:
    """Seal a fully written checkpoint (its manifest), move it into place as step-<global_step>
    and prune the older ones; returns its directory."""
    write_manifest(tmp)
    final = checkpoint_root(out_dir) / f"step-{global_step:08d}"
    commit_dir(tmp, final)
    prune(out_dir, keep_last)
    return final


def prune(out_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Checksums, damaged checkpoints, failed writes
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """MANIFEST_FILE: the size and sha256 of every file under `directory`."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (None: nothing). A checkpoint
    without a manifest was written before checkpoints carried one and is taken as it is."""
    manifest = ckpt / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST_FILE} ({e})"
    for name, expected in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def resumable_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match their manifest. Newer damaged ones are reported
    and moved aside (`corrupt-step-...`); CheckpointError when every checkpoint is damaged."""
    found = list_checkpoints(out_dir)
    damaged = []
    for candidate in reversed(found):
        damage = checkpoint_damage(candidate)
        if damage is None:
            for bad, _ in damaged:
                _move_aside(bad)
            return candidate
        damaged.append((candidate, damage))
        log.warning("checkpoint %s is damaged (%s); trying the one before it", candidate, damage)
    if damaged:
        listing = "; ".join(f"{p.name}: {d}" for p, d in damaged)
        raise CheckpointError(f"no intact checkpoint in {checkpoint_root(out_dir)} ({listing}); delete it to "
                              "start the run again")
    return None


def _move_aside(ckpt: Path) -> None:
    aside = ckpt.with_name(CORRUPT_PREFIX + ckpt.name)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(ckpt, aside)
    log.warning("moved the damaged checkpoint to %s (delete it when it is no longer needed)", aside)


def retry_write(write: Callable[[], str | None], what: str, *, retries: int, wait_seconds: float) -> None:
    """Call `write` (None: written; else why it failed, its partial output already removed) up to
    1 + `retries` times, waiting `wait_seconds` between tries; CheckpointError if every try
    failed. Ranks that call it together get the same answer from `write`, so they try again or
    stop together."""
    for attempt in range(retries + 1):
        error = write()
        if error is None:
            return
        if attempt < retries:
            log.warning("writing %s failed (%s); trying again in %gs (%d of %d)", what, error, wait_seconds,
                        attempt + 1, retries)
            time.sleep(wait_seconds)
    raise CheckpointError(f"writing {what} failed {retries + 1} times ({error}); the checkpoints written before "
                          "are intact. Free disk space or fix permissions, then continue with --resume")


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Save / load (single process; the distributed variants live in train/distributed.py)
# ---------------------------------------------------------------------------------------------


def new_temp_dir(out_dir: str | Path) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def write_trainer_files(tmp: Path, state: TrainerState, rank: int = 0) -> None:
    """trainer.json (rank 0 writes the shared part) + this rank's RNG state."""
    rng_json, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_json))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(state.__dict__, indent=1))


def save_single(out_dir: str | Path, state: TrainerState, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None, keep_last: int,
                heads: torch.nn.Module | None = None) -> Path:
    """Write a checkpoint of a single-process run and prune older ones; returns its directory.
    `heads`: a stage objective's own modules (train/objective.py), saved beside the model. On an
    OSError the partial checkpoint is removed before the error propagates."""
    tmp = new_temp_dir(out_dir)
    try:
        save_file(state_to_save(model), str(tmp / WEIGHTS_FILE))
        if heads is not None:
            save_file(state_to_save(heads), str(tmp / HEADS_FILE))
        if optimizer is not None:
            tensors, rest = flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(rest))
        write_trainer_files(tmp, state)
        return commit_checkpoint(tmp, out_dir, state.global_step, keep_last)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_trainer_state(ckpt: Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((ckpt / "trainer.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: unreadable trainer.json ({e}); delete this checkpoint to resume from an older one") from None


def restore_rng(ckpt: Path, rank: int = 0) -> None:
    tensors = load_file(str(ckpt / f"rng-rank{rank}.safetensors"))
    set_rng_state(json.loads((ckpt / f"rng-rank{rank}.json").read_text()), tensors)


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """The model's weights from a single-process checkpoint, strictly (models/weights.py)."""
    weights = ckpt / WEIGHTS_FILE
    try:
        load_state(model, load_file(str(weights)), str(weights))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; was the config changed since this run started?") from None


def load_heads(ckpt: Path, heads: torch.nn.Module) -> None:
    """A stage objective's own modules from a checkpoint written inside that stage."""
    path = ckpt / HEADS_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {HEADS_FILE}, which this stage's objective needs; was the config "
                              "changed since this run started?")
    load_state(heads, load_file(str(path)), str(path))


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state of a checkpoint written inside a stage (a stage-end checkpoint has none:
    the next stage builds a fresh optimizer)."""
    if not (ckpt / "optimizer.json").is_file():
        raise CheckpointError(f"{ckpt}: no optimizer state in a checkpoint written inside a stage; delete this "
                              "checkpoint to resume from an older one")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    rest = json.loads((ckpt / "optimizer.json").read_text())
    try:
        optimizer.load_state_dict(unflatten_optimizer(tensors, rest))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: optimizer state does not fit this run's optimizer ({e})") from None
