"""Modality-mix study: how much language data to keep in joint vision-language pretraining.

DeepSeek-VL (Lu et al. 2024, section 3.2) reports that joint VL pretraining on multimodal data
alone erodes the LLM's language ability, and that keeping language data (7:3 language :
multimodal) with a modality warm-up preserves it at little multimodal cost. This script measures
that trade-off on the embedded synthetic world:

  - one base is trained once: language pretraining of the LLM, then adapter alignment (the
    demo's first two stages, vlmkit/configs/demo.yaml), shared by every arm;
  - each arm runs the demo's JOINT stage from a copy of that base, with a multimodal : language
    mixture (multimodal = captions + QA in a 3 : 5 ratio, language = the text corpus),
    with or without a modality warm-up (the image share starts at `--warmup-start` and moves
    linearly to the target over `--warmup-steps`); every arm has the same optimizer steps and
    token budget, so the arms differ in the mixture and the warm-up alone;
  - for the base and each arm: perplexity on held-out text (vlmkit.eval.ppl.text_perplexity:
    language retention) and accuracy on the synthetic test split (vlmkit.eval.runner.evaluate,
    gen mode) with its standard error.

    python bench/modality_mix.py --out runs/modality-mix      # a quick check of the plumbing; numbers are noise
    python bench/modality_mix.py --out runs/mm --n-train 5000 --n-test 100 --base-steps 60,30
        --joint-steps 400 --token-budget 4096 --ppl-docs 200     # the documented run: 17.7 min on a 2-core CPU

Writes OUT/modality_mix.json, OUT/modality_mix.md (the table) and OUT/modality_mix.png
(perplexity against accuracy per arm); docs/studies/modality-mix.md holds a measured run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import yaml

# (multimodal share, warm-up): the arms; 1.0 = multimodal only. 0.3 is DeepSeek-VL's 3 : 7.
ARMS: list[tuple[float, bool]] = [(1.0, False), (0.7, False), (0.7, True), (0.3, False), (0.3, True)]
CAPTION_SHARE_OF_MULTIMODAL = 0.375  # captions 0.3 : qa 0.5 (the demo's joint stage when the study began)


def _config(raw: dict, stages: list[dict]):
    from vlmkit.config import load_config

    raw = copy.deepcopy(raw)
    raw["stages"] = stages
    return load_config(raw)


def arm_name(multimodal: float, warmup: bool) -> str:
    return f"{round(100 * multimodal)}:{round(100 * (1 - multimodal))}" + (" warm-up" if warmup else "")


def joint_stage(raw_joint: dict, multimodal: float, warmup: bool, args) -> dict:
    """The demo's joint stage with this arm's mixture, length and modality warm-up."""
    mixture = {"captions": round(multimodal * CAPTION_SHARE_OF_MULTIMODAL, 4),
               "qa": round(multimodal * (1 - CAPTION_SHARE_OF_MULTIMODAL), 4)}
    if multimodal < 1:
        mixture["text"] = round(1 - multimodal, 4)
    return dict(raw_joint, mixture=mixture, steps=args.joint_steps, token_budget=args.token_budget,
                 warmup_steps=min(raw_joint.get("warmup_steps", 0), args.joint_steps // 4),
                 modality_warmup_steps=args.warmup_steps if warmup else 0,
                 image_share_start=args.warmup_start if warmup else 0.0)


def measure(model, bench: Path, heldout: Path, args) -> dict:
    from vlmkit.eval.ppl import text_perplexity
    from vlmkit.eval.prompts import world_prompt_format
    from vlmkit.eval.runner import REPLY_TOKENS, evaluate

    result = evaluate(model, bench, mode="gen", batch_size=64, max_new_tokens=REPLY_TOKENS["synth"],
                      prompt_format=world_prompt_format(bench.parent), progress=False)
    n = len(result.rows)
    return {"accuracy": result.accuracy,
            "accuracy_stderr": math.sqrt(result.accuracy * (1 - result.accuracy) / max(n, 1)),
            "questions": n,
            "per_category": {c: s["accuracy"] for c, s in result.per_category.items()},
            "text_perplexity": text_perplexity(model, heldout, limit=args.ppl_docs)["perplexity"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, r in results.items():
        marker = "*" if name == "base" else ("s" if r.get("warmup") else "o")
        ax.errorbar(r["text_perplexity"], 100 * r["accuracy"], yerr=100 * r["accuracy_stderr"], fmt=marker,
                    markersize=10 if name == "base" else 7, capsize=3)
        ax.annotate(name, (r["text_perplexity"], 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")  # multimodal-only training can raise perplexity by orders of magnitude
    ax.set_xlabel("held-out text perplexity, log scale (lower: language kept)")
    ax.set_ylabel("synthetic test accuracy, gen mode (%)  ± 1 s.e.")
    ax.set_title("joint stage mixture, multimodal : language (squares: with modality warm-up)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from vlmkit.api import VLM
    from vlmkit.config import find_config
    from vlmkit.train.loop import train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/modality-mix")
    p.add_argument("--n-train", type=int, default=2000, help="training scenes of the world")
    p.add_argument("--n-test", type=int, default=20, help="test scenes of the world (~7 questions each)")
    p.add_argument("--base-steps", default="30,10", help="steps of the shared language and align stages")
    p.add_argument("--joint-steps", type=int, default=30, help="steps of each arm's joint stage")
    p.add_argument("--warmup-steps", type=int, default=None, help="modality warm-up steps (default: half the joint)")
    p.add_argument("--warmup-start", type=float, default=0.0, help="image share at the start of the warm-up")
    p.add_argument("--token-budget", type=int, default=1024)
    p.add_argument("--ppl-docs", type=int, default=50, help="held-out text documents for perplexity")
    args = p.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = args.joint_steps // 2

    out = Path(args.out).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # training picks the same
    torch.manual_seed(0)
    raw = yaml.safe_load(find_config("demo").read_text())
    raw["base_dir"] = str(out)
    raw["progress"] = False
    # The question first: the layout docs/studies/modality-mix.md's figures were measured in.
    raw["world"].update({"dir": str(out / "world"), "n_train": args.n_train, "n_test": args.n_test,
                         "prompt_layout": "text-then-image"})
    stages = {s["name"]: s for s in raw["stages"]}
    base_stages = [dict(stages["language"]), dict(stages["align"])]
    for stage, steps in zip(base_stages, map(int, args.base_steps.split(","))):
        stage.update(steps=steps, token_budget=args.token_budget,
                     warmup_steps=min(stage.get("warmup_steps", 0), steps // 4))

    t0 = time.perf_counter()
    base_dir = out / "base"
    base_final = base_dir / "final"
    if not (base_final / "model.safetensors").is_file():
        train(_config(raw, base_stages), base_dir)
    world = out / "world"
    heldout, bench = world / "text_heldout.jsonl", world / "synth.jsonl"
    results = {"base": measure(VLM.from_pretrained(base_final).to(device), bench, heldout, args)}
    results["base"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"base: {results['base']}", flush=True)
    for multimodal, warmup in ARMS:
        name = arm_name(multimodal, warmup)
        t = time.perf_counter()
        arm_dir = out / f"mm{round(100 * multimodal)}{'-warmup' if warmup else ''}"
        cfg = _config(raw, [joint_stage(stages["joint"], multimodal, warmup, args)])
        final = train(cfg, arm_dir, model=VLM.from_pretrained(base_final))
        results[name] = {"multimodal_share": multimodal, "warmup": warmup,
                         **measure(VLM.from_pretrained(final).to(device), bench, heldout, args),
                         "seconds": round(time.perf_counter() - t, 1)}
        print(f"{name}: {results[name]}", flush=True)

    settings = {**vars(args), "device": str(device), "torch_threads": torch.get_num_threads(),
                "wall_seconds": round(time.perf_counter() - t0)}
    (out / "modality_mix.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    lines = ["| joint mixture (multimodal : language) | held-out text perplexity | synth accuracy (%) ± s.e. |",
             "| --- | ---: | ---: |"]
    lines += [f"| {'base (language + align, no joint)' if k == 'base' else k} | {r['text_perplexity']:.2f} | "
              f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f} |" for k, r in results.items()]
    (out / "modality_mix.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "modality_mix.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
