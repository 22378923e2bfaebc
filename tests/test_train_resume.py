"""vlmkit/configs/tiny.yaml end to end in a subprocess, and exact resume: a run killed with
SIGKILL in the middle of a stage and resumed ends with bit-for-bit the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlmkit.config import load_config
from vlmkit.data.world import prepare_world

pytestmark = pytest.mark.slow

# One thread: bitwise equality needs the same thread count in both runs, and the suite shares cores.
SETTINGS = ["num_threads=1", "progress=false", "stages.0.steps=3", "stages.1.steps=5", "stages.1.save_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    spec = load_config("tiny").world
    spec.dir = str(tmp_path_factory.mktemp("world"))
    prepare_world(spec, progress=False)
    return Path(spec.dir)


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
    proc = subprocess.Popen(command(out, world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill in the middle of the second stage: after its second checkpoint (global step 5).
    target = out / "checkpoints" / "step-00000005"
    while not target.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    resumed = subprocess.run(command(out, world, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k] == b[k]).all()]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    # The resumed metrics pick up where the checkpoint left off, with no repeated step.
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_existing_run_needs_resume(reference, world):
    again = subprocess.run(command(reference, world), capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr
