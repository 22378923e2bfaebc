"""The imported and native-resolution families under torchrun + FSDP2 on gloo, 2 CPU processes: a
native-resolution model (configs/native.yaml on a tiny native world, images and clips), the
DeepSeek-VL hybrid (SigLIP + SAM branches) and LLaVA-OneVision (any-resolution tiles), the last two
as tiny transformers directories trained as `model.pretrained`.

Every stage that trains the tower trains all of it, so the blocks `shard_model` shards in each
tower (both branches of the hybrid) get gradients. With every rank reading the data one process
reads (tests/test_post_train_distributed.py's same-data mode: a 2-process step is the 1-process
step), the 2-process run logs the 1-process run's losses and gradient norms and ends with its
weights, and a 2-process run stopped after a checkpoint resumes under torchrun to the uninterrupted
2-process run's weights bit for bit.

The runs do not clip gradients: a clipped step scales every gradient by max_norm / norm, and the
norm FSDP sums over shards differs from one process's in its last bits, which Adam's update
(divided by each gradient's own scale) makes up to 3e-6 of a weight where a gradient is near 0,
over the tolerance. The key projections' biases are not compared (`comparable`)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_deepseek_vl import _save as save_deepseek_vl
from tests.test_families_end_to_end import data  # noqa: F401 (a fixture: images and LLaVA JSON rows)
from tests.test_onevision import saved as onevision_saved  # noqa: F401 (a fixture: the OneVision directory)
from tests.test_post_train_distributed import TOLERANCE, run, script, stopped_at  # noqa: F401 (script: a fixture)
from tests.train_support import assert_same_weights, final_weights, prepared_world
from vlmkit.api import VLM
from vlmkit.models.compile import block_lists

pytestmark = pytest.mark.slow

FAMILIES = ["native", "deepseek_vl_hybrid", "onevision"]

NATIVE_WORLD = ["world.n_train=24", "world.n_test=4", "world.n_train_clips=8", "world.n_test_clips=2",
                "world.vocab_size=400"]
# configs/native.yaml shortened: language, align and joint one step each (checkpoints at global steps
# 1-3), then sft for 3 steps training the whole tower too, with a checkpoint inside it (5) and at its
# end (6); no clipping (module docstring).
NATIVE_RUN = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=1", "stages.1.steps=1",
              "stages.2.steps=1", "stages.3.steps=3", "stages.3.save_every=2", "stages.3.vision_lr=1.0e-3",
              *(f"stages.{i}.{key}" for i in range(4) for key in ("token_budget=512", "keep_last=10", "grad_clip=0"))]
NATIVE_TOWER_START = 3
"""The native run's global step before the tower first trains (the end of joint)."""

FAMILY_STEPS, SAVE_EVERY = 4, 2
"""The directories' runs: one stage of 4 steps training tower, adapter and LLM, a checkpoint at 2."""
NORM_TOLERANCE = 1e-5
"""Relative: a loss or gradient norm of 2 processes against 1 (summed over shards in another order)."""
KEY_BIAS, FUSED_QKV_BIAS = "k_proj.bias", "qkv.bias"
STOPPED_AFTER = {"native": 5, "deepseek_vl_hybrid": SAVE_EVERY, "onevision": SAVE_EVERY}
"""The checkpoint each resumed run starts from: inside the stage that trains the tower."""


@pytest.fixture(scope="module")
def native_world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("native-world"), "native", NATIVE_WORLD)


