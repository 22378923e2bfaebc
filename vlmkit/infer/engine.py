"""The generation engine: prompts in, tokens and text deltas out. Kept apart from the model.

The model (models/vlm.py) only maps token ids (+ pixel values) to logits through a KV cache;
this engine owns the cache, the sampling and the stopping rules (nanochat's engine split). It
takes ready `Prompt`s (data/prompt.py builds them from conversations); it neither tokenizes nor
decodes images. It runs a batch of sequences that can change between decode steps:

    add(prompt, params)  prefill one prompt (its own forward, so its logits never depend on
                         what else is running), sample its first token, and add its K/V as a new
                         row of the running cache
    step()               one decode step for every running row: (B, 1) ids at per-row positions
    remove(seq)          drop a row (finished or cancelled) from the cache

`decode` picks how decode steps run (infer/static_decode.py): "dynamic" (the default) on a
growable `KVCache` read up to its longest row; "static" on a `StaticKVCache` with shapes that
never change; "graphs" the static step replayed from CUDA graphs on a GPU.

`run` drives it for a fixed set of prompts (infer/generate.py's `generate_messages`, what
`VLM.generate` calls, and the evaluator); the server's scheduler (serve/scheduler.py) drives it
with requests that come and go (continuous batching).

Shape suffixes: B = rows in the decode batch, T = prompt tokens, V = vocabulary, D = model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from vlmkit.data.prompt import Prompt
from vlmkit.errors import VlmkitError
from vlmkit.infer.sampling import SamplingParams, next_token, token_logprob
from vlmkit.infer.static_decode import DECODE_MODES, DecodeMode, StaticDecoder
from vlmkit.infer.streaming import TextStream
from vlmkit.models.attention import AttnSpec, KVCache
from vlmkit.models.lora import has_lora
from vlmkit.models.mrope import continue_positions


class PromptError(VlmkitError, ValueError):
    """A prompt the engine cannot run: empty, longer than the context with its max_new_tokens, or
    asking for stop strings from an engine without a tokenizer."""


@dataclass
class Sequence:
    """One generation in flight: its ids, sampling state and the text not yet handed out."""

    prompt: Prompt
    params: SamplingParams
    stream: TextStream | None  # None: ids only (an engine without a tokenizer)
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    """With `params.logprobs`: each output token's log-prob under the model's raw logits."""
    finish_reason: str | None = None  # "stop" | "length"
    rope_delta: int = 0
    """Native models: this row's next M-RoPE position minus its length (models/mrope.py)."""
    _pending: str = ""
    _seen: torch.Tensor | None = None  # ids the repetition penalty looks at (prompt + output)

    def __post_init__(self):
        if self.params.repetition_penalty != 1.0:
            self._seen = torch.tensor(self.prompt.input_ids)

    @property
    def seen_ids(self) -> torch.Tensor:
        """The ids the repetition penalty looks at; empty when the penalty is off."""
        return self._seen if self._seen is not None else torch.empty(0, dtype=torch.long)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.input_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    def take_delta(self) -> str:
        """Text that became final since the last call (never half a character or a stop string)."""
        out, self._pending = self._pending, ""
        return out

    def push(self, token_id: int, logprob: float | None = None) -> None:
        """Record a sampled token (and its log-prob, when asked for) and decide whether the
        sequence is done."""
        self.output_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if token_id in self.stop_ids:
            self._finish("stop")
            return
        if self.params.repetition_penalty != 1.0:
            self._seen = torch.cat([self._seen, torch.tensor([token_id])])
        if self.stream is not None:
            self._pending += self.stream.push(token_id)
        if self.stream is not None and self.stream.stopped:
            self._finish("stop")
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.stream is not None:
            self._pending += self.stream.finish()


DERIVED_WEIGHTS_MAX_BYTES = 2 << 30
"""Largest decoder (in parameter bytes) the engine builds derived decode weights for. They save
calls, which is what a small model's decode step is bound by; a large model's step is bound by
reading its weights, and the copies (up to the decoder's size again) would cost it more memory
than they save time."""


RESERVED_NEW_TOKENS = 256
"""Cache slots a prefilled row gets for its new tokens (up to its max_new_tokens): a short reply
never reallocates the cache (a regrowth zero-fills fresh memory and copies every row), and a
request allowed thousands of tokens that stops early does not hold them all; past this the cache
grows by doubling."""


