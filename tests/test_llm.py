"""LLM invariants on a tiny config: packed == padded == KV-cache decode, ragged and continuous
batching through the cache, gradient checkpointing changes nothing, tied embeddings, init, the
attention backend picked once. (The decode step path vs the module path: test_decode_paths.py.)"""

import pytest
import torch

from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import LLMConfig, MoEConfig
from vlmkit.models.llm import LLM

V = 97


def tiny(**kw) -> LLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               rope_theta=500.0, qkv_bias=True, qk_norm=True)
    model = LLM(LLMConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # non-trivial norms / biases so that every path is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def samples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def right_padded(seqs):
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    return ids, mask


def left_padded(seqs):
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
    return ids, mask


@torch.no_grad()
def test_packed_equals_padded_equals_alone():
    model = tiny()
    seqs = samples([9, 4, 13, 4])
    alone = [model(s[None])[0] for s in seqs]
    ids, mask = right_padded(seqs)
    padded = model(ids, attention_mask=mask)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    packed = model.logits(model.decode(model.embed(torch.cat(seqs)), spec=AttnSpec.packed(cu)))  # (T, V)
    for b, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(padded[b, :n], alone[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[cu[b]:cu[b] + n], alone[b], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_default_positions_restart_per_sample():
    """The default positions of a packed spec are the per-sample ones; positions do reach RoPE
    (a per-sample offset would not show: RoPE is relative and attention stays inside a sample)."""
    model = tiny()
    seqs = samples([5, 6])
    flat = model.embed(torch.cat(seqs))
    spec = AttnSpec.packed(torch.tensor([0, 5, 11]))
    restart = torch.tensor(list(range(5)) + list(range(6)))
    a = model.decode(flat, spec=spec)
    torch.testing.assert_close(a, model.decode(flat, spec=spec, position_ids=restart))
    spread = restart * 3
    assert not torch.allclose(a, model.decode(flat, spec=spec, position_ids=spread), atol=1e-4)


MODELS = {
    "dense": tiny,
    "moe": lambda: tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32, first_dense_layers=1)),
    "derived weights": lambda: _with_derived_weights(tiny()),
}


def _with_derived_weights(model: LLM) -> LLM:
    model.fuse_projections()
    return model


@pytest.mark.parametrize("pad", [right_padded, left_padded])
@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_ragged_cache_decode_equals_full_forward(pad, kind):
    """Prefill ragged prompts in one padded batch, then decode one token per row per step (the
    blocks' one-token `step` path): the logits of every step equal a full forward of each row's
    whole sequence."""
    model = MODELS[kind]()
    prompts = samples([6, 2, 4])
    continuation = samples([5, 5, 5], seed=2)
    ids, mask = pad(prompts)
    cache = model.new_cache()
    prefill = model.logits(model.decode(model.embed(ids), spec=AttnSpec.padded(mask), cache=cache))
    steps = []
    for t in range(5):
        step_ids = torch.stack([c[t] for c in continuation])[:, None]  # (B, 1)
        steps.append(model.logits(model.decode(model.embed(step_ids), cache=cache))[:, 0])
    assert cache.lengths.tolist() == [11, 7, 9]
    for b, (p, c) in enumerate(zip(prompts, continuation)):
        full = model(torch.cat([p, c])[None])[0]
        torch.testing.assert_close(prefill[b][mask[b].bool()], full[:len(p)], atol=1e-5, rtol=1e-5)
        for t in range(5):
            torch.testing.assert_close(steps[t][b], full[len(p) + t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_grows_past_its_first_allocation():
    model = tiny()
    seq = samples([40])[0]
    full = model(seq[None])[0]
    cache = model.new_cache()
    got = [model.logits(model.decode(model.embed(seq[None, :3]), cache=cache))[0]]
    for t in range(3, 40):
        got.append(model.logits(model.decode(model.embed(seq[None, t:t + 1]), cache=cache))[0])
    assert cache.capacity >= 40 and cache.lengths.tolist() == [40]
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=1e-5)


def greedy(model, prompt, n):
    out = list(prompt.tolist())
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(prompt):]


@torch.no_grad()
def test_rows_leave_and_join_mid_decode():
    """Continuous batching: rows finish and new prefilled rows join between steps; every row's
    greedy tokens equal decoding it alone without a cache."""
    model = tiny(qk_norm=False)
    a, b, c = samples([5, 3, 7], seed=3)
    want = {"a": greedy(model, a, 6), "b": greedy(model, b, 2), "c": greedy(model, c, 4)}
    got = {"a": [], "b": [], "c": []}

    def prefill(prompts):
        cache = model.new_cache()
        ids, mask = left_padded(prompts)
        return cache, model.logits(model.decode(model.embed(ids), spec=AttnSpec.padded(mask), cache=cache))[:, -1]

    cache, last = prefill([a, b])
    rows = ["a", "b"]
    for step in range(6):
        nxt = last.argmax(-1)
        for r, tok in zip(rows, nxt.tolist()):
            got[r].append(tok)
        if step == 1:  # b is done after 2 tokens; c arrives
            keep = [i for i, r in enumerate(rows) if r != "b"]
            cache.keep_rows(keep)
            nxt, rows = nxt[keep], [rows[i] for i in keep]
            new_cache, new_last = prefill([c])
            got["c"].append(int(new_last.argmax(-1)))
            cache.add_rows(new_cache)
            nxt, rows = torch.cat([nxt, new_last.argmax(-1)]), rows + ["c"]
        if step == 4:  # c is done after 4 tokens (1 from its prefill + 3 steps)
            cache.remove_rows([rows.index("c")])
            nxt, rows = nxt[:1], rows[:1]
        last = model.logits(model.decode(model.embed(nxt[:, None]), cache=cache))[:, 0]
    assert got == want


def test_gradient_checkpointing_changes_nothing():
    moe = MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, expert_intermediate_size=32, aux_loss_coef=0.01)
    results = []
    for ckpt in (False, True):
        model = tiny(moe=moe).train()
        model.gradient_checkpointing = ckpt
        ids = torch.cat(samples([7, 9]))
        spec = AttnSpec.packed(torch.tensor([0, 7, 16]))
        logits = model.logits(model.decode(model.embed(ids), spec=spec))
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]) + model.aux_loss()
        loss.backward()
        loads = {k: m.load_since_update.clone() for k, m in model.moe_layers().items()}
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, loads))
    (loss0, grads0, load0), (loss1, grads1, load1) = results
    torch.testing.assert_close(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], atol=1e-6, rtol=1e-5, msg=name)
    for name in load0:  # a recomputed forward is not counted twice
        torch.testing.assert_close(load0[name], load1[name])


