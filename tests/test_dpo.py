"""DPO: the loss against its formula, preference data (vlmkit's and TRL's layouts, bad rows counted),
pairs encoded and packed together, and the `kind: dpo` stage on the tiny world (log 2 at the first
step, reward accuracy rising on separable pairs, bitwise resume after a kill); pairs made from a
model's own samples by a checker (train/self_feedback.py)."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from tests.train_support import (Stopped, assert_same_weights, final_weights, kept_thread_count, kill_at_checkpoint,
                                 prepared_world, stop_after)
from vlmkit.config import load_config
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import BadRecord
from vlmkit.data.images import ImageProcessor
from vlmkit.data.packing import SourceStream
from vlmkit.data.preference import PairPacker, PairPipeline, PreferencePair, read_pairs
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.dpo import dpo_loss, sequence_logprobs
from vlmkit.train.loop import build_model, train
from vlmkit.train.self_feedback import FeedbackPrompt, self_feedback_pairs, write_pairs

DPO_TINY = Path(__file__).with_name("dpo_tiny.yaml")
"""The tests' DPO run on the tiny world (the ready dpo config continues from the post-training demo)."""
TPI = 4  # visual tokens per tile in the unit tests


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def test_dpo_loss_matches_its_formula_on_hand_computed_logprobs():
    beta = 0.5
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -0.5], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -1.0])
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    # pair 0: rewards 0.5 * (-1 + 2) = 0.5 and 0.5 * (-3 + 2) = -0.5, margin 1
    # pair 1: rewards 0.5 * (-2 + 2) = 0 and 0.5 * (-0.5 + 1) = 0.25, margin -0.25
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.25))) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert metrics["chosen_reward"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["rejected_reward"] == pytest.approx((-0.5 + 0.25) / 2)
    assert metrics["margin"] == pytest.approx((1.0 - 0.25) / 2)
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["chosen_logp"] == pytest.approx(-1.5) and metrics["rejected_logp"] == pytest.approx(-1.75)
    loss.backward()
    # d loss / d log pi(chosen_i) = -beta * sigmoid(-margin_i) / pairs; the rejected side the opposite
    sigmoid = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.25))]
    assert policy_chosen.grad.tolist() == pytest.approx([-beta * s / 2 for s in sigmoid], rel=1e-6)
    assert policy_rejected.grad.tolist() == pytest.approx([beta * s / 2 for s in sigmoid], rel=1e-6)


def test_equal_policy_and_reference_give_log2_and_no_margin():
    logps = torch.tensor([-4.0, -7.5, -1.25])
    loss, metrics = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    assert metrics["margin"] == 0.0 and metrics["reward_accuracy"] == 0.0


