"""LoRA, GRPO and DPO (copied reference) stages under torchrun + FSDP2 on gloo, 2 CPU processes.

A LoRA stage after a plain stage: with every rank reading the data one process reads (so that a
2-process step is the 1-process step), the 2-process run ends with the 1-process run's weights
and adapter, the adapter it writes loads back onto the stage's base, and a run stopped inside the
LoRA stage, or at the end of the stage before it, resumes under torchrun to the uninterrupted
2-process run's weights bit for bit.

A GRPO stage: every rank samples its own prompts, the metrics count every rank's groups, a run
stopped inside the stage (with a rollout's update pending, or between rollouts) resumes bit for
bit, also in a LoRA stage; and a rank whose groups dynamic sampling drops entirely pads its
update with zero-weight passes (train/distributed.py's `aligned_passes`), ending where one process
training on the other rank's prompts ends.

A DPO stage with a copied reference resumes bit for bit under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_dpo import DPO_TINY
from tests.test_dpo import world as dpo_world  # noqa: F401 (a fixture: the tiny world with preference pairs)
from tests.test_train_distributed import stopped_after_checkpoint
from tests.train_support import assert_same_weights, final_weights, prepared_world
from vlmkit.api import VLM
from vlmkit.config import load_config
from vlmkit.data.world import WorldSpec, prepare_world
from vlmkit.models.lora import ADAPTER_WEIGHTS_FILE, load_adapter, merge_and_unload
from vlmkit.train.loop import ADAPTERS_DIR

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

SCRIPT = """
import json, os, sys
import vlmkit.train.grpo as grpo
import vlmkit.train.loop as loop
from vlmkit.config import load_config
from vlmkit.data.packing import SourceStream
from vlmkit.train.data import StageData
from vlmkit.train.rewards import CHECKERS

mode, config, out, resume, *settings = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))

if "same-data" in mode:  # every rank reads what one process reads: a 2-process step is the 1-process step
    class SameStageData(StageData):
        def __init__(self, *args, rank=0, world=1, **kwargs):
            super().__init__(*args, rank=0, world=1, **kwargs)

    class SameSourceStream(SourceStream):
        def __init__(self, *args, rank=0, world=1, **kwargs):
            super().__init__(*args, rank=0, world=1, **kwargs)

    loop.StageData, grpo.SourceStream = SameStageData, SameSourceStream


def odd_length(reply, answer, task):  # mixed rewards on an untrained model
    return float(len(reply) % 2)


def silent_on_rank_1(reply, answer, task):  # no group of rank 1 carries a signal: all are dropped
    return 0.0 if rank == 1 else odd_length(reply, answer, task)


for name in CHECKERS:
    CHECKERS[name] = silent_on_rank_1 if "rank-1-silent" in mode else odd_length

drawn = []
sample = grpo.GRPOObjective._sample


def recording(self, prompts, policy):
    drawn.extend(p.task.id for p in prompts)
    return sample(self, prompts, policy)


grpo.GRPOObjective._sample = recording
loop.train(load_config(config, settings), out, resume=resume == "resume")
with open(f"{out}/drawn-rank{rank}.json", "w") as f:
    json.dump(drawn, f)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "run.py"
    path.write_text(SCRIPT)
    return path


def run(script: Path, config: str | Path, out: Path, *settings: str, processes: int = 2, mode: str = "",
        resume: bool = False) -> None:
    """A training run of `config` into `out` in `processes` processes (torchrun for 2)."""
    # --standalone: a free rendezvous port, so runs of the suite side by side do not collide.
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                if processes == 2 else [sys.executable])
    done = subprocess.run([*launcher, str(script), mode or "-", str(config), str(out),
                           "resume" if resume else "fresh", *settings], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def stopped_at(run_dir: Path, global_step: int, out: Path) -> Path:
    """What a run killed right after its checkpoint of `global_step` leaves, before any LoRA stage
    ended (its adapter is written at the stage end)."""
    stopped_after_checkpoint(run_dir, global_step, out)
    shutil.rmtree(out / ADAPTERS_DIR, ignore_errors=True)
    return out


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / ADAPTERS_DIR / "sft" / ADAPTER_WEIGHTS_FILE))


# --- a LoRA stage after a plain stage ---------------------------------------------------------------

# tiny.yaml, its second stage (sft) a LoRA stage: checkpoints at global steps 3 (the end of align),
# 5 (inside the LoRA stage) and 7 (its end).
LORA_RUN = ["progress=false", "tensorboard=false", "num_threads=1", "stages.0.steps=3", "stages.1.steps=4",
            "stages.1.save_every=2", "stages.0.keep_last=10", "stages.1.keep_last=10", "stages.0.grad_accum=1",
            "stages.1.grad_accum=1", "stages.1.lora={rank: 4, alpha: 8}"]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
