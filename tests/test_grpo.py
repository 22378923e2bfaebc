"""GRPO: advantages, the clipped token-level loss and the KL estimator against plain reference
computations; the engine's log-probs equal the training forward's; a grpo stage on a small world
trains, logs, drops and refills groups, counts bad input instead of crashing, and resumes bitwise
after a stop at any step (inside a rollout reused by several updates too)."""

import json
import math
import random

import pytest
import torch

from tests.test_engine import IMAGE, tiny_config
from tests.train_support import Stopped, assert_same_weights, final_weights, kept_thread_count, stop_after
from vlmkit.api import VLM
from vlmkit.config import load_config
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.packing import collate
from vlmkit.data.prompt import Prompt
from vlmkit.data.types import Sample
from vlmkit.data.world import WorldSpec, prepare_world
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams
from vlmkit.train.grpo import clipped_policy_loss, group_advantages, kl_estimate, runs_within, sample_seed
from vlmkit.train.loop import Trainer, train
from vlmkit.train.rewards import CHECKERS

LOGPROB_TOLERANCE = 1e-5
"""Engine and training forward compute the same float32 log-probs up to summation order."""


# ---------------------------------------------------------------------------------------------
# The loss against plain reference computations
# ---------------------------------------------------------------------------------------------


def test_group_advantages_match_a_reference():
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 0.5, 1.0]) for _ in range(6)] for _ in range(5)] + [[1.0] * 6]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64))
    for row, out in zip(rewards, got.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        assert out == pytest.approx([(r - mean) / (std + 1e-6) for r in row], abs=1e-9)
    assert got[-1].abs().max() == 0  # equal rewards: no signal
    assert group_advantages(torch.tensor([[3.0]])).item() == 0  # a group of one


def reference_token_loss(logp, old, adv, reply, clip_low, clip_high, kl_coef=0.0, ref=None):
    """The DAPO loss, token by token: the sum over reply tokens of every sample / their count."""
    total, tokens, clipped = 0.0, 0, 0
    for t in range(len(logp)):
        if not reply[t]:
            continue
        ratio = math.exp(logp[t] - old[t])
        bounded = min(max(ratio, 1 - clip_low), 1 + clip_high)
        term = -min(ratio * adv[t], bounded * adv[t])
        clipped += bounded * adv[t] < ratio * adv[t]
        if ref is not None:
            r = ref[t] - logp[t]
            term += kl_coef * (math.exp(r) - r - 1)
        total += term
        tokens += 1
    return total / tokens, clipped / tokens


def test_clipped_loss_and_token_level_average_match_a_reference():
    g = torch.Generator().manual_seed(0)
    T = 200
    old = -torch.rand(T, generator=g, dtype=torch.float64) * 4
    logp = (old + torch.randn(T, generator=g, dtype=torch.float64) * 0.4).clamp(max=0).requires_grad_(True)
    ref = -torch.rand(T, generator=g, dtype=torch.float64) * 4
    # replies of different lengths in one pack: token-level, not per-sample, averaging
    adv = torch.zeros(T, dtype=torch.float64)
    reply = torch.zeros(T, dtype=torch.float64)
    for start, end, a in ((3, 10, 1.3), (12, 80, -0.7), (90, 95, 0.4), (100, 190, -1.1)):
        reply[start:end], adv[start:end] = 1, a
    loss_t, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    kl_t = kl_estimate(logp, ref)
    n = reply.sum()
    loss = ((loss_t + 0.05 * kl_t) * reply).sum() / n
    expected, expected_clip = reference_token_loss(logp.tolist(), old.tolist(), adv.tolist(), reply.tolist(), 0.2,
                                                   0.28, 0.05, ref.tolist())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert float((clipped.double() * reply).sum() / n) == pytest.approx(expected_clip)
    assert 0 < expected_clip < 1  # both sides of the clip occur
    # a clipped token gets no policy gradient
    (loss_t * reply).sum().backward()
    assert logp.grad[clipped & reply.bool()].abs().max() == 0
    assert logp.grad[~clipped & reply.bool() & (adv != 0)].abs().min() > 0


def test_clip_higher_is_asymmetric():
    ratio = torch.tensor([1.25, 1.30, 0.79, 0.81, 0.70])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    loss, clipped = clipped_policy_loss(ratio.log(), torch.zeros(5), adv, 0.2, 0.28)
    # raising a good token's probability is clipped at 1.28, lowering a bad one's at 0.8; a good
    # token whose probability fell is never clipped
    assert clipped.tolist() == [False, True, True, False, False]
    assert loss.tolist() == pytest.approx([-1.25, -1.28, 0.8, 0.81, -0.70])


def test_kl_estimate_is_k3():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -3.0])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert kl_estimate(logp, ref).tolist() == pytest.approx(expected)
    assert kl_estimate(logp, ref)[0] == 0 and (kl_estimate(logp, ref) >= 0).all()


