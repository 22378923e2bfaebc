"""Derived decode weights (models/fused.py): fused q/k/v and gate/up, transposed copies on the CPU.
The same outputs as the separate modules, rebuilt when the weights change, never used where
gradients are needed, dropped on request."""

import pytest
import torch

from vlmkit.models.config import MoEConfig
from vlmkit.models.fused import FusedLinears
from vlmkit.models.llm import LLM

from tests.test_llm import V, tiny


def logits(model: LLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def fused_copies(model: LLM) -> list:
    return [f._weight for f in model.derived_weights() if f.fused and f._weight is not None]


def built(model: LLM) -> list:
    return [f._weight for f in model.derived_weights() if f._weight is not None]


def test_fused_matches_separate_and_is_built_lazily():
    model = tiny()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    model.fuse_projections()
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


def test_every_dense_matmul_runs_on_a_transposed_copy_that_follows_weight_changes():
    model = tiny()
    rows = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(4))
    one = rows[:1, :1]
    want, want_one = logits(model, rows), logits(model, one)
    model.fuse_projections()
    torch.testing.assert_close(logits(model, one), want_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, rows), want, rtol=1e-5, atol=1e-5)
    # every dense matmul of the decoder: per block q/k/v, o_proj, gate/up, down_proj; the tied head
    copies = built(model)
    assert len(copies) == 4 * len(model.layers) + 1
    head = model.head._weight
    assert head.shape == model.embed_tokens.weight.t().shape and head.is_contiguous()  # (in, out)
    assert head.data_ptr() != model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(2.0)  # an in-place change of one weight
        model.embed_tokens.weight.add_(0.01)  # and of the tied head (and the embeddings)
    changed = logits(model, rows)
    model.fuse_projections(False)
    assert built(model) == []
    torch.testing.assert_close(changed, logits(model, rows), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, want)


def test_derived_weights_are_skipped_where_they_do_not_apply():
    model = tiny()
    model.fuse_projections()
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(5))
    model(ids).sum().backward()  # gradients: the separate modules, nothing derived
    assert built(model) == []
    model.double()  # another dtype: copies in that dtype, the same outputs as the separate modules
    with torch.no_grad():
        got = model(ids)
    assert fused_copies(model) and all(w.dtype == torch.float64 for w in built(model))
    model.fuse_projections(False)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids))


def test_groups_concatenate_their_outputs():
    torch.manual_seed(6)
    a, b, c = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5), torch.nn.Linear(8, 2)
    fused = FusedLinears(a, b, c, groups=(2, 1))
    x = torch.randn(4, 8)
    with torch.no_grad():
        separate = fused(x)  # not enabled: the modules themselves
        fused.configure(True)
        together = fused(x)
    assert [t.shape[-1] for t in separate] == [t.shape[-1] for t in together] == [8, 2]
    for got, want in zip(together, (torch.cat([a(x), b(x)], -1), c(x))):
        torch.testing.assert_close(got, want.detach())
    with pytest.raises(ValueError, match="groups"):
        FusedLinears(a, b, groups=(1,))
