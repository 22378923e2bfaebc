"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Each sequence samples with its own `torch.Generator` (seeded from the request's seed), so a
seeded request gives the same tokens whatever else shares its decode batch. The filters follow
the usual definitions: top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020)
keeps the smallest set of tokens whose probabilities sum to at least p; the repetition penalty
(CTRL, Keskar et al. 2019) divides positive logits of already seen tokens by the penalty and
multiplies negative ones.

Shape suffixes: V = vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError


@dataclass
class SamplingParams:
    """How one sequence is decoded. temperature 0 (the default) is greedy decoding."""

    max_new_tokens: int = 128
    """Stop after this many generated tokens (finish reason "length")."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest top set with probability mass >= top_p; 1 = off."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = off. top_k = 1 equals greedy."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output; 1 = off."""
    seed: int | None = None
    """Seed of this sequence's own generator; None draws one from torch's global generator."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the text returned stops before the first of them."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (besides the tokenizer's end-of-turn ids)."""
    ignore_eos: bool = False
    """Do not stop at the tokenizer's end-of-turn ids (benchmarks: always max_new_tokens tokens)."""
    logprobs: bool = False
    """Report each sampled token's log-prob (`Sequence.output_logprobs`, infer/engine.py): the
    log-softmax of the model's raw logits, i.e. the policy at temperature 1 before the repetition
    penalty and the top-k / top-p filters, whatever this sequence samples with. It is what the
    training forward computes for the same token (`-token_loss` of `VLM.pack_loss`). Off by
    default: it costs a log-softmax over the vocabulary per token."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The sequence's own generator (None for greedy decoding, which draws nothing)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen


def apply_repetition_penalty(logits_V: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on the tokens in `seen_ids` (any order, duplicates allowed)."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits_V
    logits_V = logits_V.clone()
    seen = seen_ids.unique()
    picked = logits_V[seen]
    logits_V[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits_V


def filter_top_k(logits_V: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest become -inf; k = 0 or k >= V leaves them unchanged."""
    if k <= 0 or k >= logits_V.shape[-1]:
        return logits_V
    kth = torch.topk(logits_V, k).values[-1]
    return logits_V.masked_fill(logits_V < kth, float("-inf"))


def filter_top_p(logits_V: torch.Tensor, p: float) -> torch.Tensor:
    """Logits outside the nucleus of mass p become -inf; the most likely token always stays."""
    if p >= 1.0:
        return logits_V
    sorted_logits, order = torch.sort(logits_V, descending=True)
    probs = sorted_logits.softmax(-1)
    # mass of the tokens strictly before each one: a token is kept while that mass is < p
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_V.masked_fill(drop, float("-inf"))


def token_logprob(logits_V: torch.Tensor, token_id: int) -> float:
    """log p(token_id) under the softmax of the raw logits (V,): what `SamplingParams.logprobs`
    reports, computed as the training loss computes it (a float32 log-softmax)."""
    return float(logits_V.float().log_softmax(-1)[token_id])


def next_token(logits_V: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor,
               generator: torch.Generator | None) -> int:
    """The next token id of one sequence, given its last-position logits (V,) and the ids it has seen."""
    logits_V = apply_repetition_penalty(logits_V.float(), seen_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits_V.argmax())
    logits_V = filter_top_k(logits_V / params.temperature, params.top_k)
    logits_V = filter_top_p(logits_V, params.top_p)
    probs_V = logits_V.softmax(-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))