def test_packs_keep_order_within_the_budget():
    assert runs_within([3, 4, 2, 9, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert runs_within([], 8) == []


def test_sample_seeds_are_distinct_per_prompt_and_sample():
    seeds = {sample_seed(s, d, k) for s in (0, 1) for d in range(20) for k in range(8)}
    assert len(seeds) == 2 * 20 * 8 and all(0 <= x < 2**63 for x in seeds)


# ---------------------------------------------------------------------------------------------
# Engine log-probs == training log-probs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return VLM(tiny_config()).eval()


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.9, repetition_penalty=1.2),
    dict(temperature=0.0),
])
def test_engine_logprobs_equal_training_logprobs(vlm, params):
    g = torch.Generator().manual_seed(1)
    per_image = vlm.config.tokens_per_image
    prompts = [Prompt(torch.randint(0, 256, (7,), generator=g).tolist()),
               Prompt([IMAGE] * per_image + torch.randint(0, 256, (5,), generator=g).tolist(),
                      torch.randn(1, 3, 16, 16, generator=g)),
               Prompt(torch.randint(0, 256, (12,), generator=g).tolist())]
    engine = Engine(vlm)
    # an image token cannot be packed as text: a reply stops at one (and is compared before it)
    seqs = [engine.add(p, SamplingParams(max_new_tokens=10, seed=i, logprobs=True, stop_token_ids=[IMAGE], **params))
            for i, p in enumerate(prompts)]
    while engine.rows:  # decoded together: the batched step reports them too
        engine.step()
        for seq in [s for s in engine.rows if s.finished]:
            engine.remove(seq)
    replies = [s.output_ids[:-1] if s.output_ids[-1] == IMAGE else s.output_ids for s in seqs]
    samples = [Sample(f"s{i}", "t", p.input_ids + reply, [IGNORE_INDEX] * len(p.input_ids) + reply,
                      p.pixel_values, [1] if p.pixel_values is not None else [])
               for i, (p, reply) in enumerate(zip(prompts, replies))]
    batch = collate(samples, budget=1024)
    with torch.no_grad():
        token_loss = vlm.pack_loss(batch).token_loss
    for i, (p, s, reply) in enumerate(zip(prompts, seqs, replies)):
        assert len(s.output_logprobs) == len(s.output_ids)
        start = int(batch.cu_seqlens[i]) + len(p.input_ids)
        trained = (-token_loss[start:start + len(reply)]).tolist()
        assert s.output_logprobs[:len(reply)] == pytest.approx(trained, abs=LOGPROB_TOLERANCE, rel=0)
    assert sum(len(r) for r in replies) >= 15


def test_engine_reports_no_logprobs_unless_asked(vlm):
    seq = Engine(vlm).add(Prompt([1, 2, 3]), SamplingParams(max_new_tokens=1))
    assert seq.output_ids and seq.output_logprobs == []


# ---------------------------------------------------------------------------------------------
# A grpo stage on a small world
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    spec = WorldSpec(dir=str(tmp_path_factory.mktemp("grpo-world")), n_train=8, n_val=12, n_test=1, vocab_size=320)
    prepare_world(spec, progress=False)
    return spec


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


def grpo_config(world, sft_steps=0, **grpo):
    """A grpo stage on the world's val questions, after `sft_steps` of SFT on its train QA (so that
    the grpo stage's start, its KL reference, differs from the initial weights)."""
    settings = {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6, "kl_coef": 0.1,
                "updates_per_rollout": 2, **grpo}
    sft = [{"name": "sft", "llm_lr": 3e-3, "adapter_lr": 1e-3, "steps": sft_steps, "token_budget": 256,
            "mixture": {"qa": 1.0}, "warmup_steps": 0, "schedule": "constant"}] if sft_steps else []
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
        "stages": sft + [{"name": "grpo", "kind": "grpo", "llm_lr": 3e-3, "adapter_lr": 1e-3, "steps": 4,
                          "mixture": {"prompts": 1.0}, "token_budget": 256, "save_every": 1, "keep_last": 10,
                          "warmup_steps": 0, "schedule": "constant", "grpo": settings}],
    }
    return load_config(raw)


def odd_length(reply, answer, task):
    """A checker with mixed rewards on an untrained model: whether the reply's length is odd."""
    return float(len(reply) % 2)


@pytest.fixture
def mixed_rewards(monkeypatch):
    for name in CHECKERS:
        monkeypatch.setitem(CHECKERS, name, odd_length)


