"""`vlmkit demo --post-train [--out DIR] [--quick]`: post-training on the synthetic world, measured.

Continues from the demo's model in DIR/final (running `vlmkit demo` into DIR first when it is
absent) and shows the three post-training methods from one SFT start:

1. reasoning scenes (data/synth.py's reasoning categories; here counting by attribute and chained
   relations, `CATEGORIES`) are written into DIR/post_train/world, apart from the demo's world,
   with their own held-out benchmark (synth_reasoning.jsonl);
2. the SFT start: the demo model fine-tuned briefly on the demo's QA with a light share of the
   reasoning QA, so it answers the new categories in their worked format, well short of solving
   them (DIR/post_train/sft_start);
3. from that start, with the same evaluation before and after:
   - `lora_sft`: a rank-16 LoRA on the decoder, SFT on the reasoning QA; beside it the same
     budget as full fine-tuning (`full_sft_after`);
   - `dpo`: pairs made from the start model's own samples judged by the world's answer checker
     (RLAIF-V's self-feedback; where every sample is wrong, the question's reference reply is the
     chosen side), then DPO against the frozen start model;
   - `grpo`: RL with the world's verifiable rewards (train/grpo.py), on-policy.

Writes DIR/post_training.json (per example: categories, before / after held-out accuracy on the
reasoning categories, blind_after, chance, other_categories_before / _after, trainable_fraction,
wall_seconds; lora_sft also full_sft_after) and DIR/post_train/grpo_curve.png. The methods and the
figures: docs/post-training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from vlmkit.config import RunConfig, load_config
from vlmkit.constants import IMAGE_PLACEHOLDER
from vlmkit.data.synth import chance_accuracy
from vlmkit.data.world import WORLD_FILE, generate
from vlmkit.eval.report import benchmark_chance

CATEGORIES = ("count_attribute", "chained_relation")
"""The reasoning categories the examples train and are measured on. `arithmetic` is left out: a
light SFT share leaves it at chance (the world never asks for the digit at a given cell, the step
its worked reply needs; docs/data-synthetic.md), so neither preference nor reward has a signal."""
START_REASONING_SHARE = 0.05
"""The reasoning share of the SFT start's mixture: light enough that the categories stay well short
of solved (docs/post-training.md)."""
POST_TRAIN_DIR = "post_train"
"""Everything the post-training examples write, inside the demo's DIR."""
REASONING_BENCH = "synth_reasoning.jsonl"
"""The held-out reasoning questions; evaluation asks them with its own wording and reply length
for this benchmark name, in its world's prompt layout (eval/runner.py's WORLD_BENCHMARKS,
REPLY_TOKENS), and self-feedback samples replies of that length."""
EVAL_BATCH = 64

# The budgets (full run / --quick). The quick run checks that every step runs and every field is
# written; its figures mean nothing. The examples' stages are the ready configs sft_lora, dpo and
# grpo (vlmkit/configs/), run from this demo's paths; the quick run shrinks their steps.
FULL = {"reasoning_train": 3000, "reasoning_test": 120, "other_test_limit": 600, "start_steps": 150,
        "dpo_prompts": 400}
QUICK = {"reasoning_train": 60, "reasoning_test": 6, "other_test_limit": 16, "start_steps": 3, "dpo_prompts": 8}
QUICK_EXAMPLE_OVERRIDES = ["stages.0.steps=2", "stages.0.grpo.prompts_per_step=2"]
FULL_SFT_LR = 5e-4
"""Full fine-tuning's rate beside the LoRA example (whose adapters take sft_lora.yaml's higher one)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--post-train", action="store_true",
                        help="after the demo (trained first if DIR/final is absent): LoRA SFT, DPO and GRPO "
                             "examples on reasoning questions, measured in DIR/post_training.json")


# ---------------------------------------------------------------------------------------------
# Data and configs
# ---------------------------------------------------------------------------------------------


def reasoning_world(root: Path, budget: dict, prompt_layout: str, progress: bool) -> Path:
    """DIR/post_train/world: reasoning scenes only (one default scene per split, which nothing
    reads: a world needs them), asked in the demo world's `prompt_layout`, written once."""
    world = root / "world"
    if not (world / WORLD_FILE).is_file():
        generate(world, n_train=1, n_val=0, n_test=1, turns_per_record=1, text_corpus=False,
                 n_train_reasoning=budget["reasoning_train"], n_test_reasoning=budget["reasoning_test"],
                 reasoning_categories=CATEGORIES, prompt_layout=prompt_layout, progress=progress)
    return world


