"""`vlmkit demo --quick`: the whole embedded pipeline end to end (world, tokenizer, language
pretraining, alignment, joint, SFT, evaluation against blind and chance, report)."""

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "vlmkit", "demo", "--quick", "--out", str(out),
                           "--set", "num_threads=2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("overall_accuracy", "blind_accuracy", "chance_accuracy"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, key
    assert report["per_category"] and all({"n", "accuracy", "blind_accuracy", "chance_accuracy"} <= set(s)
                                          for s in report["per_category"].values())
    assert report["wall_seconds"] > 0
    ppl = report["language_perplexity"]
    assert math.isfinite(ppl["before_vl"]) and math.isfinite(ppl["after_vl"]) and ppl["before_vl"] > 1
    assert [s["stage"] for s in report["stages"]] == ["language", "align", "joint", "sft"]
    assert report["stages"][1]["trainable"] == {"vision": False, "adapter": True, "llm": False}
    for name in ("report.md", "accuracy.png", "loss.png", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).stat().st_size > 0, name
    assert "overall" in done.stdout

    # DIR/final is a checkpoint the rest of vlmkit loads (what `vlmkit chat --model DIR/final` does)
    from vlmkit.api import VLM

    model = VLM.from_pretrained(out / "final")
    image = next((out / "world" / "images").glob("test_*.png"))
    # the world asks the question first, then shows the image (data/synth.py)
    reply = model.generate([{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"},
                                                         {"type": "image", "image": str(image)}]}],
                           max_new_tokens=4)
    assert isinstance(reply, str)
