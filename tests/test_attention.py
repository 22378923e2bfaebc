"""Attention backends: packed == block-diagonal reference, padded == unpadded rows, GQA, the KV
cache's bookkeeping (aligned and ragged steps); and on CUDA, flash varlen == SDPA packed == padded."""

import pytest
import torch

from vlmkit.models.attention import (AlignedStep, AttnSpec, AutoBackend, FlashBackend, KVCache, RaggedStep,
                                     decode_attention, flash_available, padding_mask, select_backend)

AUTO = select_backend("auto")  # what a model gets by default: SDPA on the CPU
SDPA = select_backend("sdpa")


def qkv(T, H=4, Hkv=2, Dh=8, B=None, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if B is None else (B, T)
    return [torch.randn(*lead, h, Dh, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]


def reference(q, k, v, allowed):
    """Plain softmax attention with an explicit (Tq, Tk) bool mask; q (T, H, Dh), GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def block_diagonal(seqlens, causal):
    T = sum(seqlens)
    sample = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    allowed = sample[:, None] == sample[None, :]
    return allowed & torch.ones(T, T, dtype=torch.bool).tril() if causal else allowed


@pytest.mark.parametrize("seqlens", [[5, 3, 7], [4, 4, 4, 2, 2], [1, 6]])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_matches_block_diagonal_reference(seqlens, causal):
    q, k, v = qkv(sum(seqlens))
    cu = torch.tensor([0] + seqlens).cumsum(0)
    out = AUTO(q, k, v, AttnSpec.packed(cu), causal=causal)
    torch.testing.assert_close(out, reference(q, k, v, block_diagonal(seqlens, causal)), atol=1e-5, rtol=1e-5)
    # the batched (1, T, H, Dh) layout gives the same
    out_b = AUTO(q[None], k[None], v[None], AttnSpec.packed(cu), causal=causal)
    torch.testing.assert_close(out_b[0], out)


def test_packed_spec_fields():
    spec = AttnSpec.packed(torch.tensor([0, 3, 10, 12]))
    assert spec.max_seqlen == 7 and spec.seqlens == [3, 7, 2] and spec.cu_seqlens.dtype == torch.int32
    assert spec.position_ids(1, 12, torch.device("cpu")).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("lengths", [[7, 4, 1], [40, 23, 1]])  # short / long queries take different GQA paths
def test_padded_rows_match_unpadded(left, lengths):
    B, T = len(lengths), max(lengths)
    q, k, v = qkv(T, B=B)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1 if left else 0
        mask[b, :n] = 0 if left else 1
    out = AUTO(q, k, v, AttnSpec.padded(mask))
    assert torch.isfinite(out).all()  # pad queries must not produce NaN
    for b in range(B):
        real = mask[b].bool()
        alone = AUTO(q[b:b + 1, real], k[b:b + 1, real], v[b:b + 1, real], AttnSpec.causal())
        torch.testing.assert_close(out[b, real], alone[0], atol=1e-5, rtol=1e-5)


def test_causal_matches_reference_and_noncausal_padded():
    q, k, v = qkv(6, B=1)
    T = 6
    out = AUTO(q, k, v, AttnSpec.causal())
    torch.testing.assert_close(out[0], reference(q[0], k[0], v[0], torch.ones(T, T, dtype=torch.bool).tril()),
                               atol=1e-5, rtol=1e-5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    out = AUTO(q, k, v, AttnSpec.padded(mask), causal=False)
    allowed = mask.bool()[0][None, :].expand(T, T)
    torch.testing.assert_close(out[0, :4], reference(q[0], k[0], v[0], allowed)[:4], atol=1e-5, rtol=1e-5)
    assert padding_mask(mask, causal=False)[0, 0, 5].tolist() == [True] * 4 + [False, True]


def test_backend_is_chosen_by_name_once():
    assert isinstance(select_backend(), AutoBackend) and select_backend("sdpa").name == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        select_backend("xformers")
    q, k, v = qkv(4, B=2)
    with pytest.raises(ValueError, match="B = 1"):
        AUTO(q, k, v, AttnSpec.packed(torch.tensor([0, 4])))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # no varlen kernel (when built) or no GPU (when called)
            select_backend("flash")(q[:1], k[:1], v[:1], AttnSpec.packed(torch.tensor([0, 4])))


def test_flash_backend_refuses_unpacked_specs():
    try:
        flash = FlashBackend()
    except RuntimeError:
        pytest.skip("no varlen flash kernel in this install")
    q, k, v = qkv(4, B=2)
    with pytest.raises(ValueError, match="packed"):
        flash(q, k, v, AttnSpec.causal())


def test_kv_cache_ragged_prefill_then_decode():
    """Row 0 holds 3 prompt tokens, row 1 holds 1 (left-padded); both grow by one per step."""
    cache = KVCache(num_layers=1)
    valid = torch.tensor([[True, True, True], [False, False, True]])
    spec = cache.begin(2, 3, valid)
    k = torch.arange(6, dtype=torch.float32).view(2, 3, 1, 1)
    keys, _ = cache.update(0, k, k)
    cache.end()
    assert cache.lengths.tolist() == [3, 1]
    assert keys[1, 0, 0, 0] == 5.0  # row 1's only real token went to slot 0
    assert spec.mask[1, 0, 2].tolist() == [True, False, False]  # and only sees itself
    assert cache.position_ids().tolist() == [[3], [1]]
    spec = cache.begin(2, 1, torch.ones(2, 1, dtype=torch.bool))  # a padded step: the masked path
    cache.update(0, torch.full((2, 1, 1, 1), 9.0), torch.zeros(2, 1, 1, 1))
    cache.end()
    assert cache.lengths.tolist() == [4, 2] and spec.mask[:, 0, 0].tolist() == [[True] * 4, [True, True, False, False]]
    assert cache.k[0][1, 0, :2, 0].tolist() == [5.0, 9.0]


def test_kv_cache_aligned_steps_write_one_slice():
    """Rows of equal length, no pads: an aligned step, every row writing the same slots; one query
    per row sees every stored key (no mask), several queries get a mask over the slots."""
    cache = KVCache(num_layers=1)
    with pytest.raises(RuntimeError, match="begin"):
        cache.append(0, torch.zeros(2, 1, 1), torch.zeros(2, 1, 1))
    spec = cache.begin(2, 3)
    assert isinstance(cache._step, AlignedStep) and spec.kind == "causal"  # a fresh cache: plain causal
    k = torch.arange(6, dtype=torch.float32).view(2, 3, 1, 1)
    cache.update(0, k, k)
    cache.end()
    spec = cache.begin(2, 1)  # a decode step
    assert isinstance(cache._step, AlignedStep) and cache._step.start == 3 and spec.kind == "causal"
    keys, _ = cache.append(0, torch.full((2, 1, 1), 9.0), torch.zeros(2, 1, 1))  # (B, Hkv, L, Dh)
    cache.end()
    assert keys[:, 0, :, 0].tolist() == [[0.0, 1.0, 2.0, 9.0], [3.0, 4.0, 5.0, 9.0]]
    assert cache.lengths.tolist() == [4, 4] and cache.max_length == 4
    spec = cache.begin(2, 2)  # two tokens on rows of 4: query t sees slots up to 4 + t
    assert isinstance(cache._step, AlignedStep)
    assert spec.mask[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]


def test_kv_cache_decode_step_over_rows_of_different_lengths_is_ragged():
    cache = KVCache(num_layers=1)
    cache.begin(2, 3, torch.tensor([[True, True, True], [True, False, False]]))
    cache.update(0, torch.ones(2, 3, 1, 1), torch.ones(2, 3, 1, 1))
    cache.end()
    spec = cache.begin(2, 1)  # lengths 3 and 1: each row writes its own slot
    assert isinstance(cache._step, RaggedStep) and cache._step.valid is None
    keys, _ = cache.append(0, torch.full((2, 1, 1), 9.0), torch.zeros(2, 1, 1))
    cache.end()
    assert keys[:, 0, :, 0].tolist() == [[1.0, 1.0, 1.0, 9.0], [1.0, 9.0, 0.0, 0.0]]
    assert spec.mask[:, 0, 0].tolist() == [[True] * 4, [True, True, False, False]]
    assert cache.lengths.tolist() == [4, 2] and cache.max_length == 4


def test_kv_cache_rows_leave_and_join():
    def filled(values):
        c = KVCache(num_layers=2)
        c.begin(len(values), 2)
        for layer in range(2):
            t = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 1, 1)
            c.update(layer, t, t)
        c.end()
        return c

    cache = filled([1.0, 2.0, 3.0])
    cache.remove_rows([1])
    assert len(cache) == 2 and cache.k[1][:, 0, 0, 0].tolist() == [1.0, 3.0]
    cache.add_rows(filled([7.0]))
    assert len(cache) == 3 and cache.lengths.tolist() == [2, 2, 2]
    assert cache.v[0][:, 0, 1, 0].tolist() == [1.0, 3.0, 7.0]
    cache.keep_rows([2, 0])
    assert cache.k[0][:, 0, 0, 0].tolist() == [7.0, 1.0]
    with pytest.raises(ValueError, match="2 rows"):
        cache.begin(3, 1)


def _pad(q, k, v, cu, seqlens):
    """The packed (T, H, Dh) tensors right-padded into (B, Tmax, H, Dh) + mask."""
    B, T = len(seqlens), max(seqlens)
    pq, pk, pv = (x.new_zeros(B, T, *x.shape[1:]) for x in (q, k, v))
    mask = torch.zeros(B, T, dtype=torch.long, device=q.device)
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), seqlens)):
        pq[b, :n], pk[b, :n], pv[b, :n], mask[b, :n] = q[s:s + n], k[s:s + n], v[s:s + n], 1
    return pq, pk, pv, mask


SEQLENS = [37, 5, 128, 64, 1, 64]


@pytest.mark.cuda
def test_sdpa_packed_matches_padded_on_cuda():
    cu = torch.tensor([0] + SEQLENS).cumsum(0).cuda()
    q, k, v = qkv(sum(SEQLENS), H=8, Hkv=2, Dh=64, device="cuda", dtype=torch.bfloat16)
    packed = SDPA(q, k, v, AttnSpec.packed(cu))
    pq, pk, pv, mask = _pad(q, k, v, cu, SEQLENS)
    padded = AUTO(pq, pk, pv, AttnSpec.padded(mask))
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), SEQLENS)):
        torch.testing.assert_close(padded[b, :n].float(), packed[s:s + n].float(), atol=2e-2, rtol=2e-2)
    ref = reference(q.float(), k.float(), v.float(), block_diagonal(SEQLENS, True).cuda())
    torch.testing.assert_close(packed.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
def test_flash_varlen_matches_sdpa_packed_and_padded_on_cuda():
    if not flash_available(torch.device("cuda")):
        pytest.skip("no varlen flash kernel: needs flash-attn or PyTorch >= 2.10 on an Ampere+ GPU")
    cu = torch.tensor([0] + SEQLENS).cumsum(0).cuda()
    q, k, v = qkv(sum(SEQLENS), H=8, Hkv=2, Dh=64, device="cuda", dtype=torch.bfloat16)
    spec = AttnSpec.packed(cu)
    flash_backend = select_backend("flash")
    flash = flash_backend(q, k, v, spec)
    sdpa = SDPA(q, k, v, spec)
    torch.testing.assert_close(AUTO(q, k, v, spec), flash, atol=0, rtol=0)  # auto picks flash-attn here
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)
    pq, pk, pv, mask = _pad(q, k, v, cu, SEQLENS)
    padded = AUTO(pq, pk, pv, AttnSpec.padded(mask))
    for b, (s, n) in enumerate(zip(cu[:-1].tolist(), SEQLENS)):
        torch.testing.assert_close(padded[b, :n].float(), flash[s:s + n].float(), atol=2e-2, rtol=2e-2)
    noncausal = flash_backend(q, k, v, spec, causal=False)
    torch.testing.assert_close(noncausal.float(), SDPA(q, k, v, spec, causal=False).float(),
                               atol=2e-2, rtol=2e-2)


def test_decode_attention_with_a_ragged_mask_and_gqa():
    """One query per row against cached keys of different lengths per row (a continuous batch's
    decode step, GQA folded with the row's mask broadcast over the heads) == the reference per row."""
    B, H, Hkv, Dh, L = 3, 4, 2, 8, 7
    lengths = [7, 3, 5]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, Dh, generator=g)
    k, v = (torch.randn(B, Hkv, L, Dh, generator=g) for _ in range(2))
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]  # (B, 1, 1, L)
    out = decode_attention(q, k, v, mask)  # (B, H, 1, Dh)
    for b, n in enumerate(lengths):
        expected = reference(q[b].transpose(0, 1), k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1),
                             torch.ones(1, n, dtype=torch.bool))  # (1, H, Dh)
        torch.testing.assert_close(out[b].transpose(0, 1), expected, atol=1e-5, rtol=1e-5)
