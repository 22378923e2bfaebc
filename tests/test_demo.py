"""`vlmkit demo --quick`: the whole embedded pipeline end to end (world, tokenizer, vision
pretraining, language pretraining, alignment, joint, SFT, evaluation against blind and chance,
report), and a report whose numbers agree with each other, with the world and with the config; and
the report's pieces on histories written out by hand."""

import argparse
import json
import math
import subprocess
import sys

import pytest
import yaml

from vlmkit.config import find_config, load_config
from vlmkit.eval.report import plot_stage_values
from vlmkit.train.demo import (QUICK_CONTRASTIVE, QUICK_STAGE, TEXT_ONLY_FILE, TEXT_ONLY_QUESTIONS, demo_config,
                               language_perplexity, vision_pretraining)

ACCURACY_KEYS = ("accuracy", "blind_accuracy", "chance_accuracy")
REPORT_TYPES = {
    "overall_accuracy": float, "blind_accuracy": float, "chance_accuracy": float, "per_category": dict,
    "test_questions": int, "unparsed": int, "follow_up": dict, "text_only": list, "language_perplexity": dict,
    "vision_pretraining": dict,
    "stages": list, "params_m": float, "quick": bool, "timings": dict, "torch_threads": int, "out_dir": str,
    "model_dir": str, "wall_seconds": float,
}
STAGE_TYPES = {"stage": str, "steps": int, "tokens": int, "final_loss": float, "seconds": float, "trainable": dict}
VISION_STAGE = {
    "name": "vision", "kind": "contrastive", "vision_lr": 1.0e-3, "adapter_lr": 0, "mixture": {"captions": 1.0},
    "steps": 150, "contrastive": {"pairs_per_step": 64, "text_layers": 0, "eval_source": "held_out", "eval_pairs": 128},
}
"""A contrastive stage (as the demo runs first) for a demo config that has none yet."""
HELD_OUT_CAPTIONS = {"path": "captions_val.json", "format": "llava", "kind": "caption"}


def demo_with_vision_stage(path):
    """The packaged demo config written to `path`, with a vision pretraining stage first (and its
    held-out captions) when it has none: the report's every field is then exercised."""
    raw = yaml.safe_load(find_config("demo").read_text())
    if not any(stage.get("kind") == "contrastive" for stage in raw["stages"]):
        raw["stages"].insert(0, VISION_STAGE)
        raw["data"]["held_out"] = HELD_OUT_CAPTIONS
        raw["world"]["n_val"] = 256
    path.write_text(yaml.safe_dump(raw))
    return path


