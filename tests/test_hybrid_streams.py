"""The hybrid tower's two branches on two CUDA streams (`HybridVisionTower.parallel_streams`,
models/streams.py): the same outputs and gradients as one after the other, on the CPU exactly (the
option must not change CPU behaviour) and on CUDA within tolerance."""

import pytest
import torch

from vlmkit.models.config import HybridVisionConfig
from vlmkit.models.sam import HybridVisionTower
from vlmkit.models.streams import run_branches

# A 4 x 4 low-resolution grid (32 px, patch 8) and an 8 x 8 high-resolution one (64 px, patch 8)
# with windows of 3, so the windowed blocks pad their edges.
CONFIG = dict(low_res=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4),
              high_res=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=48, num_layers=4,
                            num_heads=4, window_size=3, global_attn_indexes=(1, 3), output_channels=16),
              out_hidden_size=48)


def _tower(device="cpu") -> HybridVisionTower:
    torch.manual_seed(0)
    tower = HybridVisionTower(HybridVisionConfig(**CONFIG))
    with torch.no_grad():
        # a non-zero global scale, so the kept block's branch reaches the output and its gradients
        tower.combiner.global_scale.fill_(0.5)
    return tower.to(device)


def _pixels(device="cpu", n=3):
    gen = torch.Generator().manual_seed(1)
    low, high = torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, 3, 64, 64, generator=gen)
    return low.to(device), high.to(device)


def _step(tower, low, high, parallel: bool, autocast_dtype=None):
    """Output and every parameter's gradient of one forward + backward."""
    tower.zero_grad(set_to_none=True)
    tower.parallel_streams = parallel
    with torch.autocast(low.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = tower(low, high)
    out.float().square().mean().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in tower.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_parallel_streams_is_bit_identical_on_cpu(checkpointing):
    tower = _tower()
    tower.gradient_checkpointing = checkpointing
    low, high = _pixels()
    out, grads = _step(tower, low, high, parallel=False)
    out_p, grads_p = _step(tower, low, high, parallel=True)
    assert torch.equal(out, out_p)
    assert grads.keys() == grads_p.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_p[name]), name
    assert grads["high_res.layers.1.mlp.fc2.weight"].abs().sum() > 0  # the kept block's branch got gradients
    with torch.no_grad():  # inference (kernels may differ from those with autograd, so it compares with itself)
        tower.parallel_streams = False
        inferred = tower(low, high)
        tower.parallel_streams = True
        assert torch.equal(tower(low, high), inferred)


def test_run_branches_runs_side_then_main_on_cpu():
    order = []
    x = torch.ones(2)
    side, main = run_branches(lambda: (order.append("side") or x * 2,), lambda: order.append("main") or x + 1,
                              side_inputs=(x,))
    assert order == ["side", "main"]
    assert torch.equal(side[0], torch.full((2,), 2.0)) and torch.equal(main, torch.full((2,), 2.0))


@pytest.mark.cuda
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_parallel_streams_match_one_stream_on_cuda(autocast_dtype):
    tower = _tower("cuda")
    low, high = _pixels("cuda")
    out, grads = _step(tower, low, high, parallel=False, autocast_dtype=autocast_dtype)
    out_p, grads_p = _step(tower, low, high, parallel=True, autocast_dtype=autocast_dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if autocast_dtype is None else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_p.float(), out.float(), **tol)
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], **tol, msg=name)
    with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        tower.parallel_streams = False
        inferred = tower(low, high)
        tower.parallel_streams = True
        inferred_p = tower(low, high)
    torch.testing.assert_close(inferred_p.float(), inferred.float(), **tol)


@pytest.mark.cuda
def test_high_res_branch_runs_on_a_side_stream_on_cuda():
    tower = _tower("cuda")
    low, high = _pixels("cuda")
    seen = {}
    tower.high_res.register_forward_pre_hook(lambda *_: seen.__setitem__("high", torch.cuda.current_stream()))
    tower.low_res.register_forward_pre_hook(lambda *_: seen.__setitem__("low", torch.cuda.current_stream()))
    tower.parallel_streams = True
    with torch.no_grad():
        tower(low, high)
    assert seen["low"] == torch.cuda.current_stream()
    assert seen["high"] != seen["low"]
    tower.parallel_streams = False
    with torch.no_grad():
        tower(low, high)
    assert seen["high"] == seen["low"] == torch.cuda.current_stream()
