"""`vlmkit demo [--out DIR] [--quick]`: the embedded default, end to end on a CPU in minutes.

1. generate the synthetic visual world (vlmkit.data.synth): scenes, captions, QA, text corpus;
2. train a tokenizer on its text;
3. pretrain the tiny LLM on the language corpus (standing in for a pretrained LLM);
4. the DeepSeek-VL curriculum (vlmkit/configs/demo.yaml): adapter alignment on captions with vision
   and LLM frozen; joint training of the LLM on captions with 5% language steps mixed in; SFT on
   QA (vision and adapter frozen after the alignment; docs/training.md measures why);
5. evaluate on the held-out test split, per category, against a blind baseline (the same model
   with every image blanked; eval/runner.py's `evaluate_with_blind`) and against chance, and
   measure language perplexity on held-out text before and after the vision-language stages.

Writes DIR/report.json, DIR/report.md, DIR/accuracy.png (tables and chart by eval/report.py),
DIR/loss.png and the model DIR/final/ (`vlmkit chat --model DIR/final --images-after-text --image
PATH "question"`: the world asks the question before the image, data/synth.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from vlmkit.config import RunConfig, load_config
from vlmkit.data.synth import chance_accuracy
from vlmkit.data.world import prepare_world
from vlmkit.eval.report import BASELINE_SERIES, category_table, compare_with_baselines, percent, plot_categories
from vlmkit.train import post_train_demo

if TYPE_CHECKING:  # annotations only: both load torch
    from vlmkit.api import VLM
    from vlmkit.eval.runner import EvalResult

# --quick: the same pipeline, small enough for a test: a small world and model, a few steps per
# stage. Its accuracy means nothing; the point is that every step runs for real and the report is
# complete.
QUICK_STAGE_STEPS = (3, 2, 3, 3)
"""Steps of the quick run's stages (language, align, joint, sft)."""
QUICK_OVERRIDES = [
    "world.n_train=300", "world.n_test=8", "world.vocab_size=400",
    "model.config.vision.hidden_size=32", "model.config.vision.intermediate_size=64",
    "model.config.vision.num_layers=1", "model.config.vision.num_heads=2",
    "model.config.llm.hidden_size=48", "model.config.llm.intermediate_size=96",
    "model.config.llm.num_layers=2", "model.config.llm.num_heads=4",
    *(f"stages.{i}.{key}={value}" for i, steps in enumerate(QUICK_STAGE_STEPS)
      for key, value in (("steps", steps), ("warmup_steps", 1), ("token_budget", 1024))),
]
PERPLEXITY_DOCS = 40
"""Held-out text documents scored before and after the vision-language stages."""
EVAL_BATCH = 64
"""Questions decoding together in the held-out evaluation."""
MODEL_COLUMNS = [("model (%)", "accuracy"), ("blind (%)", "blind_accuracy"), ("chance (%)", "chance_accuracy")]
"""report.md's per-category columns: header, key in the category's row."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run of the same pipeline (for tests)")
    parser.add_argument("--resume", action="store_true", help="continue a killed demo run in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the demo config (vlmkit/configs/demo.yaml) by dotted path")
    post_train_demo.add_arguments(parser)


def demo_config(args: argparse.Namespace, out: Path) -> RunConfig:
    """The demo config with its world under DIR, the quick overrides, then the user's --set."""
    overrides = [f"world.dir={out / 'world'}"] + (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    cfg = load_config("demo", overrides)
    if args.quick:
        cfg.progress = False
    return cfg


# The pipeline's steps import the model, training and evaluation code (and with them torch) when
# they run, so that `vlmkit demo --help` answers without loading torch.

def perplexity_hook(cfg: RunConfig, heldout: Path) -> Callable[[int, Any], dict]:
    """The trainer's `on_stage_end`: each stage's wall seconds, and held-out text perplexity after
    the first (language) stage and after the last one."""
    from vlmkit.eval.ppl import text_perplexity  # loads torch (kept out of `vlmkit demo --help`)

    mark = time.perf_counter()

    def on_stage_end(index: int, model) -> dict:
        nonlocal mark
        result = {"seconds": round(time.perf_counter() - mark, 2)}
        if index in (0, len(cfg.stages) - 1):
            result["text_perplexity"] = text_perplexity(model, heldout, limit=PERPLEXITY_DOCS)["perplexity"]
        mark = time.perf_counter()
        return result

    return on_stage_end


def train_demo(cfg: RunConfig, out: Path, world: Path, *, resume: bool, quick: bool) -> Path:
    """Language pretraining, then the vision-language curriculum; returns DIR/final."""
    from vlmkit.train.loop import train  # loads torch (kept out of `vlmkit demo --help`)

    return train(cfg, out, resume=resume, on_stage_end=perplexity_hook(cfg, world / "text_heldout.jsonl"),
                 meta={"demo": {"quick": quick}})


def evaluate_demo(final: Path, world: Path, *, progress: bool) -> tuple[VLM, dict[str, EvalResult]]:
    """The saved checkpoint, loaded as a user would, on the world's held-out split, and its blind
    baseline on the same questions: (the model, {"model": EvalResult, "blind": EvalResult})."""
    from vlmkit.api import VLM  # loads torch (kept out of `vlmkit demo --help`)
    from vlmkit.eval.prompts import SYNTH_PROMPTS
    from vlmkit.eval.runner import REPLY_TOKENS, evaluate_with_blind

    model = VLM.from_pretrained(final)
    # The world's questions are asked as trained: no added "answer with a single word" instruction.
    results = evaluate_with_blind(model, world / "synth.jsonl", mode="gen", batch_size=EVAL_BATCH,
                                  max_new_tokens=REPLY_TOKENS["synth"], prompt_format=SYNTH_PROMPTS,
                                  progress=progress)
    return model, results


def build_report(results: dict[str, EvalResult], model: VLM, final: Path, out: Path, *, quick: bool,
                 timings: dict[str, float]) -> dict[str, Any]:
    """report.json's content (docs/training.md lists its keys), all but `wall_seconds`."""
    import torch

    comparison = compare_with_baselines(results["model"].summary, results["blind"].summary, chance_accuracy)
    history = json.loads((final / "vlmkit.json").read_text())["stages"]
    return {
        "overall_accuracy": comparison["accuracy"],
        "blind_accuracy": comparison["blind_accuracy"],
        "chance_accuracy": comparison["chance_accuracy"],
        "per_category": comparison["per_category"],
        "test_questions": comparison["n"],
        "unparsed": results["model"].summary["unparsed"],
        "language_perplexity": {
            "before_vl": history[0]["eval"].get("text_perplexity", math.nan),
            "after_vl": history[-1]["eval"].get("text_perplexity", math.nan),
        },
        "stages": [{"stage": h["stage"], "steps": h["steps"], "tokens": h["tokens"], "final_loss": h["final_loss"],
                    "seconds": h["eval"].get("seconds", 0.0), "trainable": h["trainable"]} for h in history],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "quick": quick,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "out_dir": str(out),
        "model_dir": str(final),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """report.md without its charts: the headline, per category, perplexity, stages, model size."""
    lines = ["# vlmkit demo", "",
             f"Held-out accuracy **{percent(report['overall_accuracy'])}%** (blind baseline "
             f"{percent(report['blind_accuracy'])}%, chance {percent(report['chance_accuracy'])}%) on "
             f"{report['test_questions']} questions; {report['wall_seconds']:.0f} s wall in all.", ""]
    lines += category_table(report["per_category"], MODEL_COLUMNS)
    ppl = report["language_perplexity"]
    lines += ["", f"Language perplexity on held-out text: {ppl['before_vl']:.2f} after language pretraining, "
              f"{ppl['after_vl']:.2f} after the vision-language stages.", "",
              "| stage | steps | tokens | seconds | final loss |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {s['stage']} | {s['steps']} | {s['tokens']} | {s['seconds']:.0f} | {s['final_loss']:.3f} |"
              for s in report["stages"]]
    lines += ["", f"Model: {report['params_m']:.2f}M parameters. Timings in `report.json` (`timings`)."]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    return "\n".join(summary_lines(report) + ["", "![accuracy](accuracy.png)", "", "![loss](loss.png)", ""])


def write_demo_report(report: dict[str, Any], out: Path) -> None:
    """DIR/report.json, DIR/accuracy.png (model, blind and chance per category) and DIR/report.md."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_categories(report["per_category"], BASELINE_SERIES, out / "accuracy.png", ylabel="held-out accuracy (%)")
    (out / "report.md").write_text(report_markdown(report))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    if getattr(args, "post_train", False):
        return post_train_demo.run(args, run_demo, demo_config(args, Path(args.out)))
    return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    """The demo itself: world, training, evaluation, report."""
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(args, out)
    timings: dict[str, float] = {}
    with _timed(timings, "world_and_tokenizer"):  # reused when DIR/world already holds them
        world = prepare_world(cfg.world, progress=cfg.progress)
    with _timed(timings, "train"):
        final = train_demo(cfg, out, world, resume=args.resume, quick=args.quick)
    with _timed(timings, "eval"):
        model, results = evaluate_demo(final, world, progress=not args.quick)
    report = build_report(results, model, final, out, quick=args.quick, timings=timings)
    report["wall_seconds"] = time.perf_counter() - start
    write_demo_report(report, out)
    print("\n".join(["", *summary_lines(report), "", f"Report in {out / 'report.json'}"]))
    return 0
