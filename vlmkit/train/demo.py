"""`vlmkit demo [--out DIR] [--quick] [--config NAME_OR_PATH]`: the embedded default, end to end on a
CPU in minutes.

1. generate the synthetic visual world (vlmkit.data.synth): scenes, captions, QA, text corpus;
2. train a tokenizer on its text;
3. the curriculum of vlmkit/configs/demo.yaml (or the config `--config` names): vision pretraining
   first (the tower learns from image-caption pairs, `kind: contrastive`, as real VLMs start from a
   tower pretrained that way); the tiny LLM's language pretraining (standing in for a pretrained
   LLM); adapter alignment on captions with vision and LLM frozen; joint training of the LLM on
   captions; SFT on QA; the later stages keep replaying language data beside their own so that the
   LLM keeps its language ability;
4. evaluate on the held-out test split, per category, against a blind baseline (the same model
   with every image blanked; eval/runner.py's `evaluate_with_blind`) and against chance, then the
   same questions as follow-ups (each asked after another question about its image, in one
   conversation; eval/follow_up.py); language perplexity on held-out text is measured after every
   stage; a few held-out text-only chat questions (no image) show what the model answers to them.

Writes DIR/report.json, DIR/report.md, DIR/accuracy.png (tables and chart by eval/report.py),
DIR/perplexity.png (held-out text perplexity after each stage), DIR/loss.png and the model
DIR/final/ (`vlmkit chat --model DIR/final --image PATH "question"`: the world shows the image
first, then asks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from vlmkit.config import RunConfig, load_config
from vlmkit.data.corpus import chat_unit
from vlmkit.data.formats import read_records
from vlmkit.data.synth import chance_accuracy
from vlmkit.data.types import Record
from vlmkit.data.world import prepare_world
from vlmkit.eval.report import (BASELINE_SERIES, category_table, compare_with_baselines, percent, plot_categories,
                                plot_stage_values)
from vlmkit.train import post_train_demo

if TYPE_CHECKING:  # annotations only: both load torch
    from vlmkit.api import VLM
    from vlmkit.eval.runner import EvalResult

# --quick: the same pipeline, small enough for a test: a small world and model, a few steps in every
# stage of the config's list. Its accuracy means nothing; the point is that every step runs for
# real and the report is complete.
QUICK_WORLD_AND_MODEL = [
    "world.n_train=300", "world.n_test=8", "world.vocab_size=400",
    "model.config.vision.hidden_size=32", "model.config.vision.intermediate_size=64",
    "model.config.vision.num_layers=1", "model.config.vision.num_heads=2",
    "model.config.llm.hidden_size=48", "model.config.llm.intermediate_size=96",
    "model.config.llm.num_layers=2", "model.config.llm.num_heads=4",
]
QUICK_VAL_SCENES = 32
"""Validation scenes of the quick world, when the config's world has any (held-out captions)."""
QUICK_STAGE = {"steps": 3, "warmup_steps": 1, "token_budget": 1024}
"""Every stage of the quick run."""
QUICK_CONTRASTIVE = {"pairs_per_step": 16, "eval_pairs": 16}
"""A contrastive stage of the quick run: few pairs per step and few held-out pairs."""
DEFAULT_CONFIG = "demo"
"""The demo's config: vlmkit/configs/demo.yaml."""
LANGUAGE_STAGE = "language"
"""The stage whose end is the language reference: the LLM's language pretraining, before any
vision-language stage (report.json's `language_perplexity.before_vl`)."""
PERPLEXITY_DOCS = 40
"""Held-out text documents scored after each stage."""
EVAL_BATCH = 64
"""Questions decoding together in the held-out evaluation."""
FOLLOW_UP_SEED = 0
"""Seeds which question of an image each follow-up is asked after (eval/follow_up.py)."""
PERPLEXITY_RATIO_TARGET = 1.5
"""The most the later stages may multiply the language stage's held-out text perplexity by."""
RETRIEVAL_METRICS = ("i2t", "t2i", "chance", "pairs")
"""The contrastive stage's held-out retrieval metrics (train/contrastive.py's `evaluate`)."""
ACCURACY_CHART, PERPLEXITY_CHART, LOSS_CHART = "accuracy.png", "perplexity.png", "loss.png"
"""report.md's charts, in DIR (loss.png is the trainer's)."""
TEXT_ONLY_FILE = "text_chat_heldout.json"
"""The world's held-out text-only chats (data/corpus.py): a question about a corpus topic, no image."""
TEXT_ONLY_QUESTIONS = 3
"""Text-only questions asked of the final model (each about another held-out topic)."""
TEXT_ONLY_REPLY_TOKENS = 48
"""The most tokens of a text-only reply."""
MODEL_COLUMNS = [("model (%)", "accuracy"), ("blind (%)", "blind_accuracy"), ("chance (%)", "chance_accuracy")]
"""report.md's per-category columns: header, key in the category's row."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run of the same pipeline (for tests)")
    parser.add_argument("--resume", action="store_true", help="continue a killed demo run in --out")
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="NAME_OR_PATH",
                        help="the run config to demo: a ready config's name or a YAML path of a synthetic "
                             f"world's run (default: {DEFAULT_CONFIG}, vlmkit/configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the demo config by dotted path")
    post_train_demo.add_arguments(parser)


def quick_overrides(cfg: RunConfig) -> list[str]:
    """`--quick`'s overrides of `cfg` (the config as it would run): a small world and model, and
    each of its stages, however many, a few steps long."""
    overrides = list(QUICK_WORLD_AND_MODEL)
    if cfg.world is not None and cfg.world.n_val > 0:
        overrides.append(f"world.n_val={QUICK_VAL_SCENES}")
    for i, stage in enumerate(cfg.stages):
        overrides += [f"stages.{i}.{key}={value}" for key, value in QUICK_STAGE.items()]
        if stage.kind == "contrastive":
            overrides += [f"stages.{i}.contrastive.{key}={value}" for key, value in QUICK_CONTRASTIVE.items()]
    return overrides


def demo_config(args: argparse.Namespace, out: Path) -> RunConfig:
    """The demo config (`--config`) with its world under DIR, the quick overrides, then the user's --set."""
    base = [f"world.dir={out / 'world'}"]
    quick = quick_overrides(load_config(args.config, base + args.overrides)) if args.quick else []
    cfg = load_config(args.config, base + quick + args.overrides)
    if args.quick:
        cfg.progress = False
    return cfg


