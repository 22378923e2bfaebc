"""MoE FFN: top-k routing, shared experts, auxiliary-loss-free bias balancing, aux loss, load reporting."""

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


def test_aux_loss_positive_and_differentiable():
    layer = moe(aux_loss_coef=0.1)
    _, aux, _ = layer(torch.randn(32, D))
    assert aux.item() > 0
    aux.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
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