@pytest.fixture(scope="module")
def directories(onevision_saved, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 (the imported fixture)
    """family -> its tiny transformers directory."""
    hybrid = tmp_path_factory.mktemp("deepseek_vl_hybrid")
    save_deepseek_vl(hybrid, "deepseek_vl_hybrid")
    return {"deepseek_vl_hybrid": hybrid, "onevision": onevision_saved[1]}


def directory_config(hf_dir: Path, data_dir: Path, out: Path) -> Path:
    """tests/test_families_end_to_end.py's run, its stage training the vision tower too, unclipped
    (module docstring)."""
    config = {"model": {"pretrained": str(hf_dir)},
              "data": {"qa": {"path": str(data_dir / "qa.json"), "format": "llava", "kind": "chat"}},
              "stages": [{"name": "sft", "vision_lr": 1e-3, "adapter_lr": 1e-3, "llm_lr": 1e-3, "steps": FAMILY_STEPS,
                          "save_every": SAVE_EVERY, "keep_last": 10, "token_budget": 512, "grad_clip": 0}],
              "num_threads": 1, "progress": False, "tensorboard": False}
    out.write_text(yaml.safe_dump(config))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def launch(family, native_world, directories, data, tmp_path_factory) -> tuple[str | Path, list[str]]:  # noqa: F811
    """(config, settings) of the family's run."""
    if family == "native":
        return "native", [*NATIVE_WORLD, f"world.dir={native_world}", *NATIVE_RUN]
    return directory_config(directories[family], data, tmp_path_factory.mktemp("config") / "run.yaml"), []


@pytest.fixture(scope="module")
def runs(script, launch, tmp_path_factory) -> dict[int, Path]:  # noqa: F811
    """The family's run in 1 and in 2 processes, every rank reading the whole data."""
    config, settings = launch
    out = {}
    for processes in (1, 2):
        out[processes] = tmp_path_factory.mktemp(f"run-{processes}")
        run(script, config, out[processes], *settings, processes=processes, mode="same-data")
    return out


def start_weights(family: str, directories: dict[str, Path], runs: dict[int, Path]) -> dict[str, torch.Tensor]:
    """The weights before the tower first trains: the directory's, or the native run's at the end of
    the stage before (the 1-process run's checkpoint)."""
    if family == "native":
        return load_file(str(runs[1] / "checkpoints" / f"step-{NATIVE_TOWER_START:08d}" / "model.safetensors"))
    return VLM.load(directories[family]).state_dict()


def tower_block_lists(model: VLM) -> dict[str, list[str]]:
    """Each stack of vision blocks `shard_model` shards -> its parameters' names."""
    names = {id(module): name for name, module in model.named_modules()}
    stacks = {names[id(blocks)]: blocks for blocks in block_lists(model)}
    return {name: [f"{name}.{p}" for p, _ in blocks.named_parameters()]
            for name, blocks in stacks.items() if name.startswith("vision.")}


def test_every_tower_block_is_sharded_and_trained(family, directories, runs):
    model = VLM.from_pretrained(runs[2] / "final")
    stacks = tower_block_lists(model)
    expected = {"native": {"vision.blocks"}, "onevision": {"vision.layers"},
                "deepseek_vl_hybrid": {"vision.low_res.layers", "vision.high_res.layers"}}[family]
    assert set(stacks) == expected
    before, after = start_weights(family, directories, runs), final_weights(runs[2])
    for stack, names in stacks.items():
        assert any(not torch.equal(before[n], after[n]) for n in names), f"{stack} did not train"
    assert any((runs[2] / "checkpoints").glob("step-*/dcp"))


def steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")]


def comparable(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without the key projections' biases (of a fused qkv bias, its middle third).
    Their gradient is 0 in exact arithmetic (a bias added to every key moves all of a query's
    logits by one constant, which softmax ignores), so rounding alone, and Adam, dividing by its
    scale, turns rounding that differs into steps of the learning rate's size. It differs in the
    hybrid's SAM branch: the gradient of the block output it keeps for the combiner is a sum over
    several paths (the combiner's, the next block's residual and norm), which FSDP's hook on the
    next block's input adds in another order than one process does; the gradients of that block
    and those below it differ by up to 3.5e-7 relative, all others are equal."""
    kept = {}
    for name, tensor in weights.items():
        if name.endswith(FUSED_QKV_BIAS):
            q, _, v = tensor.chunk(3)
            kept[name] = torch.cat([q, v])
        elif not name.endswith(KEY_BIAS):
            kept[name] = tensor
    return kept


def test_two_processes_train_like_one_process(runs):
    logged = steps(runs[1]), steps(runs[2])
    assert [r["global_step"] for r in logged[1]] == [r["global_step"] for r in logged[0]]
    for a, b in zip(*logged):
        assert b["loss"] == pytest.approx(a["loss"], rel=NORM_TOLERANCE)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=NORM_TOLERANCE)
    assert final_weights(runs[1]).keys() == final_weights(runs[2]).keys()
    one, two = comparable(final_weights(runs[1])), comparable(final_weights(runs[2]))
    for name in one:
        torch.testing.assert_close(two[name], one[name], **TOLERANCE, msg=name)


def test_a_sharded_run_resumes_bitwise(script, family, launch, runs, tmp_path):  # noqa: F811
    config, settings = launch
    out = stopped_at(runs[2], STOPPED_AFTER[family], tmp_path / "resumed")
    run(script, config, out, *settings, mode="same-data", resume=True)
    assert_same_weights(final_weights(runs[2]), final_weights(out))
