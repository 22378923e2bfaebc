"""Modality-mix study: how much text-only data to keep in vision-language fine-tuning.

DeepSeek-VL (Lu et al. 2024, section 3.2) reports that training a VLM on multimodal data alone
erodes the LLM's language ability, and keeps a large share of text data in its joint stage. This
script measures the trade-off on the embedded synthetic world: one base model (the demo's
language, align and joint stages) is fine-tuned in several arms that differ only in the share of
text-only samples in the SFT mixture, and each arm reports

  - held-out accuracy on the synthetic test split (vlmkit.eval.runner.evaluate, gen mode), and
  - perplexity on held-out text (vlmkit.eval.ppl.text_perplexity): language retention.

    python bench/modality_mix.py --out runs/modality-mix                 # shares 0, 0.25, 0.5
    python bench/modality_mix.py --out runs/mm --shares 0,0.1,0.3,0.5 --sft-steps 300

Writes OUT/modality_mix.json and OUT/modality_mix.md; docs/studies/modality-mix.md holds a
measured table. Every arm starts from the same base checkpoint and sees the same number of
optimizer steps and token budget, so the arms differ in the mixture alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml


def _config(raw: dict, stages: list[dict]):
    from vlmkit.config import load_config

    raw = copy.deepcopy(raw)
    raw["stages"] = stages
    return load_config(raw)


def main(argv: list[str] | None = None) -> int:
    from vlmkit.api import VLM
    from vlmkit.config import find_config
    from vlmkit.eval.ppl import text_perplexity
    from vlmkit.eval.runner import evaluate
    from vlmkit.train.loop import train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/modality-mix")
    p.add_argument("--shares", default="0,0.25,0.5", help="text shares of the SFT mixture, comma-separated")
    p.add_argument("--n-train", type=int, default=4000, help="training scenes of the world")
    p.add_argument("--n-test", type=int, default=300, help="test scenes of the world")
    p.add_argument("--base-steps", default="40,20,80", help="steps of the language, align and joint stages")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--ppl-docs", type=int, default=200, help="held-out text documents for perplexity")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # training picks the same
    torch.manual_seed(0)
    raw = yaml.safe_load(find_config("demo").read_text())
    raw["base_dir"] = str(out)
    raw["progress"] = False
    raw["world"].update({"dir": str(out / "world"), "n_train": args.n_train, "n_test": args.n_test})
    base_stages = [dict(s) for s in raw["stages"][:3]]
    for stage, steps in zip(base_stages, map(int, args.base_steps.split(","))):
        stage["steps"] = steps
        stage["token_budget"] = args.token_budget
        stage["warmup_steps"] = min(stage.get("warmup_steps", 0), steps // 4)
        if "modality_warmup_steps" in stage:
            stage["modality_warmup_steps"] = min(stage["modality_warmup_steps"], steps // 4)
    sft = dict(raw["stages"][3], steps=args.sft_steps, token_budget=args.token_budget)

    t0 = time.perf_counter()
    base_dir = out / "base"
    base_final = base_dir / "final"
    if not (base_final / "model.safetensors").is_file():
        train(_config(raw, base_stages), base_dir)
    world = out / "world"
    heldout = world / "text_heldout.jsonl"
    bench = world / "synth.jsonl"
    base = VLM.from_pretrained(base_final).to(device)
    results = {"base": {"text_perplexity": text_perplexity(base, heldout, limit=args.ppl_docs)["perplexity"],
                        "accuracy": evaluate(base, bench, batch_size=32, progress=False).accuracy}}
    print(f"base: {results['base']}", flush=True)
    for share in [float(s) for s in args.shares.split(",")]:
        mixture = {"qa": round(1.0 - share, 4)}
        if share > 0:
            mixture["text"] = share
        arm_dir = out / f"text-{share:g}"
        t = time.perf_counter()
        final = train(_config(raw, [dict(sft, mixture=mixture)]), arm_dir, model=VLM.from_pretrained(base_final))
        model = VLM.from_pretrained(final).to(device)
        result = evaluate(model, bench, batch_size=32, progress=False)
        results[f"{share:g}"] = {
            "text_share": share,
            "accuracy": result.accuracy,
            "per_category": {c: s["accuracy"] for c, s in result.per_category.items()},
            "text_perplexity": text_perplexity(model, heldout, limit=args.ppl_docs)["perplexity"],
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"text share {share:g}: {results[f'{share:g}']}", flush=True)

    settings = {**vars(args), "torch_threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - t0)}
    (out / "modality_mix.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    lines = ["| text share in SFT | held-out accuracy (%) | held-out text perplexity |", "| ---: | ---: | ---: |",
             f"| (base, before SFT) | {100 * results['base']['accuracy']:.1f} | {results['base']['text_perplexity']:.2f} |"]
    lines += [f"| {r['text_share']:g} | {100 * r['accuracy']:.1f} | {r['text_perplexity']:.2f} |"
              for k, r in results.items() if k != "base"]
    (out / "modality_mix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
