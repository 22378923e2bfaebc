"""Derived decode weights (models/fused.py): fused q/k/v and gate/up, CPU-prepacked matmuls. The
same outputs as the separate modules, rebuilt when the weights change, never used where
gradients are needed, dropped on request."""

import pytest
import torch

from vlmkit.models.config import MoEConfig
from vlmkit.models.fused import PACK_MIN_ROWS, packing_available
from vlmkit.models.llm import LLM

from test_llm import V, tiny


def logits(model: LLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def fused_copies(model: LLM) -> list:
    return [f._weight for f in model.derived_weights() if f.fused and f._weight is not None]


def packed_copies(model: LLM) -> list:
    return [f._packed for f in model.derived_weights() if f._packed is not None]


def test_fused_matches_separate_and_is_built_lazily():
    model = tiny()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    model.fuse_projections(pack=False)
    assert fused_copies(model) == []  # nothing until a no-grad forward needs it
    got = logits(model, ids)
    assert len(fused_copies(model)) == 2 * len(model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_changes_rebuild_the_fused_copy():
    model = tiny()
    model.fuse_projections()
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    # an optimiser step changes every weight in place
    model.train()
    model(ids).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    after = logits(model, ids)
    model.fuse_projections(False)
    torch.testing.assert_close(after, logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    # load_state_dict copies into the parameters in place
    fresh = tiny(initializer_range=0.05)
    model.fuse_projections()
    logits(model, ids)
    model.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(logits(model, ids), logits(fresh, ids), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_separate_modules():
    model = tiny()
    model.fuse_projections()
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    model(ids).sum().backward()
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.q_proj.bias,
              mlp.gate_proj.weight, mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert fused_copies(model) == []  # a grad-enabled forward builds nothing


def test_disabling_drops_the_copies_and_moe_experts_stay_separate():
    model = tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32,
                               first_dense_layers=1))
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(3))
    want = logits(model, ids)
    model.fuse_projections()
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    # q/k/v of both blocks and gate/up of the dense first block; the experts run as before
    assert len(fused_copies(model)) == len(model.layers) + 1
    model.fuse_projections(False)
    assert fused_copies(model) == []


needs_packing = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN prepacked linear")


@needs_packing
def test_prepacked_matmuls_match_and_follow_weight_changes():
    model = tiny()
    rows = torch.randint(0, V, (2, 2 * PACK_MIN_ROWS), generator=torch.Generator().manual_seed(4))
    one = rows[:1, :1]  # a single row keeps the plain matmul
    want, want_one = logits(model, rows), logits(model, one)
    model.fuse_projections(pack=True)
    torch.testing.assert_close(logits(model, one), want_one, rtol=1e-5, atol=1e-5)
    assert packed_copies(model) == []
    torch.testing.assert_close(logits(model, rows), want, rtol=1e-5, atol=1e-5)
    # every dense matmul of the decoder: per block q/k/v, o_proj, gate/up, down_proj; the tied head
    assert len(packed_copies(model)) == 4 * len(model.layers) + 1
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(2.0)  # an in-place change of one weight
        model.embed_tokens.weight.add_(0.01)  # and of the tied head (and the embeddings)
    changed = logits(model, rows)
    model.fuse_projections(False)
    assert packed_copies(model) == []
    torch.testing.assert_close(changed, logits(model, rows), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, want)


@needs_packing
def test_prepacking_is_skipped_where_it_does_not_apply():
    model = tiny()
    model.fuse_projections(pack=True)
    ids = torch.randint(0, V, (1, 2 * PACK_MIN_ROWS), generator=torch.Generator().manual_seed(5))
    model(ids).sum().backward()  # gradients: the separate modules, nothing derived
    assert packed_copies(model) == [] and fused_copies(model) == []
    model.double()  # not fp32: the plain matmul on the fused copy
    with torch.no_grad():
        model(ids)
    assert packed_copies(model) == [] and fused_copies(model)
