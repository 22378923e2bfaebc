"""Likelihood-based evaluation: multiple choice by perplexity, and held-out text perplexity.

Multiple choice (as DeepSeek-VL evaluates its small models, and as HellaSwag / MMLU are scored
cloze-style): each option is put as the assistant's reply to the question (+ images) and scored
by its length-normalised log-likelihood, the mean log-probability of the reply's supervised
tokens (the option text and the end-of-turn token, exactly the tokens the chat template
supervises in training). The best-scoring option is the model's answer. Items without listed
options are scored against the option set of their kind: yes / no, or for open-ended items the
distinct gold answers of their category in the benchmark (a closed-vocabulary answer space).

Sequences are scored in packs through the training loss (`compute_loss` on a flat sequence with
cu_seqlens, no padding): the per-token losses of one sample sum to minus its log-likelihood,
and attention never crosses samples, so batching cannot change a row's score.

Text perplexity: exp(total token loss / total tokens) over a text JSONL (`{"text": ...}`), each
document templated as training templates text records (to track language retention).

Shape suffixes: T = tokens of a pack, S = samples in a pack, N = image tiles in a pack.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.packing import collate
from vlmkit.data.template import encode_record
from vlmkit.data.types import Record, Sample
from vlmkit.errors import BadRecordError, VlmkitError


def _num_targets(sample: Sample) -> int:
    """Scored tokens: supervised labels after the first position (nothing predicts token 0)."""
    return sum(label != IGNORE_INDEX for label in sample.labels[1:])


@torch.no_grad()
def sequence_logprobs(model, samples: list[Sample]) -> list[tuple[float, int]]:
    """(sum of log-probabilities of the supervised tokens, their count) for each sample.

    The samples go through one packed loss call (`VLM.pack_loss` on data/packing.py's collate).
    """
    if not samples:
        return []
    batch = collate(samples, budget=sum(len(s) for s in samples))
    out = model.pack_loss(batch)
    token_loss = out.token_loss.float().cpu()  # (T,) CE on each target's own position, 0 elsewhere
    cu = batch.cu_seqlens.tolist()
    return [(-float(token_loss[cu[i]:cu[i + 1]].sum()), _num_targets(s)) for i, s in enumerate(samples)]


def length_normalised(scored: list[tuple[float, int]]) -> list[float]:
    """Mean log-probability per scored token (the option's length no longer decides)."""
    return [logprob / max(count, 1) for logprob, count in scored]


# --- held-out text perplexity ---------------------------------------------------------------------

def read_text_jsonl(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, str]]:
    """(line index, text) of each usable line of a `{"text": ...}` JSONL; bad lines are skipped.
    A missing file raises VlmkitError here, before anything is read."""
    path = Path(path)
    if not path.is_file():
        raise VlmkitError(f"text file {path} does not exist")
    return _text_lines(path, limit)


def _text_lines(path: Path, limit: int | None) -> Iterator[tuple[int, str]]:
    count = 0
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if limit is not None and count >= limit:
                return
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(text, str) and text.strip():
                count += 1
                yield index, text


def _batches(samples: Iterable[Sample], max_tokens: int) -> Iterator[list[Sample]]:
    batch, tokens = [], 0
    for sample in samples:
        if batch and tokens + len(sample) > max_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(sample)
        tokens += len(sample)
    if batch:
        yield batch


def text_perplexity(model, path: str | Path, *, limit: int | None = None, max_len: int = 1024,
                    max_tokens: int = 8192, progress: bool = False) -> dict:
    """Token-level perplexity of the model on held-out text (documents cut to `max_len` tokens).

    Returns {"documents", "tokens", "loss" (mean CE in nats), "perplexity", "skipped"}.
    """
    tok = model.tokenizer
    lines = read_text_jsonl(path, limit)
    skipped = 0

    def sequences() -> Iterator[Sample]:
        nonlocal skipped
        for index, text in lines:
            try:
                ids, labels = encode_record(Record(id=str(index), source="heldout", kind="text", text=text), tok, [])
            except BadRecordError:
                skipped += 1
                continue
            yield Sample(id=str(index), source="heldout", input_ids=list(ids[:max_len]), labels=list(labels[:max_len]))

    total_logprob, total_tokens, documents = 0.0, 0, 0
    bar = tqdm(desc="perplexity", unit="doc", disable=not progress)
    for batch in _batches(sequences(), max_tokens):
        for logprob, count in sequence_logprobs(model, batch):
            total_logprob += logprob
            total_tokens += count
        documents += len(batch)
        bar.update(len(batch))
    bar.close()
    loss = -total_logprob / total_tokens if total_tokens else float("nan")
    return {"documents": documents, "tokens": total_tokens, "loss": loss,
            "perplexity": math.exp(loss) if total_tokens else float("nan"), "skipped": skipped}