"""2 processes against 1 on the same data: FSDP sums gradients and norms over ranks in another order
than one process does (on this CPU and torch, the runs agree bit for bit)."""


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def lora_runs(script, tiny_world, tmp_path_factory) -> dict[int, Path]:
    """The LoRA run in 1 and in 2 processes, every rank reading the whole data."""
    runs = {}
    for processes in (1, 2):
        runs[processes] = tmp_path_factory.mktemp(f"lora-{processes}")
        run(script, "tiny", runs[processes], f"world.dir={tiny_world}", *LORA_RUN, processes=processes,
            mode="same-data")
    return runs


def test_a_lora_stage_under_torchrun_trains_like_one_process(lora_runs):
    one, two = final_weights(lora_runs[1]), final_weights(lora_runs[2])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], **TOLERANCE, msg=name)
    adapters = adapter(lora_runs[1]), adapter(lora_runs[2])
    assert adapters[0].keys() == adapters[1].keys()
    assert any(t.any() for k, t in adapters[1].items() if ".lora_B." in k)  # the adapters trained
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], **TOLERANCE, msg=name)
    assert any((lora_runs[2] / "checkpoints").glob("step-*/dcp"))


def test_the_adapter_a_sharded_lora_stage_writes_loads_back_onto_its_base(lora_runs):
    # The base: the weights at the end of align (the 1-process run's checkpoint, which the 2-process
    # one matches); the LoRA stage keeps it frozen.
    model = VLM.from_pretrained(lora_runs[1] / "final")
    model.load_state_dict(load_file(str(lora_runs[1] / "checkpoints" / "step-00000003" / "model.safetensors")))
    load_adapter(model, lora_runs[2] / ADAPTERS_DIR / "sft")
    merge_and_unload(model)
    state, final = model.state_dict(), final_weights(lora_runs[2])
    for name, tensor in final.items():
        torch.testing.assert_close(state[name], tensor, **TOLERANCE, msg=name)


@pytest.mark.parametrize("global_step", [5, 3], ids=["inside-the-lora-stage", "end-of-the-stage-before"])
def test_a_sharded_lora_stage_resumes_bitwise(script, tiny_world, lora_runs, tmp_path, global_step):
    out = stopped_at(lora_runs[2], global_step, tmp_path / "resumed")
    run(script, "tiny", out, f"world.dir={tiny_world}", *LORA_RUN, mode="same-data", resume=True)
    assert_same_weights(final_weights(lora_runs[2]), final_weights(out))
    assert_same_weights(adapter(lora_runs[2]), adapter(out))


# --- GRPO --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_world(tmp_path_factory) -> WorldSpec:
    spec = WorldSpec(dir=str(tmp_path_factory.mktemp("grpo-world")), n_train=8, n_val=12, n_test=1, vocab_size=320)
    prepare_world(spec, progress=False)
    return spec


def grpo_config(world: WorldSpec, directory: Path, *, sft_steps: int = 2, lora: bool = False, **grpo) -> Path:
    """tests/test_grpo.py's run as a config file: `sft_steps` of SFT on the world's train QA, then a
    grpo stage of 4 steps on its val questions (two updates per rollout), checkpoints at every
    step."""
    settings = {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6, "kl_coef": 0.1,
                "updates_per_rollout": 2, **grpo}
    sft = [{"name": "sft", "llm_lr": 3e-3, "adapter_lr": 1e-3, "steps": sft_steps, "token_budget": 256,
            "mixture": {"qa": 1.0}, "warmup_steps": 0, "schedule": "constant", "keep_last": 10}] if sft_steps else []
    stage = {"name": "grpo", "kind": "grpo", "llm_lr": 3e-3, "adapter_lr": 1e-3, "steps": 4,
             "mixture": {"prompts": 1.0}, "token_budget": 256, "save_every": 1, "keep_last": 10,
             "warmup_steps": 0, "schedule": "constant", "grpo": settings}
    if lora:
        stage["lora"] = {"rank": 4, "alpha": 8}
    raw = {
        "world": {"dir": world.dir, "n_train": world.n_train, "n_val": world.n_val, "n_test": world.n_test,
                  "vocab_size": world.vocab_size},
        "model": {"config": {
            "vision": {"style": "siglip", "image_size": 48, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
            "adapter": {"kind": "pixel_shuffle", "scale_factor": 2},
            "llm": {"hidden_size": 48, "intermediate_size": 96, "num_layers": 2, "num_heads": 4,
                    "tie_embeddings": True}}},
        "data": {"prompts": {"path": "qa_val.json", "format": "llava", "kind": "chat"},
                 "qa": {"path": "qa_train.json", "format": "llava", "kind": "chat"}},
        "eval_sources": [], "num_threads": 1, "progress": False, "tensorboard": False,
        "stages": sft + [stage],
    }
    load_config(raw)  # valid before any process starts
    path = directory / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def grpo_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "grpo"]


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def grpo_run(request, script, grpo_world, tmp_path_factory) -> tuple[Path, Path]:
    """(config, output) of the uninterrupted 2-process GRPO run, a full-weight or a LoRA stage."""
    directory = tmp_path_factory.mktemp("grpo")
    config = grpo_config(grpo_world, directory, lora=request.param)
    run(script, config, directory / "run")
    return config, directory / "run"