def example_config(name: str, demo_cfg: RunConfig, start: Path, *, quick: bool, extra: list[str] = ()) -> RunConfig:
    """A ready config (sft_lora, dpo, grpo) run from this demo: its world spec (which anchors the
    configs' relative paths: DIR/world, beside DIR/post_train) and its SFT start."""
    world = json.dumps(dataclasses.asdict(demo_cfg.world))
    overrides = [f"world={world}", f"model.pretrained={start}", f"progress={str(not quick).lower()}",
                 *(QUICK_EXAMPLE_OVERRIDES if quick else []), *extra]
    return load_config(name, overrides)


def start_config(demo_cfg: RunConfig, budget: dict, *, quick: bool) -> RunConfig:
    """The SFT start: the demo's model on its QA with a light share of reasoning questions (the
    sft_lora config's sources and schedule, full fine-tuning)."""
    share = {"qa": 1 - START_REASONING_SHARE, "reasoning": START_REASONING_SHARE}
    return example_config("sft_lora", demo_cfg, demo_cfg.resolve("../final"), quick=quick, extra=[
        "stages.0.name=sft_start", "stages.0.lora=null", f"stages.0.llm_lr={FULL_SFT_LR}",
        f"stages.0.mixture={json.dumps(share)}", f"stages.0.steps={budget['start_steps']}"])


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def measure(model_dir: Path, world: Path, demo_world: Path, budget: dict, *, blind: bool) -> dict:
    """Held-out accuracy on the reasoning categories (with chance, and the blind baseline when
    asked) and on the demo's own categories."""
    from vlmkit.api import VLM  # loads torch (kept out of `vlmkit demo --help`)
    from vlmkit.eval.runner import evaluate, evaluate_with_blind

    model = VLM.from_pretrained(model_dir)
    kw = {"mode": "gen", "batch_size": EVAL_BATCH, "progress": False}
    if blind:
        runs = evaluate_with_blind(model, world / REASONING_BENCH, **kw)
        reasoning = runs["model"]
    else:
        reasoning = evaluate(model, world / REASONING_BENCH, **kw)
    other = evaluate(model, demo_world / "synth.jsonl", limit=budget["other_test_limit"], **kw)
    per_category = reasoning.summary["per_category"]
    result = {"accuracy": reasoning.summary["accuracy"],
              "per_category": {c: row["accuracy"] for c, row in per_category.items()},
              "chance": benchmark_chance(per_category, chance_accuracy)[0],
              "other_accuracy": other.summary["accuracy"]}
    if blind:
        result["blind_accuracy"] = runs["blind"].summary["accuracy"]
    return result


# ---------------------------------------------------------------------------------------------
# The examples
# ---------------------------------------------------------------------------------------------


def train_run(cfg, out: Path) -> tuple[Path, float, float]:
    """Train `cfg` into `out` (resuming a killed run there; a finished one is reused); (DIR/final,
    training wall seconds, trainable fraction of the model's parameters in its last stage)."""
    from vlmkit.train.loop import train  # loads torch

    final, record = out / "final", out / "post_train_run.json"
    if (final / "vlmkit.json").is_file() and record.is_file():
        done = json.loads(record.read_text())
        return final, done["wall_seconds"], done["trainable_fraction"]
    fraction: dict[str, float] = {}

    def on_stage_end(index: int, model) -> dict:
        total = sum(p.numel() for p in model.parameters())
        fraction["value"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / total
        return {}

    start = time.perf_counter()
    train(cfg, out, resume=(out / "checkpoints").is_dir(), on_stage_end=on_stage_end)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"wall_seconds": seconds, "trainable_fraction": fraction["value"]}))
    return final, seconds, fraction["value"]


def self_feedback_data(start: Path, world: Path, out: Path, budget: dict) -> tuple[Path, dict]:
    """Preference pairs from the start model's own replies to reasoning train questions, judged by
    the world's answer checker; returns (the pairs file, the sampling stats)."""
    from vlmkit.api import VLM
    from vlmkit.eval.runner import REPLY_TOKENS
    from vlmkit.train.rewards import Task, check_world
    from vlmkit.train.self_feedback import FeedbackPrompt, self_feedback_pairs, write_pairs

    pairs = out / "pairs.jsonl"
    stats_file = out / "pairs_stats.json"
    if pairs.is_file() and stats_file.is_file():
        return pairs, json.loads(stats_file.read_text())
    records = json.loads((world / "qa_reasoning_train.json").read_text())[: budget["dpo_prompts"]]
    prompts = []
    for rec in records:
        question = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
        reference = next(t["value"] for t in reversed(rec["conversations"]) if t["from"] == "gpt")
        turn = {"role": "user", "content": content_parts(question, world / rec["image"])}
        prompts.append(FeedbackPrompt(rec["id"], [turn], Task(rec["id"], reference)))

    def checker(reply: str, task: Task) -> bool:
        return check_world(reply, task.answer, task) == 1.0

    made = self_feedback_pairs(VLM.from_pretrained(start), prompts, checker, samples_per_prompt=8,
                               temperature=1.0, max_new_tokens=REPLY_TOKENS[Path(REASONING_BENCH).stem], seed=0,
                               reference_of=lambda task: task.reference)
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(made.rows, pairs, image_root=world)
    stats = dataclasses.asdict(made.stats)
    stats_file.write_text(json.dumps(stats, indent=1))
    return pairs, stats


