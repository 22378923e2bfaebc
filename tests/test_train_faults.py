"""The trainer under faults (docs/reliability.md, "Trainer"): each fault is injected into a run of
vlmkit/configs/tiny.yaml and the test checks that nothing is lost. Where the fault is recoverable
the final weights equal, bit for bit, those of the run without it; where it is not, the last good
checkpoint is intact and a resume from it reaches those weights.

Faults: a NaN in the loss and in the gradients, too many of them, SIGTERM / SIGUSR1 at a step, a
flipped byte or a truncated file in the newest checkpoint, an OSError while a checkpoint is
written (once, and every time), a data file that disappears (or fails to read) while the stage
streams it."""

import dataclasses
import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_support import (Stopped, assert_same_weights, final_weights, kept_thread_count, prepared_world,
                                 stop_after)
from vlmkit.config import load_config
from vlmkit.data.formats import BadRecord
from vlmkit.data.packing import SourceStream, UnreadableSource
from vlmkit.data.pipeline import TooManyBadRecords
from vlmkit.errors import CheckpointError
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.cli import PREEMPTED_EXIT_CODE
from vlmkit.train.data import StageData
from vlmkit.train.loop import Trainer, TooManyNonfiniteSteps, build_model, train

pytestmark = pytest.mark.slow

# One thread (bitwise equality needs the same thread count in every run). Global steps 1-3 are
# the align stage (checkpoints 2 and 3, its end), 4-7 the sft stage (a checkpoint after every
# step, all kept; 7 is its end). Failed writes are retried at once.
SETTINGS = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=3", "stages.0.save_every=2",
            "stages.1.steps=4", "stages.1.save_every=1", "stages.1.keep_last=10", "save_retry_seconds=0"]
STEPS = 7


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


def config(world: Path, *extra: str):
    return load_config("tiny", [f"world.dir={world}", *SETTINGS, *extra])


def checkpoint_weights(out: Path, global_step: int) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.checkpoint_root(out) / f"step-{global_step:08d}" / "model.safetensors"))


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")]