def test_sequence_logprobs_sum_each_samples_targets_and_backpropagate():
    cu_seqlens = torch.tensor([0, 4, 7], dtype=torch.int32)
    labels = torch.tensor([5, IGNORE_INDEX, 6, 7, 8, 9, IGNORE_INDEX])
    # pack_loss's per-token loss: 0 where the label is no target (and at each sample's first token)
    token_loss = torch.tensor([0.0, 0.0, 0.5, 1.5, 0.0, 2.0, 0.0], requires_grad=True)
    logps = sequence_logprobs(token_loss, cu_seqlens, labels)
    assert logps.tolist() == [-2.0, -2.0]
    logps.sum().backward()
    assert token_loss.grad.tolist() == [0.0, 0.0, -1.0, -1.0, 0.0, -1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Reading preference data
# ---------------------------------------------------------------------------------------------


def png_bytes(color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def image_question(image: str, text: str = "What color?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_vlmkit_layout(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "messages": image_question("a.png"), "chosen": "Red.", "rejected": "Blue."},
        {"id": "2", "messages": [{"role": "system", "content": "Be brief."}, *image_question("a.png"),
                                 {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Sure?"}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}], "rejected": "No."},
    ])
    first, second = read_pairs(path)
    assert isinstance(first, PreferencePair) and first.id == "1" and first.source == "p"
    assert [m.role for m in first.prompt] == ["user"] and first.prompt[0].content == "<image>\nWhat color?"
    assert first.images[0].path == (tmp_path / "a.png").resolve()
    assert first.chosen[0].content == "Red." and first.rejected[0].content == "Blue."
    assert first.key == f"{path}:1"
    assert [m.role for m in second.prompt] == ["system", "user", "assistant", "user"]
    assert second.chosen[0].content == "Yes."


def test_trl_layouts(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    conversational_prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}]
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Color?", "images": ["a.png"], "chosen": "Red.", "rejected": "Blue."},
        {"prompt": conversational_prompt, "images": ["a.png"],
         "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Blue."}]},
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
    ])
    string, conversation, implicit = read_pairs(path)
    for pair in (string, conversation):
        assert pair.prompt[0].content == "<image>\nColor?" and len(pair.images) == 1
        assert pair.chosen[0].content == "Red." and pair.rejected[0].content == "Blue."
    assert implicit.prompt[0].content == "Hi?" and implicit.images == []
    assert implicit.chosen[0].content == "Hello." and implicit.rejected[0].content == "Go away."
    # TRL's datasets as parquet: images as HF-datasets structs of bytes
    table = pa.table({"prompt": [conversational_prompt], "images": [[{"bytes": png_bytes(), "path": None}]],
                      "chosen": ["Red."], "rejected": ["Blue."]})
    pq.write_table(table, tmp_path / "trl.parquet")
    (pair,) = read_pairs(tmp_path / "trl.parquet")
    assert pair.images[0].data == png_bytes() and pair.prompt[0].content == "<image>\nColor?"


def bad_rows() -> list:
    question = image_question("a.png")
    return [
        {"id": "no-rejected", "messages": question, "chosen": "Red."},
        {"id": "empty-rejected", "messages": question, "chosen": "Red.", "rejected": "  "},
        {"id": "no-chosen", "messages": question, "rejected": "Red."},
        {"id": "same", "messages": question, "chosen": "Red.", "rejected": "Red."},
        {"id": "image-in-reply", "messages": question, "chosen": "Red.",
         "rejected": [{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]},
        {"id": "user-reply", "messages": question, "chosen": "Red.", "rejected": [{"role": "user", "content": "x"}]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}]}], "images": ["a.png", "a.png"],
         "chosen": "Red.", "rejected": "Blue."},
        "{not json",
    ]


def test_bad_rows_are_bad_records_with_their_reasons(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    items = list(read_pairs(write_jsonl(tmp_path / "bad.jsonl", bad_rows())))
    assert all(isinstance(item, BadRecord) for item in items)
    assert [item.reason for item in items] == ["no_rejected", "no_rejected", "no_chosen", "same_replies",
                                               "malformed_record", "malformed_record", "placeholder_mismatch",
                                               "malformed_json"]
    assert items[0].record_id == "no-rejected" and items[0].where.endswith("bad.jsonl:1")


# ---------------------------------------------------------------------------------------------
# Encoding and packing pairs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["What color is the square? The square is red, not blue.", "Yes. No. Sure?"] * 30,
                           vocab_size=300)


def pair_pipeline(tok, budget: int = 200) -> PairPipeline:
    processor = ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, max_tiles=1)
    return PairPipeline(tok, processor, TPI, max_length=budget, max_bad_fraction=1.0)