# The pipeline's steps import the model, training and evaluation code (and with them torch) when
# they run, so that `vlmkit demo --help` answers without loading torch.

def perplexity_hook(cfg: RunConfig, heldout: Path) -> Callable[[int, Any], dict]:
    """The trainer's `on_stage_end`: each stage's wall seconds and held-out text perplexity after it
    (the report's per-stage language curve)."""
    from vlmkit.eval.ppl import text_perplexity  # loads torch (kept out of `vlmkit demo --help`)

    mark = time.perf_counter()

    def on_stage_end(index: int, model) -> dict:
        nonlocal mark
        result = {"seconds": round(time.perf_counter() - mark, 2),
                  "text_perplexity": text_perplexity(model, heldout, limit=PERPLEXITY_DOCS)["perplexity"]}
        mark = time.perf_counter()
        return result

    return on_stage_end


def train_demo(cfg: RunConfig, out: Path, world: Path, *, resume: bool, quick: bool) -> Path:
    """The config's curriculum, each stage's held-out text perplexity measured at its end; returns
    DIR/final."""
    from vlmkit.train.loop import train  # loads torch (kept out of `vlmkit demo --help`)

    return train(cfg, out, resume=resume, on_stage_end=perplexity_hook(cfg, world / "text_heldout.jsonl"),
                 meta={"demo": {"quick": quick}})


def evaluate_demo(final: Path, world: Path, *,
                  progress: bool) -> tuple[VLM, dict[str, EvalResult], dict[str, EvalResult]]:
    """The saved checkpoint, loaded as a user would, on the world's held-out split, then on its
    follow-ups (each question asked after another one about the same image and the model's own reply
    to it, in one conversation: eval/follow_up.py), each beside its blind baseline on the same
    questions: (the model, {"model", "blind"} of the questions, {"model", "blind"} of the follow-ups)."""
    from vlmkit.api import VLM  # loads torch (kept out of `vlmkit demo --help`)
    from vlmkit.eval.benchmarks import read_benchmark
    from vlmkit.eval.follow_up import follow_up_benchmark
    from vlmkit.eval.prompts import world_prompt_format
    from vlmkit.eval.runner import REPLY_TOKENS, evaluate_with_blind

    model = VLM.from_pretrained(final)
    # The world's questions are asked as trained: no added "answer with a single word" instruction,
    # the image where its training records put it.
    asked = dict(mode="gen", batch_size=EVAL_BATCH, max_new_tokens=REPLY_TOKENS["synth"],
                 prompt_format=world_prompt_format(world), progress=progress)
    benchmark = read_benchmark(world / "synth.jsonl")
    results = evaluate_with_blind(model, benchmark, **asked)
    follow_ups = follow_up_benchmark(benchmark, results["model"], seed=FOLLOW_UP_SEED)
    return model, results, evaluate_with_blind(model, follow_ups, **asked)


