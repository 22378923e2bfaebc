"""Training-step time with compiled blocks (models/compile.py, a stage's `compile: true`) against
the eager blocks, the same model and packs, measured in one run.

Both sides run full training steps (packed micro-batch, forward, backward, AdamW over every weight)
on copies of the same initial weights; steps alternate between the sides so that both see the same
machine load. The compiled side first runs warm-up steps over packs of different lengths (the
block compiles for the first length and once more with the token count symbolic); the compile time
reported is those warm-up steps' time minus as many eager steps. Every pack has a different length,
as in training.

Shapes: on the CPU (the default) a small VLM, SigLIP-style 2 x 128 tower at 64 px (patch 16: 16
tokens per image, MLP adapter) + a 4 x 256 decoder (GQA 4/2), vocabulary 2048, fp32, packs of about
`--budget` 1024 tokens; with `--device cuda` bench/gpu_train_step.py's 0.5B shape (a
Qwen2.5-0.5B-shaped decoder + a SigLIP-B-shaped tower at 224 px, pixel shuffle to 64 tokens per
image) under bf16 autocast, packs of `--budget` 16384 tokens.

    python bench/compile_train_step.py [--steps 8] [--budget 1024] [--threads 2]
    python bench/compile_train_step.py --device cuda [--steps 20] [--budget 16384]

Prints each side's median step time and tokens/s, the ratio compiled / eager, the compile time,
and the first step's loss of both sides (equal up to float rounding). `--device cuda` exits with a
message where CUDA is not available.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from gpu_train_step import shape as gpu_shape
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.packing import collate
from vlmkit.data.types import PackedBatch, Sample
from vlmkit.models.compile import compile_blocks
from vlmkit.models.config import VLMConfig
from vlmkit.models.vlm import VLMModel

IMAGE_TOKEN_ID = 1
"""The image token of the benchmark's vocabulary (ids past it are text)."""
WARMUP_LENGTHS = 3
"""Warm-up steps of the compiled side, each pack a different length: the static compile, the
dynamic one, and one step that must reuse it."""
MIN_TEXT, MAX_TEXT = 16, 512
"""Text tokens per sample, drawn log-uniformly (short and long answers, as in SFT data)."""
IMAGE_SHARE = 0.5
"""Share of samples holding one image."""

CPU_SHAPE = dict(vision=dict(style="siglip", image_size=64, patch_size=16, hidden_size=128, intermediate_size=512,
                             num_layers=2, num_heads=4),
                 adapter=dict(kind="mlp"),
                 llm=dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                          num_kv_heads=2))


def build(device: str) -> VLMModel:
    cfg = (dataclasses.replace(gpu_shape("0.5b").config, image_token_id=IMAGE_TOKEN_ID) if device == "cuda"
           else VLMConfig(**copy.deepcopy(CPU_SHAPE), image_token_id=IMAGE_TOKEN_ID))
    torch.manual_seed(0)
    return VLMModel(cfg).to(device)


def packs(model: VLMModel, count: int, budget: int, seed: int) -> list[PackedBatch]:
    """`count` packs of random samples, each filled up to about `budget` tokens (so lengths differ)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(count):
        samples, used = [], 0
        while used < budget * 0.9:
            u = float(torch.rand((), generator=gen))
            text = int(math.exp(math.log(MIN_TEXT) + u * math.log(MAX_TEXT / MIN_TEXT)))
            image = torch.rand((), generator=gen) < IMAGE_SHARE
            visual = cfg.tokens_per_tile if image else 0
            if used + visual + text > budget:
                break
            ids = [IMAGE_TOKEN_ID] * visual + torch.randint(2, cfg.llm.vocab_size, (text,), generator=gen).tolist()
            labels = [IGNORE_INDEX] * (visual + 1) + ids[visual + 1:]
            pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) if image else None
            samples.append(Sample(id=f"{p}.{len(samples)}", source="bench", input_ids=ids, labels=labels,
                                  pixel_values=pixels, tiles_per_image=[1] if image else []))
            used += visual + text
        out.append(collate(samples, budget))
    return out


class Side:
    """One model and its optimizer; `step(batch)` runs a training step and returns (seconds, loss)."""

    def __init__(self, model: VLMModel, device: str):
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step(self, batch: PackedBatch) -> tuple[float, float]:
        d = self.device
        pixels = batch.pixel_values.to(d) if batch.pixel_values is not None else None
        self._sync()
        t0 = time.perf_counter()
        with self.autocast:
            out = self.model.compute_loss(batch.input_ids.to(d), batch.labels.to(d), batch.position_ids.to(d),
                                          batch.cu_seqlens.to(d), pixel_values=pixels)
        loss = out.loss_sum / out.num_targets
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - t0, float(loss.detach())

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    parser.add_argument("--budget", type=int, default=None, help="tokens per pack (cpu 1024, cuda 16384)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/compile_train_step.py --device cuda needs a CUDA GPU; none is available here "
                 "(run it without --device for the CPU comparison)")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget or (16384 if args.device == "cuda" else 1024)
    eager = Side(build(args.device), args.device)
    compiled = Side(copy.deepcopy(eager.model), args.device)
    compile_blocks(compiled.model)
    warmup = packs(eager.model, WARMUP_LENGTHS, budget, seed=1)
    timed = packs(eager.model, args.steps, budget, seed=2)

    eager_warm = [eager.step(b) for b in warmup]
    compiled_warm = [compiled.step(b) for b in warmup]
    compile_seconds = sum(s for s, _ in compiled_warm) - sum(s for s, _ in eager_warm)
    times = {"eager": [], "compiled": []}
    for batch in timed:
        times["eager"].append(eager.step(batch)[0])
        times["compiled"].append(compiled.step(batch)[0])

    tokens = statistics.mean(b.num_tokens for b in timed)
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.steps} steps per side, "
          f"{tokens:.0f} tokens per pack on average (budget {budget})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:9s} median step {median * 1e3:8.1f} ms   {tokens / median:9.0f} tokens/s")
    ratio = statistics.median(times["eager"]) / statistics.median(times["compiled"])
    print(f"  compiled / eager throughput: {ratio:.2f}x")
    print(f"  compile time (warm-up steps over {WARMUP_LENGTHS} lengths, less eager): {compile_seconds:.1f} s")
    print(f"  first-step loss: eager {eager_warm[0][1]:.6f}, compiled {compiled_warm[0][1]:.6f}")


if __name__ == "__main__":
    main()
