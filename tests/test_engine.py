"""Generation engine invariants on a tiny random VLM: cache == recomputation, batched == alone,
stop strings, seeds, top-k = 1 == greedy, rows joining and leaving between steps."""

import pytest
import torch

from vlmkit.data.prompt import Prompt
from vlmkit.infer.engine import Engine, PromptError
from vlmkit.infer.sampling import SamplingParams
from vlmkit.models.config import AdapterConfig, LLMConfig, VisionConfig, VLMConfig
from vlmkit.models.vlm import VLMModel

EOS, IMAGE = 256, 257


class ByteTokenizer:
    """Bytes 0..255 are tokens; 256 ends a turn, 257 marks visual tokens (never decoded)."""

    stop_ids = [EOS]
    image_token_id = IMAGE

    def decode(self, ids, skip_special=True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_config() -> VLMConfig:
    """A tiny VLM over ByteTokenizer's ids (the image token is IMAGE)."""
    return VLMConfig(vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                         num_layers=1, num_heads=2),
                     adapter=AdapterConfig(kind="mlp"),
                     llm=LLMConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, max_position_embeddings=256),
                     image_token_id=IMAGE)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = VLMModel(tiny_config()).eval()
    # scale up the logits so that greedy decoding is far from ties and does not loop at once
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(40)
    return model


def make_prompts(vlm, n_images=(0, 1, 2, 0)) -> list[Prompt]:
    g = torch.Generator().manual_seed(1)
    per_image = vlm.config.tokens_per_image
    prompts = []
    for i, k in enumerate(n_images):
        text = torch.randint(0, 256, (3 + 5 * i,), generator=g).tolist()
        ids = [IMAGE] * (k * per_image) + text
        pixels = torch.randn(k, 3, 16, 16, generator=g) if k else None
        prompts.append(Prompt(ids, pixels))
    return prompts


def generate_ids(engine: Engine, prompts, params, max_batch=None):
    seqs = []
    waiting = list(prompts)
    while waiting or engine.rows:
        while waiting and len(engine.rows) < (max_batch or len(prompts)):
            seqs.append(engine.add(waiting.pop(0), params))
        engine.step()
        for s in list(engine.rows):
            if s.finished:
                engine.remove(s)
    return [s.output_ids for s in seqs]


def test_cached_decode_equals_full_recomputation(vlm):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for prompt in make_prompts(vlm)[:3]:
        [got] = generate_ids(Engine(vlm, ByteTokenizer()), [prompt], params)
        ids = list(prompt.input_ids)
        with torch.no_grad():
            for _ in range(12):
                logits = vlm(torch.tensor([ids]), prompt.pixel_values)  # (1, T, V), no cache
                ids.append(int(logits[0, -1].argmax()))
        assert got == ids[len(prompt.input_ids):]


def test_batched_equals_unbatched_greedy(vlm):
    prompts = make_prompts(vlm)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [generate_ids(Engine(vlm, ByteTokenizer()), [p], params)[0] for p in prompts]
    together = generate_ids(Engine(vlm, ByteTokenizer()), prompts, params)
    assert together == alone
    assert len({tuple(a) for a in alone}) > 1  # the prompts really lead to different answers
    # rows joining and leaving between steps (at most 2 at once) change nothing either
    assert generate_ids(Engine(vlm, ByteTokenizer()), prompts, params, max_batch=2) == alone


def test_rows_leave_and_join_in_any_order(vlm):
    """Rows of different lengths leave while others run, new ones join in the same gap, and a row
    removed before its first step (a cancelled request) never disturbs the others."""
    prompts = make_prompts(vlm)
    lengths = [3, 9, 5, 7]
    alone = [generate_ids(Engine(vlm, ByteTokenizer()), [p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
             for p, n in zip(prompts, lengths)]
    engine = Engine(vlm, ByteTokenizer())
    seqs = [engine.add(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts[:3], lengths)]
    cancelled = engine.add(prompts[3], SamplingParams(max_new_tokens=7, ignore_eos=True))
    engine.remove(cancelled)  # joined, never stepped
    late = None
    while engine.rows:
        engine.step()
        for s in list(engine.rows):
            if s.finished:
                engine.remove(s)
                if late is None:  # the first row to leave makes room for the last prompt
                    late = engine.add(prompts[3], SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert [s.output_ids for s in seqs] + [late.output_ids] == alone
    assert cancelled.output_ids == alone[3][:1] and engine.cache is None


def test_seeded_sampling_does_not_depend_on_neighbours(vlm):
    prompts = make_prompts(vlm)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    alone = generate_ids(Engine(vlm, ByteTokenizer()), prompts[1:2], params)[0]
    again = generate_ids(Engine(vlm, ByteTokenizer()), prompts[1:2], params)[0]
    batched = generate_ids(Engine(vlm, ByteTokenizer()), prompts, params)[1]
    assert alone == again == batched
    other_seed = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=124, ignore_eos=True)
    assert generate_ids(Engine(vlm, ByteTokenizer()), prompts[1:2], other_seed)[0] != alone


def test_top_k_one_is_greedy(vlm):
    prompts = make_prompts(vlm)
    greedy = generate_ids(Engine(vlm, ByteTokenizer()), prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    top1 = generate_ids(Engine(vlm, ByteTokenizer()), prompts,
                        SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1, seed=5, ignore_eos=True))
    assert top1 == greedy


def test_stop_strings_and_stop_tokens(vlm):
    prompt = make_prompts(vlm)[0]
    engine = Engine(vlm, ByteTokenizer())
    free = list(engine.run([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True)))
    text = "".join(d for _, d in free)
    assert len(text) >= 4
    stop = text[2:4]
    cut = list(engine.run([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True, stop=[stop])))
    assert "".join(d for _, d in cut) == text[:text.index(stop)]
    # a stop token ends the sequence with finish reason "stop" and is not part of the text
    first = generate_ids(Engine(vlm, ByteTokenizer()), [prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    seq = engine.add(prompt, SamplingParams(max_new_tokens=16, stop_token_ids=[first[2]]))
    while not seq.finished:
        engine.step()
    assert seq.finish_reason == "stop" and seq.output_ids == first[:3]
    seq = engine.add(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    while not seq.finished:
        engine.step()
    assert seq.finish_reason == "length" and len(seq.output_ids) == 5


def test_prompt_errors(vlm):
    engine = Engine(vlm, ByteTokenizer())
    with pytest.raises(PromptError, match="context"):
        engine.add(Prompt([1] * 250), SamplingParams(max_new_tokens=10))
    with pytest.raises(PromptError, match="empty"):
        engine.add(Prompt([]), SamplingParams(max_new_tokens=10))
    assert engine.rows == []  # a refused prompt never joins the batch


def test_engine_without_tokenizer_generates_ids(vlm):
    prompt = make_prompts(vlm)[1]
    with_tok = generate_ids(Engine(vlm, ByteTokenizer()), [prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine = Engine(vlm)  # VLMModel has no tokenizer
    assert generate_ids(engine, [prompt], SamplingParams(max_new_tokens=6)) == with_tok
    with pytest.raises(PromptError, match="tokenizer"):
        engine.add(prompt, SamplingParams(stop=["x"]))
