"""Decode steps of fixed shapes over a static KV cache, replayed from CUDA graphs on a GPU.

The engine's default decode step (infer/engine.py, "dynamic") reads keys up to the longest row
and grows its cache: its shapes change every step, and a GPU spends most of a small model's step
launching kernels (docs/benchmarks.md, generation section). The decoding modes here, as vLLM and
SGLang do it:

    "static"   every step runs on a `StaticKVCache` (models/attention.py): storage allocated once,
               attention over the whole capacity with a per-row length mask, positions and writes
               from per-row lengths on the device; a batch of B rows runs as the next size of
               `GRAPH_BATCH_SIZES` (pad rows write to a scratch slot and are ignored). Eager, on
               any device: on the CPU this is the reference the graphs must match.
    "graphs"   the same step, captured once per batch size in a `torch.cuda.CUDAGraph` and replayed
               (on CUDA; elsewhere, and for MoE decoders, whose routing reads expert counts on the
               host, it runs as "static").

Prefill stays eager (variable length) in a `KVCache` per prompt; `StaticDecoder.sync` copies the
prefilled rows in. A captured graph reads the model's weights (and derived decode weights,
models/fused.py) as they were at capture: an engine in "graphs" mode must not outlive a change of
the weights' storage (training steps between generations build a new engine).

Shape suffixes: B rows, R rows of the static cache, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vlmkit.models.attention import KVCache, StaticKVCache
from vlmkit.models.llm import LLM

DecodeMode = Literal["dynamic", "static", "graphs"]
DECODE_MODES: tuple[str, ...] = ("dynamic", "static", "graphs")

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
"""The batch sizes a step is run (and captured) at; B rows run as the smallest one >= B, and more
rows than the largest as themselves (captured at that size)."""

CAPTURE_WARMUP_STEPS = 2
"""Eager runs of a step on a side stream before its capture: CUDA's docs ask for warm-up so that
lazy initialisation (cuBLAS handles, derived weights, the RoPE table) happens outside the graph."""


def padded_batch(rows: int) -> int:
    """The batch size `rows` rows run at: the smallest of GRAPH_BATCH_SIZES >= rows, else rows."""
    return next((size for size in GRAPH_BATCH_SIZES if size >= rows), rows)


@dataclass
class CapturedStep:
    """One batch size's decode step as a CUDA graph; `logits` (B, V) is its output buffer."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class StaticDecoder:
    """Runs an engine's decode steps on a static KV cache, eagerly or as CUDA graph replays.

    `reserve(rows, length)` sizes the cache (allocated once when the caller knows the sizes up
    front, as `Engine.run` does; grown, and graphs recaptured, when a later row needs more),
    `sync(kept, joining, offsets)` drops and adds rows between steps, `step(last_ids)` runs one
    step and returns the live rows' logits."""

    def __init__(self, llm: LLM, graphs: bool):
        self.llm = llm
        device = next(llm.parameters()).device
        self.use_graphs = graphs and device.type == "cuda" and not llm.moe_layers()
        self.cache: StaticKVCache | None = None
        self._ids: torch.Tensor | None = None  # (R,) each row's last token: the step's input
        self._device = device
        self._graphs: dict[int, CapturedStep] = {}
        self._pool = None  # one memory pool for every captured batch size (replayed one at a time)
        self.captures = 0
        """Graphs captured so far (one per batch size used, again after the cache grows)."""

    def __len__(self) -> int:
        """Live rows."""
        return len(self.cache) if self.cache is not None else 0

    def reserve(self, rows: int, length: int) -> None:
        """Make room for `rows` live rows of up to `length` tokens each (no-op when there is)."""
        rows = padded_batch(rows)
        cache = self.cache
        if cache is not None and cache.rows >= rows and cache.capacity >= length:
            return
        if cache is None:
            self.cache = self.llm.new_static_cache(rows, length)
        else:  # grow, the length at least doubled: a stream of longer requests does not regrow per request
            capacity = cache.capacity if length <= cache.capacity else max(length, 2 * cache.capacity)
            self.cache = cache.resized(max(rows, cache.rows), capacity)
        self._ids = torch.zeros(self.cache.rows, dtype=torch.long, device=self._device)
        self._graphs.clear()  # they point at the old storage

    def sync(self, kept: list[int], joining: list[KVCache], offsets: list[int]) -> None:
        """Keep the live rows `kept` (in that order), then append the rows prefilled in `joining`
        with their position offsets (a native model's rope deltas)."""
        if len(kept) < len(self):
            self.cache.keep_rows(kept)
        if joining:
            self.cache.add_rows(*joining, offsets=offsets)

    @torch.inference_mode()  # the engine allocated the cache in inference mode, and removes rows outside it
    def clear(self) -> None:
        """Drop every row (storage and graphs stay)."""
        if self.cache is not None:
            self.cache.keep_rows([])

    def step(self, last_ids: list[int]) -> torch.Tensor:
        """One decode step for the live rows, whose last tokens are `last_ids` -> logits (B, V)."""
        B = len(last_ids)
        batch = padded_batch(B)
        self._ids[:B].copy_(torch.tensor(last_ids))
        logits = self._replay(batch) if self.use_graphs else self._forward(batch)
        return logits[:B]

    def _forward(self, batch: int) -> torch.Tensor:
        """The step itself over cache rows 0 .. batch - 1: embed, blocks, head -> (batch, V)."""
        hidden = self.llm.decode(self.llm.embed(self._ids[:batch, None]), cache=self.cache)
        return self.llm.logits(hidden[:, -1])

    def _replay(self, batch: int) -> torch.Tensor:
        captured = self._graphs.get(batch)
        if captured is None:
            captured = self._graphs[batch] = self._capture(batch)
        captured.graph.replay()
        return captured.logits

    def _capture(self, batch: int) -> CapturedStep:
        """Warm the step up on a side stream, then capture it. Every run writes each row's new key
        at its length, a slot no step has filled yet, and advances the lengths; the lengths are
        put back, so the warm-up leaves the cache as it found it."""
        lengths = self.cache.lengths.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP_STEPS):
                self._forward(batch)
                self.cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(batch)
        self._pool = graph.pool()
        self.captures += 1
        return CapturedStep(graph, logits)