def test_grpo_under_torchrun_samples_on_every_rank(grpo_run):
    _, out = grpo_run
    drawn = [json.loads((out / f"drawn-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(len(ids) == 2 * 2 for ids in drawn)  # 2 prompts per rollout, 2 rollouts
    assert not set(drawn[0]) & set(drawn[1])  # each rank its own share of the prompts
    records = grpo_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # summed over the ranks: 2 groups of 4 replies each
        assert r["groups_kept"] + r["groups_dropped"] == 4 and r["tokens"] > 0 and r["grad_norm"] > 0
        assert r["response_length"] > 0 and 0 <= r["reward"] <= 1
    assert records[0]["kl"] == pytest.approx(0, abs=1e-5) and records[1]["kl"] > 1e-6


# Global steps 1-2 are SFT, 3-6 GRPO with two updates per rollout: stopped after 3 (a rollout with
# an update left rides in the checkpoint) and 4 (between rollouts).
@pytest.mark.parametrize("global_step", [3, 4])
def test_a_sharded_grpo_stage_resumes_bitwise(script, grpo_run, tmp_path, global_step):
    config, out = grpo_run
    resumed = stopped_at(out, global_step, tmp_path / "resumed")
    run(script, config, resumed, resume=True)
    assert_same_weights(final_weights(out), final_weights(resumed))
    assert [r["reward"] for r in grpo_records(resumed)] == [r["reward"] for r in grpo_records(out)]


def test_a_rank_without_groups_pads_its_update(script, grpo_world, tmp_path):
    # Both ranks draw the same prompts (same-data); rank 1's rewards are all equal, so dynamic
    # sampling drops every group of it and its update is padding alone: the 2-process run is the
    # 1-process run on rank 0's groups, up to the decoding kernels (the engine decodes on derived
    # weights in one process, not under a process group: infer/engine.py).
    config = grpo_config(grpo_world, tmp_path, sft_steps=0, updates_per_rollout=1, refill_rounds=1)
    run(script, config, tmp_path / "one", processes=1, mode="same-data")
    run(script, config, tmp_path / "two", mode="same-data,rank-1-silent")
    one, two = grpo_records(tmp_path / "one"), grpo_records(tmp_path / "two")
    assert [r["groups_kept"] for r in two] == [r["groups_kept"] for r in one] == [2] * 4
    assert all(r["groups_dropped"] == 2 * 2 for r in two)  # rank 1: 2 prompts, then 2 refilled
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    # the padding adds nothing: the same loss over the same N, the same gradient
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # Adam's update divides by the gradient's scale, so where a gradient is near 0 the kernels'
    # rounding moves a weight by up to about 1e-5 over the 4 steps.
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=5e-5, msg=name)


# --- DPO with a copied reference ----------------------------------------------------------------------


# tests/dpo_tiny.yaml, shortened: SFT for 2 steps, then DPO (reference: copy) for 4, a checkpoint
# inside it at global step 4.
DPO_RUN = ["progress=false", "tensorboard=false", "num_threads=1", "stages.0.steps=2", "stages.1.steps=4",
           "stages.1.grad_accum=1", "stages.1.save_every=2", "stages.0.keep_last=10", "stages.1.keep_last=10"]


def test_a_sharded_dpo_stage_with_a_copied_reference_resumes_bitwise(script, dpo_world, tmp_path):  # noqa: F811
    settings = [f"world.dir={dpo_world}", *DPO_RUN]
    run(script, DPO_TINY, tmp_path / "run", *settings)
    steps = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "dpo"]
    assert len(steps) == 4
    # the policy is its reference at the first step, on every rank: no margin, the loss log 2
    assert steps[0]["margin"] == pytest.approx(0, abs=1e-6) and steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    resumed = stopped_at(tmp_path / "run", 4, tmp_path / "resumed")
    run(script, DPO_TINY, resumed, *settings, resume=True)
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(resumed))
