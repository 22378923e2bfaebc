"""The decode step path gives the tokens of the module path.

`LLM.decode` with a KV cache and one token per row runs each block's `step` (models/llm.py:
`Block.step`, `Attention.step`, called without nn.Module's call machinery). Greedy decoding through
it must give the same tokens and logits as (1) the same cache decoding with every block run as a
module (`Block.__call__` -> `forward` on (B, 1, D), hooks included) and (2) a full forward of each
row's growing sequence without a cache; for dense and MoE decoders, with and without derived
weights, over rows of equal length (aligned cache steps) and of different lengths (ragged ones).
"""

import pytest
import torch

from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import MoEConfig
from vlmkit.models.llm import LLM, Block

from tests.test_llm import left_padded, samples, tiny

NEW_TOKENS = 8

MODELS = {
    "dense": tiny,
    "moe": lambda: tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32, first_dense_layers=1,
                                      aux_loss_coef=0.01)),
}
PROMPT_LENGTHS = {"aligned rows": [5, 5, 5], "ragged rows": [6, 2, 4]}


def block_as_module(block: Block, x, cos, sin, spec, cache):
    """Stands in for `Block.step`: the module path on the same cache, (B, D) <-> (B, 1, D)."""
    out, aux, counts = block(x[:, None], cos[:, None], sin[:, None], spec, cache)
    return out[:, 0], aux, counts


@torch.no_grad()
def greedy_with_cache(model: LLM, prompts: list[torch.Tensor]) -> dict:
    """Prefill the prompts as one left-padded batch, then decode NEW_TOKENS greedy tokens per row,
    one `LLM.decode` call per token. Returns the tokens (B, N), the logits they were picked from
    (B, N, V), the last step's MoE aux loss and how often a block's forward hook ran while decoding."""
    calls = []
    hooks = [block.register_forward_hook(lambda *_: calls.append(1)) for block in model.layers]
    ids, mask = left_padded(prompts)
    cache = model.new_cache()
    logits = model.logits(model.decode(model.embed(ids), spec=AttnSpec.padded(mask), cache=cache))[:, -1]
    calls.clear()  # the prefill runs `forward`: count the decode steps only
    tokens, picked_from = [], []
    for _ in range(NEW_TOKENS):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        picked_from.append(logits)
        logits = model.logits(model.decode(model.embed(nxt[:, None]), cache=cache))[:, 0]
    for hook in hooks:
        hook.remove()
    return dict(tokens=torch.stack(tokens, 1), logits=torch.stack(picked_from, 1), aux=model.aux_loss(),
                hook_calls=len(calls))


@torch.no_grad()
def greedy_full_forward(model: LLM, prompt: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The reference: each token from a full forward of the whole sequence so far, no cache."""
    seq, picked_from = prompt.tolist(), []
    for _ in range(NEW_TOKENS):
        logits = model(torch.tensor([seq]))[0, -1]
        picked_from.append(logits)
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], torch.stack(picked_from)


@pytest.mark.parametrize("derived", [False, True], ids=["separate weights", "derived weights"])
@pytest.mark.parametrize("lengths", PROMPT_LENGTHS.values(), ids=PROMPT_LENGTHS.keys())
@pytest.mark.parametrize("kind", MODELS)
def test_step_path_gives_the_tokens_of_the_module_path(kind, lengths, derived, monkeypatch):
    model = MODELS[kind]()
    model.fuse_projections(derived)
    prompts = samples(lengths, seed=4)

    step_path = greedy_with_cache(model, prompts)
    with monkeypatch.context() as patch:
        patch.setattr(Block, "step", block_as_module)
        module_path = greedy_with_cache(model, prompts)

    # the step path skips the module call machinery, the patched run went through it
    assert step_path["hook_calls"] == 0
    assert module_path["hook_calls"] == NEW_TOKENS * len(model.layers)
    assert torch.equal(step_path["tokens"], module_path["tokens"])
    torch.testing.assert_close(step_path["logits"], module_path["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_path["aux"], module_path["aux"])
    if kind == "moe":
        assert step_path["aux"] > 0  # the step path adds up the MoE blocks' balance losses too
    for b, prompt in enumerate(prompts):
        tokens, logits = greedy_full_forward(model, prompt)
        assert step_path["tokens"][b].tolist() == tokens
        torch.testing.assert_close(step_path["logits"][b], logits, atol=1e-5, rtol=1e-5)
