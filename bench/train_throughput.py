"""Training throughput on the CPU: vlmkit (packed, no padding) against transformers'
LlavaForConditionalGeneration (padded batches), same model shape, same samples, same threads,
measured in one run. Also: memory and step time with gradient checkpointing on and off.

Model (both sides): SigLIP 4 x 192 vision (128 px, patch 16 -> 64 image tokens, MLP projector)
+ Llama 6 x 256 decoder, vocab 4096. Samples: text lengths log-uniform in 16..512 plus 64 image
tokens each; every sample is supervised on its text tokens. AdamW, fp32.

    python bench/train_throughput.py [--steps 6] [--batch 8] [--threads 2]

Prints non-pad training tokens/s of each side and the ratio vlmkit / transformers. Gradient
checkpointing figures come from child processes (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

IMAGE_TOKENS = 64
VOCAB = 4096
IMAGE_TOKEN_ID = VOCAB - 1


def lengths_mix(n: int, gen: torch.Generator, lo: int = 16, hi: int = 512) -> list[int]:
    """Log-uniform text lengths (a realistic SFT spread of short and long answers)."""
    u = torch.rand(n, generator=gen)
    return [int(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo)))) for x in u.tolist()]


def make_samples(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, pixel_values) per sample: 64 image tokens first, then the text."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths_mix(n, gen):
        text = torch.randint(0, VOCAB - 1, (length,), generator=gen)
        ids = torch.cat([torch.full((IMAGE_TOKENS,), IMAGE_TOKEN_ID), text])
        pixels = torch.randn(1, 3, 128, 128, generator=gen)
        out.append((ids, pixels))
    return out


# ---------------------------------------------------------------------------------------------
# transformers: padded batches
# ---------------------------------------------------------------------------------------------


def hf_model():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                image_size=128, patch_size=16)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=IMAGE_TOKENS,
                      projector_hidden_act="gelu")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg)


def hf_step(model, batch) -> int:
    B, T = len(batch), max(len(ids) for ids, _ in batch)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (s, _) in enumerate(batch):  # right padding
        ids[b, : len(s)], mask[b, : len(s)] = s, 1
        labels[b, IMAGE_TOKENS: len(s)] = s[IMAGE_TOKENS:]
    pixels = torch.cat([p for _, p in batch])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    out.loss.backward()
    return int(mask.sum())


# ---------------------------------------------------------------------------------------------
# vlmkit: packed micro-batches
# ---------------------------------------------------------------------------------------------


def vlmkit_model():
    from vlmkit.models.config import VLMConfig
    from vlmkit.models.vlm import VLMModel

    cfg = VLMConfig(
        vision=dict(style="siglip", image_size=128, patch_size=16, hidden_size=192, intermediate_size=768,
                    num_layers=4, num_heads=4, feature_layer=-1),
        adapter=dict(kind="mlp", depth=2, hidden_act="gelu"),
        llm=dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=4,
                 max_position_embeddings=1024),
        image_token_id=IMAGE_TOKEN_ID,
    )
    torch.manual_seed(0)
    return VLMModel(cfg)


def vlmkit_step(model, batch) -> int:
    ids, labels, pos, cu = [], [], [], [0]
    for s, _ in batch:
        lab = s.clone()
        lab[:IMAGE_TOKENS] = -100
        ids.append(s)
        labels.append(lab)
        pos.append(torch.arange(len(s)))
        cu.append(cu[-1] + len(s))
    pixels = torch.cat([p for _, p in batch])
    out = model.compute_loss(torch.cat(ids), torch.cat(labels), torch.cat(pos),
                             torch.tensor(cu, dtype=torch.int32), pixel_values=pixels)
    out.loss.backward()
    return cu[-1]


def measure(side: str, steps: int, batch: int, warmup: int = 1) -> dict:
    model = hf_model() if side == "transformers" else vlmkit_model()
    step_fn = hf_step if side == "transformers" else vlmkit_step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = make_samples(batch * (steps + warmup), seed=1)
    tokens, slots, t0 = 0, 0, 0.0
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        chunk = samples[i * batch:(i + 1) * batch]
        n = step_fn(model, chunk)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += n
            slots += len(chunk) * max(len(s) for s, _ in chunk)
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    if side == "vlmkit":
        slots = tokens  # one pack per step: every slot holds a real token
    return {"side": side, "tokens_per_s": tokens / dt, "pad_fraction": 1 - tokens / slots,
            "params_m": params / 1e6, "seconds": dt}


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def saved_activation_mib(model, batch) -> float:
    """MiB of tensors the forward pass keeps for backward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vlmkit_step(model, batch)
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def checkpointing_probe(on: bool, steps: int, batch: int) -> dict:
    """One child process: vlmkit packed steps with gradient checkpointing on or off."""
    model = vlmkit_model()
    model.set_gradient_checkpointing(on)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = make_samples(batch * (steps + 1), seed=2)
    saved = saved_activation_mib(model, samples[:batch])
    base = peak_rss_mib()
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        vlmkit_step(model, samples[i * batch:(i + 1) * batch])
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t0) / steps
    peak = peak_rss_mib()
    return {"checkpointing": on, "step_seconds": dt, "peak_rss_mib": peak, "rss_growth_mib": peak - base,
            "saved_activations_mib": saved}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="samples per step (a padded batch / one pack)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(checkpointing_probe(args.probe == "on", args.steps, args.batch)))
        return 0
    print(f"threads {torch.get_num_threads()}, {args.steps} timed steps of {args.batch} samples "
          f"(text log-uniform 16..512 + {IMAGE_TOKENS} image tokens)")
    results = [measure("transformers", args.steps, args.batch), measure("vlmkit", args.steps, args.batch)]
    for r in results:
        print(f"{r['side']:>12}: {r['tokens_per_s']:8.0f} non-pad tokens/s  ({r['params_m']:.1f}M params, "
              f"padding {100 * r['pad_fraction']:.1f}% of slots)")
    print(f"ratio vlmkit / transformers: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    probes = []
    for flag in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--probe", flag, "--steps", str(max(2, args.steps // 2)),
                              "--batch", str(args.batch), "--threads", str(args.threads)],
                             capture_output=True, text=True, env={**os.environ})
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for p in probes:
        print(f"gradient checkpointing {'on ' if p['checkpointing'] else 'off'}: {p['step_seconds']:.2f} s/step, "
              f"activations saved for backward {p['saved_activations_mib']:.0f} MiB, "
              f"peak RSS {p['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
