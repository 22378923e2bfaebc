"""torchrun + FSDP2 on gloo: 2 processes (each on its own share of the data, grad_accum 1) train
like 1 process with grad_accum 2 (the same global batch size): same loss curve within tolerance.

The two runs see different packs (each rank packs its own disjoint share), so the curves agree
to data noise, not bitwise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit.config import load_config
from vlmkit.data.world import prepare_world

pytestmark = pytest.mark.slow

SETTINGS = ["progress=false", "tensorboard=false", "stages.0.steps=3", "stages.1.steps=4",
            "stages.1.save_every=2", "stages.1.mixture={qa: 1.0}"]


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if not json.loads(x).get("eval")]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    spec = load_config("tiny").world
    spec.dir = str(tmp_path / "world")
    prepare_world(spec, progress=False)
    common = ["train", "tiny", "--set", f"world.dir={spec.dir}"]
    for item in SETTINGS:
        common += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    single = tmp_path / "single"
    done = subprocess.run([sys.executable, "-m", "vlmkit", *common, "--out", str(single),
                           "--set", "stages.0.grad_accum=2", "--set", "stages.1.grad_accum=2",
                           "--set", "num_threads=1"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    sharded = tmp_path / "fsdp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "vlmkit", *common, "--out", str(sharded),
                           "--set", "stages.0.grad_accum=1", "--set", "stages.1.grad_accum=1"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = losses(single), losses(sharded)
    assert len(a) == len(b) == 7
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    # DCP checkpoints of the sharded run, and a final checkpoint the rest of vlmkit loads
    assert any((sharded / "checkpoints").glob("step-*/dcp"))
    from vlmkit.api import VLM

    model = VLM.from_pretrained(sharded / "final")
    assert model.tokenizer is not None
