"""`vlmkit demo --quick`: the whole embedded pipeline end to end (world, tokenizer, language
pretraining, alignment, joint, SFT, evaluation against blind and chance, report), and a report
whose numbers agree with each other, with the world and with the config."""

import json
import math
import subprocess
import sys

import pytest

from vlmkit.config import load_config
from vlmkit.train.demo import QUICK_OVERRIDES

pytestmark = pytest.mark.slow

ACCURACY_KEYS = ("accuracy", "blind_accuracy", "chance_accuracy")
REPORT_TYPES = {
    "overall_accuracy": float, "blind_accuracy": float, "chance_accuracy": float, "per_category": dict,
    "test_questions": int, "unparsed": int, "language_perplexity": dict, "stages": list, "params_m": float,
    "quick": bool, "timings": dict, "torch_threads": int, "out_dir": str, "model_dir": str, "wall_seconds": float,
}
STAGE_TYPES = {"stage": str, "steps": int, "tokens": int, "final_loss": float, "seconds": float, "trainable": dict}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run([sys.executable, "-m", "vlmkit", "demo", "--quick", "--out", str(out),
                           "--set", "num_threads=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), done.stdout


def weighted(per_category: dict, key: str) -> float:
    return sum(row["n"] * row[key] for row in per_category.values()) / sum(row["n"] for row in per_category.values())


def test_report_has_every_key_with_its_type(demo):
    out, report, _ = demo
    assert {k: type(v) for k, v in report.items()} == REPORT_TYPES
    for category, row in report["per_category"].items():
        assert {k: type(v) for k, v in row.items()} == {"n": int, **dict.fromkeys(ACCURACY_KEYS, float)}, category
    assert set(report["language_perplexity"]) == {"before_vl", "after_vl"}
    assert set(report["timings"]) == {"world_and_tokenizer", "train", "eval"}
    assert all(isinstance(s, float) and s >= 0 for s in report["timings"].values())
    for stage in report["stages"]:
        assert {k: type(v) for k, v in stage.items()} == STAGE_TYPES, stage
        assert set(stage["trainable"]) == {"vision", "adapter", "llm"}
    assert report["quick"] is True and report["wall_seconds"] > 0 and report["params_m"] > 0
    assert report["out_dir"] == str(out) and report["model_dir"] == str(out / "final")


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


def test_report_stages_follow_the_config(demo):
    _, report, _ = demo
    cfg = load_config("demo", QUICK_OVERRIDES)
    assert [(s["stage"], s["steps"]) for s in report["stages"]] == [(s.name, s.steps) for s in cfg.stages]
    assert report["stages"][1]["trainable"] == {"vision": False, "adapter": True, "llm": False}
    assert all(s["tokens"] > 0 and math.isfinite(s["final_loss"]) for s in report["stages"])
    ppl = report["language_perplexity"]
    assert math.isfinite(ppl["before_vl"]) and math.isfinite(ppl["after_vl"]) and ppl["before_vl"] > 1


def test_report_files_and_summary(demo):
    out, report, stdout = demo
    for name in ("report.md", "accuracy.png", "loss.png", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "report.md").read_text()
    assert "| category | questions | model (%) | blind (%) | chance (%) |" in markdown
    for category, row in report["per_category"].items():
        assert f"| {category} | {row['n']} | {100 * row['accuracy']:.1f} |" in markdown, category
    assert f"on {report['test_questions']} questions" in markdown and "![accuracy](accuracy.png)" in markdown
    assert "Held-out accuracy" in stdout and str(out / "report.json") in stdout


def test_final_checkpoint_loads_and_answers(demo):
    """DIR/final is a checkpoint the rest of vlmkit loads (what `vlmkit chat --model DIR/final` does)."""
    from vlmkit.api import VLM

    out, _, _ = demo
    model = VLM.from_pretrained(out / "final")
    image = next((out / "world" / "images").glob("test_*.png"))
    # the world asks the question first, then shows the image (data/synth.py)
    reply = model.generate([{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"},
                                                         {"type": "image", "image": str(image)}]}],
                           max_new_tokens=4)
    assert isinstance(reply, str)


POST_TRAIN_FIELDS = {"categories", "before", "after", "per_category_before", "per_category_after", "blind_after",
                     "chance", "other_categories_before", "other_categories_after", "trainable_fraction",
                     "wall_seconds"}


def test_post_train_continues_from_the_demo_and_reports_every_example(demo):
    out, _, _ = demo
    done = subprocess.run([sys.executable, "-m", "vlmkit", "demo", "--quick", "--post-train", "--out", str(out)],
                          capture_output=True, text=True)
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
