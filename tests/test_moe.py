"""MoE FFN: top-k routing, shared experts, auxiliary-loss-free bias balancing, the aux loss against
its formula, load reporting."""

import pytest
import torch

from vlmkit.models.config import LLMConfig, MoEConfig
from vlmkit.models.llm import LLM
from vlmkit.models.moe import MoE

D = 16


def moe(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**dict(num_experts=6, top_k=2, num_shared_experts=1, expert_intermediate_size=24), **kw})
    layer = MoE(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_exactly_top_k_distinct_experts_per_token_and_output_matches_reference():
    layer = moe(top_k=3)
    x = torch.randn(20, D)
    weights, idx, scores = layer.router(x)
    assert idx.shape == (20, 3)
    assert all(len(set(row)) == 3 for row in idx.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(20))  # norm_topk_prob
    out, _, counts = layer(x)
    assert counts.sum() == 20 * 3
    want = layer.shared_experts(x)
    for n in range(20):
        for j in range(3):
            want[n] += weights[n, j] * layer.experts[int(idx[n, j])](x[n])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_shared_experts_always_used():
    layer = moe()
    x = torch.randn(10, D)
    with_shared, _, _ = layer(x)
    torch.nn.init.zeros_(layer.shared_experts.down_proj.weight)
    without, _, _ = layer(x)
    diff = (with_shared - without).norm(dim=-1)
    assert torch.all(diff > 1e-4)  # every token's output had the shared expert's contribution
    torch.testing.assert_close(with_shared - without, moe().shared_experts(x), atol=1e-5, rtol=1e-5)


def test_bias_update_moves_load_toward_balance():
    """Skewed input: one expert takes most picks; the sign updates of the selection bias spread the
    load out over a few steps, while the gate weights keep using the unbiased affinities."""
    layer = moe(num_experts=4, top_k=1, num_shared_experts=0, bias_update_rate=0.02).train()
    torch.manual_seed(1)
    x = torch.randn(256, D) * 0.1 + layer.router.weight[2].detach()  # tokens aligned with expert 2

    def imbalance():
        with torch.no_grad():
            _, _, counts = layer(x)
        layer.record_load(counts)
        return (counts.float().max() / counts.float().mean()).item()

    busiest = int(layer.router(x)[1].flatten().bincount(minlength=4).argmax())
    first = imbalance()
    assert first == 4.0  # every token picks the same expert
    history = [first]
    for _ in range(30):
        layer.update_bias()
        history.append(imbalance())
    assert max(history[-10:]) < 2.0, history  # and stays spread, not just dipping once
    assert layer.router.score_bias.argmin() == busiest  # the overloaded expert became least attractive
    assert layer.load_since_update.sum() > 0  # only the last imbalance() since the update
    layer.update_bias()
    assert layer.load_since_update.sum() == 0


def test_bias_not_updated_in_eval_or_when_rate_is_zero():
    layer = moe(bias_update_rate=0.0).train()
    _, _, counts = layer(torch.randn(8, D))
    layer.record_load(counts)
    layer.update_bias()
    assert torch.all(layer.router.score_bias == 0)
    layer = moe().eval()
    _, _, counts = layer(torch.randn(8, D))
    layer.record_load(counts)
    layer.update_bias()
    assert torch.all(layer.router.score_bias == 0)  # eval forwards do not count as load


def balance_loss_by_hand(x, router_weight, score_bias, top_k, score_func, coef):
    """The auxiliary balance loss from its formula, computed here from the router's parameters.

    Switch Transformer's load-balancing loss (Fedus et al., arXiv:2101.03961, section 2.2,
    eq. 4-6), coef * E * sum_e f_e * P_e, with top-k routing: f_e the fraction of the N * K picks
    that went to expert e, P_e the mean over tokens of e's share of the token's affinities (the
    normalised affinities of DeepSeek-V3's sequence-wise balance loss, arXiv:2412.19437, section
    2.1.2). The picks are the router's, made on the biased scores; P_e uses the unbiased ones."""
    E = router_weight.shape[0]
    logits = x @ router_weight.T  # (N, E)
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    picks = (scores.detach() + score_bias).topk(top_k, dim=-1).indices  # (N, K)
    f = torch.stack([(picks == e).sum() for e in range(E)]).float() / picks.numel()
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    return coef * E * (f * P).sum()


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_aux_loss_is_the_balance_loss_formula(score_func):
    layer = moe(aux_loss_coef=0.1, score_func=score_func)
    with torch.no_grad():  # a selection bias that changes some picks: they must still count
        layer.router.score_bias.copy_(torch.linspace(-0.3, 0.3, 6))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(7))
    _, aux, counts = layer(x)
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    want = balance_loss_by_hand(x, weight, layer.router.score_bias, top_k=2, score_func=score_func, coef=0.1)
    torch.testing.assert_close(aux, want)
    assert counts.sum() == 32 * 2
    # differentiable through P_e, with the gradient of the formula
    aux.backward()
    want.backward()
    torch.testing.assert_close(layer.router.weight.grad, weight.grad)
    _, zero, _ = moe(aux_loss_coef=0.0)(torch.randn(4, D))
    assert zero.item() == 0


def test_llm_moe_load_aux_and_dense_first_layers():
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16, first_dense_layers=1,
                                  aux_loss_coef=0.01, bias_update_rate=0.1))
    model = LLM(cfg).train()
    assert not isinstance(model.layers[0].mlp, MoE) and isinstance(model.layers[1].mlp, MoE)
    assert "layers.1.mlp.router.score_bias" in model.state_dict()  # saved with the checkpoint
    logits = model(torch.randint(0, 50, (2, 9)))
    load = model.moe_load()
    assert sorted(load) == ["layers.1", "layers.2"]
    assert all(len(v) == 4 and abs(sum(v) - 1) < 1e-6 for v in load.values())
    aux = model.aux_loss()
    assert aux.item() > 0
    (logits.logsumexp(-1).mean() + aux).backward()
    before = model.layers[1].mlp.router.score_bias.clone()
    model.update_moe_bias()
    assert not torch.equal(before, model.layers[1].mlp.router.score_bias)
    dense = LLM(LLMConfig(vocab_size=50, hidden_size=32, num_heads=4, num_layers=1))
    dense(torch.randint(0, 50, (1, 3)))
    assert dense.aux_loss().item() == 0 and dense.moe_load() == {}
    dense.update_moe_bias()  # no-op


def test_idle_experts_run_on_an_empty_batch_when_sharded_training_asks():
    """Under FSDP every rank must run (gather, reduce) the same experts, whatever its tokens chose:
    with `run_idle_experts` an expert no token chose still gets a gradient, of zeros, and the
    output is unchanged; without it (one process) an idle expert gets none."""
    x = torch.randn(2, D)  # 2 tokens x top-2: at most 4 of the 6 experts are chosen
    grads = {}
    for run_idle in (False, True):
        layer = moe()
        layer.run_idle_experts = run_idle
        out, _, counts = layer(x)
        out.sum().backward()
        grads[run_idle] = (out.detach(), counts, [e.gate_proj.weight.grad for e in layer.experts])
    (out_off, counts, off), (out_on, _, on) = grads[False], grads[True]
    idle = [e for e, n in enumerate(counts.tolist()) if n == 0]
    assert idle and torch.equal(out_off, out_on)
    assert all(off[e] is None for e in idle)
    assert all(on[e] is not None and not on[e].any() for e in idle)
    assert all(torch.equal(off[e], on[e]) for e in range(len(off)) if e not in idle)
