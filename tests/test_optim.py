"""`optimizer: muon` (train/optim.py): Muon over the linear layers' weights, AdamW over the rest.

Its Muon groups step bit for bit as PyTorch's `torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`
when the Newton-Schulz iterations run in PyTorch's bf16, its AdamW groups as `torch.optim.AdamW`;
a sharded matrix (FSDP2's DTensor, 2 gloo processes) steps as the whole one; a run stopped inside
a Muon stage resumes bit for bit; which parameters Muon takes; the config's refusals."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.serving_support import free_port
from tests.train_support import (
    Stopped,
    assert_same_weights,
    final_weights,
    kept_thread_count,
    prepared_world,
    stop_after,
)
from vlmkit.config import load_config
from vlmkit.errors import ConfigError
from vlmkit.models.config import LLMConfig, VisionConfig, VLMConfig
from vlmkit.models.vlm import VLMModel
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.loop import train
from vlmkit.train.optim import MuonAdamW, muon_parameters, newton_schulz
from vlmkit.train.stages import apply_freezing, build_optimizer


def trained(make_optimizer, steps: int = 5) -> list[torch.Tensor]:
    """The weights of a small MLP after `steps` steps of the optimizer `make_optimizer(net)` builds."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    optimizer = make_optimizer(net)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        net.zero_grad()
        net(torch.randn(32, 8, generator=data)).pow(2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def matrices(net: nn.Sequential) -> list[nn.Parameter]:
    return [net[0].weight, net[2].weight]


def test_muon_groups_step_as_pytorchs_muon():
    ours = trained(lambda net: MuonAdamW([{"params": matrices(net), "muon": True, "lr": 0.01, "weight_decay": 0.1}],
                                         ns_dtype=torch.bfloat16))
    reference = trained(lambda net: torch.optim.Muon(matrices(net), lr=0.01, weight_decay=0.1,
                                                     adjust_lr_fn="match_rms_adamw"))
    untouched = trained(lambda net: torch.optim.SGD(matrices(net), lr=0.0))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert not torch.equal(ours[0], untouched[0])


def test_adamw_groups_step_as_pytorchs_adamw():
    ours = trained(lambda net: MuonAdamW([{"params": list(net.parameters()), "lr": 0.01, "weight_decay": 0.1}],
                                         betas=(0.8, 0.9), eps=1e-6))
    reference = trained(lambda net: torch.optim.AdamW(net.parameters(), lr=0.01, betas=(0.8, 0.9), eps=1e-6,
                                                      weight_decay=0.1, foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_orthogonalises(shape):
    """Singular values spread over two orders of magnitude (a gradient's few dominant directions)
    all end near 1, and the singular vectors stay: the result is the polar factor's kind."""
    generator = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator))
    matrix = u @ torch.diag(torch.logspace(0, 2, k)) @ v.T
    orthogonal = newton_schulz(matrix)
    singular = torch.linalg.svdvals(orthogonal)
    # Jordan et al.'s coefficients trade exactness for speed: near 1, not at 1
    assert singular.min() > 0.5 and singular.max() < 1.3, singular
    aligned = u.T @ orthogonal @ v  # diagonal when the singular vectors are kept
    off_diagonal = aligned - torch.diag(torch.diagonal(aligned))
    assert off_diagonal.abs().max() < 1e-4


def test_a_muon_group_holds_matrices_only():
    with pytest.raises(ValueError, match="matrices only"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}])


def small_vlm(tie_embeddings: bool) -> VLMModel:
    return VLMModel(VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2),
        llm=LLMConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      tie_embeddings=tie_embeddings),
        image_token_id=3))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_muon_takes_the_linear_layers_and_leaves_embeddings_head_norms_and_convolutions(tie_embeddings):
    model = small_vlm(tie_embeddings)
    names = {n for n, p in model.named_parameters() if id(p) in muon_parameters(model)}
    assert {"llm.layers.0.attn.q_proj.weight", "llm.layers.0.mlp.down_proj.weight", "adapter.mlp.linear_1.weight",
            "vision.layers.0.self_attn.q_proj.weight", "vision.layers.0.mlp.fc1.weight"} <= names
    assert not any("embed" in n or "norm" in n or "lm_head" in n or n.endswith(".bias") for n in names), names
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert names == linear_weights - {"llm.lm_head.weight"}
    assert ("llm.lm_head.weight" in dict(model.named_parameters())) != tie_embeddings