def content_parts(question: str, image: Path) -> list[dict]:
    """A LLaVA human turn as content parts, the image where its placeholder stands (before or after
    the question, as the world's prompt layout put it and the demo model was trained)."""
    before, _, after = question.partition(IMAGE_PLACEHOLDER)
    parts = [{"type": "text", "text": before}] if before.strip() else []
    parts.append({"type": "image", "image": str(image)})
    if after.strip():
        parts.append({"type": "text", "text": after})
    return parts


def grpo_curve(run_dir: Path, path: Path) -> list[dict]:
    """The GRPO run's reward and accuracy per step (from its metrics.jsonl), plotted to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "reward" in r and not r.get("eval")]
    curve = [{"step": r["global_step"], "reward": r["reward"], "accuracy": r.get("accuracy")} for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["reward"] for c in curve], label="reward")
    if all(c["accuracy"] is not None for c in curve):
        ax.plot([c["step"] for c in curve], [c["accuracy"] for c in curve], label="rollout accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("GRPO on the reasoning categories")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curve


def run(args: argparse.Namespace, demo_run, demo_cfg: RunConfig) -> int:
    """`demo_run(args)` runs the plain demo (train/demo.py's `run`) when DIR/final is absent;
    `demo_cfg` is its run config (its world spec anchors the examples' paths)."""
    out = Path(args.out)
    if not (out / "final" / "vlmkit.json").is_file():
        demo_run(args)
    budget = QUICK if args.quick else FULL
    progress = not args.quick
    root = out / POST_TRAIN_DIR
    root.mkdir(parents=True, exist_ok=True)
    demo_world = out / "world"
    world = reasoning_world(root, budget, demo_cfg.world.prompt_layout, progress)
    categories = list(CATEGORIES)

    start, _, _ = train_run(start_config(demo_cfg, budget, quick=args.quick), root / "sft_start")
    before = measure(start, world, demo_world, budget, blind=False)
    report: dict[str, Any] = {"sft_start": str(start), "chance": before["chance"], "before": before,
                              "budget": budget, "quick": args.quick}

    def example(name: str, cfg, extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        final, train_seconds, fraction = train_run(cfg, root / name)
        after = measure(final, world, demo_world, budget, blind=True)
        entry = {"categories": categories, "before": before["accuracy"], "after": after["accuracy"],
                 "per_category_before": before["per_category"], "per_category_after": after["per_category"],
                 "blind_after": after["blind_accuracy"], "chance": report["chance"],
                 "other_categories_before": before["other_accuracy"],
                 "other_categories_after": after["other_accuracy"], "trainable_fraction": fraction,
                 "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
                 **(extra or {})}
        report[name] = entry
        (out / "post_training.json").write_text(json.dumps(report, indent=2) + "\n")
        return entry

    quick = args.quick
    full_cfg = example_config("sft_lora", demo_cfg, start, quick=quick,
                              extra=["stages.0.name=full_sft", "stages.0.lora=null", f"stages.0.llm_lr={FULL_SFT_LR}"])
    full_final, full_seconds, _ = train_run(full_cfg, root / "full_sft")
    full_after = measure(full_final, world, demo_world, budget, blind=False)
    example("lora_sft", example_config("sft_lora", demo_cfg, start, quick=quick),
            {"full_sft_after": full_after["accuracy"], "full_sft_other_after": full_after["other_accuracy"],
             "full_sft_train_seconds": round(full_seconds, 1)})

    t0 = time.perf_counter()
    _, pair_stats = self_feedback_data(start, world, root / "dpo_data", budget)  # where dpo.yaml reads
    pairs_seconds = time.perf_counter() - t0  # 0 when the pairs were made by an earlier run
    entry = example("dpo", example_config("dpo", demo_cfg, start, quick=quick), {"pairs": pair_stats})
    entry["pairs_seconds"] = round(pairs_seconds, 1)
    entry["wall_seconds"] = round(entry["wall_seconds"] + pairs_seconds, 1)  # making the pairs counts

    example("grpo", example_config("grpo", demo_cfg, start, quick=quick))
    report["grpo"]["curve"] = grpo_curve(root / "grpo", root / "grpo_curve.png")
    (out / "post_training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {f: v[f] for f in ("before", "after", "blind_after", "other_categories_after")}
                      for k, v in report.items() if k in ("lora_sft", "dpo", "grpo")}, indent=1))
    print(f"Report in {out / 'post_training.json'}")
    return 0
