"""Training-step throughput and model FLOPs utilisation (MFU) of a ~0.5B VLM on one CUDA GPU.

bf16 autocast, packed micro-batches (no padding) through the varlen attention backend, against
the same model and the same tokens in padded batches through SDPA: the ratio printed at the end is
packed tokens/s over padded tokens/s (non-pad tokens in both). MFU counts 6 * params * tokens plus
causal attention (per sample, 6 * 2 * L * d * T_i^2 / 2 forward+backward) over the GPU's dense bf16
peak (H100 SXM: 989 TFLOP/s, H200: same chip).

    python bench/gpu_train_step.py [--steps 20] [--budget 16384] [--peak-tflops 989]

Needs CUDA; exits with a message without it.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import VLMConfig
from vlmkit.models.vlm import VLMModel


def model_config() -> VLMConfig:
    # Qwen2.5-0.5B-shaped decoder (24 x 896, GQA 14/2) + a SigLIP-B-shaped vision tower at 224 px.
    return VLMConfig(
        vision=dict(style="siglip", image_size=224, patch_size=14, hidden_size=768, intermediate_size=3072,
                    num_layers=12, num_heads=12, feature_layer=-2),
        adapter=dict(kind="pixel_shuffle", scale_factor=2),
        llm=dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, qkv_bias=True, rope_theta=1e6, tie_embeddings=True),
        image_token_id=31999,
    )


def length_mix(n: int, gen: torch.Generator, lo: int = 64, hi: int = 2048) -> list[int]:
    """Log-uniform sample lengths, as a realistic SFT mix."""
    u = torch.rand(n, generator=gen)
    return [int(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo)))) for x in u]


def make_pack(lengths: list[int], cfg: VLMConfig, n_images: int, device, gen):
    """One packed micro-batch: the first n_images samples start with one image's visual tokens."""
    ids, pos, cu = [], [], [0]
    tpi = cfg.tokens_per_image
    for i, n in enumerate(lengths):
        if i < n_images:
            n = lengths[i] = max(n, tpi + 16)  # an image sample holds all of its visual tokens
        t = torch.randint(0, cfg.llm.vocab_size - 1, (n,), generator=gen)
        if i < n_images:
            t[1:1 + tpi] = cfg.image_token_id
        ids.append(t)
        pos.append(torch.arange(n))
        cu.append(cu[-1] + n)
    input_ids = torch.cat(ids).to(device)
    labels = input_ids.clone()
    labels[input_ids == cfg.image_token_id] = IGNORE_INDEX
    pixels = torch.randn(n_images, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen).to(device)
    return input_ids, labels, torch.cat(pos).to(device), torch.tensor(cu, dtype=torch.int32, device=device), pixels


def step_flops(n_params: int, lengths: list[int], cfg: VLMConfig) -> float:
    L, d = cfg.llm.num_layers, cfg.llm.num_heads * cfg.llm.head_dim
    dense = 6 * n_params * sum(lengths)
    attn = 6 * 2 * L * d * sum(t * t for t in lengths) / 2
    return dense + attn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--verbose", action="store_true", help="print every step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_step: needs a CUDA device; nothing measured")
        return 0
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = model_config()
    model = VLMModel(cfg).to(device)
    n_params = sum(p.numel() for p in model.llm.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)

    def run(steps: int, packed: bool) -> tuple[float, float, int]:
        tokens, flops = 0, 0.0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            lengths = []
            while sum(lengths) < args.budget * 0.97:
                lengths += length_mix(1, gen)
                if sum(lengths) > args.budget:
                    lengths.pop()
                    break
            input_ids, labels, pos, cu, pixels = make_pack(lengths, cfg, n_images=4, device=device, gen=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if packed:
                    loss = model.compute_loss(input_ids, labels, pos, cu, pixel_values=pixels).loss
                else:  # the same samples right-padded into a (B, T) batch
                    B, T = len(lengths), max(lengths)
                    ids = torch.zeros(B, T, dtype=torch.long, device=device)
                    lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
                    mask = torch.zeros(B, T, dtype=torch.long, device=device)
                    for b in range(B):
                        s, e = int(cu[b]), int(cu[b + 1])
                        ids[b, : e - s], lab[b, : e - s], mask[b, : e - s] = input_ids[s:e], labels[s:e], 1
                    logits = model(ids, pixel_values=pixels, attention_mask=mask)
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += sum(lengths)
            flops += step_flops(n_params, lengths, cfg)
            if args.verbose:
                torch.cuda.synchronize()
                print(f"  {'packed' if packed else 'padded'} step: {len(lengths)} samples, {sum(lengths)} tokens, "
                      f"max {max(lengths)}, {time.perf_counter() - t0:.2f}s since start, alloc retries "
                      f"{torch.cuda.memory_stats().get('num_alloc_retries', 0)}")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return tokens / dt, flops / dt / 1e12, torch.cuda.max_memory_allocated() // 2**20

    print(f"model: llm {n_params / 1e6:.0f}M params, vision {sum(p.numel() for p in model.vision.parameters()) / 1e6:.0f}M; "
          f"{torch.cuda.get_device_name()}; attention spec {AttnSpec.__name__}")
    run(args.warmup, packed=True)
    torch.cuda.reset_peak_memory_stats()
    tps, tflops, mem = run(args.steps, packed=True)
    print(f"packed bf16: {tps:,.0f} tokens/s, {tflops:.0f} TFLOP/s, MFU {100 * tflops / args.peak_tflops:.1f}%, "
          f"peak memory {mem} MiB")
    run(2, packed=False)
    torch.cuda.reset_peak_memory_stats()
    ptps, ptflops, pmem = run(max(args.steps // 2, 3), packed=False)
    print(f"padded bf16 (SDPA): {ptps:,.0f} non-pad tokens/s, MFU {100 * ptflops / args.peak_tflops:.1f}%, "
          f"peak memory {pmem} MiB")
    print(f"ratio packed / padded: {tps / ptps:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
