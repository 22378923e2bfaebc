"""`vlmkit demo [--out DIR] [--quick]`: the embedded default, end to end on a CPU in minutes.

1. generate the synthetic visual world (vlmkit.data.synth): scenes, captions, QA, text corpus;
2. train a tokenizer on its text;
3. pretrain the tiny LLM on the language corpus (standing in for a pretrained LLM);
4. the DeepSeek-VL curriculum (configs/demo.yaml): adapter alignment on captions with vision
   and LLM frozen; joint training of the LLM on captions with 5% language steps mixed in; SFT on
   QA (vision and adapter frozen after the alignment; docs/training.md measures why);
5. evaluate on the held-out test split, per category, against a blind baseline (the same model
   with every image blanked) and against chance, and measure language perplexity on held-out
   text before and after the vision-language stages.

Writes DIR/report.json, DIR/report.md, DIR/accuracy.png, DIR/loss.png and the model DIR/final/
(`vlmkit chat --model DIR/final --images-after-text --image PATH "question"`: the world asks
the question before the image, data/synth.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# --quick: the same pipeline, small enough for a test (well under a minute on 2 CPU cores): a small
# world and model, a few steps per stage. Its accuracy means nothing; the point is that every step
# runs for real and the report is complete.
QUICK_OVERRIDES = [
    "world.n_train=300", "world.n_test=8", "world.vocab_size=400",
    "model.config.vision.hidden_size=32", "model.config.vision.intermediate_size=64",
    "model.config.vision.num_layers=1", "model.config.vision.num_heads=2",
    "model.config.llm.hidden_size=48", "model.config.llm.intermediate_size=96",
    "model.config.llm.num_layers=2", "model.config.llm.num_heads=4",
    "stages.0.steps=3", "stages.1.steps=2", "stages.2.steps=3", "stages.3.steps=3",
    "stages.0.warmup_steps=1", "stages.1.warmup_steps=1", "stages.2.warmup_steps=1", "stages.3.warmup_steps=1",
    "stages.0.token_budget=1024", "stages.1.token_budget=1024", "stages.2.token_budget=1024",
    "stages.3.token_budget=1024",
]
PERPLEXITY_DOCS = 40  # held-out text documents scored before and after the VL stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run of the same pipeline (for tests)")
    parser.add_argument("--resume", action="store_true", help="continue a killed demo run in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of configs/demo.yaml by dotted path (repeatable)")


def chance_accuracy(items) -> tuple[float, dict[str, float]]:
    """Expected accuracy of uniform guessing over each category's answer space (the world's own
    definition, vlmkit.data.synth.chance_accuracy), overall weighted by questions per category."""
    from vlmkit.data.synth import chance_accuracy as category_chance

    counts: dict[str, int] = {}
    for item in items:
        counts[item.category] = counts.get(item.category, 0) + 1
    per_cat = {c: category_chance(c) for c in counts}
    overall = sum(per_cat[c] * n for c, n in counts.items()) / max(1, sum(counts.values()))
    return overall, per_cat


def plot_accuracy(per_category: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(per_category)
    x = range(len(cats))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(cats) + 2), 3.6))
    w = 0.27
    for k, (key, label, color) in enumerate((("accuracy", "model", "#4c72b0"), ("blind_accuracy", "blind (no image)", "#dd8452"),
                                             ("chance_accuracy", "chance", "#999999"))):
        ax.bar([i + (k - 1) * w for i in x], [100 * per_category[c][key] for c in cats], w, label=label, color=color)
    ax.set_xticks(list(x), cats, rotation=25, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["# vlmkit demo", "",
             f"Held-out accuracy **{pct(report['overall_accuracy'])}%** (blind baseline "
             f"{pct(report['blind_accuracy'])}%, chance {pct(report['chance_accuracy'])}%) on "
             f"{report['test_questions']} questions; {report['wall_seconds']:.0f} s wall in all.", "",
             "| category | questions | model (%) | blind (%) | chance (%) |", "| --- | ---: | ---: | ---: | ---: |"]
    for cat, s in report["per_category"].items():
        lines.append(f"| {cat} | {s['n']} | {pct(s['accuracy'])} | {pct(s['blind_accuracy'])} | {pct(s['chance_accuracy'])} |")
    ppl = report["language_perplexity"]
    lines += ["", f"Language perplexity on held-out text: {ppl['before_vl']:.2f} after language pretraining, "
              f"{ppl['after_vl']:.2f} after the vision-language stages.", "",
              "| stage | steps | tokens | seconds | final loss |", "| --- | ---: | ---: | ---: | ---: |"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['steps']} | {s['tokens']} | {s.get('seconds', 0):.0f} | {s['final_loss']:.3f} |")
    lines += ["", f"Model: {report['params_m']:.2f}M parameters. Timings in `report.json` (`timings`).",
              "", "![accuracy](accuracy.png)", "", "![loss](loss.png)", ""]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    print()
    print(f"{'category':<22}{'n':>6}{'model':>9}{'blind':>9}{'chance':>9}")
    for cat, s in report["per_category"].items():
        print(f"{cat:<22}{s['n']:>6}{100 * s['accuracy']:>8.1f}%{100 * s['blind_accuracy']:>8.1f}%"
              f"{100 * s['chance_accuracy']:>8.1f}%")
    print(f"{'overall':<22}{report['test_questions']:>6}{100 * report['overall_accuracy']:>8.1f}%"
          f"{100 * report['blind_accuracy']:>8.1f}%{100 * report['chance_accuracy']:>8.1f}%")
    ppl = report["language_perplexity"]
    print(f"language perplexity (held-out text): {ppl['before_vl']:.2f} before VL stages, {ppl['after_vl']:.2f} after")
    print(f"wall time {report['wall_seconds']:.0f} s; report in {report['out_dir']}/report.json")


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.api import VLM
    from vlmkit.config import load_config
    from vlmkit.eval.benchmarks import read_benchmark
    from vlmkit.eval.ppl import text_perplexity
    from vlmkit.eval.prompts import SYNTH_PROMPTS
    from vlmkit.eval.runner import REPLY_TOKENS, evaluate
    from vlmkit.train.data import prepare_world
    from vlmkit.train.loop import train

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"world.dir={out / 'world'}"] + (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    cfg = load_config("demo", overrides)
    if args.quick:
        cfg.progress = False

    # 1-2. the world and its tokenizer (reused when DIR/world already holds them)
    t = time.perf_counter()
    world = prepare_world(cfg.world, progress=cfg.progress)
    timings["world_and_tokenizer"] = time.perf_counter() - t

    # 3-4. language pretraining, then the vision-language curriculum
    heldout = world / "text_heldout.jsonl"
    mark = [time.perf_counter()]

    def on_stage_end(index: int, m) -> dict:
        result = {"seconds": round(time.perf_counter() - mark[0], 2)}
        if index in (0, len(cfg.stages) - 1):
            result["text_perplexity"] = text_perplexity(m, heldout, limit=PERPLEXITY_DOCS)["perplexity"]
        mark[0] = time.perf_counter()
        return result

    t = time.perf_counter()
    final = train(cfg, out, resume=args.resume, on_stage_end=on_stage_end, meta={"demo": {"quick": args.quick}})
    timings["train"] = time.perf_counter() - t

    # 5. evaluation of the saved checkpoint, as a user would load it
    t = time.perf_counter()
    trained = VLM.from_pretrained(final)
    bench = read_benchmark(world / "synth.jsonl")
    progress = not args.quick
    # The world's questions are asked as trained: no added "answer with a single word" instruction.
    kw = dict(mode="gen", batch_size=64, max_new_tokens=REPLY_TOKENS["synth"], prompt_format=SYNTH_PROMPTS,
              progress=progress)
    seen = evaluate(trained, bench, **kw)
    blind = evaluate(trained, bench, blind=True, **kw)
    timings["eval"] = time.perf_counter() - t
    chance, chance_per_cat = chance_accuracy(bench.items)

    meta = json.loads((final / "vlmkit.json").read_text())
    history = meta.get("stages", [])
    per_category = {}
    for cat, s in seen.per_category.items():
        per_category[cat] = {"n": s["n"], "accuracy": s["accuracy"],
                             "blind_accuracy": blind.per_category.get(cat, {}).get("accuracy", 0.0),
                             "chance_accuracy": chance_per_cat.get(cat, 0.0)}
    report = {
        "overall_accuracy": seen.accuracy,
        "blind_accuracy": blind.accuracy,
        "chance_accuracy": chance,
        "per_category": per_category,
        "test_questions": seen.summary["n"],
        "unparsed": seen.summary.get("unparsed", 0),
        "language_perplexity": {
            "before_vl": history[0]["eval"].get("text_perplexity", math.nan) if history else math.nan,
            "after_vl": history[-1]["eval"].get("text_perplexity", math.nan) if history else math.nan,
        },
        "stages": [{"stage": h["stage"], "steps": h["steps"], "tokens": h["tokens"], "final_loss": h["final_loss"],
                    "seconds": h["eval"].get("seconds", 0.0), "trainable": h["trainable"]} for h in history],
        "params_m": sum(p.numel() for p in trained.parameters()) / 1e6,
        "quick": args.quick,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": torch.get_num_threads(),
        "out_dir": str(out),
        "model_dir": str(final),
    }
    report["wall_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_accuracy(per_category, out / "accuracy.png")
    (out / "report.md").write_text(markdown(report))
    print_table(report)
    return 0