def test_a_muon_stage_splits_each_group_into_muon_and_adamw_parts():
    model = small_vlm(tie_embeddings=True)
    stage = load_config("tiny", ["stages.1.optimizer=muon", "stages.1.vision_lr=1e-4",
                                 "stages.1.muon_lr_scale=3"]).stages[1]
    apply_freezing(model, stage)
    optimizer = build_optimizer(model, stage)
    assert isinstance(optimizer, MuonAdamW)
    hidden = muon_parameters(model)
    for group in optimizer.param_groups:
        assert all((id(p) in hidden) == group["muon"] for p in group["params"]), group["name"]
        assert group["lr"] == stage.lr_of(group["name"].split(".")[0]) * (3.0 if group["muon"] else 1.0)
    assert {g["name"] for g in optimizer.param_groups} >= {"llm.decay.muon", "llm.decay", "llm.no_decay",
                                                          "adapter.decay.muon", "vision.decay.muon"}
    adamw_stage = load_config("tiny").stages[1]
    assert type(build_optimizer(model, adamw_stage)) is torch.optim.AdamW


def test_optimizer_state_round_trips_through_the_checkpoint_files_bitwise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    groups = lambda: [{"params": [net[0].weight, net[1].weight], "muon": True},
                      {"params": [net[0].bias, net[1].bias]}]
    optimizer = MuonAdamW(groups(), lr=1e-2)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors, rest = ckpt.flatten_optimizer(optimizer.state_dict())
    restored = MuonAdamW(groups(), lr=5.0)
    restored.load_state_dict(ckpt.unflatten_optimizer(tensors, json.loads(json.dumps(rest))))
    a, b = optimizer.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert {key for entries in a["state"].values() for key in entries} == {"momentum_buffer", "step", "exp_avg",
                                                                          "exp_avg_sq"}
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])


def test_config_refuses_muon_with_lora_and_a_momentum_out_of_range():
    with pytest.raises(ConfigError, match="LoRA"):
        load_config("tiny", ["stages.1.optimizer=muon", "stages.1.lora={rank: 4}"])
    with pytest.raises(ConfigError, match="muon_momentum"):
        load_config("tiny", ["stages.1.muon_momentum=1.0"])
    with pytest.raises(ConfigError, match="muon_lr_scale"):
        load_config("tiny", ["stages.1.muon_lr_scale=0"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_config("tiny", ["stages.1.optimizer=sgd"])


# ---------------------------------------------------------------------------------------------
# A sharded matrix (FSDP2's DTensor) steps as the whole one
# ---------------------------------------------------------------------------------------------

def _sharded_steps(rank: int, port: int, result: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        param = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        optimizer = MuonAdamW([{"params": [param], "muon": True, "lr": 0.1, "weight_decay": 0.1}])
        for step in range(3):
            grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + step))
            param.grad = distribute_tensor(grad, mesh, [Shard(0)])
            optimizer.step()
        result[rank] = param.detach().full_tensor().clone()
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_matrix_steps_as_the_whole_matrix():
    result = mp.Manager().dict()
    mp.spawn(_sharded_steps, args=(free_port(), result), nprocs=2)
    param = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    optimizer = MuonAdamW([{"params": [param], "muon": True, "lr": 0.1, "weight_decay": 0.1}])
    for step in range(3):
        param.grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + step))
        optimizer.step()
    for rank in (0, 1):
        torch.testing.assert_close(result[rank], param.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Exact resume inside a Muon stage
# ---------------------------------------------------------------------------------------------

MUON_RUN = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=2", "stages.1.steps=4",
            "stages.1.save_every=2", "stages.0.optimizer=muon", "stages.1.optimizer=muon"]


@pytest.mark.slow
def test_a_run_stopped_inside_a_muon_stage_resumes_bitwise(tmp_path, monkeypatch):
    world = prepared_world(tmp_path / "world")
    config = lambda: load_config("tiny", [f"world.dir={world}", *MUON_RUN])
    with kept_thread_count():
        train(config(), tmp_path / "reference")
        stop_after(monkeypatch, 5)  # inside sft, after its checkpoint at global step 4, one step past it
        with pytest.raises(Stopped):
            train(config(), tmp_path / "stopped")
        monkeypatch.undo()
        train(config(), tmp_path / "stopped", resume=True)
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(tmp_path / "stopped"))
    adamw = load_config("tiny", [f"world.dir={world}", *MUON_RUN[:-2]])
    with kept_thread_count():
        train(adamw, tmp_path / "adamw")
    key = "llm.layers.0.mlp.up_proj.weight"
    assert not torch.equal(final_weights(tmp_path / "adamw")[key], final_weights(tmp_path / "reference")[key])
