"""Evaluate the arms of the hybrid-encoder study (docs/studies/hybrid-encoder.md) on the world's
held-out small-text scenes, each with its blind baseline, and print the study's table; with
`--probe`, also fit a linear probe of the small digit on each arm's visual tokens.

    OMP_NUM_THREADS=1 .venv/bin/python docs/studies/hybrid-encoder/evaluate.py \
        runs/world-small-text runs/hybrid-study/lowres/final runs/hybrid-study/hybrid/final --out runs/hybrid-study
"""

import argparse
import json
from pathlib import Path

import torch

from vlmkit import VLM
from vlmkit.data.synth import (CATEGORIES, GRID, SMALL_TEXT_CATEGORIES, Scene, chance_accuracy, render,
                               split_small_text_scenes)
from vlmkit.eval.prompts import world_prompt_format
from vlmkit.eval.runner import evaluate_with_blind

BENCHMARK = "synth_small_text.jsonl"
REPLY_TOKENS = 40
"""The synthetic benchmarks' reply budget (eval/runner.py's REPLY_TOKENS)."""
PROBE_SCENES = {"train": 2000, "test": 400}
"""Small-text scenes the probe is fitted on and scored on (seed 0's, as the world's splits)."""
PROBE_RIDGE = 1.0
"""The probe's ridge penalty (on standardised features)."""
PROBE_BATCH = 100


def digit_cell_tokens(model: VLM, scenes: list[Scene]) -> torch.Tensor:
    """(N, k * k * D): the visual tokens over each scene's small-digit cell, flattened."""
    processor = model.image_processor()
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), PROBE_BATCH):
            chunk = scenes[i:i + PROBE_BATCH]
            tokens = model.image_features(torch.cat([processor(render(s)) for s in chunk]))
            side = int(tokens.shape[1] ** 0.5)
            k = side // GRID
            for scene, t in zip(chunk, tokens):
                row, col = divmod(scene.small_digit.cell, GRID)
                out.append(t.reshape(side, side, -1)[row * k:(row + 1) * k, col * k:(col + 1) * k].reshape(-1))
    return torch.stack(out)


def probe_accuracy(model: VLM) -> float:
    """Held-out accuracy of a ridge-regression probe of the small digit on its cell's tokens."""
    scenes = split_small_text_scenes(0, PROBE_SCENES)
    x = {split: digit_cell_tokens(model, scenes[split]) for split in PROBE_SCENES}
    y = {split: torch.tensor([int(s.small_digit.digit) for s in scenes[split]]) for split in PROBE_SCENES}
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    train, test = (x["train"] - mean) / std, (x["test"] - mean) / std
    targets = torch.nn.functional.one_hot(y["train"], 10).float()
    weights = torch.linalg.solve(train.T @ train + PROBE_RIDGE * torch.eye(train.shape[1]), train.T @ targets)
    return ((test @ weights).argmax(1) == y["test"]).float().mean().item()


def _split(summary: dict) -> tuple[float, float, int, int]:
    """(small_text accuracy, accuracy of every other category together, their question counts)."""
    per = summary["per_category"]
    small = per[SMALL_TEXT_CATEGORIES[0]]
    rest = [v for c, v in per.items() if c not in SMALL_TEXT_CATEGORIES]
    n_rest = sum(v["n"] for v in rest)
    return small["accuracy"], sum(v["correct"] for v in rest) / n_rest, small["n"], n_rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe", action="store_true", help="also probe the small digit in the visual tokens")
    args = parser.parse_args()
    bench = Path(args.world) / BENCHMARK
    results = {}
    for ckpt in args.checkpoints:
        model = VLM.load(ckpt)
        got = evaluate_with_blind(model, bench, prompt_format=world_prompt_format(args.world), max_new_tokens=REPLY_TOKENS,
                                  image_root=args.world, progress=False)
        results[ckpt] = {k: r.summary for k, r in got.items()}
        if args.probe:
            results[ckpt]["probe_accuracy"] = probe_accuracy(model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "hybrid_encoder.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| arm | small_text | other categories | " + " | ".join(CATEGORIES) + " |")
    for ckpt, by in results.items():
        for kind in ("model", "blind"):
            summary = by[kind]
            small, rest, _, _ = _split(summary)
            per = summary["per_category"]
            cells = [f"{100 * per[c]['accuracy']:.1f}" if c in per else "-" for c in CATEGORIES]
            print(f"| {ckpt} ({kind}) | {100 * small:.1f} | {100 * rest:.1f} | " + " | ".join(cells) + " |")
    print(f"chance small_text {100 * chance_accuracy('small_text'):.1f}")
    for ckpt, by in results.items():
        if "probe_accuracy" in by:
            print(f"{ckpt}: linear probe of the small digit {100 * by['probe_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