def test_a_pair_is_two_samples_sharing_the_prompt_supervised_on_the_reply(tmp_path, tok):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "messages": [
        *image_question("a.png"), {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Sure?"}],
        "chosen": "Yes, it is red.", "rejected": "No."}])
    (pair,) = read_pairs(path)
    encoded = pair_pipeline(tok).encode(pair)
    chosen, rejected = encoded.chosen, encoded.rejected
    shared = 0
    while chosen.input_ids[shared] == rejected.input_ids[shared]:
        shared += 1
    # the prompt (its earlier assistant turn included) is context: no label before the reply starts
    assert all(label == IGNORE_INDEX for label in chosen.labels[:shared])
    assert all(label == IGNORE_INDEX for label in rejected.labels[:shared])
    supervised = [t for t in chosen.labels if t != IGNORE_INDEX]
    assert tok.decode(supervised[:-1]) == "Yes, it is red." and supervised[-1] == tok.end_of_turn_id
    assert tok.decode([t for t in rejected.labels if t != IGNORE_INDEX][:-1]) == "No."
    assert chosen.input_ids.count(tok.image_token_id) == TPI and rejected.input_ids.count(tok.image_token_id) == TPI
    assert torch.equal(chosen.pixel_values, rejected.pixel_values) and len(encoded) == len(chosen) + len(rejected)


def pack_rows(n: int) -> list[dict]:
    return [{"id": str(i), "messages": image_question("a.png", f"What color {'is it ' * (i % 4)}?"),
             "chosen": "Red." * (1 + i % 3), "rejected": "Blue."} for i in range(n)]


def packer_over(path: Path, tok, budget: int, seed: int = 0) -> PairPacker:
    stream = SourceStream(path, seed=seed, shuffle_block=8, reader=lambda: read_pairs(path))
    return PairPacker(stream, pair_pipeline(tok, budget), budget)