class Engine:
    """Runs sequences of one model; not thread-safe (one owner thread drives it).

    Without a tokenizer (none given and the model has none) it generates token ids only: no
    text, no stop strings, no end-of-turn ids. `decode`: "dynamic", "static" or "graphs" (the
    module's docstring).
    """

    def __init__(self, vlm, tokenizer=None, decode: DecodeMode = "dynamic"):
        if decode not in DECODE_MODES:
            raise VlmkitError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.vlm = vlm
        self.tokenizer = tokenizer if tokenizer is not None else getattr(vlm, "tokenizer", None)
        self.device = next(vlm.parameters()).device
        self.max_positions = vlm.config.llm.max_position_embeddings
        self.native = vlm.config.is_native  # decode steps then take positions shifted by rope deltas
        self.rows: list[Sequence] = []  # the running sequences, in cache order
        self.cache: KVCache | None = None
        # static / graphs: decode steps run on its static cache, and `cache` stays None
        self.static = StaticDecoder(vlm.llm, graphs=decode == "graphs") if decode != "dynamic" else None
        # The cache follows `rows` lazily: rows removed since the last step are still in it, rows
        # added wait in _joining (each prefilled in a cache of its own), and `_sync_cache` brings
        # it in line before the next step, one copy for all leaving and one for all joining rows.
        # rows[i] is row _cache_rows[i] of [cache rows..., joining rows...].
        self._joining: list[KVCache] = []
        self._cache_rows: list[int] = []
        # Decode on derived weights (models/fused.py: q/k/v and gate/up fused, CPU weights
        # transposed): not on a sharded model, whose parameters FSDP swaps in and out around every
        # forward, nor on one whose copies would cost more memory than DERIVED_WEIGHTS_MAX_BYTES.
        sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        llm_bytes = sum(p.numel() * p.element_size() for p in vlm.llm.parameters())
        # Nor with LoRA adapters attached and unmerged: the copies hold the base weights only.
        if not sharded and llm_bytes <= DERIVED_WEIGHTS_MAX_BYTES and not has_lora(vlm):
            vlm.llm.fuse_projections()

    # ---- running sequences ---------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """Prefill `prompt`, sample its first token, and (unless already done) join the batch."""
        n = len(prompt.input_ids)
        if n == 0:
            raise PromptError("empty prompt")
        if n + params.max_new_tokens > self.max_positions:
            raise PromptError(f"prompt of {n} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                              f"model's context of {self.max_positions} tokens")
        if self.tokenizer is None and params.stop:
            raise PromptError("stop strings need a tokenizer; this engine generates token ids only")
        eos_ids = () if params.ignore_eos or self.tokenizer is None else self.tokenizer.stop_ids
        stop_ids = frozenset(eos_ids) | frozenset(params.stop_token_ids)
        stream = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq = Sequence(prompt, params, stream, stop_ids, params.make_generator(self.device))
        inputs = self.vlm.decoder_inputs(torch.tensor([prompt.input_ids], device=self.device),
                                         **_visual_inputs(prompt, self.device))
        if inputs.rope_deltas is not None:
            seq.rope_delta = int(inputs.rope_deltas[0, 0])
        row_cache = self.vlm.llm.new_cache(capacity=n + min(params.max_new_tokens, RESERVED_NEW_TOKENS))
        hidden_1TD = self.vlm.llm.decode(inputs.embeds, position_ids=inputs.position_ids, spec=AttnSpec.causal(),
                                         cache=row_cache, deepstack=inputs.deepstack)
        logits_V = self.vlm.llm.logits(hidden_1TD[0, -1])
        self._push(seq, logits_V, self._sample(logits_V, seq))
        if not seq.finished:
            if self.static is not None:
                self.static.reserve(len(self.rows) + 1, n + params.max_new_tokens)
            self._cache_rows.append(self._cached_rows() + len(self._joining))
            self._joining.append(row_cache)
            self.rows.append(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step: every running row gets one new token."""
        if not self.rows:
            return
        self._sync_cache()
        if self.static is not None:
            logits_BV = self.static.step([s.output_ids[-1] for s in self.rows])
        else:
            logits_BV = self._dynamic_step()
        plain_greedy = [s.params.greedy and s.params.repetition_penalty == 1.0 for s in self.rows]
        # one argmax and one device-to-host copy for every plain greedy row (max's indices: the
        # first maximum, as argmax, in half the time of argmax on the CPU)
        greedy_ids = logits_BV.max(-1).indices.tolist() if any(plain_greedy) else []
        for i, (seq, logits_V) in enumerate(zip(self.rows, logits_BV)):
            if seq.finished:  # done but not yet removed by its owner: its row idles
                continue
            self._push(seq, logits_V, greedy_ids[i] if plain_greedy[i] else self._sample(logits_V, seq))

    def _dynamic_step(self) -> torch.Tensor:
        """The default decode step on the growable cache -> logits (B, V)."""
        last_B1 = torch.tensor([[s.output_ids[-1]] for s in self.rows], device=self.device)
        embeds_B1D = self.vlm.llm.embed(last_B1)
        # positions come from the cache: each row continues from its own length (None), shifted by
        # its rope delta in a native model (its images took fewer M-RoPE positions than tokens)
        positions_B1 = None
        if self.native:
            deltas_B1 = torch.tensor([[s.rope_delta] for s in self.rows], device=self.device)
            positions_B1 = continue_positions(self.cache.position_ids(), deltas_B1)
        hidden_B1D = self.vlm.llm.decode(embeds_B1D, position_ids=positions_B1, spec=AttnSpec.causal(),
                                         cache=self.cache)
        return self.vlm.llm.logits(hidden_B1D[:, -1])

    def remove(self, seq: Sequence | None) -> None:
        """Drop a sequence's row from the batch (no-op when it never joined or already left)."""
        i = next((i for i, s in enumerate(self.rows) if s is seq), None)
        if i is None:
            return
        del self.rows[i], self._cache_rows[i]
        if not self.rows:
            self.cache, self._joining, self._cache_rows = None, [], []
            if self.static is not None:
                self.static.clear()

    def _sync_cache(self) -> None:
        """Make cache row i belong to rows[i]: drop the rows of removed sequences, then append the
        joining ones (one copy each, however many rows leave or join)."""
        held = self._cached_rows()
        if not self._joining and len(self._cache_rows) == held:
            return  # nothing left or joined since the last step
        kept = [r for r in self._cache_rows if r < held]
        joining = [self._joining[r - held] for r in self._cache_rows if r >= held]
        if self.static is not None:
            offsets = [s.rope_delta for s, r in zip(self.rows, self._cache_rows) if r >= held]
            self.static.sync(kept, joining, offsets)
        else:
            self._sync_dynamic(held, kept, joining)
        self._joining, self._cache_rows = [], list(range(len(self.rows)))

    def _sync_dynamic(self, held: int, kept: list[int], joining: list[KVCache]) -> None:
        """`_sync_cache` on the growable cache: keep `kept` of its `held` rows, append `joining`."""
        if len(kept) < held:
            if kept:
                self.cache.keep_rows(kept)
            else:
                self.cache = None
        if joining:
            if self.cache is None:
                self.cache = joining.pop(0)
            self.cache.add_rows(*joining)

    def _cached_rows(self) -> int:
        """Rows the decode cache holds (removed rows included until the next step syncs it)."""
        if self.static is not None:
            return len(self.static)
        return len(self.cache) if self.cache is not None else 0

    def _sample(self, logits_V: torch.Tensor, seq: Sequence) -> int:
        return next_token(logits_V, seq.params, seq.seen_ids.to(logits_V.device), seq.generator)

    @staticmethod
    def _push(seq: Sequence, logits_V: torch.Tensor, token_id: int) -> None:
        seq.push(token_id, token_logprob(logits_V, token_id) if seq.params.logprobs else None)

    # ---- a fixed set of prompts ----------------------------------------------------------------

    def run(self, prompts: list[Prompt], params: SamplingParams,
            max_batch: int | None = None) -> Iterator[tuple[int, str]]:
        """Generate for every prompt, at most `max_batch` rows at once; yield (prompt index, delta)."""
        waiting = list(enumerate(prompts))
        active: list[tuple[int, Sequence]] = []
        limit = max_batch or len(prompts)
        if self.static is not None and prompts:  # the static cache sized once, for every prompt
            self.static.reserve(min(limit, len(prompts)),
                                max(len(p.input_ids) for p in prompts) + params.max_new_tokens)
        while waiting or active:
            while waiting and len(active) < limit:
                index, prompt = waiting.pop(0)
                seq = self.add(prompt, params)
                active.append((index, seq))
            self.step()
            still = []
            for index, seq in active:
                delta = seq.take_delta()
                if delta:
                    yield index, delta
                if seq.finished:
                    self.remove(seq)
                else:
                    still.append((index, seq))
            active = still


def _visual_inputs(prompt: Prompt, device: torch.device) -> dict:
    """The prompt's pixels (and a native model's grids and videos) as `decoder_inputs` takes them."""
    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dict(pixel_values=on_device(prompt.pixel_values), image_grid_thw=on_device(prompt.image_grid_thw),
                pixel_values_videos=on_device(prompt.pixel_values_videos),
                video_grid_thw=on_device(prompt.video_grid_thw),
                second_per_grid_ts=prompt.second_per_grid_ts or None)
