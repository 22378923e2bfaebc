"""train/data.py: a stage's data from the run config. The order follows the stage's seed
(`stage_seed`: stages that share a seed setting still differ), a cursor taken mid-stage resumes
the same batches, and eval packs are the same at every eval point."""

import json

import pytest

from vlmkit.config import load_config
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.train.data import StageData, eval_batches

DOCS = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(60)]
STAGE = "{llm_lr: 1.0e-3, adapter_lr: 0, steps: 1, token_budget: 64, seed: 0}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "t.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "run.yaml").write_text(f"data:\n  t: {{path: t.jsonl, kind: text}}\nstages:\n  - {STAGE}\n  - {STAGE}\n")
    return load_config(root / "run.yaml"), Tokenizer.train(DOCS, vocab_size=300)


def sample_ids(data: StageData, steps: int) -> list[list[str]]:
    return [data.next_batch(data.modality(step)).sample_ids for step in range(steps)]


def test_a_cursor_resumes_the_same_batches(run):
    cfg, tok = run
    data = StageData(cfg, 0, tok, None, 9)
    sample_ids(data, 3)
    cursor = json.loads(json.dumps(data.state_dict()))  # what a checkpoint stores
    expected = sample_ids(data, 5)
    resumed = StageData(cfg, 0, tok, None, 9)
    resumed.load_state_dict(cursor)
    assert sample_ids(resumed, 5) == expected


def test_each_stage_draws_its_own_order(run):
    cfg, tok = run
    first = sample_ids(StageData(cfg, 0, tok, None, 9), 4)
    assert sample_ids(StageData(cfg, 0, tok, None, 9), 4) == first
    assert sample_ids(StageData(cfg, 1, tok, None, 9), 4) != first


def test_eval_packs_are_the_same_at_every_eval_point(run):
    cfg, tok = run
    packs = eval_batches(cfg, "t", tok, None, 9, 64)
    ids = [pack.sample_ids for pack in packs]
    assert len(packs) == cfg.eval_batches and len({i for pack in ids for i in pack}) == sum(map(len, ids))
    assert [pack.sample_ids for pack in eval_batches(cfg, "t", tok, None, 9, 64)] == ids
