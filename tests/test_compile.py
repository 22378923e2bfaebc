"""torch.compile of the training blocks (models/compile.py) and the packed attention custom op
(models/attention.py's `vlmkit::packed_attention`): the op equals the eager packed path in outputs
and gradients, a block compiles without graph breaks and not again for every pack length, and a
few training steps with compiled blocks give the eager losses and weights up to float rounding.

Inductor compiles C++ with gcc on the CPU, slowly: the models here are tiny, and the tests that
only count compiles use a counting backend instead of inductor."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from tests.test_train_loop import sample, tiny_model
from tests.train_support import final_weights, kept_thread_count, prepared_world
from vlmkit.config import Stage, load_config
from vlmkit.data.packing import collate
from vlmkit.models.attention import AttnSpec, _packed_sdpa, packed_attention
from vlmkit.models.compile import compile_blocks, compiled_blocks
from vlmkit.models.config import LLMConfig
from vlmkit.models.llm import LLM
from vlmkit.models.vision import VisionBlock
from vlmkit.train.loop import train
from vlmkit.train.stages import apply_freezing, build_optimizer

SEQLENS = [5, 3, 5, 1, 7, 3]
"""Sample lengths of a pack: equal-length groups (two 5s, two 3s) and lone samples."""
LOSS_RTOL = 1e-5
"""Compiled vs eager losses, relative: inductor may fuse and reorder fp32 sums (here the losses
came out equal)."""
WEIGHT_ATOL = 1e-5
"""Compiled vs eager weights after the steps, absolute (here at most 4e-6 apart, after AdamW steps
of up to 1e-3 per coordinate)."""
OP_ATOL = 1e-6
"""The custom op vs the eager packed path: the same kernels, the backward recomputed."""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qkv(T: int, H: int = 4, Hkv: int = 2, Dh: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, Dh, generator=gen, requires_grad=True) for h in (H, Hkv, Hkv)]


def cu_of(seqlens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)


def tiny_llm(layers: int = 2) -> LLM:
    torch.manual_seed(0)
    return LLM(LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                         num_kv_heads=2))


def packed_forward_backward(model: LLM, seqlens: list[int], seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (sum(seqlens),), generator=torch.Generator().manual_seed(seed))
    hidden = model.decode(model.embed(ids), spec=AttnSpec.packed(cu_of(seqlens)))
    hidden.square().mean().backward()
    return hidden.detach()


# --- the custom op -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_op_matches_the_eager_path(causal):
    q, k, v = qkv(sum(SEQLENS))
    grad = torch.randn(sum(SEQLENS), 4, 8, generator=torch.Generator().manual_seed(1))
    eager = _packed_sdpa(q, k, v, SEQLENS, causal)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    op = packed_attention(q, k, v, cu_of(SEQLENS), max(SEQLENS), causal, "sdpa")
    op_grads = torch.autograd.grad(op, (q, k, v), grad)
    torch.testing.assert_close(op, eager, atol=OP_ATOL, rtol=0)
    for got, want in zip(op_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=OP_ATOL, rtol=0)


def test_packed_attention_op_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as PyTorch checks them."""
    q, k, v = qkv(sum(SEQLENS))
    torch.library.opcheck(torch.ops.vlmkit.packed_attention.default,
                          (q, k, v, cu_of(SEQLENS), max(SEQLENS), True, "auto"))


def test_an_uncompiled_call_keeps_the_eager_path(monkeypatch):
    """The op is for compiled code only: an eager forward never goes through it."""
    def refuse(*args):
        raise AssertionError("an eager forward went through the custom op")

    monkeypatch.setattr("vlmkit.models.attention.packed_attention", refuse)
    packed_forward_backward(tiny_llm(), SEQLENS)


# --- compiling the blocks --------------------------------------------------------------------------------


