"""Decode speed: vlmkit's engine vs transformers' `generate` on the same llava-hf weights.

Builds a random LlavaForConditionalGeneration (SigLIP tower + Llama decoder) from a config,
saves it, imports the directory with `VLM.from_hf_llava`, and times greedy decoding of
the same prompts (one image + text each) at batch 1 and batch 8 on both sides. Decode speed is
generated tokens per second excluding prefill: (time for N new tokens - time for 1) / (N - 1)
per row, best of the repeats, which interleave the sides. Both sides must produce the same
tokens (checked and printed).

With `--device cuda` a third side runs: vlmkit decoding with CUDA graphs (`decode="graphs"`,
infer/static_decode.py: a static KV cache, one captured step per batch size, replayed), printed as
a ratio against vlmkit's default (eager) decoding and against transformers, measured in the same
run; `--shape 0.5b` puts a Qwen2.5-0.5B-shaped decoder (24 x 896, GQA 14/2) behind the tower,
and `--hf-static` adds transformers with its static cache (`cache_implementation="static"`).

    .venv/bin/python bench/generate.py [--new-tokens 48] [--repeats 5] [--device cpu|cuda]
    .venv/bin/python bench/generate.py --device cuda --shape 0.5b [--hf-static]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmkit.api import VLM  # noqa: E402
from vlmkit.data.prompt import Prompt  # noqa: E402
from vlmkit.infer.engine import Engine  # noqa: E402
from vlmkit.infer.sampling import SamplingParams  # noqa: E402

IMAGE_TOKEN = 3

DECODERS = {
    # the scale of `vlmkit demo`'s model: decoder 4x192
    "demo": dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=6, num_key_value_heads=6),
    # Qwen2.5-0.5B's shape (bench/gpu_train_step.py's 0.5b decoder), Llama-style layers
    "0.5b": dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
}


def build_llava(out: Path, shape: str = "demo"):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    # the tower of `vlmkit demo`'s model: ViT 3x128 on 48 px images
    vision = SiglipVisionConfig(image_size=48, patch_size=8, hidden_size=128, intermediate_size=512,
                                num_hidden_layers=3, num_attention_heads=4)
    text = LlamaConfig(**DECODERS[shape], max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    return model


def make_batch(batch: int, patches: int, vocab: int, text_len: int = 24):
    g = torch.Generator().manual_seed(batch)
    text = torch.randint(10, vocab, (batch, text_len), generator=g)
    ids = torch.cat([torch.full((batch, patches), IMAGE_TOKEN), text], dim=1)  # (B, T)
    pixels = torch.randn(batch, 3, 48, 48, generator=g)
    return ids, pixels


def hf_generate(model, ids, pixels, new_tokens: int, static_cache: bool = False) -> torch.Tensor:
    extra = {"cache_implementation": "static"} if static_cache else {}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None, **extra)
    return out[:, ids.shape[1]:]


def vlmkit_generate(vlm, ids, pixels, new_tokens: int, derived: bool = True, engine: Engine | None = None
                    ) -> torch.Tensor:
    """Greedy ids (B, new_tokens). `engine`: one kept across calls (CUDA graphs are captured in the
    first call's steps and replayed in the next ones); None: a fresh default engine."""
    engine = engine or Engine(vlm)  # no tokenizer: token ids only, like the transformers side
    if not derived:  # the engine decodes on fused / transposed weights (models/fused.py); measure without
        vlm.llm.fuse_projections(False)
    params = SamplingParams(max_new_tokens=new_tokens)
    seqs = [engine.add(Prompt(ids[b].tolist(), pixels[b:b + 1]), params) for b in range(ids.shape[0])]
    while engine.rows:
        engine.step()
        for s in [s for s in engine.rows if s.finished]:
            engine.remove(s)
    return torch.tensor([s.output_ids for s in seqs], device=ids.device)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rates(sides: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Generated tokens per second of the decode phase (prefill time subtracted), per side.

    `sides` maps a name to fn(n) that generates n new tokens per row. The repeats interleave the
    sides (ours, theirs, ours, ...), so that a change of load on a shared machine reaches every
    side alike; each side keeps its best time for n = new_tokens and for n = 1."""
    best = {(name, n): float("inf") for name in sides for n in (new_tokens, 1)}
    for _ in range(repeats):
        for name, fn in sides.items():
            for n in (new_tokens, 1):
                best[name, n] = min(best[name, n], timed(lambda: fn(n)))
    return {name: batch * (new_tokens - 1) / max(best[name, new_tokens] - best[name, 1], 1e-9) for name in sides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both models run there, fp32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest timings on a shared 2-core machine)")
    parser.add_argument("--shape", choices=sorted(DECODERS), default="demo", help="the decoder's shape")
    parser.add_argument("--hf-static", action="store_true",
                        help="with --device cuda: also transformers with its static cache")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/generate.py --device cuda needs a CUDA GPU (CUDA graphs vs eager vs transformers); "
                 "none is available here. Run it without --device for the CPU comparison.")
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_llava(Path(tmp), args.shape)
        vlm = VLM.from_hf_llava(tmp)
    hf, vlm = hf.to(args.device), vlm.to(args.device)
    # vlmkit without derived weights runs on its own copy: turning them off drops them, and the
    # interleaved repeats would otherwise rebuild them inside the timed runs of the other side
    vlm_plain = copy.deepcopy(vlm)
    patches = vlm.config.tokens_per_image
    decoder = DECODERS[args.shape]
    print(f"model: SigLIP 3x128 (48 px, {patches} visual tokens) + Llama {decoder['num_hidden_layers']}x"
          f"{decoder['hidden_size']}, {sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M params; {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    for batch in args.batches:
        ids, pixels = (t.to(args.device) for t in make_batch(batch, patches, decoder["vocab_size"]))
        if args.device == "cuda":
            cuda_comparison(hf, vlm, ids, pixels, args)
            continue
        same = torch.equal(hf_generate(hf, ids, pixels, args.new_tokens),
                           vlmkit_generate(vlm, ids, pixels, args.new_tokens))
        rates = decode_rates({"vlmkit": lambda n: vlmkit_generate(vlm, ids, pixels, n),
                              "plain": lambda n: vlmkit_generate(vlm_plain, ids, pixels, n, derived=False),
                              "transformers": lambda n: hf_generate(hf, ids, pixels, n)},
                             batch, args.new_tokens, args.repeats)
        ours, plain, theirs = rates["vlmkit"], rates["plain"], rates["transformers"]
        print(f"batch {batch}: vlmkit {ours:.0f} tok/s, transformers {theirs:.0f} tok/s, ratio {ours / theirs:.2f}x "
              f"(target >= 1.5x); same tokens: {same}; vlmkit without derived weights {plain:.0f} tok/s "
              f"({plain / theirs:.2f}x)", flush=True)


def cuda_comparison(hf, vlm, ids, pixels, args) -> None:
    """One batch on the GPU: vlmkit eager (the default decoding), vlmkit with CUDA graphs (one engine
    kept across the repeats, so its graphs are captured once and replayed), transformers."""
    batch = ids.shape[0]
    graphs = Engine(vlm, decode="graphs")
    eager_ids = vlmkit_generate(vlm, ids, pixels, args.new_tokens)
    graph_ids = vlmkit_generate(vlm, ids, pixels, args.new_tokens, engine=graphs)
    hf_ids = hf_generate(hf, ids, pixels, args.new_tokens)
    sides = {"eager": lambda n: vlmkit_generate(vlm, ids, pixels, n),
             "graphs": lambda n: vlmkit_generate(vlm, ids, pixels, n, engine=graphs),
             "transformers": lambda n: hf_generate(hf, ids, pixels, n)}
    if args.hf_static:
        sides["transformers static"] = lambda n: hf_generate(hf, ids, pixels, n, static_cache=True)
    rates = decode_rates(sides, batch, args.new_tokens, args.repeats)
    line = (f"batch {batch}: vlmkit eager {rates['eager']:.0f} tok/s, vlmkit CUDA graphs {rates['graphs']:.0f} tok/s "
            f"({rates['graphs'] / rates['eager']:.2f}x eager), transformers {rates['transformers']:.0f} tok/s; "
            f"graphs / transformers {rates['graphs'] / rates['transformers']:.2f}x, eager / transformers "
            f"{rates['eager'] / rates['transformers']:.2f}x")
    if args.hf_static:
        line += (f", transformers static cache {rates['transformers static']:.0f} tok/s (graphs / it "
                 f"{rates['graphs'] / rates['transformers static']:.2f}x)")
    print(f"{line}; same tokens: graphs == eager {torch.equal(graph_ids, eager_ids)}, "
          f"eager == transformers {torch.equal(eager_ids, hf_ids)}; graphs captured {graphs.static.captures}",
          flush=True)


if __name__ == "__main__":
    main()