def test_packs_keep_each_pair_together_and_count_bad_pairs(tmp_path, tok, caplog):
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = pack_rows(10) + bad_rows() + [{"id": "long", "messages": image_question("a.png", "Why? " * 60),
                                          "chosen": "Red.", "rejected": "Blue."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    packer = packer_over(path, tok, budget=160)
    packs = [packer.next_pack() for _ in range(6)]
    for batch in packs:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        assert batch.num_tokens <= 160 and len(lengths) == 2 * batch.num_pairs
        assert batch.sample_ids[0::2] == [f"{i.split(':')[0]}:chosen" for i in batch.sample_ids[1::2]]
        assert batch.position_ids[batch.cu_seqlens[1:-1].long()].eq(0).all()  # each sample restarts
    # every bad row is counted by its reason (the long pair is never cut), and nothing stopped
    stats = packer.pipeline.stats
    assert stats.bad["no_rejected"] >= 2 and stats.bad["too_long"] >= 1 and stats.bad["same_replies"] >= 1
    assert "no-rejected" in caplog.text


def test_pair_packer_resumes_with_the_same_packs(tmp_path, tok):
    (tmp_path / "a.png").write_bytes(png_bytes())
    path = write_jsonl(tmp_path / "p.jsonl", pack_rows(13) + bad_rows()[:1])
    packer = packer_over(path, tok, budget=150, seed=3)
    for _ in range(4):
        packer.next_pack()
    cursor = json.loads(json.dumps(packer.state_dict()))
    assert cursor["held"] is not None  # a pair waits for the next pack
    expected = [packer.next_pack() for _ in range(5)]
    resumed = packer_over(path, tok, budget=150, seed=3)
    resumed.load_state_dict(cursor)
    for want, got in zip(expected, (resumed.next_pack() for _ in range(5))):
        assert want.pair_keys == got.pair_keys and torch.equal(want.input_ids, got.input_ids)
    assert resumed.pipeline.stats.state_dict() == packer.pipeline.stats.state_dict()


# ---------------------------------------------------------------------------------------------
# The stage on the tiny world
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    world = prepared_world(tmp_path_factory.mktemp("world"), str(DPO_TINY))
    items = [json.loads(line) for line in (world / "synth.jsonl").read_text().splitlines()]
    answers = {k: v["answers"] for k, v in json.loads((world / "world.json").read_text())["categories"].items()}

    def pair(item, chosen, rejected):
        return {"id": item["id"], "messages": image_question(item["images"][0], item["question"]),
                "chosen": chosen, "rejected": rejected}

    # the world's answer against another answer of its category; and clearly separable pairs
    swapped = [pair(it, it["answer"], next(a for a in answers[it["category"]] if a != it["answer"])) for it in items]
    separable = [pair(it, "yes", "no") for it in items]
    write_jsonl(world / "pairs_train.jsonl", swapped[:200])
    write_jsonl(world / "pairs_heldout.jsonl", swapped[200:])
    write_jsonl(world / "separable_train.jsonl", separable[:200])
    write_jsonl(world / "separable_heldout.jsonl", separable[200:])
    return world


@pytest.fixture
def one_thread():
    with kept_thread_count():
        yield


def dpo_only(world: Path, **stage) -> dict:
    """tests/dpo_tiny.yaml with its DPO stage alone, on a fresh model, as a mapping."""
    raw = yaml.safe_load(DPO_TINY.read_text())
    raw["world"]["dir"] = str(world)
    raw.update(num_threads=1, progress=False, tensorboard=False)
    raw["stages"] = [{**raw["stages"][1], "grad_accum": 1, "token_budget": 512, "save_every": 0, **stage}]
    return raw


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_first_step_is_log2_and_separable_pairs_raise_reward_accuracy(world, one_thread, tmp_path):
    raw = dpo_only(world, steps=6, llm_lr=1e-2, adapter_lr=1e-2, warmup_steps=0, schedule="constant")
    raw["data"]["pairs"]["path"] = "separable_train.jsonl"
    raw["data"]["pairs_heldout"]["path"] = "separable_heldout.jsonl"
    train(load_config(raw), tmp_path)
    records = metrics(tmp_path)
    steps = [r for r in records if not r.get("eval")]
    first = steps[0]
    # the policy is the reference at the first step: every margin is exactly 0, the loss log 2
    assert first["kind"] == "dpo" and first["margin"] == 0.0 and first["reward_accuracy"] == 0.0
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["pairs"] > 0 and first["bad_pairs"] == 0 and first["chosen_logp"] < 0
    assert steps[-1]["reward_accuracy"] == 1.0 and steps[-1]["margin"] > 0.5 and steps[-1]["loss"] < first["loss"]
    held_out = next(r for r in records if r.get("eval"))
    assert held_out["eval_reward_accuracy/pairs_heldout"] == 1.0 and held_out["eval_margin/pairs_heldout"] > 0
    meta = json.loads((tmp_path / "final" / "vlmkit.json").read_text())
    assert meta["stages"][0]["kind"] == "dpo"
    assert meta["stages"][0]["eval"]["eval_reward_accuracy/pairs_heldout"] == 1.0


@pytest.mark.slow
def test_a_pair_without_a_rejected_reply_is_counted_during_training(world, one_thread, tmp_path):
    rows = [json.loads(line) for line in (world / "pairs_train.jsonl").read_text().splitlines()][:30]
    del rows[3]["rejected"]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = dpo_only(world, steps=3, mixture={"pairs": 1.0}, dpo={"eval_source": None, "sft_weight": 0.5})
    raw["data"]["pairs"].update(path=str(tmp_path / "pairs.jsonl"), root=str(world))  # its images are the world's
    train(load_config(raw), tmp_path / "run")
    steps = [r for r in metrics(tmp_path / "run") if not r.get("eval")]
    assert len(steps) == 3 and steps[-1]["bad_pairs"] == 1
    # the added SFT term: the chosen replies' mean next-token loss (a fresh model: about log(vocab))
    first = steps[0]
    assert 1.0 < first["sft_loss"] < 10.0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["sft_loss"], rel=1e-5)


# Kill inside the DPO stage: global steps 1-2 are SFT, 3-6 DPO with a checkpoint after each step.
KILL_SETTINGS = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=2",
                 "stages.1.steps=4", "stages.1.save_every=1"]


