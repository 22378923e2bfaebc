"""bf16 mixed-precision training (train/precision.py): bf16 compute over fp32 master weights and
optimizer state, in one process (autocast + a bf16 residual stream) and sharded (FSDP2's
MixedPrecisionPolicy, 2 CPU processes on gloo).

The runs: configs/tiny.yaml on its synthetic world, 2 adapter steps then 8 steps training
everything at lr 3e-3 (the loss falls by several tenths), in fp32 and in bf16.

TOLERANCE: a bf16 step's loss lies within 0.01 of the fp32 step's at every step. One bf16
rounding moves a value by up to 2^-8 of itself (~0.02 on a loss near 5); the loss is an fp32
average of many per-token cross-entropies whose rounding errors mostly cancel, and 10 steps of
small updates let the runs drift apart only slowly. The bound is meaningful against what it must
catch: the loss falls by far more than it over the run, so a bf16 run that trained differently
(a wrong dtype in an update, an lr applied to bf16-rounded weights) leaves it; a bf16 path that
silently ran in fp32 is caught apart from the tolerance (bf16 activations are observed, and the
losses must differ from fp32's); and fp32 master weights are observed directly: the RMSNorm
weights start at 1.0, where half of bf16's spacing (2^-8) exceeds the updates an lr of 3e-3
makes, so bf16-stored weights would stay at 1.0 exactly, while fp32 master weights end at values bf16
cannot hold."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.test_post_train_distributed import run, script  # noqa: F401 (script: a fixture)
from tests.train_support import final_weights, kept_thread_count, prepared_world
from vlmkit.config import Stage, load_config
from vlmkit.errors import ConfigError
from vlmkit.models.config import LLMConfig
from vlmkit.models.llm import LLM, RMSNorm
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.loop import Trainer
from vlmkit.train.precision import fsdp_policy, forward_precision, sharded_precision

TOLERANCE = 0.01
"""Absolute, on a step's loss: bf16 against fp32 (module docstring), and the sharded bf16 run
against the single-process one (the same data; they differ where FSDP holds the parameters of
elementwise ops, norms' weights and biases, in bf16, which one process keeps in fp32)."""
MIN_FALL = 0.3
"""The fp32 run's loss falls by at least this much between its first step and its best one."""
LR = 3.0e-3
RUN = ["progress=false", "tensorboard=false", "num_threads=1", "stages.0.steps=2", "stages.1.steps=8",
       "stages.1.grad_accum=1", "stages.0.save_every=0", "stages.1.save_every=4", "stages.0.keep_last=10",
       "stages.1.keep_last=10", *(f"stages.1.{m}_lr={LR}" for m in ("vision", "adapter", "llm"))]
BF16 = ["stages.0.precision=bf16", "stages.1.precision=bf16"]
INSIDE_STAGE = 6
"""The global step of the checkpoint inside the second stage (its optimizer state is saved)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if not r.get("eval")]


def observed_run(world: Path, out: Path, *settings: str) -> dict[str, set[torch.dtype]]:
    """A run in this process; returns the dtypes its hooks saw: each decoder block's output (the
    residual stream), the final norm's output, the attention's q, and the trained parameters."""
    seen: dict[str, set[torch.dtype]] = {"residual": set(), "final_norm": set(), "query": set(), "params": set()}
    with kept_thread_count():
        trainer = Trainer(load_config("tiny", [f"world.dir={world}", *RUN, *settings]), out)
        llm = trainer.model.llm
        for block in llm.layers:
            block.register_forward_hook(lambda m, args, out: seen["residual"].add(out[0].dtype))
        llm.norm.register_forward_hook(lambda m, args, out: seen["final_norm"].add(out.dtype))
        llm.layers[0].attn.q_proj.register_forward_hook(lambda m, args, out: seen["query"].add(out.dtype))
        trainer.run()
    seen["params"] = {p.dtype for p in trainer.model.parameters()}
    return seen


@pytest.fixture(scope="module")
def single(world, tmp_path_factory) -> dict[str, tuple[Path, dict[str, set[torch.dtype]]]]:
    """precision -> (the one-process run's directory, the dtypes it saw)."""
    runs = {}
    for precision, settings in (("fp32", []), ("bf16", BF16)):
        out = tmp_path_factory.mktemp(precision)
        runs[precision] = out, observed_run(world, out, *settings)
    return runs


def test_bf16_loss_tracks_fp32_at_every_step(single):
    fp32, bf16 = losses(single["fp32"][0]), losses(single["bf16"][0])
    assert len(fp32) == len(bf16) == 10
    assert fp32[0] - min(fp32) > MIN_FALL, fp32  # the run trains: the tolerance is small against it
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < TOLERANCE, (fp32, bf16)
    assert fp32 != bf16  # bf16 changed the arithmetic


def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights(single):
    fp32_seen, bf16_seen = single["fp32"][1], single["bf16"][1]
    assert all(dtypes == {torch.float32} for dtypes in fp32_seen.values()), fp32_seen
    assert bf16_seen["residual"] == bf16_seen["final_norm"] == bf16_seen["query"] == {torch.bfloat16}, bf16_seen
    assert bf16_seen["params"] == {torch.float32}
    norm = final_weights(single["bf16"][0])["llm.layers.0.attn_norm.weight"]
    moved = norm != 1.0
    assert moved.any()
    # updates smaller than bf16's spacing at 1.0 accumulated: the master weights are not bf16
    assert (norm[moved] != norm[moved].bfloat16().float()).any()


# --- FSDP2 on gloo, 2 processes ---------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_bf16_tracks_one_process_and_keeps_fp32_shards(script, world, single, tmp_path):  # noqa: F811
    """Every rank reads the data one process reads (tests/test_post_train_distributed.py's
    same-data mode), so a 2-process step is the 1-process step up to the precision FSDP holds
    parameters in (TOLERANCE)."""
    out = tmp_path / "sharded"
    run(script, "tiny", out, f"world.dir={world}", *RUN, *BF16, processes=2, mode="same-data")
    sharded, one, fp32 = losses(out), losses(single["bf16"][0]), losses(single["fp32"][0])
    assert len(sharded) == len(one) == 10
    assert max(abs(a - b) for a, b in zip(sharded, one)) < TOLERANCE, (sharded, one)
    # the sharded run computed in bf16: in fp32, 2 processes on the same data log fp32's losses to 1e-5
    assert max(abs(a - b) / b for a, b in zip(sharded, fp32)) > 1e-5, (sharded, fp32)

    inside = next(p for p in list_checkpoints(out) if p.name == f"step-{INSIDE_STAGE:08d}")
    saved = dcp.FileSystemReader(str(inside / "dcp")).read_metadata().state_dict_metadata
    weights = {k: v.properties.dtype for k, v in saved.items() if k.startswith("model.")}
    optim = {k: v.properties.dtype for k, v in saved.items() if k.startswith("optim.state.") and k.endswith("exp_avg")}
    assert weights and optim
    assert set(weights.values()) == set(optim.values()) == {torch.float32}, (weights, optim)


# --- the pieces ------------------------------------------------------------------------------------

def test_a_sharded_run_takes_one_precision():
    assert sharded_precision([Stage(name="a", precision="bf16"), Stage(name="b", precision="bf16")]) == "bf16"
    assert sharded_precision([Stage(name="a")]) == "fp32"
    with pytest.raises(ConfigError, match="one precision.*'a': fp32, 'b': bf16"):
        sharded_precision([Stage(name="a"), Stage(name="b", precision="bf16")])


def test_fsdp_policy_gathers_bf16_and_reduces_fp32():
    block, root = fsdp_policy("bf16", root=False), fsdp_policy("bf16", root=True)
    assert block.param_dtype == root.param_dtype == torch.bfloat16
    assert block.reduce_dtype == root.reduce_dtype == torch.float32
    assert root.cast_forward_inputs and not block.cast_forward_inputs  # RoPE tables reach blocks in fp32
    fp32 = fsdp_policy("fp32", root=True)
    assert fp32.param_dtype is None and fp32.reduce_dtype is None


def test_forward_precision_is_autocast_for_bf16_only():
    cpu = torch.device("cpu")
    with forward_precision("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with forward_precision("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")


def test_rmsnorm_keeps_a_bf16_input_bf16_with_an_fp32_weight():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(5, 64) * 30
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # statistics in fp32: two bf16 roundings (the normalised input, the output) from the fp32 result
    torch.testing.assert_close(out.float(), norm(x.bfloat16().float()), rtol=2 ** -7, atol=0)


def test_decoder_under_bf16_autocast_runs_a_bf16_residual_with_fp32_rope():
    torch.manual_seed(0)
    llm = LLM(LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    ids = torch.randint(0, 64, (2, 9))
    seen = []
    llm.layers[1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype)))
    with torch.no_grad():
        reference = llm.decode(llm.embed(ids))
        with forward_precision("bf16", torch.device("cpu")):
            mixed = llm.decode(llm.embed(ids))
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]  # (residual, cos)
    assert mixed.dtype == torch.bfloat16 and reference.dtype == torch.float32
    torch.testing.assert_close(mixed.float(), reference, atol=0.1, rtol=0.05)
