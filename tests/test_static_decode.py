"""Static-shape decoding (infer/static_decode.py, models/attention.py's `StaticKVCache`) gives the
tokens of the default dynamic decoding: on the CPU its eager step, for ragged prompts in one batch,
batches padded to the next captured size, rows finishing and joining at different times, a VLM
with images, a native-resolution VLM (rope offsets), a text-only decoder and an MoE decoder; on
CUDA its graph-captured step, captured once per batch size used and replayed."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving_support import build_qwen2_vl_dir
from tests.test_engine import ByteTokenizer, generate_ids, make_prompts, tiny_config
from tests.test_llm import samples, tiny
from vlmkit.api import VLM
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for
from vlmkit.infer.sampling import SamplingParams
from vlmkit.infer.static_decode import GRAPH_BATCH_SIZES, StaticDecoder, padded_batch
from vlmkit.models.attention import AttnSpec
from vlmkit.models.config import MoEConfig
from vlmkit.models.vlm import VLMModel

NEW_TOKENS = 10
ATOL = 1e-4  # fp32: the static step attends over masked slots past each row, a different reduction order


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = VLMModel(tiny_config()).eval()
    with torch.no_grad():  # far from ties, as in test_engine.py
        model.llm.lm_head.weight.mul_(40)
    return model


def run_ids(vlm, prompts, decode: str, params=None, max_batch=None):
    """Each prompt's generated ids and log-probs through `Engine.run` with decode mode `decode`."""
    params = params or SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    engine = Engine(vlm, ByteTokenizer(), decode=decode)
    seqs = []
    add = engine.add

    def add_and_keep(prompt, p):  # `run` hands out text only: keep its sequences for their ids
        seqs.append(add(prompt, p))
        return seqs[-1]

    engine.add = add_and_keep
    for _ in engine.run(prompts, params, max_batch):
        pass
    return [s.output_ids for s in seqs], [s.output_logprobs for s in seqs], engine


def test_padded_batch_rounds_up_to_a_captured_size():
    assert [padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert padded_batch(GRAPH_BATCH_SIZES[-1] + 3) == GRAPH_BATCH_SIZES[-1] + 3


@pytest.mark.parametrize("decode", ["static", "graphs"])  # graphs: the static step on the CPU
@pytest.mark.parametrize("n_prompts", [1, 3, 4, 5])  # 3 and 5 pad to 4 and 8
def test_static_decode_gives_the_dynamic_tokens(vlm, decode, n_prompts):
    prompts = (make_prompts(vlm) * 2)[:n_prompts]  # ragged, with 0, 1 and 2 images
    ids, logprobs, _ = run_ids(vlm, prompts, "dynamic")
    static_ids, static_logprobs, engine = run_ids(vlm, prompts, decode)
    assert static_ids == ids
    assert torch.allclose(torch.tensor(static_logprobs), torch.tensor(logprobs), atol=ATOL)
    assert engine.static.cache.rows == padded_batch(n_prompts)
    assert engine.static.captures == 0  # no graphs on the CPU


def test_rows_finishing_and_joining_at_different_times(vlm):
    """Rows of different max_new_tokens, at most 3 at once: rows leave mid-batch, new ones join,
    the batch size crosses several padded sizes, and the static cache grows as longer rows join
    (no `run` to size it up front)."""
    prompts = make_prompts(vlm, n_images=(0, 1, 0, 2, 0, 1))
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 9, 5, 12, 2, 7)]

    def generate(decode):
        engine = Engine(vlm, ByteTokenizer(), decode=decode)
        waiting, seqs = list(zip(prompts, params)), []
        while waiting or engine.rows:
            while waiting and len(engine.rows) < 3:
                seqs.append(engine.add(*waiting.pop(0)))
            engine.step()
            for s in [s for s in engine.rows if s.finished]:
                engine.remove(s)
        return [s.output_ids for s in seqs], engine

    ids, _ = generate("dynamic")
    static_ids, engine = generate("static")
    assert static_ids == ids
    assert [len(i) for i in ids] == [3, 9, 5, 12, 2, 7]
    assert len(engine.static) == 0  # every row removed


def test_sampled_decoding_with_a_seed_matches(vlm):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
    prompts = make_prompts(vlm)[:3]
    assert run_ids(vlm, prompts, "static", params)[0] == run_ids(vlm, prompts, "dynamic", params)[0]


def test_engine_helper_and_generate_path_take_the_mode(vlm):
    """`generate_ids` (add / step / remove without `run`) and the mode check."""
    prompts = make_prompts(vlm)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert (generate_ids(Engine(vlm, ByteTokenizer(), decode="static"), prompts, params, max_batch=2)
            == generate_ids(Engine(vlm, ByteTokenizer()), prompts, params, max_batch=2))
    with pytest.raises(VlmkitError, match="decode must be one of"):
        Engine(vlm, ByteTokenizer(), decode="fast")


# --- the decoder alone: text-only and MoE LLMs, logits -------------------------------------------


def prefilled(llm, prompt: torch.Tensor):
    """A one-row KVCache holding `prompt`, and the logits (V,) of its last position."""
    cache = llm.new_cache()
    hidden = llm.decode(llm.embed(prompt[None]), spec=AttnSpec.causal(), cache=cache)
    return cache, llm.logits(hidden[0, -1])


