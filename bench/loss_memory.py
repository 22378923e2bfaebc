"""Output head + cross-entropy at a 150k vocabulary: peak memory and time, plain vs chunked (vs Liger).

One forward and backward of the per-token loss of M tokens under a (V, D) head, as
`VLMModel.compute_loss` runs it: plain (`F.linear` -> (M, V) logits -> `F.cross_entropy` in fp32),
chunked (models/loss.py's `linear_cross_entropy`, the CPU and fallback path) and, on CUDA with
liger-kernel installed, Liger's kernel. Every variant runs in its own process on the same inputs,
so each peak is its own: on CUDA `torch.cuda.max_memory_allocated` above the inputs, on the CPU the
growth of the process's peak resident set (ru_maxrss) over what it held with the inputs built.
Both peaks include the gradients of hidden and weight (M x D + V x D), which every variant makes.
The upstream gradient is a mean over tokens (supervised training); `--weighted` gives each token its
own weight instead (a policy gradient through `token_loss`), which makes the chunked path recompute
the logits for the weight gradient.

Run: .venv/bin/python bench/loss_memory.py   (CPU: M=512, D=896, fp32, about a minute)
     .venv/bin/python bench/loss_memory.py --tokens 16384 --hidden 1536 --dtype bf16   (CUDA)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vlmkit.models.loss import default_chunk_size, linear_cross_entropy

QWEN2_VOCAB = 151_936
"""Qwen2 / Qwen2.5's vocabulary (its embedding rows)."""
QWEN2_05B_HIDDEN = 896
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KIB = 1024
MIB = 2**20


def per_token_loss(variant: str, hidden, weight, targets, chunk_size: int | None) -> torch.Tensor:
    if variant == "plain":
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    backend = "liger" if variant == "liger" else "chunked"
    return linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, backend=backend)


def step(variant: str, hidden, weight, targets, token_weights, chunk_size: int | None) -> float:
    """One forward and backward; the loss sum."""
    hidden.grad = weight.grad = None
    losses = per_token_loss(variant, hidden, weight, targets, chunk_size)
    (losses * token_weights).sum().backward()
    return float(losses.detach().sum())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


def measure(args) -> dict:
    """The child process: build the inputs, run one step for its peak, then time the repeats."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    # made in their dtype and scaled in place: a temporary copy here would raise the baseline peak
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype).mul_(args.hidden ** -0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    token_weights = (torch.rand(args.tokens, device=device) if args.weighted
                     else torch.full((args.tokens,), 1.0 / args.tokens, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss_bytes()
    loss_sum = step(args.variant, hidden, weight, targets, token_weights, args.chunk_size)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(args.variant, hidden, weight, targets, token_weights, args.chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": args.variant, "peak_bytes": peak, "seconds": statistics.median(times), "loss_sum": loss_sum}


def run_child(variant: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", variant], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--tokens", type=int, default=16384 if cuda else 512, help="supervised tokens M")
    ap.add_argument("--hidden", type=int, default=QWEN2_05B_HIDDEN, help="hidden width D")
    ap.add_argument("--vocab", type=int, default=QWEN2_VOCAB, help="vocabulary V")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    ap.add_argument("--chunk-size", type=int, default=None, help="chunked path's tokens per chunk (default: "
                    "logits about the size of the hidden states)")
    ap.add_argument("--weighted", action="store_true", help="each token's loss weighted apart (policy gradients)")
    ap.add_argument("--repeats", type=int, default=3 if cuda else 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        args.variant = args.child
        print(json.dumps(measure(args)))
        return 0
    if args.device == "cuda" and not cuda:
        print("loss_memory: --device cuda needs a CUDA device; nothing measured")
        return 0
    argv = sys.argv[1:]
    variants = ["plain", "chunked"]
    if args.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        variants.append("liger")
    chunk = args.chunk_size or default_chunk_size(args.tokens, args.vocab, args.hidden)
    print(f"M={args.tokens} tokens, D={args.hidden}, V={args.vocab}, {args.dtype} on {args.device}, chunk {chunk} "
          f"tokens, {'weighted' if args.weighted else 'mean'} upstream gradient; logits alone would be "
          f"{args.tokens * args.vocab * 4 / MIB:,.0f} MiB in fp32")
    if args.device == "cuda" and "liger" not in variants:
        print("liger-kernel not installed (pip install 'vlmkit[gpu]'): its variant skipped")
    results = {v: run_child(v, argv) for v in variants}
    plain = results["plain"]
    for name, r in results.items():
        agree = abs(r["loss_sum"] - plain["loss_sum"]) / abs(plain["loss_sum"])
        print(f"{name:>8}: peak {r['peak_bytes'] / MIB:8,.0f} MiB above the inputs, {r['seconds'] * 1e3:8,.1f} ms "
              f"forward+backward, loss sum {r['loss_sum']:.4f} (relative difference to plain {agree:.1e})")
    for name, r in results.items():
        if name != "plain":
            print(f"{name} / plain: memory {r['peak_bytes'] / plain['peak_bytes']:.2f}x, "
                  f"time {r['seconds'] / plain['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
