"""vlmkit/configs/tiny.yaml end to end in a subprocess, and exact resume: a run killed with
SIGKILL in the middle of a stage and resumed ends with bit-for-bit the weights of an uninterrupted
run, and so does a run stopped after any step (before any checkpoint, at a checkpoint inside a
stage or at a stage's end, between checkpoints, after the last stage) or after it finished."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_support import (Stopped, assert_same_weights, final_weights, kept_thread_count, kill_at_checkpoint,
                                 prepared_world, stop_after)
from vlmkit.config import load_config
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.loop import train

pytestmark = pytest.mark.slow

# One thread: bitwise equality needs the same thread count in both runs, and the suite shares cores.
SETTINGS = ["num_threads=1", "progress=false", "stages.0.steps=3", "stages.1.steps=5", "stages.1.save_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


def command(out: Path, world: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "vlmkit", "train", "tiny", "--out", str(out), "--set", f"world.dir={world}"]
    for item in SETTINGS:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run(command(out, world), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_tiny_runs_end_to_end(reference):
    from vlmkit.api import VLM

    final = reference / "final"
    model = VLM.from_pretrained(final)
    assert model.tokenizer is not None
    meta = json.loads((final / "vlmkit.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["align", "sft"]
    assert meta["stages"][0]["trainable"] == {"vision": False, "adapter": True, "llm": False}
    assert set(meta["data_fingerprint"]) == {"captions", "qa", "text"}
    lines = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if not r.get("eval")]
    assert [r["global_step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert r["tokens_per_s"] > 0 and 0 < r["packing_efficiency"] <= 1 and r["grad_norm"] >= 0
        assert any(k.startswith("loss/") for k in r)
    assert (reference / "loss.png").stat().st_size > 0
    assert any((reference / "tensorboard").iterdir())


def test_killed_run_resumes_bitwise(world, reference, tmp_path):
    out = tmp_path / "killed"
    # Kill in the middle of the second stage: after its second checkpoint (global step 5).
    kill_at_checkpoint(command(out, world), out, 5)
    resumed = subprocess.run(command(out, world, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(reference), final_weights(out))
    # The resumed metrics pick up where the checkpoint left off, with no repeated step.
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_existing_run_needs_resume(reference, world):
    again = subprocess.run(command(reference, world), capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr


# ---------------------------------------------------------------------------------------------
# Resume from every point of a run
# ---------------------------------------------------------------------------------------------

# Two short stages, each with a checkpoint inside it and one at its end: global steps 2 (inside
# align), 3 (end of align), 5 (inside sft), 7 (end of sft); the sft stage mixes text steps in.
MATRIX_SETTINGS = ["num_threads=1", "progress=false", "tensorboard=false",
                   "stages.0.steps=3", "stages.0.save_every=2", "stages.1.steps=4", "stages.1.save_every=2"]
MATRIX_STEPS = 7
MATRIX_CHECKPOINTS = [2, 3, 5, 7]


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


def matrix_config(world: Path):
    return load_config("tiny", [f"world.dir={world}", *MATRIX_SETTINGS])


@pytest.fixture(scope="module")
def matrix_reference(world, one_thread, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("matrix-reference")
    train(matrix_config(world), out)
    return final_weights(out)


# Stopped after each step: before any checkpoint (1), at a checkpoint inside a stage (2, 5), at a
# stage-end checkpoint (3), between checkpoints (4, 6), after the last stage's checkpoint (7).
@pytest.mark.parametrize("stopped_after", range(1, MATRIX_STEPS + 1))
def test_resume_from_any_step_is_bitwise(world, matrix_reference, monkeypatch, tmp_path, stopped_after):
    cfg = matrix_config(world)
    stop_after(monkeypatch, stopped_after)
    with pytest.raises(Stopped):
        train(cfg, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "final").exists()
    written = [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)]
    assert written[-1:] == [c for c in MATRIX_CHECKPOINTS if c <= stopped_after][-1:]
    train(matrix_config(world), tmp_path, resume=True)
    assert_same_weights(matrix_reference, final_weights(tmp_path))
    steps = [json.loads(x)["global_step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if not json.loads(x).get("eval")]
    assert steps == list(range(1, MATRIX_STEPS + 1))


def test_resume_of_a_finished_run_is_bitwise(world, matrix_reference, one_thread, tmp_path):
    train(matrix_config(world), tmp_path)
    train(matrix_config(world), tmp_path, resume=True)
    assert_same_weights(matrix_reference, final_weights(tmp_path))
