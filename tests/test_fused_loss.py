"""The output head's cross-entropy without the (M, V) logits (models/loss.py): per-token losses and
gradients equal to the plain `F.cross_entropy(hidden @ W^T + b)` for any chunking, any upstream
gradient (uniform: scaled in backward; per token: recomputed), frozen inputs and no-grad; a
training step through `compute_loss` equal on both paths; the Liger path on CUDA."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import Stage
from vlmkit.constants import IGNORE_INDEX
from vlmkit.errors import ConfigError
from vlmkit.models.config import LoRAConfig, VLMConfig
from vlmkit.models.lora import apply_lora
from vlmkit.models.loss import (MIN_CHUNK_TOKENS, default_chunk_size, fused_loss_wanted, linear_cross_entropy,
                                output_projection)
from vlmkit.models.vlm import VLMModel
from vlmkit.schema import build

from tests.test_vlm import _ids, _model

M, D, V = 13, 6, 29


def inputs(dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (M,), generator=g)
    targets[[2, 7]] = IGNORE_INDEX
    return hidden, weight, b, targets


def reference(hidden, weight, targets, bias=None):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           reduction="none", ignore_index=IGNORE_INDEX)


def grads(losses, token_weights, tensors):
    return torch.autograd.grad((losses * token_weights).sum(), [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 4, 5, M, 64])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "per_token"])
def test_losses_and_gradients_equal_the_plain_path(chunk_size, weighted):
    hidden, weight, bias, targets = inputs()
    token_weights = (torch.rand(M, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) if weighted
                     else torch.full((M,), 1.0 / M, dtype=torch.float64))
    got = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    want = reference(hidden, weight, targets, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[targets == IGNORE_INDEX] == 0)
    for g, w in zip(grads(got, token_weights, (hidden, weight, bias)), grads(want, token_weights, (hidden, weight, bias))):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_one_hot_upstream_gradients():
    # gradcheck's analytic Jacobian backpropagates one token at a time: the per-token path
    hidden, weight, bias, targets = inputs()
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, chunk_size=4),
                                    (hidden, weight, bias))


def test_fp32_within_tolerance_and_without_bias():
    hidden, weight, _, targets = inputs(torch.float32, bias=False)
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    want = reference(hidden, weight, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ones = torch.ones(M)
    for g, w in zip(grads(got, ones, (hidden, weight)), grads(want, ones, (hidden, weight))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_no_grad():
    hidden, weight, bias, targets = inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    got = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    (g,) = torch.autograd.grad(got.sum(), hidden)
    (w,) = torch.autograd.grad(reference(hidden, weight, targets, bias).sum(), hidden)
    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        plain = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, got.detach(), rtol=0, atol=0)


def test_no_targets():
    hidden, weight, bias, targets = inputs()
    got = linear_cross_entropy(hidden[:0], weight, targets[:0], bias=bias)
    assert got.shape == (0,)
    got.sum().backward()
    assert torch.all(weight.grad == 0)


def test_autocast_matches_the_plain_path_under_autocast():
    hidden, weight, _, targets = inputs(torch.float32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
        want = reference(hidden, weight, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    g_h, g_w = grads(got, torch.ones(M), (hidden, weight))
    w_h, w_w = grads(want, torch.ones(M), (hidden, weight))
    assert g_h.dtype == torch.float32 and g_w.dtype == torch.float32
    torch.testing.assert_close(g_h, w_h, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_w, w_w, rtol=2e-2, atol=2e-2)


def test_bad_shapes_and_backends_are_refused():
    hidden, weight, _, targets = inputs()
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, targets, backend="triton")
    with pytest.raises(RuntimeError, match="liger"):
        linear_cross_entropy(hidden, weight, targets, backend="liger")  # CPU tensors


def test_default_chunk_size():
    assert default_chunk_size(16384, 151936, 1536) == 256  # Liger's rule: 16384 / ceil(V / D) -> 256
    assert default_chunk_size(131072, 151936, 896) == 1024  # 131072 / 170 = 772 -> 1024
    assert default_chunk_size(10, 151936, 896) == MIN_CHUNK_TOKENS


def test_fused_loss_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fused_loss_wanted("auto", cpu) and fused_loss_wanted("auto", cuda)
    assert fused_loss_wanted("on", cpu) and not fused_loss_wanted("off", cuda)
    assert Stage().fused_loss == "auto"
    assert build(Stage, {"fused_loss": "on"}).fused_loss == "on"
    with pytest.raises(ConfigError, match="fused_loss"):
        build(Stage, {"fused_loss": "yes"})


def test_output_projection_of_each_head():
    linear = nn.Linear(D, V)
    assert output_projection(linear) == (linear.weight, linear.bias)
    embedding = nn.Embedding(V, D)
    assert output_projection(embedding) == (embedding.weight, None)

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert output_projection(Scaled(D, V)) is None


def step(model, fused: bool):
    """One training forward and backward through compute_loss: (loss, token_loss, grads)."""
    model.zero_grad()
    model.fused_loss = fused
    n = model.config.tokens_per_image
    ids = torch.tensor(_ids(5, ("img", n), 9, 10, 11, 12, 13, 14))
    labels = ids.clone()
    labels[:n + 1] = IGNORE_INDEX
    cu = torch.tensor([0, 4, ids.numel()], dtype=torch.int32)
    pos = torch.cat([torch.arange(4), torch.arange(ids.numel() - 4)])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model.compute_loss(ids, labels, pos, cu, pixels)
    out.loss.backward()
    return out.loss.detach(), out.token_loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                                         if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_training_step_equals_the_plain_path(tied):
    model = _model("mlp")
    if tied:
        cfg = model.config.to_dict()
        model = VLMModel(VLMConfig.from_dict({**cfg, "llm": {**cfg["llm"], "tie_embeddings": True}}))
    model.train()
    plain_loss, plain_tokens, plain_grads = step(model, fused=False)
    loss, tokens, grads_ = step(model, fused=True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens, plain_tokens, rtol=1e-5, atol=1e-6)
    assert grads_.keys() == plain_grads.keys()
    assert ("llm.embed_tokens.weight" if tied else "llm.lm_head.weight") in grads_
    for k in grads_:
        torch.testing.assert_close(grads_[k], plain_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_lora_on_the_head_takes_the_plain_path():
    model = _model("mlp").train()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["llm.lm_head"]))
    with torch.no_grad():
        model.llm.lm_head.lora_B.weight.normal_()  # a non-zero update, which the fused path would miss
    assert output_projection(model.llm.head.modules[0]) is None
    plain_loss, _, plain_grads = step(model, fused=False)
    loss, _, grads_ = step(model, fused=True)
    assert torch.equal(loss, plain_loss)
    assert "llm.lm_head.lora_B.weight" in grads_
    assert all(torch.equal(grads_[k], plain_grads[k]) for k in plain_grads)


@pytest.mark.cuda
def test_chunked_bf16_on_cuda_matches_the_plain_path():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, 32000, (1000,), device="cuda", generator=g)
    got = linear_cross_entropy(hidden, weight, targets, backend="chunked", chunk_size=300)
    want = reference(hidden, weight, targets)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads(got, torch.ones_like(got), (hidden, weight)),
                    grads(want, torch.ones_like(want), (hidden, weight))):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "per_token"])
def test_liger_matches_the_chunked_path(weighted):
    pytest.importorskip("liger_kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 256, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    bias = torch.randn(32000, device="cuda", generator=g).requires_grad_()
    targets = torch.randint(0, 32000, (1000,), device="cuda", generator=g)
    targets[::7] = IGNORE_INDEX
    token_weights = torch.rand(1000, device="cuda", generator=g) if weighted else torch.ones(1000, device="cuda")
    liger = linear_cross_entropy(hidden, weight, targets, bias=bias, backend="liger")
    chunked = linear_cross_entropy(hidden, weight, targets, bias=bias, backend="chunked")
    torch.testing.assert_close(liger, chunked, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads(liger, token_weights, (hidden, weight, bias)),
                    grads(chunked, token_weights, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_second_backward_recomputes_instead_of_rescaling():
    # the first backward scales the stored gradients in place; a retained graph's second one must
    # not read them again
    hidden, weight, bias, targets = inputs()
    got = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=4)
    first = torch.autograd.grad(got.mean(), (hidden, weight, bias), retain_graph=True)
    second = torch.autograd.grad(got.mean(), (hidden, weight, bias))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