def text_only_replies(model: VLM, world: Path) -> list[dict[str, Any]]:
    """report.json's `text_only`: the final model's greedy replies to the first held-out text-only
    chats of TEXT_ONLY_FILE (one per topic, no image), each with the reference reply, its length in
    tokens and `repeats`, the share of its tokens that are its most frequent one (near 1: one token
    over and over; None for an empty reply)."""
    asked: dict[str, Record] = {}  # a topic's first record
    for record in read_records(world / TEXT_ONLY_FILE):
        asked.setdefault(chat_unit(record.id), record)
        if len(asked) == TEXT_ONLY_QUESTIONS:
            break
    records = list(asked.values())
    replies = model.generate([[{"role": "user", "content": r.messages[0].content}] for r in records],
                             max_new_tokens=TEXT_ONLY_REPLY_TOKENS)
    out = []
    for record, reply in zip(records, replies):
        tokens = model.tokenizer.encode(reply)
        out.append({"question": record.messages[0].content, "reply": reply, "reference": record.messages[1].content,
                    "tokens": len(tokens), "repeats": max(Counter(tokens).values()) / len(tokens) if tokens else None})
    return out


def accuracy_section(results: dict[str, EvalResult]) -> dict[str, Any]:
    """A model's and its blind baseline's results ({"model", "blind"}) beside chance:
    eval/report.py's `compare_with_baselines` with the world's chance per category."""
    return compare_with_baselines(results["model"].summary, results["blind"].summary, chance_accuracy)


def language_perplexity(history: list[dict]) -> dict[str, Any]:
    """report.json's `language_perplexity`: held-out text perplexity after each stage (`per_stage`),
    after the language stage (`before_vl`) and after the last one (`after_vl`), and their ratio
    (`ratio_final_to_language`: what the later stages cost the LLM's language; None without a stage
    named LANGUAGE_STAGE)."""
    per_stage = [{"stage": h["stage"], "perplexity": h["eval"].get("text_perplexity")} for h in history]
    before = next((p["perplexity"] for p in per_stage if p["stage"] == LANGUAGE_STAGE), None)
    after = per_stage[-1]["perplexity"]
    ratio = after / before if before is not None and after is not None else None
    return {"before_vl": before, "after_vl": after, "per_stage": per_stage, "ratio_final_to_language": ratio}


def vision_pretraining(history: list[dict]) -> dict[str, Any] | None:
    """report.json's `vision_pretraining`: the held-out retrieval of the last contrastive stage at its
    end (train/contrastive.py's `retrieval_<metric>/<source>` metrics, in its stage history):
    {"stage", "source", "i2t", "t2i", "chance", "pairs"}; None without a contrastive stage that
    measured retrieval."""
    contrastive = [h for h in history if h["kind"] == "contrastive"]
    if not contrastive:
        return None
    stage = contrastive[-1]
    source = next((key.split("/", 1)[1] for key in stage["eval"] if key.startswith("retrieval_i2t/")), None)
    if source is None:
        return None
    return {"stage": stage["stage"], "source": source,
            **{metric: stage["eval"][f"retrieval_{metric}/{source}"] for metric in RETRIEVAL_METRICS}}


def build_report(results: dict[str, EvalResult], follow_up: dict[str, EvalResult], model: VLM, final: Path,
                 out: Path, *, text_only: list[dict[str, Any]], quick: bool,
                 timings: dict[str, float]) -> dict[str, Any]:
    """report.json's content (docs/training.md lists its keys), all but `wall_seconds`, from
    `evaluate_demo`'s results of the questions and of their follow-ups, and `text_only_replies`."""
    import torch

    comparison = accuracy_section(results)
    history = json.loads((final / "vlmkit.json").read_text())["stages"]
    return {
        "overall_accuracy": comparison["accuracy"],
        "blind_accuracy": comparison["blind_accuracy"],
        "chance_accuracy": comparison["chance_accuracy"],
        "per_category": comparison["per_category"],
        "test_questions": comparison["n"],
        "unparsed": results["model"].summary["unparsed"],
        "follow_up": accuracy_section(follow_up),
        "text_only": text_only,
        "language_perplexity": language_perplexity(history),
        "vision_pretraining": vision_pretraining(history),
        "stages": [{"stage": h["stage"], "steps": h["steps"], "tokens": h["tokens"], "final_loss": h["final_loss"],
                    "seconds": h["eval"].get("seconds", 0.0), "trainable": h["trainable"]} for h in history],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "quick": quick,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "out_dir": str(out),
        "model_dir": str(final),
    }


