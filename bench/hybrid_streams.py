"""DeepSeek-VL's hybrid vision tower on one CUDA GPU: its two towers one after the other (one stream)
vs concurrently on two CUDA streams (`HybridVisionTower.parallel_streams`, models/streams.py).

The tower at DeepSeek-VL-7B's sizes: a SigLIP-L-shaped low-resolution tower at 384 px (patch 16,
24 x 24 patches, 24 layers, width 1024, MLP 4096, 16 heads), a SAM-B-shaped high-resolution tower
at 1024 px (patch 16, 64 x 64 patches, 12 layers, width 768, MLP 3072, 12 heads, windows of 14,
global blocks 2, 5, 8, 11, neck 256 channels; transformers' SamVisionConfig defaults) and the
combination to the 4096-wide LLM. fp32 weights under bf16 autocast, as training runs it.

Timed, for a batch of `--images` images: the forward alone (inference, no autograd) and forward +
backward (every weight trained), each with one stream and with two; the repeats alternate the two
modes, and each time is the median of `--steps` runs. Also timed: each tower alone, whose sum over
their maximum bounds what any overlap can win. Printed: the ratio one-stream time / two-stream time
(> 1 is a speed-up), and the largest difference between the two modes' outputs.

    python bench/hybrid_streams.py [--images 8] [--steps 20] [--warmup 3]

Needs CUDA; exits with a message without it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vlmkit.models.config import HybridVisionConfig
from vlmkit.models.sam import HybridVisionTower

LLM_WIDTH = 4096
"""DeepSeek-VL-7B's decoder width: the combined tokens' width."""


def hybrid_config() -> HybridVisionConfig:
    return HybridVisionConfig(
        low_res=dict(style="siglip", image_size=384, patch_size=16, hidden_size=1024, intermediate_size=4096,
                     num_layers=24, num_heads=16),
        high_res=dict(image_size=1024, patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12,
                      num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11), output_channels=256),
        out_hidden_size=LLM_WIDTH)


def seconds(fn: Callable[..., object], *args: object) -> float:
    """Wall time of one call `fn(*args)`, synchronised with the device."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("hybrid_streams: needs a CUDA device; nothing measured")
        return 0
    device = torch.device("cuda")
    cfg = hybrid_config()
    tower = HybridVisionTower(cfg).to(device)
    with torch.no_grad():
        tower.combiner.global_scale.fill_(1.0)  # the global branch on, as in a trained tower
    gen = torch.Generator(device=device).manual_seed(0)
    low = torch.randn(args.images, 3, cfg.low_res.image_size, cfg.low_res.image_size, device=device, generator=gen)
    high = torch.randn(args.images, 3, cfg.high_res.image_size, cfg.high_res.image_size, device=device,
                       generator=gen)
    keep = (cfg.high_res_block,)

    def forward(parallel: bool) -> torch.Tensor:
        tower.parallel_streams = parallel
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return tower(low, high)

    def train_step(parallel: bool) -> None:
        tower.parallel_streams = parallel
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tower(low, high)
        out.float().square().mean().backward()
        tower.zero_grad(set_to_none=True)

    def alone(branch: str) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            tower.low_res(low) if branch == "low" else tower.high_res(high, keep_blocks=keep)

    n_params = sum(p.numel() for p in tower.parameters())
    print(f"hybrid tower: {n_params / 1e6:.0f}M parameters, {args.images} images of {cfg.low_res.image_size} + "
          f"{cfg.high_res.image_size} px; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    diff = (forward(True).float() - forward(False).float()).abs().max().item()
    for name, step in (("forward", forward), ("forward+backward", train_step)):
        for _ in range(args.warmup):
            step(False), step(True)
        one, two = [], []
        for _ in range(args.steps):  # alternate, so a change of clock or load reaches both modes alike
            one.append(seconds(step, False))
            two.append(seconds(step, True))
        t_one, t_two = statistics.median(one), statistics.median(two)
        print(f"{name}: one stream {1e3 * t_one:.1f} ms, two streams {1e3 * t_two:.1f} ms, "
              f"ratio one / two {t_one / t_two:.2f}x")
    t_low, t_high = (statistics.median(seconds(alone, branch) for _ in range(args.steps)) for branch in ("low", "high"))
    print(f"forward of each tower alone: SigLIP {1e3 * t_low:.1f} ms, SAM {1e3 * t_high:.1f} ms; the most any "
          f"overlap can win: {(t_low + t_high) / max(t_low, t_high):.2f}x")
    print(f"largest output difference two streams vs one (bf16 autocast): {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
