"""Shared pieces of the training tests that stop a run and resume it (tests/test_train_resume.py,
test_train_faults.py, test_contrastive.py, test_grpo.py, test_dpo.py, ...): a prepared synthetic
world, the thread count kept for the tests after, a stop at a chosen global step (in process) or a
kill at a checkpoint (a subprocess), and the bitwise comparison of two runs' weights."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.config import load_config
from vlmkit.data.world import prepare_world
from vlmkit.train.loop import Trainer

POLL_SECONDS = 0.02
"""How often a killed run's checkpoint directory is looked for."""


class Stopped(Exception):
    """Stands in for a kill: raised where a run is to stop."""


def prepared_world(directory: Path, config: str = "tiny", overrides: tuple[str, ...] = (), **fields) -> Path:
    """The synthetic world of a ready config (with `overrides`, and `fields` of its world spec set)
    written to `directory`."""
    spec = load_config(config, list(overrides)).world
    spec.dir = str(directory)
    for name, value in fields.items():
        setattr(spec, name, value)
    prepare_world(spec, progress=False)
    return Path(spec.dir)


@contextlib.contextmanager
def kept_thread_count() -> Iterator[None]:
    """The trainer sets the process's thread count (bitwise equality needs the same in every run);
    the tests after keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def stop_after(monkeypatch, global_step: int) -> None:
    """Make the next run raise Stopped once `global_step` steps (and any checkpoint of that step)
    are done: before the next step, or before the final model after the last one."""
    def stop_at(method):
        def stopping(self, *args, **kwargs):
            if self.state.global_step == global_step:
                raise Stopped
            return method(self, *args, **kwargs)
        return stopping

    monkeypatch.setattr(Trainer, "_train_step", stop_at(Trainer._train_step))
    monkeypatch.setattr(Trainer, "_save_final", stop_at(Trainer._save_final))


def kill_at_checkpoint(command: list[str], out: Path, global_step: int) -> None:
    """Run `command` (a training run writing to `out`) and SIGKILL it once its checkpoint of
    `global_step` exists, before it ends."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / f"step-{global_step:08d}"
    while not target.exists() and proc.poll() is None:
        time.sleep(POLL_SECONDS)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ: {differ[:5]}"
