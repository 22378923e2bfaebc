"""Sampling filters, seeded sampling, and the incremental detokenizer with stop strings."""

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.infer.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p,
                                   next_token)
from vlmkit.infer.streaming import TextStream


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for incremental decoding (characters span tokens)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream_all(text: str, stop=()) -> tuple[list[str], TextStream]:
    tok = ByteTokenizer()
    stream = TextStream(tok, stop)
    deltas = []
    for i in tok.encode(text):
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_top_p(probs.log(), 0.7)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_top_p(probs.log(), 0.01)  # the top token always stays
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_repetition_penalty_signs():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_top_k_one_is_greedy_and_seed_reproducible():
    torch.manual_seed(0)
    logits = torch.randn(50)
    seen = torch.tensor([], dtype=torch.long)
    greedy = next_token(logits, SamplingParams(), seen, None)
    p = SamplingParams(temperature=1.3, top_k=1, seed=3)
    assert next_token(logits, p, seen, p.make_generator()) == greedy
    p = SamplingParams(temperature=1.0, seed=7)
    g1, g2 = p.make_generator(), p.make_generator()
    a = [next_token(logits, p, seen, g1) for _ in range(20)]
    b = [next_token(logits, p, seen, g2) for _ in range(20)]
    assert a == b and len(set(a)) > 1  # same seed, same draws; and it really samples


def test_bad_params_raise():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stream_never_splits_utf8():
    text = "héllo wörld ✓ 日本 🙂"
    deltas, stream = stream_all(text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stream_cuts_before_stop_string_and_never_emits_it():
    deltas, stream = stream_all("The answer is red.\nUser: next", stop=["\nUser:"])
    assert stream.stopped
    assert "".join(deltas) == "The answer is red."
    # the held-back "\n" was never emitted before the stop string completed
    assert not any("\n" in d for d in deltas)


def test_stream_releases_partial_stop_at_end():
    deltas, stream = stream_all("abc END", stop=["END!"])
    assert not stream.stopped
    assert "".join(deltas) == "abc END"


def test_stream_long_output_matches_full_decode():
    text = "ünïcödé " * 40 + "done"
    deltas, _ = stream_all(text, stop=["STOP"])
    assert "".join(deltas) == text