def greedy_loop(logits, next_logits):
    """NEW_TOKENS greedy picks from the prefill's last logits (B, V), `next_logits(tokens)` giving
    the next step's; returns the tokens (B, NEW_TOKENS) and the logits each was picked from."""
    tokens, picked_from = [], []
    for _ in range(NEW_TOKENS):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        picked_from.append(logits)
        logits = next_logits(nxt)
    return torch.stack(tokens, 1), torch.stack(picked_from, 1)


@torch.no_grad()
def greedy_dynamic(llm, prompts):
    """Greedy tokens and their logits of each prompt, decoded together on the growable cache."""
    caches, logits = zip(*(prefilled(llm, p) for p in prompts))
    cache = caches[0]
    cache.add_rows(*caches[1:])
    return greedy_loop(torch.stack(logits), lambda nxt: llm.logits(llm.decode(llm.embed(nxt[:, None]), cache=cache))[:, 0])


@torch.no_grad()
def greedy_static(llm, prompts):
    """The same through `StaticDecoder`'s eager static step."""
    decoder = StaticDecoder(llm, graphs=False)
    decoder.reserve(len(prompts), max(len(p) for p in prompts) + NEW_TOKENS)
    caches, logits = zip(*(prefilled(llm, p) for p in prompts))
    decoder.sync([], list(caches), [0] * len(prompts))
    return greedy_loop(torch.stack(logits), lambda nxt: decoder.step(nxt.tolist()))


MODELS = {
    "dense": tiny,
    "moe": lambda: tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32, first_dense_layers=1,
                                      aux_loss_coef=0.01)),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("lengths", [[7], [6, 2, 4], [5, 3, 8, 1, 2]])
def test_static_step_logits_equal_the_dynamic_step(kind, lengths):
    llm = MODELS[kind]()
    with torch.no_grad():
        llm.lm_head.weight.mul_(20)
    prompts = samples(lengths)
    tokens, logits = greedy_dynamic(llm, prompts)
    static_tokens, static_logits = greedy_static(llm, prompts)
    assert torch.equal(static_tokens, tokens)
    assert torch.allclose(static_logits, logits, atol=ATOL)


def test_static_cache_refuses_prefill_and_overflow():
    llm = tiny()
    cache = llm.new_static_cache(rows=1, capacity=16)
    with pytest.raises(ValueError, match="one token per row"):
        cache.begin(1, 4)
    row, _ = prefilled(llm, samples([4])[0])
    cache.add_rows(row)
    with pytest.raises(ValueError, match="cannot take"):
        cache.add_rows(row)


# --- a native-resolution VLM: positions continue with each row's rope delta ------------------------


def test_native_model_decodes_the_same(tmp_path):
    pytest.importorskip("transformers")
    model = VLM.from_hf(build_qwen2_vl_dir(tmp_path / "qwen2_vl"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 36), (28, 16))]
    prompts = [prompt_for(model, [{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": text}]}])
               for image, text in zip(images, ("what is this?", "describe"))]
    prompts.append(prompt_for(model, [{"role": "user", "content": "no image here"}]))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def ids(decode):
        engine = Engine(model, decode=decode)
        seqs = [engine.add(p, params) for p in prompts]
        assert seqs[0].rope_delta != 0  # the image took fewer positions than tokens: offsets matter
        while engine.rows:
            engine.step()
            for s in [s for s in engine.rows if s.finished]:
                engine.remove(s)
        return [s.output_ids for s in seqs]

    assert ids("static") == ids("dynamic")


# --- CUDA graphs --------------------------------------------------------------------------------------


@pytest.fixture
def cuda_model(vlm):
    """The test VLM's weights in a plain model on the GPU."""
    model = VLMModel(tiny_config()).eval()
    model.load_state_dict(vlm.state_dict())
    return model.cuda()


@pytest.mark.cuda
def test_graph_replay_gives_the_eager_tokens_on_cuda(cuda_model):
    model = cuda_model
    prompts = make_prompts(model) * 2  # 8 rows
    ids, logprobs, _ = run_ids(model, prompts, "dynamic")
    static_ids, _, static_engine = run_ids(model, prompts, "static")
    graph_ids, graph_logprobs, engine = run_ids(model, prompts, "graphs")
    assert graph_ids == static_ids == ids
    assert torch.allclose(torch.tensor(graph_logprobs), torch.tensor(logprobs), atol=ATOL)
    assert static_engine.static.captures == 0
    assert engine.static.captures == 1  # every step at batch 8: one capture, then replays


@pytest.mark.cuda
def test_one_capture_per_batch_size_used_on_cuda(cuda_model):
    model = cuda_model
    prompts = make_prompts(model, n_images=(0, 1, 0, 2, 0))
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 9, 5, 12, 2)]

    def generate(decode):
        engine, sizes = Engine(model, ByteTokenizer(), decode=decode), set()
        seqs = [engine.add(p, q) for p, q in zip(prompts, params)]
        while engine.rows:
            sizes.add(padded_batch(len(engine.rows)))
            engine.step()
            for s in [s for s in engine.rows if s.finished]:
                engine.remove(s)
        return [s.output_ids for s in seqs], engine, sizes

    ids, _, _ = generate("dynamic")
    graph_ids, engine, sizes = generate("graphs")
    assert graph_ids == ids
    assert sizes == {8, 4, 2, 1}
    assert engine.static.captures == len(sizes)