def test_tied_embeddings_share_one_matrix():
    model = tiny(tie_embeddings=True)
    assert model.lm_head is None and not any(k.startswith("lm_head") for k in model.state_dict())
    h = torch.randn(3, 48)
    torch.testing.assert_close(model.logits(h), h @ model.embed_tokens.weight.T)


def test_init_weights_scales():
    model = LLM(LLMConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                          initializer_range=0.02))
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].mlp.down_proj.weight.std().item() - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8)
    assert torch.all(model.norm.weight == 1)


@torch.no_grad()
def test_attention_backend_is_chosen_once_for_every_layer():
    model = tiny()
    assert model.attend.name == "auto" and all(block.attn.attend is model.attend for block in model.layers)
    sdpa = LLM(model.config, attention_backend="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    assert all(block.attn.attend.name == "sdpa" for block in sdpa.layers)
    ids = torch.cat(samples([5, 8]))
    spec = AttnSpec.packed(torch.tensor([0, 5, 13]))
    # on the CPU "auto" runs packed specs on SDPA too
    torch.testing.assert_close(model.decode(model.embed(ids), spec=spec), sdpa.decode(sdpa.embed(ids), spec=spec),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        LLM(model.config, attention_backend="xformers")


def test_non_silu_rejected():
    with pytest.raises(ValueError, match="gelu"):
        LLM(LLMConfig(vocab_size=V, hidden_size=48, num_heads=4, hidden_act="gelu"))


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [48, 64])  # head_dim 12: SDPA; 16: the flash varlen kernel where present
@torch.no_grad()
def test_packed_padded_and_cache_agree_on_cuda_bf16(hidden):
    model = tiny(hidden_size=hidden).cuda().to(torch.bfloat16)
    seqs = [s.cuda() for s in samples([33, 7, 64, 1])]
    ids, mask = right_padded(seqs)
    padded = model(ids.cuda(), attention_mask=mask.cuda()).float()
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).cuda()
    packed = model.logits(model.decode(model.embed(torch.cat(seqs)), spec=AttnSpec.packed(cu))).float()
    cache = model.new_cache()
    prefill = model.logits(model.decode(model.embed(ids[:, :-1].cuda()), spec=AttnSpec.padded(mask[:, :-1].cuda()),
                                        cache=cache))
    for b, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(packed[cu[b]:cu[b] + n], padded[b, :n], atol=5e-2, rtol=5e-2)
        if n > 1:
            torch.testing.assert_close(prefill[b, :n - 1].float(), padded[b, :n - 1], atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
def test_packed_equals_padded_under_bf16_autocast_on_cuda():
    """fp32 weights under bf16 autocast (training on GPUs): packed (a flash kernel where present)
    and padded agree, forward and backward runs."""
    model = tiny(hidden_size=64, moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32)).cuda().train()
    seqs = [s.cuda() for s in samples([33, 7, 64, 1])]
    ids, mask = right_padded(seqs)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = model(ids.cuda(), attention_mask=mask.cuda()).float()
        packed = model.logits(model.decode(model.embed(torch.cat(seqs)), spec=AttnSpec.packed(cu))).float()
    packed.logsumexp(-1).mean().backward()
    for b, s in enumerate(seqs):
        torch.testing.assert_close(packed[cu[b]:cu[b] + len(s)], padded[b, :len(s)], atol=5e-2, rtol=5e-2)
