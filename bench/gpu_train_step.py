"""Training-step throughput and model FLOPs utilisation (MFU) of a VLM on one CUDA GPU: vlmkit
packed, vlmkit padded and transformers padded, on the same samples in one run.

Three sides, each a full training step (forward, backward, fused AdamW over every weight) under
bf16 autocast with fp32 weights, over the same micro-batches (sample lengths log-uniform, the first
`IMAGES_PER_BATCH` samples of each holding one image):

- vlmkit packed: one flat sequence per micro-batch (`VLMModel.compute_loss`, varlen attention);
- vlmkit padded: the same samples right-padded into (B, T), SDPA with a padding mask;
- transformers padded: transformers' model of the same shape, the same padded batches, its own loss
  (`labels=`), `attn_implementation="sdpa"`, and also "flash_attention_2" when flash-attn is
  installed. The class is the closest transformers has to each shape: for 0.5b (pixel shuffle +
  LayerNorm-MLP projector + Qwen2) `InternVLForConditionalGeneration`, whose tower is InternViT of
  the SigLIP tower's shape (one class token more per image, layer scale); for 1.5b (SigLIP + a
  2-layer GELU MLP + Qwen2) `LlavaForConditionalGeneration`, the same architecture exactly.

Shapes (`--shape`): 0.5b = a Qwen2.5-0.5B-shaped decoder (24 x 896, GQA 14/2, intermediate 4864,
vocabulary 32000, tied) + a SigLIP-B-shaped tower at 224 px (12 x 768, patch 14, read at layer -2)
+ pixel shuffle to 64 tokens per image; 1.5b = a Qwen2.5-1.5B-shaped decoder (28 x 1536, GQA 12/2,
intermediate 8960, vocabulary 151936, tied) + a SigLIP-so400m-shaped tower at 384 px (27 x 1152,
intermediate 4304, 16 heads, patch 14: 27 x 27 = 729 tokens per image) + a 2-layer MLP.

MFU = model FLOPs per second / `--peak-tflops` (H100 / H200 SXM dense bf16: 989). Model FLOPs of a
step, the same for all three sides (padding, and work a side does that no output needs, count as
nothing), with T_i the length of sample i, T = sum T_i, n images of P patches:

    decoder  6 * N_llm * T  +  6 * L * d * sum(T_i^2)        (causal attention, d = heads * head_dim)
    vision   n * [6 * P * (l * (4 D^2 + 2 D I) + C p^2 D)  +  12 * l * P^2 * D]
    adapter  6 * N_adapter * n * tokens_per_image

N_llm counts the decoder's weights with the tied embedding once (it is the LM head's matmul); l
is the number of tower layers up to the one the adapter reads, D its width, I its MLP width, p the
patch side and C the channels. Norms, activations and the optimizer are not counted.

    python bench/gpu_train_step.py [--shape 0.5b|1.5b] [--steps 20] [--budget 16384] [--peak-tflops 989]
    python bench/gpu_train_step.py --smoke      # a tiny shape on the CPU, to check the script runs

Needs CUDA (except with --smoke); exits with a message without it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, InternVLConfig, LlavaConfig

from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.config import VisionConfig, VLMConfig
from vlmkit.models.vlm import VLMModel

IMAGES_PER_BATCH = 4
PEAK_TFLOPS = 989.0
"""H100 / H200 SXM dense bf16 peak."""
BUDGET_FILL = 0.97
"""A micro-batch takes samples until it holds this share of its token budget."""
TEXT_AFTER_IMAGE = 16
"""Text tokens an image sample holds at least beside its visual tokens."""


@dataclass(frozen=True)
class Shape:
    config: VLMConfig
    lengths: tuple[int, int]
    """Sample lengths are log-uniform between these two."""


def _decoder(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                num_heads=heads, num_kv_heads=kv_heads, qkv_bias=True, rope_theta=1e6, tie_embeddings=True)


def _siglip(image: int, hidden: int, intermediate: int, layers: int, heads: int, feature_layer: int) -> dict:
    return dict(style="siglip", image_size=image, patch_size=14, hidden_size=hidden, intermediate_size=intermediate,
                num_layers=layers, num_heads=heads, feature_layer=feature_layer)


def shape(name: str, smoke: bool = False) -> Shape:
    """The bench's model at `name`'s real size, or a tiny one of the same layout (`smoke`)."""
    pixel_shuffle = name == "0.5b"
    adapter = dict(kind="pixel_shuffle", scale_factor=2) if pixel_shuffle else dict(kind="mlp")
    if smoke:
        vision = _siglip(56, 32, 64, 2, 4, -2 if pixel_shuffle else -1)
        llm = _decoder(512, 64, 128, 2, 4, 2)
        lengths = (16, 96)
    elif pixel_shuffle:
        vision = _siglip(224, 768, 3072, 12, 12, -2)
        llm = _decoder(32000, 896, 4864, 24, 14, 2)
        lengths = (64, 2048)
    else:
        vision = _siglip(384, 1152, 4304, 27, 16, -1)
        llm = _decoder(151936, 1536, 8960, 28, 12, 2)
        lengths = (64, 2048)
    cfg = VLMConfig(vision=vision, adapter=adapter, llm=llm, image_token_id=llm["vocab_size"] - 1)
    return Shape(cfg, lengths)


# --- the transformers peer ---------------------------------------------------------------------------


def peer_config(cfg: VLMConfig) -> InternVLConfig | LlavaConfig:
    """transformers' config of the same shape (module docstring): InternVL for a pixel-shuffle
    adapter, LLaVA for an MLP one."""
    v, d = cfg.vision, cfg.llm
    text = dict(model_type="qwen2", vocab_size=d.vocab_size, hidden_size=d.hidden_size,
                intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
                num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, rope_theta=d.rope_theta,
                tie_word_embeddings=d.tie_embeddings, max_position_embeddings=32768)
    if cfg.adapter.kind == "pixel_shuffle":
        vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                      intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
                      attention_bias=True, use_mean_pooling=False)
        return InternVLConfig(vision_config=vision, text_config=text, image_token_id=cfg.image_token_id,
                              downsample_ratio=1 / cfg.adapter.scale_factor, vision_feature_layer=v.feature_layer,
                              tie_word_embeddings=d.tie_embeddings)
    vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                  patch_size=v.patch_size, vision_use_head=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
                       vision_feature_layer=v.feature_layer, vision_feature_select_strategy="full",
                       tie_word_embeddings=d.tie_embeddings)


def peer_model(cfg: VLMConfig, attn_implementation: str) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_config(peer_config(cfg), attn_implementation=attn_implementation)


def peer_attention() -> list[str]:
    """The attention implementations the transformers side runs with here."""
    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


# --- the samples -------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch, packed; `padded()` gives the same samples as a (B, T) batch."""

    lengths: list[int]
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.lengths, *(t.to(device) for t in (self.input_ids, self.labels, self.position_ids,
                                                             self.cu_seqlens, self.pixels)))

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, attention_mask), each (B, T): the samples right-padded, labels ignored there."""
        B, T = len(self.lengths), max(self.lengths)
        ids = self.input_ids.new_zeros(B, T)
        labels = self.labels.new_full((B, T), IGNORE_INDEX)
        mask = self.input_ids.new_zeros(B, T)
        for b, (start, n) in enumerate(zip(self.cu_seqlens[:-1].tolist(), self.lengths)):
            ids[b, :n], labels[b, :n], mask[b, :n] = self.input_ids[start:start + n], self.labels[start:start + n], 1
        return ids, labels, mask


def sample_lengths(budget: int, bounds: tuple[int, int], gen: torch.Generator) -> list[int]:
    """Log-uniform lengths (a realistic SFT mix) until the budget is nearly full."""
    lo, hi = bounds
    lengths: list[int] = []
    while sum(lengths) < budget * BUDGET_FILL:
        u = float(torch.rand(1, generator=gen))
        lengths.append(int(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
        if sum(lengths) > budget:
            lengths.pop()
            break
    return lengths


def make_batch(lengths: list[int], cfg: VLMConfig, gen: torch.Generator) -> Batch:
    """The samples as one pack; the first `IMAGES_PER_BATCH` start with one image's visual tokens."""
    ids, pos, cu = [], [], [0]
    tpi = cfg.tokens_per_image
    for i, n in enumerate(lengths):
        if i < IMAGES_PER_BATCH:
            n = lengths[i] = max(n, tpi + TEXT_AFTER_IMAGE)  # an image sample holds all of its visual tokens
        t = torch.randint(0, cfg.llm.vocab_size - 1, (n,), generator=gen)
        if i < IMAGES_PER_BATCH:
            t[1:1 + tpi] = cfg.image_token_id
        ids.append(t)
        pos.append(torch.arange(n))
        cu.append(cu[-1] + n)
    input_ids = torch.cat(ids)
    labels = input_ids.clone()
    labels[input_ids == cfg.image_token_id] = IGNORE_INDEX
    n_images = min(IMAGES_PER_BATCH, len(lengths))
    pixels = torch.randn(n_images, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    return Batch(lengths, input_ids, labels, torch.cat(pos), torch.tensor(cu, dtype=torch.int32), pixels)


def make_batches(s: Shape, n: int, budget: int, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(sample_lengths(budget, s.lengths, gen), s.config, gen) for _ in range(n)]


# --- model FLOPs (module docstring) ------------------------------------------------------------------


def vision_flops_per_image(v: VisionConfig) -> float:
    """Forward + backward FLOPs of the tower's layers up to the one the adapter reads, one image."""
    P = (v.image_size // v.patch_size) ** 2
    D, I = v.hidden_size, v.intermediate_size
    layers = v.feature_layer if v.feature_layer >= 0 else v.num_layers + 1 + v.feature_layer
    dense = 6 * P * (layers * (4 * D * D + 2 * D * I) + v.num_channels * v.patch_size ** 2 * D)
    return dense + 12 * layers * P * P * D


def step_flops(cfg: VLMConfig, batch: Batch, n_llm: int, n_adapter: int) -> float:
    d = cfg.llm.num_heads * cfg.llm.head_dim
    decoder = 6 * n_llm * sum(batch.lengths) + 6 * cfg.llm.num_layers * d * sum(t * t for t in batch.lengths)
    n_images = batch.pixels.shape[0]
    return (decoder + n_images * vision_flops_per_image(cfg.vision)
            + 6 * n_adapter * n_images * cfg.tokens_per_image)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors once


# --- one side's training steps -----------------------------------------------------------------------


def vlmkit_packed_loss(model: VLMModel, b: Batch) -> torch.Tensor:
    return model.compute_loss(b.input_ids, b.labels, b.position_ids, b.cu_seqlens, pixel_values=b.pixels).loss


def vlmkit_padded_loss(model: VLMModel, b: Batch) -> torch.Tensor:
    ids, labels, mask = b.padded()
    logits = model(ids, pixel_values=b.pixels, attention_mask=mask)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def peer_padded_loss(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    ids, labels, mask = b.padded()
    return model(input_ids=ids, pixel_values=b.pixels, attention_mask=mask, labels=labels).loss


@dataclass(frozen=True)
class Result:
    tokens_per_s: float
    """Non-pad tokens per second."""
    tflops: float
    """Model TFLOP/s (module docstring)."""
    peak_mib: int | None
    """Peak allocated GPU memory (None on the CPU)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
            batches: list[Batch], warmup: int, flops: Callable[[Batch], float], device: torch.device) -> Result | None:
    """Training steps over `batches` after `warmup` untimed ones (the first batches again); None
    when the GPU runs out of memory."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    on_device = [b.to(device) for b in batches]

    def step(b: Batch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for b in on_device[:warmup]:
            step(b)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        for b in on_device:
            step(b)
        synchronize(device)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)  # what the failed step left, before the next side runs
        return None
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) // 2**20 if device.type == "cuda" else None
    return Result(sum(sum(b.lengths) for b in batches) / seconds, sum(map(flops, batches)) / seconds / 1e12, peak)


def release(device: torch.device) -> None:
    """Give a finished side's memory back before the next side's model is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the comparison ----------------------------------------------------------------------------------


def compare(s: Shape, batches: list[Batch], warmup: int, device: torch.device) -> dict[str, Result | None]:
    """Every side's result, in the order they ran: vlmkit packed, vlmkit padded, then transformers
    padded with each attention implementation available."""
    cfg = s.config
    torch.manual_seed(0)
    model = VLMModel(cfg)
    n_llm, n_adapter = parameter_count(model.llm), parameter_count(model.adapter)

    def flops(b: Batch) -> float:
        return step_flops(cfg, b, n_llm, n_adapter)

    results = {"vlmkit packed": measure(model, vlmkit_packed_loss, batches, warmup, flops, device)}
    release(device)
    results["vlmkit padded (sdpa)"] = measure(model, vlmkit_padded_loss, batches, warmup, flops, device)
    del model
    release(device)
    for attn in peer_attention():
        peer = peer_model(cfg, attn)
        results[f"transformers {type(peer).__name__} padded ({attn})"] = measure(
            peer, peer_padded_loss, batches, warmup, flops, device)
        del peer
        release(device)
    return results


def report(results: dict[str, Result | None], peak_tflops: float) -> list[str]:
    lines = []
    for name, r in results.items():
        if r is None:
            lines.append(f"{name}: out of memory")
            continue
        memory = "" if r.peak_mib is None else f", peak memory {r.peak_mib} MiB"
        lines.append(f"{name}: {r.tokens_per_s:,.0f} tokens/s, {r.tflops:.1f} TFLOP/s, "
                     f"MFU {100 * r.tflops / peak_tflops:.1f}%{memory}")
    packed = results["vlmkit packed"]
    for name, r in results.items():
        if name != "vlmkit packed" and packed is not None and r is not None:
            lines.append(f"ratio vlmkit packed / {name}: {packed.tokens_per_s / r.tokens_per_s:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("0.5b", "1.5b"), default="0.5b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model of the shape's layout, 2 steps of 512 tokens, on the CPU without CUDA")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.budget = 2, 1, 512
    elif not torch.cuda.is_available():
        print("gpu_train_step: needs a CUDA device (or --smoke for a tiny CPU run); nothing measured")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    s = shape(args.shape, smoke=args.smoke)
    batches = make_batches(s, args.steps, args.budget)
    cfg = s.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    smoke = " (smoke)" if args.smoke else ""
    print(f"shape {args.shape}{smoke}: decoder {cfg.llm.num_layers} x {cfg.llm.hidden_size}, "
          f"tower {cfg.vision.num_layers} x {cfg.vision.hidden_size} at {cfg.vision.image_size} px, "
          f"{cfg.tokens_per_image} tokens per image; {args.steps} steps of ~{args.budget} tokens; {where}, "
          f"torch {torch.__version__}")
    for line in report(compare(s, batches, args.warmup, device), args.peak_tflops):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