def step_records(out):
    """The grpo steps' records of a run's metrics."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "grpo"]


@pytest.fixture(scope="module")
def reference_run(world, one_thread, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in CHECKERS:
            mp.setitem(CHECKERS, name, odd_length)
        out = tmp_path_factory.mktemp("grpo-reference")
        train(grpo_config(world, sft_steps=2), out)
    return out


def test_grpo_stage_trains_and_logs(world, reference_run):
    records = step_records(reference_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["kind"] == "grpo" for r in records)
    for r in records:
        for key in ("loss", "reward", "accuracy", "format_reward", "response_length", "entropy", "kl",
                    "clip_fraction", "groups_kept", "groups_dropped", "reward_errors", "overlong", "bad_prompts",
                    "tokens"):
            assert key in r, key
        assert r["groups_kept"] == 2 and r["tokens"] > 0 and r["entropy"] > 0 and r["grad_norm"] > 0
        assert 0 < r["reward"] < 1 and r["reward"] == r["accuracy"]  # odd_length, no format reward
    # updates_per_rollout 2: steps 1-2 share a rollout, 3-4 the next; the first update of a rollout is
    # on-policy (ratio 1 up to the engine's rounding), the second is not, and has a KL to the start
    assert records[0]["reward"] == records[1]["reward"] and records[2]["reward"] == records[3]["reward"]
    assert records[0]["clip_fraction"] == 0 and records[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert records[1]["kl"] > 1e-6
    meta = json.loads((reference_run / "final" / "vlmkit.json").read_text())
    assert [s["kind"] for s in meta["stages"]] == ["sft", "grpo"]


# Global steps 1-2 are SFT, 3-6 GRPO with two updates per rollout: stopped after 3 (a rollout with
# an update left rides in the checkpoint), 4 (between rollouts), 5.
@pytest.mark.parametrize("stopped_after", [3, 4, 5])
def test_grpo_resumes_bitwise(world, reference_run, mixed_rewards, monkeypatch, tmp_path, stopped_after):
    with monkeypatch.context() as mp:
        stop_after(mp, stopped_after)
        with pytest.raises(Stopped):
            train(grpo_config(world, sft_steps=2), tmp_path)
    train(grpo_config(world, sft_steps=2), tmp_path, resume=True)
    assert_same_weights(final_weights(reference_run), final_weights(tmp_path))
    assert [r["reward"] for r in step_records(tmp_path)] == [r["reward"] for r in step_records(reference_run)]


def test_dynamic_sampling_drops_and_refills(world, one_thread, monkeypatch, tmp_path):
    for name in CHECKERS:  # every reply scores the same: no group carries a signal
        monkeypatch.setitem(CHECKERS, name, lambda reply, answer, task: 0.0)
    cfg = grpo_config(world, refill_rounds=2, updates_per_rollout=1)
    cfg.stages[0].steps = 1
    start = Trainer(cfg, tmp_path / "dropped").model.state_dict()
    start = {k: v.clone() for k, v in start.items()}
    train(cfg, tmp_path / "dropped")
    [record] = step_records(tmp_path / "dropped")
    assert record["groups_dropped"] == 2 * 3 and record["groups_kept"] == 0  # 2 prompts + 2 refill rounds
    assert record["loss"] == 0 and record["tokens"] == 0
    cfg = grpo_config(world, dynamic_sampling=False, updates_per_rollout=1)
    cfg.stages[0].steps = 1
    train(cfg, tmp_path / "kept")
    [record] = step_records(tmp_path / "kept")
    assert record["groups_dropped"] == 0 and record["groups_kept"] == 2 and record["tokens"] > 0


def test_bad_input_is_counted_never_a_crash(world, one_thread, monkeypatch, tmp_path):
    asked = []

    def flaky(reply, answer, task):
        asked.append(task.category)
        if len(asked) % 3 == 0:
            raise RuntimeError("checker bug")
        return odd_length(reply, answer, task)

    for name in CHECKERS:
        monkeypatch.setitem(CHECKERS, name, flaky)
    rows = [{"id": "ok-count", "messages": [{"role": "user", "content": "How many shapes are there?"},
                                            {"role": "assistant", "content": "3"}]},
            {"id": "no-reply", "messages": [{"role": "user", "content": "How many shapes are there?"}]},
            {"id": "long-count", "messages": [{"role": "user", "content": "How many? " * 40},
                                              {"role": "assistant", "content": "3"}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    cfg = grpo_config(world, max_new_tokens=32, updates_per_rollout=1, kl_coef=0.0)
    cfg.data["prompts"].path, cfg.data["prompts"].format = str(path), "messages"
    cfg.model.config["llm"]["max_position_embeddings"] = 48
    cfg.max_bad_fraction = 1.0
    cfg.stages[0].steps = 2
    train(cfg, tmp_path / "out")
    records = step_records(tmp_path / "out")
    assert len(records) == 2
    assert records[-1]["bad_prompts"] >= 3  # no reply, longer than the context, malformed JSON
    assert sum(r["reward_errors"] for r in records) > 0
    assert sum(r["overlong"] for r in records) > 0  # cut at the context (48) before 32 new tokens
    assert set(asked) == {"count"}


def test_categories_filter_the_prompts(world, one_thread, monkeypatch, tmp_path):
    asked = []

    def recording(reply, answer, task):
        asked.append(task.category)
        return odd_length(reply, answer, task)

    for name in CHECKERS:
        monkeypatch.setitem(CHECKERS, name, recording)
    cfg = grpo_config(world, categories=["color", "count"], updates_per_rollout=1, kl_coef=0.0)
    cfg.stages[0].steps = 2
    train(cfg, tmp_path)
    assert asked and set(asked) <= {"color", "count"}