def kill_command(out: Path, world: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "vlmkit", "train", str(DPO_TINY), "--out", str(out), "--set", f"world.dir={world}"]
    for item in KILL_SETTINGS:
        args += ["--set", item]
    return args + list(extra)


@pytest.mark.slow
def test_dpo_stage_resumes_bitwise_after_a_kill(world, one_thread, tmp_path):
    train(load_config(DPO_TINY, [f"world.dir={world}", *KILL_SETTINGS]), tmp_path / "reference")
    out = tmp_path / "killed"
    kill_at_checkpoint(kill_command(out, world), out, 4)  # the second DPO step, its reference copy inside
    resumed = subprocess.run(kill_command(out, world, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(out))
    want = [r for r in metrics(tmp_path / "reference") if r.get("kind") == "dpo"]
    got = [r for r in metrics(out) if r.get("kind") == "dpo"]
    assert [r["global_step"] for r in got] == [3, 4, 5, 6]
    assert [r["margin"] for r in got] == [r["margin"] for r in want]


@pytest.mark.slow
def test_precomputed_reference_resumes_bitwise(world, one_thread, monkeypatch, tmp_path):
    raw = dpo_only(world, steps=4, save_every=1, dpo={"reference": "precomputed", "eval_source": "pairs_heldout"})
    train(load_config(raw), tmp_path / "reference")
    stop_after(monkeypatch, 2)
    with pytest.raises(Stopped):
        train(load_config(raw), tmp_path / "stopped")
    monkeypatch.undo()
    cursor = json.loads((list_checkpoints(tmp_path / "stopped")[-1] / "trainer.json").read_text())
    table = cursor["data"]["0"]["reference"]  # every training pair's, and the held-out packs' pairs'
    assert sum(key.startswith(f"{world / 'pairs_train.jsonl'}:") for key in table) == 200
    assert any(key.startswith(f"{world / 'pairs_heldout.jsonl'}:") for key in table)
    train(load_config(raw), tmp_path / "stopped", resume=True)
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(tmp_path / "stopped"))
    first = metrics(tmp_path / "reference")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_lora_disabled_reference_starts_at_log2(world, one_thread, tmp_path):
    raw = dpo_only(world, steps=2, lora={"rank": 4}, dpo={"reference": "lora_disabled", "eval_source": None})
    train(load_config(raw), tmp_path)
    first = metrics(tmp_path)[0]
    assert first["margin"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "adapters" / "dpo" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_replayed_sft_data_adds_its_loss_and_resumes_bitwise(world, one_thread, monkeypatch, tmp_path):
    replay = {"mixture": {"qa": 1.0}, "weight": 0.5}
    raw = dpo_only(world, steps=4, save_every=1, dpo={"reference": "precomputed", "eval_source": None},
                   replay=replay)
    train(load_config(raw), tmp_path / "reference")
    first = [r for r in metrics(tmp_path / "reference") if not r.get("eval")][0]
    # the step's loss is the DPO loss (log 2 at the first step) plus the weighted replay loss
    assert first["objective_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert 1.0 < first["replay_loss"] < 10.0  # a fresh model on the world's QA: about log(vocab)
    assert first["loss"] == pytest.approx(first["objective_loss"] + 0.5 * first["replay_loss"], rel=1e-6)
    # the replayed batches' gradients reach the weights
    without = dpo_only(world, steps=4, save_every=1, dpo={"reference": "precomputed", "eval_source": None})
    train(load_config(without), tmp_path / "without")
    a, b = final_weights(tmp_path / "reference"), final_weights(tmp_path / "without")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # stopped inside the stage: the replay cursor rides beside the objective's, and resumes bitwise
    stop_after(monkeypatch, 2)
    with pytest.raises(Stopped):
        train(load_config(raw), tmp_path / "stopped")
    monkeypatch.undo()
    cursor = json.loads((list_checkpoints(tmp_path / "stopped")[-1] / "trainer.json").read_text())
    assert "sources" in cursor["data"]["0"]["replay"]
    train(load_config(raw), tmp_path / "stopped", resume=True)
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(tmp_path / "stopped"))


def test_config_checks_replay():
    raw = yaml.safe_load(DPO_TINY.read_text())
    raw["stages"][1]["replay"] = {"mixture": {"qa": 1.0}, "weight": 0.5}
    assert load_config(raw).stages[1].replay.mixture == {"qa": 1.0}
    for replay, match in [({"mixture": {"nowhere": 1.0}}, "unknown source"), ({"mixture": {}}, "at least one"),
                          ({"mixture": {"qa": 1.0}, "weight": 0}, "weight")]:
        raw["stages"][1]["replay"] = replay
        with pytest.raises(ConfigError, match=match):
            load_config(raw)
    raw["stages"][1]["replay"] = {"mixture": {"qa": 1.0}}
    raw["stages"][0]["replay"] = {"mixture": {"qa": 1.0}}  # an sft stage replays too (tests/test_replay.py)
    assert load_config(raw).stages[0].replay.mixture == {"qa": 1.0}
    del raw["stages"][0]["replay"], raw["stages"][1]["mixture"]
    with pytest.raises(ConfigError, match="names its own sources"):
        load_config(raw)


def test_config_checks_the_held_out_source():
    raw = yaml.safe_load(DPO_TINY.read_text())
    load_config(raw)
    raw["stages"][1]["dpo"]["eval_source"] = "nowhere"
    with pytest.raises(ConfigError, match="eval_source"):
        load_config(raw)
    raw["stages"][1]["dpo"]["eval_source"] = "pairs"
    with pytest.raises(ConfigError, match="no training pairs"):
        load_config(raw)


# ---------------------------------------------------------------------------------------------
# Pairs from the model's own samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_self_feedback_pairs_a_correct_reply_against_a_wrong_one(world, one_thread):
    torch.set_num_threads(1)  # a tiny model decodes fastest on one thread, whatever else runs
    torch.manual_seed(0)
    vlm = build_model(load_config(dpo_only(world)))
    items = [json.loads(line) for line in (world / "synth.jsonl").read_text().splitlines()][:6]
    prompts = [FeedbackPrompt(it["id"], image_question(str(world / it["images"][0]), it["question"]), it)
               for it in items]
    prompts.append(FeedbackPrompt("unreadable", image_question(str(world / "nowhere.png")), {}))
    prompts.append(FeedbackPrompt("checker-fails", image_question(str(world / items[0]["images"][0])), None))

    def even_length(reply: str, item) -> bool:  # a stand-in verdict that splits random replies
        if item is None:
            raise ValueError("nothing to judge against")
        return len(reply) % 2 == 0

    state = torch.random.get_rng_state()
    made = self_feedback_pairs(vlm, prompts, even_length, samples_per_prompt=6, pairs_per_prompt=2,
                               max_new_tokens=6, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is untouched
    again = self_feedback_pairs(vlm, prompts, even_length, samples_per_prompt=6, pairs_per_prompt=2,
                                max_new_tokens=6, seed=1)
    assert made.rows == again.rows and made.rows
    stats = made.stats
    assert stats.prompts == 8 and stats.samples == 7 * 6 and stats.bad_prompts == {"missing_image": 1}
    assert stats.checker_errors == 6 and stats.pairs == len(made.rows)
    for row in made.rows:
        assert len(row["chosen"]) % 2 == 0 and len(row["rejected"]) % 2 == 1
    path = write_pairs(made.rows, world / "self_feedback.jsonl")
    pairs = list(read_pairs(path))
    assert all(isinstance(p, PreferencePair) for p in pairs) and len(pairs) == len(made.rows)
    assert pairs[0].images[0].path == (world / items[0]["images"][0]).resolve()
    assert json.loads(path.read_text().splitlines()[0])["messages"][0]["content"][0]["image"].startswith("images/")
