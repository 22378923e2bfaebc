"""Replay in an sft stage (config.ReplaySettings): every step also backpropagates packs of the
replayed sources, in packs of their own token budget, and the replay cursor resumes bitwise."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_support import Stopped, assert_same_weights, final_weights, kept_thread_count, prepared_world, stop_after
from vlmkit.config import find_config, load_config
from vlmkit.errors import ConfigError
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.loop import train

REPLAY = {"mixture": {"text": 1.0}, "weight": 0.5, "token_budget": 256}
"""Language packs of 256 tokens beside each step's QA pack of 1,024."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(autouse=True)
def one_thread():
    with kept_thread_count():
        yield


def sft_with_replay(world: Path, **stage):
    """tiny.yaml with one sft stage on its QA alone, with `stage` fields set."""
    raw = yaml.safe_load(find_config("tiny").read_text())
    raw.update(num_threads=1, progress=False, tensorboard=False)
    raw["world"]["dir"] = str(world)
    raw["stages"] = [{"name": "sft", "llm_lr": 1e-3, "adapter_lr": 1e-3, "mixture": {"qa": 1.0}, "steps": 4,
                      "token_budget": 1024, "warmup_steps": 1, "save_every": 1, "keep_last": 8, **stage}]
    return load_config(raw)


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "modality" in r]


def test_sft_replay_adds_its_loss_in_its_own_packs_and_resumes_bitwise(world, monkeypatch, tmp_path):
    train(sft_with_replay(world, replay=REPLAY), tmp_path / "reference")
    records = step_records(tmp_path / "reference")
    assert len(records) == 4
    for r in records:
        # the step's loss is its own QA loss plus half the language loss of the replayed pack
        assert r["loss"] == pytest.approx(r["objective_loss"] + 0.5 * r["replay_loss"], rel=1e-6)
        assert 1.0 < r["replay_loss"] < 10.0  # a fresh model on prose: about log(vocab)
        assert 0 < r["replay_tokens"] <= REPLAY["token_budget"] < r["tokens"] - r["replay_tokens"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_seconds"])
    # the replayed packs' gradients reach the weights
    train(sft_with_replay(world), tmp_path / "without")
    a, b = final_weights(tmp_path / "reference"), final_weights(tmp_path / "without")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # stopped inside the stage: the replay cursor is in the checkpoint and the run resumes bitwise
    stop_after(monkeypatch, 2)
    with pytest.raises(Stopped):
        train(sft_with_replay(world, replay=REPLAY), tmp_path / "stopped")
    monkeypatch.undo()
    cursor = json.loads((list_checkpoints(tmp_path / "stopped")[-1] / "trainer.json").read_text())
    assert "sources" in cursor["data"]["0"]["replay"]
    train(sft_with_replay(world, replay=REPLAY), tmp_path / "stopped", resume=True)
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(tmp_path / "stopped"))


def test_replay_token_budget_must_be_positive(world):
    with pytest.raises(ConfigError, match="token_budget"):
        sft_with_replay(world, replay={**REPLAY, "token_budget": 0})