def quick_args(config, *extra):
    return argparse.Namespace(config=str(config), quick=True, overrides=list(extra))


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return demo_with_vision_stage(tmp_path_factory.mktemp("config") / "demo.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, config_path):
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run([sys.executable, "-m", "vlmkit", "demo", "--quick", "--out", str(out),
                           "--config", str(config_path), "--set", "num_threads=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), done.stdout


def weighted(per_category: dict, key: str) -> float:
    return sum(row["n"] * row[key] for row in per_category.values()) / sum(row["n"] for row in per_category.values())


# ---------------------------------------------------------------------------------------------
# The report's pieces, on configs and stage histories written out here
# ---------------------------------------------------------------------------------------------

def test_quick_shortens_every_stage_of_the_config_whatever_their_number(tmp_path):
    for config in ("demo", demo_with_vision_stage(tmp_path / "demo.yaml")):
        full = load_config(config)
        cfg = demo_config(quick_args(config), tmp_path / "out")
        assert [s.name for s in cfg.stages] == [s.name for s in full.stages]
        assert all(s.steps == QUICK_STAGE["steps"] < f.steps for s, f in zip(cfg.stages, full.stages)), config
        for stage in (s for s in cfg.stages if s.kind == "contrastive"):
            assert stage.contrastive.pairs_per_step == QUICK_CONTRASTIVE["pairs_per_step"]
            assert stage.contrastive.eval_pairs == QUICK_CONTRASTIVE["eval_pairs"]
        assert cfg.world.dir == str(tmp_path / "out" / "world") and cfg.progress is False
    # the user's --set comes last, over the quick run's
    assert demo_config(quick_args("demo", "stages.0.steps=5"), tmp_path).stages[0].steps == 5


def history(*stages):
    return [{"stage": name, "kind": kind, "eval": evals} for name, kind, evals in stages]


def test_language_perplexity_is_measured_against_the_language_stage_not_the_first():
    ppl = language_perplexity(history(("vision", "contrastive", {"text_perplexity": 2000.0}),
                                      ("language", "sft", {"text_perplexity": 8.0}),
                                      ("align", "sft", {"text_perplexity": 8.0}),
                                      ("sft", "sft", {"text_perplexity": 10.0})))
    assert ppl["before_vl"] == 8.0 and ppl["after_vl"] == 10.0 and ppl["ratio_final_to_language"] == 1.25
    assert ppl["per_stage"] == [{"stage": "vision", "perplexity": 2000.0}, {"stage": "language", "perplexity": 8.0},
                                {"stage": "align", "perplexity": 8.0}, {"stage": "sft", "perplexity": 10.0}]
    # without a language stage there is nothing to compare with
    alone = language_perplexity(history(("sft", "sft", {"text_perplexity": 10.0})))
    assert alone["before_vl"] is None and alone["ratio_final_to_language"] is None and alone["after_vl"] == 10.0


def test_vision_pretraining_reads_the_contrastive_stage_retrieval():
    retrieval = {"retrieval_i2t/held_out": 0.75, "retrieval_t2i/held_out": 0.5, "retrieval_chance/held_out": 0.01,
                 "retrieval_pairs/held_out": 128, "text_perplexity": 2000.0}
    assert vision_pretraining(history(("vision", "contrastive", retrieval), ("sft", "sft", {}))) == {
        "stage": "vision", "source": "held_out", "i2t": 0.75, "t2i": 0.5, "chance": 0.01, "pairs": 128}
    assert vision_pretraining(history(("language", "sft", {}), ("sft", "sft", {}))) is None
    # a contrastive stage without held-out pairs measured no retrieval
    assert vision_pretraining(history(("vision", "contrastive", {"text_perplexity": 2000.0}))) is None


def test_plot_stage_values_writes_a_png(tmp_path):
    plot_stage_values(["vision", "language", "sft"], [2000.0, 8.0, 10.0], tmp_path / "p.png", ylabel="ppl",
                      log_y=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# The quick demo, end to end
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_has_every_key_with_its_type(demo):
    out, report, _ = demo
    assert {k: type(v) for k, v in report.items()} == REPORT_TYPES
    for category, row in [*report["per_category"].items(), *report["follow_up"]["per_category"].items()]:
        assert {k: type(v) for k, v in row.items()} == {"n": int, **dict.fromkeys(ACCURACY_KEYS, float)}, category
    assert set(report["follow_up"]) == {"accuracy", "blind_accuracy", "chance_accuracy", "n", "per_category"}
    assert set(report["language_perplexity"]) == {"before_vl", "after_vl", "per_stage", "ratio_final_to_language"}
    assert set(report["vision_pretraining"]) == {"stage", "source", "i2t", "t2i", "chance", "pairs"}
    assert set(report["timings"]) == {"world_and_tokenizer", "train", "eval"}
    assert all(isinstance(s, float) and s >= 0 for s in report["timings"].values())
    for stage in report["stages"]:
        assert {k: type(v) for k, v in stage.items()} == STAGE_TYPES, stage
        assert set(stage["trainable"]) == {"vision", "adapter", "llm"}
    assert report["quick"] is True and report["wall_seconds"] > 0 and report["params_m"] > 0
    assert report["out_dir"] == str(out) and report["model_dir"] == str(out / "final")


@pytest.mark.slow
def test_report_numbers_agree(demo):
    out, report, _ = demo
    per_category = report["per_category"]
    # every held-out question of the world was asked, once
    world_questions = [json.loads(line) for line in (out / "world" / "synth.jsonl").read_text().splitlines()]
    counts = {c: sum(q["category"] == c for q in world_questions) for c in per_category}
    assert {c: row["n"] for c, row in per_category.items()} == counts
    assert sum(row["n"] for row in per_category.values()) == report["test_questions"] == len(world_questions)
    assert 0 <= report["unparsed"] <= report["test_questions"]
    for category, row in per_category.items():
        for key in ACCURACY_KEYS:
            assert 0.0 <= row[key] <= 1.0, (category, key)
        # model and blind accuracies are right answers out of the same n questions
        for key in ("accuracy", "blind_accuracy"):
            assert row[key] * row["n"] == pytest.approx(round(row[key] * row["n"]), abs=1e-9), (category, key)
    # the overall numbers are the count-weighted means of the categories: the blind baseline and
    # chance are over the same questions as the model
    for overall, key in zip(("overall_accuracy", "blind_accuracy", "chance_accuracy"), ACCURACY_KEYS):
        assert report[overall] == pytest.approx(weighted(per_category, key), abs=1e-12), overall
    world = json.loads((out / "world" / "world.json").read_text())
    assert {c: row["chance_accuracy"] for c, row in per_category.items()} == pytest.approx(
        {c: world["categories"][c]["chance"] for c in per_category})


@pytest.mark.slow
def test_follow_ups_ask_the_questions_again_each_after_another(demo):
    _, report, _ = demo
    follow_up = report["follow_up"]
    # the world asks every category of each test image, so each question comes back as a follow-up
    assert follow_up["n"] == report["test_questions"]
    assert {c: row["n"] for c, row in follow_up["per_category"].items()} == {
        c: row["n"] for c, row in report["per_category"].items()}
    for category, row in follow_up["per_category"].items():
        assert row["chance_accuracy"] == report["per_category"][category]["chance_accuracy"], category
        assert all(0.0 <= row[key] <= 1.0 for key in ACCURACY_KEYS), category
    for overall, key in zip(("accuracy", "blind_accuracy", "chance_accuracy"), ACCURACY_KEYS):
        assert follow_up[overall] == pytest.approx(weighted(follow_up["per_category"], key), abs=1e-12), overall


@pytest.mark.slow
def test_report_shows_the_replies_to_text_only_questions(demo):
    out, report, _ = demo
    held_out = json.loads((out / "world" / TEXT_ONLY_FILE).read_text())
    references = {}  # a question's first reference: a topic's later documents may be asked the same
    for r in held_out:
        references.setdefault(r["conversations"][0]["value"], r["conversations"][1]["value"])
    text_only = report["text_only"]
    assert len(text_only) == TEXT_ONLY_QUESTIONS
    assert len({item["question"] for item in text_only}) == TEXT_ONLY_QUESTIONS  # about as many topics
    markdown = (out / "report.md").read_text()
    for item in text_only:
        assert set(item) == {"question", "reply", "reference", "tokens", "repeats"}
        assert item["question"].strip() and item["reference"] == references[item["question"]]
        assert isinstance(item["reply"], str) and isinstance(item["tokens"], int)
        if item["tokens"]:  # the share of the reply's tokens that are its most frequent one
            assert 1 / item["tokens"] <= item["repeats"] <= 1
        else:
            assert item["reply"] == "" and item["repeats"] is None
        assert f"- **{item['question']}** -> {json.dumps(item['reply'])}" in markdown


@pytest.mark.slow
def test_report_stages_follow_the_config(demo, config_path):
    out, report, _ = demo
    cfg = demo_config(quick_args(config_path, "num_threads=2"), out)
    assert [(s["stage"], s["steps"]) for s in report["stages"]] == [(s.name, s.steps) for s in cfg.stages]
    align = [s.name for s in cfg.stages].index("align")
    assert report["stages"][align]["trainable"] == {"vision": False, "adapter": True, "llm": False}
    assert all(s["tokens"] > 0 and math.isfinite(s["final_loss"]) for s in report["stages"])
    # held-out text perplexity after every stage; the language reference is the stage named so
    ppl = report["language_perplexity"]
    assert [p["stage"] for p in ppl["per_stage"]] == [s.name for s in cfg.stages]
    assert all(math.isfinite(p["perplexity"]) and p["perplexity"] > 1 for p in ppl["per_stage"])
    by_stage = {p["stage"]: p["perplexity"] for p in ppl["per_stage"]}
    assert ppl["before_vl"] == by_stage["language"] and ppl["after_vl"] == ppl["per_stage"][-1]["perplexity"]
    assert ppl["ratio_final_to_language"] == pytest.approx(ppl["after_vl"] / ppl["before_vl"])


@pytest.mark.slow
def test_report_has_the_vision_stage_retrieval(demo, config_path):
    out, report, _ = demo
    cfg = demo_config(quick_args(config_path), out)
    vision = report["vision_pretraining"]
    stage = next(s for s in cfg.stages if s.kind == "contrastive")
    assert vision["stage"] == stage.name and vision["source"] == stage.contrastive.eval_source
    assert vision["pairs"] == QUICK_CONTRASTIVE["eval_pairs"]
    assert all(0.0 <= vision[key] <= 1.0 for key in ("i2t", "t2i")) and 0.0 < vision["chance"] <= 1.0
    # the same numbers the trainer logged at the stage end
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m.get("eval") and f"retrieval_i2t/{vision['source']}" in m][-1]
    assert (last[f"retrieval_i2t/{vision['source']}"], last[f"retrieval_t2i/{vision['source']}"]) == (
        vision["i2t"], vision["t2i"])


@pytest.mark.slow
def test_report_files_and_summary(demo):
    out, report, stdout = demo
    for name in ("report.md", "accuracy.png", "perplexity.png", "loss.png", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (out / name).stat().st_size > 0, name
    for chart in ("accuracy.png", "perplexity.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG", chart
    markdown = (out / "report.md").read_text()
    assert "| category | questions | model (%) | blind (%) | chance (%) |" in markdown
    for category, row in report["per_category"].items():
        assert f"| {category} | {row['n']} | {100 * row['accuracy']:.1f} |" in markdown, category
    assert f"on {report['test_questions']} questions" in markdown and "![accuracy](accuracy.png)" in markdown
    ppl = report["language_perplexity"]
    assert f"{ppl['ratio_final_to_language']:.2f}x" in markdown and "![language perplexity](perplexity.png)" in markdown
    for stage, p in zip(report["stages"], ppl["per_stage"]):
        assert f"| {stage['stage']} | {stage['steps']} |" in markdown and f"| {p['perplexity']:.2f} |" in markdown
    vision = report["vision_pretraining"]
    assert f"image -> caption {100 * vision['i2t']:.1f}%, caption -> image {100 * vision['t2i']:.1f}%" in markdown
    assert f"Follow-up questions (asked later in the same conversation about the image): " \
           f"**{100 * report['follow_up']['accuracy']:.1f}%**" in markdown
    assert "Held-out accuracy" in stdout and str(out / "report.json") in stdout


@pytest.mark.slow
def test_final_checkpoint_loads_and_answers(demo):
    """DIR/final is a checkpoint the rest of vlmkit loads (what `vlmkit chat --model DIR/final` does)."""
    from vlmkit.api import VLM

    out, _, _ = demo
    model = VLM.from_pretrained(out / "final")
    image = next((out / "world" / "images").glob("test_*.png"))
    reply = model.generate([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                         {"type": "text", "text": "How many shapes are there?"}]}],
                           max_new_tokens=4)
    assert isinstance(reply, str)


POST_TRAIN_FIELDS = {"categories", "before", "after", "per_category_before", "per_category_after", "blind_after",
                     "chance", "other_categories_before", "other_categories_after", "trainable_fraction",
                     "wall_seconds"}


@pytest.mark.slow
def test_post_train_continues_from_the_demo_and_reports_every_example(demo, config_path):
    out, _, _ = demo
    done = subprocess.run([sys.executable, "-m", "vlmkit", "demo", "--quick", "--post-train", "--out", str(out),
                           "--config", str(config_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "post_training.json").read_text())
    for name in ("lora_sft", "dpo", "grpo"):
        assert POST_TRAIN_FIELDS <= set(report[name]), name
        assert report[name]["categories"] == ["count_attribute", "chained_relation"]
        assert 0.0 <= report[name]["after"] <= 1.0 and 0.0 < report[name]["chance"] < 1.0
    assert {"full_sft_after"} <= set(report["lora_sft"]) and report["dpo"]["pairs"]["pairs"] > 0
    # the LoRA example trains its adapters only; the full fine-tuning beside it trains the decoder
    assert 0.0 < report["lora_sft"]["trainable_fraction"] < report["dpo"]["trainable_fraction"]
    assert (out / "post_train" / "lora_sft" / "adapters" / "lora_sft" / "adapter_config.json").is_file()
    assert len(report["grpo"]["curve"]) == 2  # the quick run's steps
    assert (out / "post_train" / "grpo_curve.png").is_file()
    assert json.loads((out / "final" / "vlmkit.json").read_text())["demo"]["quick"] is True  # the demo's model kept
