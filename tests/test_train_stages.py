"""Stage policy and checkpoint pieces: stage seeds, lr schedules, optimizer state round trip, atomic dirs."""

import json
import random

import numpy as np
import pytest
import torch

from vlmkit.config import Stage, load_config
from vlmkit.errors import ConfigError
from vlmkit.train import checkpoint as ckpt
from vlmkit.train.stages import lr_factor, stage_seed


def stage(**kw) -> Stage:
    return Stage(**{"adapter_lr": 1e-3, "steps": 100, **kw})


def test_stages_sharing_a_seed_setting_get_their_own_seeds():
    cfg = load_config("tiny", ["stages.0.seed=3", "stages.1.seed=3"])
    assert stage_seed(cfg, 0) != stage_seed(cfg, 1)
    other = load_config("tiny", ["stages.0.seed=4", "stages.1.seed=3"])
    assert stage_seed(other, 0) != stage_seed(cfg, 0) and stage_seed(other, 1) == stage_seed(cfg, 1)


def test_warmup_then_cosine_to_min():
    s = stage(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(s, 0) == pytest.approx(0.1)
    assert lr_factor(s, 9) == pytest.approx(1.0)
    assert lr_factor(s, 10) == pytest.approx(1.0)
    assert lr_factor(s, 55) == pytest.approx(0.55)
    assert lr_factor(s, 100) == pytest.approx(0.1)
    factors = [lr_factor(s, i) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_constant_and_step_schedules():
    assert lr_factor(stage(schedule="constant"), 77) == 1.0
    s = stage(schedule="step", step_every=30, step_gamma=0.5)
    assert [lr_factor(s, i) for i in (0, 29, 30, 60, 99)] == [1.0, 1.0, 0.5, 0.25, 0.125]


def test_optimizer_state_round_trips_bitwise():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.9), foreach=False)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, rest = ckpt.flatten_optimizer(opt.state_dict())
    rest = json.loads(json.dumps(rest))  # what the file holds
    opt2 = torch.optim.AdamW(net.parameters(), lr=5.0, foreach=False)
    opt2.load_state_dict(ckpt.unflatten_optimizer(tensors, rest))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])


def test_rng_state_round_trips():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    js, ts = ckpt.rng_state()
    js = json.loads(json.dumps(js))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(js, ts)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_checkpoint_dirs_are_atomic_and_pruned(tmp_path):
    net = torch.nn.Linear(3, 3)
    for step in (1, 2, 3):
        state = ckpt.TrainerState(stage=0, step=step, global_step=step, data={"0": {"pos": step}})
        ckpt.save_single(tmp_path, state, net, None, keep_last=2)
    (ckpt.checkpoint_root(tmp_path) / ".tmp-halfwritten").mkdir()  # what a kill mid-save leaves
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.read_trainer_state(latest).data == {"0": {"pos": 3}}
    ckpt.clean_temporaries(tmp_path)
    assert not any(p.name.startswith(".tmp") for p in ckpt.checkpoint_root(tmp_path).iterdir())
    net2 = torch.nn.Linear(3, 3)
    ckpt.load_model_weights(latest, net2)
    assert torch.equal(net.weight, net2.weight)


def test_one_process_stages_are_refused_before_a_sharded_run_starts():
    from vlmkit.train.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # the check reads the config only
    trainer.cfg = load_config("contrastive")
    with pytest.raises(ConfigError, match="contrastive stages run in one process"):
        trainer._check_distributable()
    # LoRA, grpo and dpo stages (any reference) run under torchrun (tests/test_post_train_distributed.py)
    for overrides in (["stages.1.kind=grpo"], ["stages.1.lora={rank: 4}"], ["stages.1.kind=dpo"],
                      ["stages.1.kind=dpo", "stages.1.dpo={reference: precomputed}"]):
        trainer.cfg = load_config("tiny", overrides)
        trainer._check_distributable()