def perplexity_lines(ppl: dict[str, Any]) -> list[str]:
    """report.md's language paragraph: the perplexity after the language stage and after the last."""
    after = f"{ppl['after_vl']:.2f} after the last stage"
    if ppl["before_vl"] is None:
        return [f"Language perplexity on held-out text: {after} (no `{LANGUAGE_STAGE}` stage to compare with)."]
    return [f"Language perplexity on held-out text: {ppl['before_vl']:.2f} after language pretraining, {after}: "
            f"{ppl['ratio_final_to_language']:.2f}x (the target is <= {PERPLEXITY_RATIO_TARGET}x). After each "
            "stage in the table below and in perplexity.png."]


def vision_line(vision: dict[str, Any] | None) -> list[str]:
    """report.md's line on the vision pretraining stage's held-out retrieval (none without one)."""
    if vision is None:
        return []
    return [f"Vision pretraining (`{vision['stage']}`): held-out retrieval over {vision['pairs']} pairs of "
            f"`{vision['source']}`, image -> caption {percent(vision['i2t'])}%, caption -> image "
            f"{percent(vision['t2i'])}% (chance {percent(vision['chance'])}%).", ""]


def follow_up_lines(follow_up: dict[str, Any]) -> list[str]:
    """report.md's follow-up section: questions asked after a first one in the same conversation."""
    return ["", f"Follow-up questions (asked later in the same conversation about the image): "
            f"**{percent(follow_up['accuracy'])}%** (blind {percent(follow_up['blind_accuracy'])}%, chance "
            f"{percent(follow_up['chance_accuracy'])}%) on {follow_up['n']} questions.", "",
            *category_table(follow_up["per_category"], MODEL_COLUMNS)]


def text_only_lines(text_only: list[dict[str, Any]]) -> list[str]:
    """report.md's text-only section: each question, the model's reply and the reference."""
    lines = ["", "Text-only questions (no image; held-out topics of the text corpus):", ""]
    for item in text_only:
        repeats = "" if item["repeats"] is None else f"; {percent(item['repeats'])}% of its tokens are one token"
        lines += [f"- **{item['question']}** -> {json.dumps(item['reply'])} ({item['tokens']} tokens{repeats}); "
                  f"reference: {json.dumps(item['reference'])}"]
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """report.md without its charts: the headline, per category, follow-ups, text-only questions,
    vision pretraining, perplexity, stages, model size."""
    lines = ["# vlmkit demo", "",
             f"Held-out accuracy **{percent(report['overall_accuracy'])}%** (blind baseline "
             f"{percent(report['blind_accuracy'])}%, chance {percent(report['chance_accuracy'])}%) on "
             f"{report['test_questions']} questions; {report['wall_seconds']:.0f} s wall in all.", ""]
    lines += category_table(report["per_category"], MODEL_COLUMNS)
    lines += follow_up_lines(report["follow_up"])
    lines += text_only_lines(report["text_only"])
    lines += ["", *vision_line(report["vision_pretraining"]), *perplexity_lines(report["language_perplexity"]), "",
              "| stage | steps | tokens | seconds | final loss | text perplexity after |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    per_stage = report["language_perplexity"]["per_stage"]
    lines += [f"| {s['stage']} | {s['steps']} | {s['tokens']} | {s['seconds']:.0f} | {s['final_loss']:.3f} | "
              f"{'' if p['perplexity'] is None else format(p['perplexity'], '.2f')} |"
              for s, p in zip(report["stages"], per_stage)]
    lines += ["", f"Model: {report['params_m']:.2f}M parameters. Timings in `report.json` (`timings`)."]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    charts = [("accuracy", ACCURACY_CHART), ("language perplexity", PERPLEXITY_CHART), ("loss", LOSS_CHART)]
    embedded = [line for alt, file in charts for line in ("", f"![{alt}]({file})")]
    return "\n".join(summary_lines(report) + embedded + [""])


def write_demo_report(report: dict[str, Any], out: Path) -> None:
    """DIR/report.json, DIR/accuracy.png (model, blind and chance per category), DIR/perplexity.png
    (held-out text perplexity after each stage) and DIR/report.md."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_categories(report["per_category"], BASELINE_SERIES, out / ACCURACY_CHART, ylabel="held-out accuracy (%)")
    per_stage = [p for p in report["language_perplexity"]["per_stage"] if p["perplexity"] is not None]
    plot_stage_values([p["stage"] for p in per_stage], [p["perplexity"] for p in per_stage], out / PERPLEXITY_CHART,
                      ylabel="held-out text perplexity", title="the LLM's language after each stage", log_y=True)
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
        model, results, follow_up = evaluate_demo(final, world, progress=not args.quick)
        text_only = text_only_replies(model, world)
    report = build_report(results, follow_up, model, final, out, text_only=text_only, quick=args.quick,
                          timings=timings)
    report["wall_seconds"] = time.perf_counter() - start
    write_demo_report(report, out)
    print("\n".join(["", *summary_lines(report), "", f"Report in {out / 'report.json'}"]))
    return 0