def test_blocks_compile_without_graph_breaks():
    model = tiny_llm(layers=1)
    block = model.layers[0]
    x = torch.randn(1, sum(SEQLENS), 32, requires_grad=True)
    spec = AttnSpec.packed(cu_of(SEQLENS))
    cos, sin = model.rope(spec.position_ids(1, sum(SEQLENS), x.device), sum(SEQLENS), x.dtype)
    explained = torch._dynamo.explain(block.forward)(x, cos, sin, spec, None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    vision = tiny_model().vision.layers[0]
    assert isinstance(vision, VisionBlock)
    assert torch._dynamo.explain(vision.forward)(torch.randn(2, 4, 32)).graph_break_count == 0


def test_new_pack_lengths_do_not_recompile():
    """The first pack compiles the block, a second length once more (its token count symbolic from
    then on); later lengths and sample counts reuse those graphs. The blocks of a stack share them
    (the first block's input, a view of the embeddings, gets a dynamic graph of its own)."""
    model = tiny_llm(layers=3)
    counter = CompileCounter()
    assert compile_blocks(model, backend=counter) == 3
    packed_forward_backward(model, [5, 7, 3])
    packed_forward_backward(model, [4, 4, 9, 2])
    settled = counter.frame_count
    assert settled <= 3
    for seed, seqlens in enumerate(([6, 11], [3, 3, 3, 8, 1], [2, 30], [17])):
        packed_forward_backward(model, seqlens, seed)
    assert counter.frame_count == settled


def test_compiling_is_undone_and_copies_are_eager():
    model = tiny_llm()
    counter = CompileCounter()
    assert compile_blocks(model, backend=counter) == compiled_blocks(model) == 2
    first = model.layers[0].forward
    assert compile_blocks(model, backend=counter) == 2
    assert model.layers[0].forward is first  # compiled again with the same options: kept
    twin = copy.deepcopy(model)
    assert compiled_blocks(twin) == 0  # its compiled code would run the original's weights
    assert compile_blocks(twin, enabled=False) == 0 and "forward" not in vars(twin.layers[0])
    with torch.no_grad():
        twin.layers[0].attn.q_proj.weight.mul_(2)
    packed_forward_backward(twin, SEQLENS)
    assert counter.frame_count == 0
    assert compile_blocks(model, enabled=False) == compiled_blocks(model) == 0
    assert "forward" not in vars(model.layers[0])


def test_decoding_with_a_cache_runs_eager():
    model = tiny_llm().eval()
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache()
        prefill = model.decode(model.embed(ids), cache=cache)
        step = model.decode(model.embed(ids[:, :1]), cache=cache)
    assert counter.frame_count == 0
    compile_blocks(model, enabled=False)
    with torch.no_grad():
        cache = model.new_cache()
        torch.testing.assert_close(model.decode(model.embed(ids), cache=cache), prefill, atol=0, rtol=0)
        torch.testing.assert_close(model.decode(model.embed(ids[:, :1]), cache=cache), step, atol=0, rtol=0)


def test_gradient_checkpointing_through_compiled_blocks():
    """`torch.utils.checkpoint` around a compiled block (AOTAutograd's graphs, no inductor): the
    same gradients as the eager blocks without checkpointing."""
    eager = tiny_llm().train()
    packed_forward_backward(eager, SEQLENS)
    compiled = tiny_llm().train()
    compiled.gradient_checkpointing = True
    compile_blocks(compiled, backend="aot_eager")
    packed_forward_backward(compiled, SEQLENS)
    for (name, want), got in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(got.grad, want.grad, atol=OP_ATOL, rtol=0, msg=name)


# --- training with compiled blocks (inductor) ----------------------------------------------------------


def train_steps(model, steps: int) -> list[float]:
    """`steps` AdamW steps on packs of a different length each, every module learning."""
    stage = Stage(vision_lr=1e-3, adapter_lr=1e-3, llm_lr=1e-3)
    apply_freezing(model, stage)
    optimizer = build_optimizer(model, stage)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        batch = collate([sample(j, 10 + 3 * i + j, j != 1, gen) for j in range(3)], 128)
        d = next(model.parameters()).device
        out = model.compute_loss(batch.input_ids.to(d), batch.labels.to(d), batch.position_ids.to(d),
                                 batch.cu_seqlens.to(d), pixel_values=batch.pixel_values.to(d))
        loss = out.loss_sum / out.num_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_training_with_compiled_blocks_equals_eager():
    eager = tiny_model()
    eager_losses = train_steps(eager, 3)
    compiled = tiny_model()
    assert compile_blocks(compiled) == 3  # one vision block, two LLM blocks
    compiled_losses = train_steps(compiled, 3)
    assert compiled_losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    for (name, want), got in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(got, want, atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_the_stage_flag_compiles_the_trainers_blocks(tmp_path, monkeypatch):
    """`compile: true` on the tiny run's sft stage: the trainer compiles the blocks when that stage
    starts (not in the align stage before it), and the run ends with the eager run's weights up to
    float rounding. AOTAutograd's graphs without inductor keep the run quick; the inductor
    equality is the test above."""
    world = prepared_world(tmp_path / "world")
    settings = [f"world.dir={world}", "num_threads=1", "progress=false", "tensorboard=false",
                "stages.0.steps=2", "stages.1.steps=3"]
    with kept_thread_count():
        train(load_config("tiny", settings), tmp_path / "eager")
        calls = []

        def compiling(model, enabled=True, **options):
            calls.append(enabled)
            return compile_blocks(model, enabled, backend="aot_eager")

        monkeypatch.setattr("vlmkit.train.loop.compile_blocks", compiling)
        train(load_config("tiny", [*settings, "stages.1.compile=true"]), tmp_path / "compiled")
    assert calls == [False, True]
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    for name, want in eager.items():
        torch.testing.assert_close(compiled[name], want, atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.mark.cuda
def test_compiled_bf16_training_on_cuda_matches_eager():
    """On a GPU under bf16 autocast the op runs the flash varlen kernel (when one exists): the
    compiled steps' losses follow the eager ones within bf16 rounding."""
    eager = tiny_model().cuda()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_losses = train_steps(eager, 3)
        compiled_losses = train_steps(compiled, 3)
    assert compiled_losses == pytest.approx(eager_losses, rel=2e-2)