@pytest.fixture(scope="module")
def reference(world, one_thread, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the run without faults."""
    out = tmp_path_factory.mktemp("reference")
    train(config(world), out)
    return final_weights(out)


# ---------------------------------------------------------------------------------------------
# Non-finite loss and gradients
# ---------------------------------------------------------------------------------------------

NAN_STEP = 5


def inject_nan(monkeypatch, steps: set[int], where: str = "loss") -> None:
    """Make the training forward passes of these global steps give a NaN loss, or (where="grad")
    a finite loss whose gradients are NaN."""
    compute_loss = Trainer._compute_loss

    def poisoned(self, batch):
        out = compute_loss(self, batch)
        if self.state.global_step + 1 not in steps or not self.model.training:
            return out
        if where == "loss":
            return dataclasses.replace(out, loss_sum=out.loss_sum * float("nan"))
        out.loss_sum.register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(Trainer, "_compute_loss", poisoned)


def optimizer_state(out: Path, global_step: int) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.checkpoint_root(out) / f"step-{global_step:08d}" / "optimizer.safetensors"))


@pytest.fixture(scope="module")
def nan_run(world, one_thread, tmp_path_factory) -> Path:
    """A run whose step NAN_STEP has a NaN loss."""
    out = tmp_path_factory.mktemp("nan")
    with pytest.MonkeyPatch.context() as mp:
        inject_nan(mp, {NAN_STEP})
        train(config(world), out)
    return out


def assert_step_skipped(out: Path, step: int) -> None:
    """The step changed neither the weights nor the optimizer, and was logged as skipped."""
    assert_same_weights(checkpoint_weights(out, step - 1), checkpoint_weights(out, step))
    assert_same_weights(optimizer_state(out, step - 1), optimizer_state(out, step))
    record = next(r for r in step_records(out) if r["global_step"] == step)
    assert record["skipped"] == "nonfinite"
    assert all("skipped" not in r for r in step_records(out) if r["global_step"] != step)


def test_nan_loss_skips_the_step_and_the_run_goes_on(nan_run, reference):
    assert_step_skipped(nan_run, NAN_STEP)
    assert [r["global_step"] for r in step_records(nan_run)] == list(range(1, STEPS + 1))
    state = ckpt.read_trainer_state(ckpt.latest_checkpoint(nan_run))
    assert state.nonfinite_total == 1 and state.nonfinite_steps == [NAN_STEP]
    weights = final_weights(nan_run)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], reference[k]) for k in weights)  # one step fewer was taken


def test_nan_gradient_with_a_finite_loss_skips_the_step(world, one_thread, monkeypatch, tmp_path):
    inject_nan(monkeypatch, {NAN_STEP}, where="grad")
    stop_after(monkeypatch, NAN_STEP)
    with pytest.raises(Stopped):
        train(config(world), tmp_path)
    assert_step_skipped(tmp_path, NAN_STEP)
    record = step_records(tmp_path)[-1]
    assert record["global_step"] == NAN_STEP and math.isfinite(record["loss"]) and math.isnan(record["grad_norm"])


def test_resume_after_a_skipped_step_is_bitwise(world, nan_run, one_thread, monkeypatch, tmp_path):
    # The skipped step still advanced the step counter, the data and the RNG.
    inject_nan(monkeypatch, {NAN_STEP})
    stop_after(monkeypatch, NAN_STEP)
    with pytest.raises(Stopped):
        train(config(world), tmp_path)
    monkeypatch.undo()
    train(config(world), tmp_path, resume=True)
    assert_same_weights(final_weights(nan_run), final_weights(tmp_path))


def test_too_many_nonfinite_steps_stop_at_the_last_good_checkpoint(world, nan_run, one_thread, monkeypatch,
                                                                   tmp_path):
    # One skip is allowed in any 10 steps: the second NaN (step 6) stops the run before its checkpoint.
    settings = ["max_nonfinite_steps=1", "nonfinite_window=10"]
    inject_nan(monkeypatch, set(range(NAN_STEP, STEPS + 1)))
    with pytest.raises(TooManyNonfiniteSteps, match="max_nonfinite_steps=1") as stopped:
        train(config(world, *settings), tmp_path)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == f"step-{NAN_STEP:08d}" and str(latest) in str(stopped.value)
    assert ckpt.checkpoint_damage(latest) is None
    assert not (tmp_path / "final").exists()
    # The checkpoint holds the step before the NaNs (the skipped step changed nothing): resumed
    # without them, the run ends where the run with one NaN at NAN_STEP ended.
    train(config(world, *settings), tmp_path, resume=True)
    assert_same_weights(final_weights(nan_run), final_weights(tmp_path))


# ---------------------------------------------------------------------------------------------
# Preemption signals
# ---------------------------------------------------------------------------------------------

# Only the stage ends are checkpointed (steps 3 and 8): a checkpoint inside a stage exists only
# because the signal asked for it.
CLI_SETTINGS = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=3", "stages.0.save_every=0",
                "stages.1.steps=5", "stages.1.save_every=0"]
CLI_STEPS = 8


def command(out: Path, world: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "vlmkit", "train", "tiny", "--out", str(out), "--set", f"world.dir={world}"]
    for item in CLI_SETTINGS:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def cli_reference(world, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("cli-reference")
    done = subprocess.run(command(out, world), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(out)


def logged_steps(out: Path) -> set[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return set()
    steps = set()
    for line in path.read_text().splitlines():
        try:
            steps.add(json.loads(line)["global_step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


# A step drawn at random (seeded, so a failure can be rerun), and SIGUSR1 at the first step;
# the signal lands while the following step runs, and the last step must still be ahead.
SIGNAL_CASES = [(signal.SIGTERM, random.Random(19).randint(1, CLI_STEPS - 2)), (signal.SIGUSR1, 1)]


@pytest.mark.parametrize("sig, after_step", SIGNAL_CASES, ids=[f"{s.name}-after-{n}" for s, n in SIGNAL_CASES])
def test_preemption_signal_checkpoints_and_resume_is_bitwise(world, cli_reference, tmp_path, sig, after_step):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while after_step not in logged_steps(out) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert f"stopped by {sig.name}" in stderr and "--resume" in stderr
    assert not (out / "final").exists()
    stopped_at = ckpt.read_trainer_state(ckpt.latest_checkpoint(out)).global_step
    assert after_step <= stopped_at < CLI_STEPS
    resumed = subprocess.run(command(out, world, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(cli_reference, final_weights(out))
    assert [r["global_step"] for r in step_records(out)] == list(range(1, CLI_STEPS + 1))


def children_by_rank(parent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun (process `parent`) started."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if ppid == parent and rank:
            found[int(rank[0][5:])] = int(stat.parent.name)
    return found


def torchrun(world: Path, out: Path) -> subprocess.Popen:
    """A 2-process run of the CLI settings (gloo, one thread per process)."""
    args = command(out, world)[3:]  # after `python -m vlmkit`
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "vlmkit", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds torchrun's workers through /proc")
def test_signal_to_one_rank_stops_every_rank_at_one_checkpoint(world, tmp_path):
    # How a sharded checkpoint resumes bitwise is tests/test_train_distributed.py's; here, that
    # the ranks agree: both stop after the same step and write that step's checkpoint together.
    proc = torchrun(world, tmp_path)
    while 4 not in logged_steps(tmp_path) and proc.poll() is None:
        time.sleep(0.05)
    workers = children_by_rank(proc.pid)
    assert proc.poll() is None and set(workers) == {0, 1}, "the run ended before the signal"
    os.kill(workers[1], signal.SIGUSR1)  # only rank 1 hears it
    _, stderr = proc.communicate()
    assert proc.returncode != 0 and not (tmp_path / "final").exists()
    assert "stopped by SIGUSR1" in stderr and "a preemption signal on another rank" in stderr, stderr[-3000:]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert 4 <= ckpt.read_trainer_state(latest).global_step < CLI_STEPS
    assert (latest / "rng-rank0.json").is_file() and (latest / "rng-rank1.json").is_file()
    assert ckpt.checkpoint_damage(latest) is None


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the end of the tensor data: the file still loads, with one value changed
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("file, damage", [("model.safetensors", flip_last_byte), ("optimizer.safetensors", truncate)])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(world, reference, one_thread, monkeypatch,
                                                                          tmp_path, caplog, file, damage):
    stop_after(monkeypatch, 6)
    with pytest.raises(Stopped):
        train(config(world), tmp_path)
    monkeypatch.undo()
    damage(ckpt.checkpoint_root(tmp_path) / "step-00000006" / file)
    with caplog.at_level(logging.WARNING, logger="vlmkit.train"):
        train(config(world), tmp_path, resume=True)
    assert "step-00000006 is damaged" in caplog.text and file in caplog.text
    assert (ckpt.checkpoint_root(tmp_path) / "corrupt-step-00000006").is_dir()
    assert_same_weights(reference, final_weights(tmp_path))


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    for step in (2, 3):
        directory = ckpt.checkpoint_root(tmp_path) / f"step-{step:08d}"
        directory.mkdir(parents=True)
        (directory / "trainer.json").write_text("{}")
        ckpt.write_manifest(directory)
        flip_last_byte(directory / "trainer.json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        ckpt.resumable_checkpoint(tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


# ---------------------------------------------------------------------------------------------
# Failed writes
# ---------------------------------------------------------------------------------------------

FAILING_STEP = 5


def fail_saves(monkeypatch, times: int | None) -> list[int]:
    """Make writing a checkpoint's weights fail with ENOSPC (a half-written file left behind) from
    global step FAILING_STEP on, `times` times (None: always); returns the steps whose writes failed."""
    save_file, save_single = ckpt.save_file, ckpt.save_single
    failed: list[int] = []
    failing = {"now": False}

    def counting(out_dir, state, *args, **kwargs):
        failing["now"] = state.global_step >= FAILING_STEP and (times is None or len(failed) < times)
        if failing["now"]:
            failed.append(state.global_step)
        return save_single(out_dir, state, *args, **kwargs)

    def full_disk(tensors, path, *args, **kwargs):
        if failing["now"] and Path(path).name == "model.safetensors":
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_single", counting)
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    return failed


def no_temporaries(out: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_root(out).iterdir())


def test_failed_save_is_retried_and_the_run_is_unchanged(world, reference, one_thread, monkeypatch, tmp_path, caplog):
    failed = fail_saves(monkeypatch, times=2)
    with caplog.at_level(logging.WARNING, logger="vlmkit.train"):
        train(config(world, "save_retries=2"), tmp_path)
    assert failed == [FAILING_STEP, FAILING_STEP]
    assert caplog.text.count("No space left on device") == 2
    assert no_temporaries(tmp_path)
    assert ckpt.checkpoint_damage(ckpt.checkpoint_root(tmp_path) / f"step-{FAILING_STEP:08d}") is None
    assert_same_weights(reference, final_weights(tmp_path))


def test_save_failing_every_time_stops_with_the_previous_checkpoint_intact(world, reference, one_thread, monkeypatch,
                                                                           tmp_path):
    failed = fail_saves(monkeypatch, times=None)
    with pytest.raises(CheckpointError, match="failed 2 times .*No space left on device.* intact"):
        train(config(world, "save_retries=1"), tmp_path)
    monkeypatch.undo()
    assert failed == [FAILING_STEP, FAILING_STEP]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == f"step-{FAILING_STEP - 1:08d}" and ckpt.checkpoint_damage(latest) is None
    assert no_temporaries(tmp_path) and not (tmp_path / "final").exists()
    train(config(world), tmp_path, resume=True)
    assert_same_weights(reference, final_weights(tmp_path))


def test_a_failed_replacement_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    final = tmp_path / "step-00000003"
    final.mkdir()
    (final / "trainer.json").write_text("old")
    tmp = tmp_path / ".tmp-new"
    tmp.mkdir()
    (tmp / "trainer.json").write_text("new")
    replace = os.replace

    def refuse_new(src, dst):
        if Path(src) == tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(PermissionError):
        ckpt.commit_dir(tmp, final)
    assert (final / "trainer.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-old")] == []


# ---------------------------------------------------------------------------------------------
# A data file that becomes unreadable
# ---------------------------------------------------------------------------------------------

# The sft stage reads qa (weight 0.7) and text (0.3); the text file is cut to a few lines so that
# its stream opens it again every few packs.
TEXT_LINES = 30


@pytest.fixture
def own_world(world, tmp_path) -> Path:
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    text = copy / "text_train.jsonl"
    text.write_text("".join(text.read_text().splitlines(keepends=True)[:TEXT_LINES]))
    return copy


def stage_data(cfg) -> StageData:
    model = build_model(cfg)
    return StageData(cfg, 1, model.tokenizer, model.image_processor(), model.config.tokens_per_tile)


def test_unreadable_source_is_dropped_and_counted(own_world, caplog):
    cfg = config(own_world, "max_bad_fraction=0.5")
    data = stage_data(cfg)
    for _ in range(3):
        data.next_batch("text")
    (own_world / "text_train.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        batches = [data.next_batch("text") for _ in range(TEXT_LINES)]
    assert set(data.unreadable) == {"text"} and "No such file" in data.unreadable["text"]
    assert "counted as a bad source" in caplog.text and "text_train.jsonl" in caplog.text
    assert {s for b in batches[-5:] for s in b.sources} == {"qa"}
    # The cursor keeps it dropped: a restored stream goes on with the same packs.
    state = json.loads(json.dumps(data.state_dict()))
    restored = stage_data(cfg)
    restored.load_state_dict(state)
    assert restored.unreadable == data.unreadable
    for _ in range(3):
        assert torch.equal(data.next_batch("text").input_ids, restored.next_batch("text").input_ids)


def test_an_os_error_mid_file_makes_the_source_unreadable():
    # As a file whose permission is taken away (or whose disk fails) while it is read.
    def reader():
        yield from [BadRecord("malformed_json", "-", f"shard-0:{i}") for i in range(3)]
        raise PermissionError(errno.EACCES, "Permission denied", "shard-1.parquet")

    stream = SourceStream("s", reader=reader, loop=False)
    with pytest.raises(UnreadableSource, match="'s' cannot be read: .*Permission denied: 'shard-1.parquet'"):
        list(stream.iter_from())


def test_unreadable_source_over_max_bad_fraction_stops_clearly(own_world):
    data = stage_data(config(own_world))  # max_bad_fraction 0.01 < text's 30%
    data.next_batch("text")
    (own_world / "text_train.jsonl").unlink()
    with pytest.raises(TooManyBadRecords, match="'text'.*30.0% of this stage's data, more than max_bad_fraction"):
        for _ in range(TEXT_LINES):
            data.next_batch("text")


def test_file_deleted_mid_run_does_not_stop_the_run(own_world, one_thread, monkeypatch, tmp_path, caplog):
    # The sft stage's steps 4-6 (global 7-9) would be text steps; the file goes after step 3.
    train_step = Trainer._train_step

    def delete_text(self, *args, **kwargs):
        if self.state.global_step == 4:
            (own_world / "text_train.jsonl").unlink(missing_ok=True)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", delete_text)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        train(config(own_world, "max_bad_fraction=0.5", "stages.1.steps=6"), out)
    assert "'text' cannot be read" in caplog.text
    assert (out / "final" / "model.safetensors").is_file()
    later = [r for r in step_records(out) if r["global_step"] >= 7]
    assert len(later) == 3 and all("loss/text" not in r and "loss/qa" in r for r in later)
    cursors = ckpt.read_trainer_state(ckpt.checkpoint_root(out) / "step-00000008").data
    assert set(cursors["0"]["unreadable"]) == {"text"}
