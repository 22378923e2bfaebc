"""torchrun + FSDP2 on gloo, 2 CPU processes.

2 processes (each on its own share of the data, grad_accum 1) train like 1 process with
grad_accum 2 (the same global batch size): same loss curve within tolerance. The two runs see
different packs (each rank packs its own disjoint share), so the curves agree to data noise, not
bitwise.

A 2-process run stopped at a checkpoint and resumed under torchrun ends with bit-for-bit the
weights of the uninterrupted 2-process run: inside the second stage (whose optimizer covers
modules the first stage froze, and a parameter no gradient reaches), at the first stage's end,
after the last stage; the same for a run whose stages use Muon, inside a stage. Without torchrun,
DCP's optimizer round trip keeps which parameters have state."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.train_support import assert_same_weights, final_weights, prepared_world
from vlmkit.errors import CheckpointError
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.distributed import dcp_load_optimizer, dcp_save

# Checkpoints at global steps 2 (inside align), 3 (end of align), 5 (inside sft, the first after
# the hand-off that unfreezes vision and the LLM), 7 (end of sft); all kept for the resume tests.
SETTINGS = ["progress=false", "tensorboard=false", "stages.0.steps=3", "stages.1.steps=4",
            "stages.1.save_every=2", "stages.1.mixture={qa: 1.0}", "stages.0.keep_last=10", "stages.1.keep_last=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    args = ["train", "tiny", "--out", str(out), "--set", f"world.dir={world}"]
    for item in SETTINGS:
        args += ["--set", item]
    return args + list(extra)


def torchrun(world: Path, out: Path, *extra: str) -> None:
    """The 2-process run (grad_accum 1) into `out`."""
    # --standalone: a free rendezvous port, so runs of the suite side by side do not collide.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vlmkit",
                           *train_args(world, out, "--set", "stages.0.grad_accum=1", "--set", "stages.1.grad_accum=1",
                                        *extra)],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(world, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(world, out)
    return out


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if not json.loads(x).get("eval")]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(world, sharded, tmp_path):
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, "-m", "vlmkit",
                           *train_args(world, single, "--set", "stages.0.grad_accum=2", "--set", "stages.1.grad_accum=2",
                                       "--set", "num_threads=1")],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = losses(single), losses(sharded)
    assert len(a) == len(b) == 7
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    # DCP checkpoints of the sharded run, and a final checkpoint the rest of vlmkit loads
    assert any((sharded / "checkpoints").glob("step-*/dcp"))
    from vlmkit.api import VLM

    model = VLM.from_pretrained(sharded / "final")
    assert model.tokenizer is not None


def stopped_after_checkpoint(run: Path, global_step: int, out: Path) -> None:
    """Into `out`, what a run killed right after writing its checkpoint of `global_step` leaves:
    the finished run's directory without the later checkpoints and the final model (a checkpoint
    is renamed into place whole, the final model comes after the last stage, and the resume cuts
    the metrics lines past its step)."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "final")
    later = [p for p in list_checkpoints(out) if int(p.name.split("-")[1]) > global_step]
    for checkpoint in later:
        shutil.rmtree(checkpoint)
    assert list_checkpoints(out)[-1].name == f"step-{global_step:08d}"


@pytest.mark.slow
def test_an_moe_decoder_trains_sharded_when_a_rank_leaves_experts_idle(world, tmp_path):
    """32 experts, top-1, 256-token packs: in most steps some expert gets no token on one rank and
    some on the other. Every rank must still gather and reduce every expert (models/moe.py's
    `run_idle_experts`, set by shard_model; the experts stay in their layer's unit): without
    that the ranks' collectives differ and the run fails."""
    moe = "model.config.llm.moe={num_experts: 32, top_k: 1, expert_intermediate_size: 32}"
    torchrun(world, tmp_path, "--set", moe, "--set", "stages.0.token_budget=256", "--set", "stages.1.token_budget=256")
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("eval")]
    assert len(steps) == 7 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any(k.startswith("moe_load_max/") for k in steps[-1])


@pytest.mark.slow
@pytest.mark.parametrize("global_step", [5, 3, 7], ids=["inside-sft", "end-of-align", "end-of-sft"])
def test_sharded_run_resumes_bitwise(world, sharded, tmp_path, global_step):
    out = tmp_path / "resumed"
    stopped_after_checkpoint(sharded, global_step, out)
    torchrun(world, out, "--resume")
    a = load_file(str(sharded / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if not json.loads(x).get("eval")]
    assert steps == list(range(1, 8))


MUON = ["--set", "stages.0.optimizer=muon", "--set", "stages.1.optimizer=muon"]


@pytest.mark.slow
def test_a_sharded_muon_run_resumes_bitwise_inside_a_stage(world, sharded, tmp_path):
    """Muon's matrices are gathered for its iterations and cut back to each rank's rows
    (train/optim.py); DCP saves and restores its momentum shards like AdamW's moments."""
    run = tmp_path / "muon"
    torchrun(world, run, *MUON)
    out = tmp_path / "resumed"
    stopped_after_checkpoint(run, 5, out)
    torchrun(world, out, "--resume", *MUON)
    muon_weights = final_weights(run)
    assert_same_weights(muon_weights, final_weights(out))
    key = "llm.layers.0.mlp.up_proj.weight"
    assert not torch.equal(muon_weights[key], final_weights(sharded)[key])


# DCP runs in this one process too (no process group): the optimizer state round trip alone.
no_process_group = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)


@no_process_group
def test_dcp_restores_exactly_the_optimizer_state_it_saved(tmp_path):
    # A parameter no gradient has reached has no AdamW state: it comes back without any.
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    optimizer = adamw(model)
    model["used"](torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # as the trainer leaves it between steps
    dcp_save(tmp_path / "dcp", model, optimizer)
    restored = adamw(model)
    dcp_load_optimizer(tmp_path / "dcp", model, restored)
    saved, loaded = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert saved.keys() == loaded.keys() == {0, 1}  # used.weight, used.bias
    for index, entries in saved.items():
        assert entries.keys() == loaded[index].keys()
        assert all(torch.equal(value, loaded[index][key]) for key, value in entries.items())


@no_process_group
def test_dcp_optimizer_state_for_other_parameters_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"first": nn.Linear(4, 4), "second": nn.Linear(4, 4)})
    optimizer = adamw(model["first"])
    model["first"](torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dcp_save(tmp_path / "dcp", model, optimizer)
    with pytest.raises(CheckpointError, match="config changed"):
        dcp_load_optimizer(tmp_path / "dcp", model, adamw(model["second"]))


@no_process_group
def test_saving_an_optimizer_that_never_stepped_leaves_it_as_it_was(tmp_path):
    model = nn.Linear(4, 4)
    optimizer = adamw(model)
    dcp_save(tmp_path / "dcp", model, optimizer)
    assert not optimizer.state
    restored = adamw(model)
    dcp_load_optimizer(tmp_path / "dcp", model, restored)
    assert not restored.state
