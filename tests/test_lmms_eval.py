"""The lmms-eval plugin (vlmkit/eval/lmms.py): lmms-eval's own evaluator finds the `vlmkit` model
through its entry point and runs local tasks (YAML + JSONL written here, nothing downloaded) over
the synthetic world's benchmark items; its replies and scores equal `vlmkit eval`'s on the same
items, and requests it cannot ask are counted instead of ending the run.

The tiny model is taught the answers of every other item, so that accuracies sit between 0 and 1
and greedy decoding gives the taught answers."""

import datasets.config
import huggingface_hub.constants
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from PIL import Image, ImageFile

from vlmkit.api import VLM
from vlmkit.data.packing import collate
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.world import generate
from vlmkit.eval.benchmarks import read_benchmark
from vlmkit.eval.lmms import SAMPLING_TEMPERATURE, VlmkitLMM, sampling_params
from vlmkit.eval.prompts import LLAVA_PROMPTS, chat_messages
from vlmkit.eval.runner import DEFAULT_REPLY_TOKENS, evaluate, reply_samples
from vlmkit.models.config import VLMConfig

CONTEXT = 256
"""The tiny model's context, small so that an over-long request is cheap to write."""
TEACH_STEPS = 120
TEACH_LR = 1e-2
BATCH_SIZE = 3

# The task's Python side, as an lmms-eval task directory holds it: visuals read from the world's
# folder, questions worded as `vlmkit eval` words them for a benchmark file (LLaVA's wording).
TASK_UTILS = '''
from PIL import Image

from vlmkit.eval.prompts import LLAVA_PROMPTS

ROOT = {root!r}


def doc_to_visual(doc):
    return [Image.open(ROOT + "/" + path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    lines = [doc["question"]]
    if doc["choices"]:
        lines += [f"{{'ABCDEFGH'[i]}}. {{choice}}" for i, choice in enumerate(doc["choices"])]
        lines.append(LLAVA_PROMPTS.choice_instruction)
    else:
        lines.append(LLAVA_PROMPTS.short_instruction)
    return "\\n".join(lines)


def doc_to_cloze(doc):
    """Cloze-style, as likelihood scoring asks: the options are not listed."""
    return doc["question"] if doc["choices"] else doc["question"] + "\\n" + LLAVA_PROMPTS.short_instruction


def doc_to_choice(doc):
    return doc["choices"] or ["yes", "no"]


def doc_to_choice_index(doc):
    return "ABCDEFGH".index(doc["answer"]) if doc["choices"] else ["yes", "no"].index(doc["answer"])
'''

GEN_TASK = '''
task: vlmkit_synth_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

CHOICE_TASK = '''
task: vlmkit_synth_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_cloze
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_choice_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


@pytest.fixture(scope="module")
def lmms_evaluator():
    """lmms-eval's evaluator and task manager, offline: nothing may reach the hub, the tasks read
    local files only. Imported here, not at the top: importing them sets Pillow's
    `ImageFile.LOAD_TRUNCATED_IMAGES` for the whole process, which other test files' checks of
    truncated images must not see; it is put back after this file's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        yield simple_evaluate, TaskManager


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The world's test split as two benchmark files (named so that `vlmkit eval` words them as
    any benchmark file, LLaVA's way): every question, and the yes/no and multiple-choice ones."""
    root = tmp_path_factory.mktemp("world")
    files = generate(root, n_train=0, n_val=0, n_test=4, seed=0, text_corpus=False)
    lines = open(files["test"]).read().splitlines()
    rows = [line for line in lines if '"existence"' in line or '"choices"' in line]
    (root / "bench.jsonl").write_text("\n".join(lines) + "\n")
    (root / "choice.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    """A tiny VLM taught the answers of every other benchmark item, saved as a checkpoint."""
    bench = read_benchmark(world / "bench.jsonl")
    texts = [" ".join([item.question, item.answer, *item.choices]) for item in bench.items] + ["yes no"] * 10
    tok = Tokenizer.train(texts * 20, vocab_size=300)
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2),
                    adapter=dict(kind="pixel_shuffle", scale_factor=2),
                    llm=dict(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=CONTEXT),
                    image_token_id=tok.image_token_id)
    model = VLM(cfg, tokenizer=tok)
    processor = model.image_processor()
    samples = []
    for item in bench.items[::2]:
        images = [processor.load(ref) for ref in item.images]
        messages = chat_messages(item, images, LLAVA_PROMPTS, list_options=True)
        samples += reply_samples(model, processor, messages, [item.answer], item.id)
    batch = collate(samples, budget=sum(len(s) for s in samples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACH_LR)
    for _ in range(TEACH_STEPS):
        optimizer.zero_grad()
        model.pack_loss(batch).loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("model") / "final"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tasks(world, tmp_path_factory):
    """An lmms-eval task directory: the Python side and one YAML per task."""
    root = tmp_path_factory.mktemp("tasks")
    cache = tmp_path_factory.mktemp("datasets-cache")
    (root / "utils.py").write_text(TASK_UTILS.format(root=str(world)))
    (root / "gen.yaml").write_text(GEN_TASK.format(data=world / "bench.jsonl", cache=cache,
                                                   max_new_tokens=DEFAULT_REPLY_TOKENS))
    (root / "choice.yaml").write_text(CHOICE_TASK.format(data=world / "choice.jsonl", cache=cache))
    return root


def run_lmms(lmms_evaluator, checkpoint, tasks, names: list[str], **model_args) -> dict:
    """lmms-eval's evaluator on the named tasks, the model found by its registered name."""
    simple_evaluate, task_manager = lmms_evaluator
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": checkpoint, "device": "cpu", **model_args}.items())
    return simple_evaluate(model="vlmkit", model_args=args, tasks=names, batch_size=BATCH_SIZE,
                           task_manager=task_manager(include_path=str(tasks)), log_samples=True)


@pytest.fixture(scope="module")
def lmms_results(lmms_evaluator, checkpoint, tasks):
    return run_lmms(lmms_evaluator, checkpoint, tasks, ["vlmkit_synth_gen", "vlmkit_synth_choice"])


def replies_by_id(samples: list[dict]) -> dict[str, str]:
    return {s["doc"]["id"]: s["filtered_resps"][0] for s in samples}


def test_entry_point_registers_the_model():
    assert get_model("vlmkit") is VlmkitLMM


def test_generation_equals_vlmkit_eval(lmms_results, checkpoint, world):
    model = VLM.load(checkpoint)
    ours = evaluate(model, world / "bench.jsonl", batch_size=BATCH_SIZE, progress=False)
    samples = lmms_results["samples"]["vlmkit_synth_gen"]
    assert replies_by_id(samples) == {row.id: row.prediction for row in ours.rows}
    assert len(samples) == len(ours.rows) == ours.summary["n"]
    # Taught items answer right and the others mostly not: the same items score in both.
    assert 0 < ours.accuracy < 1
    assert {s["doc"]["id"]: bool(s["exact_match"]) for s in samples} == {row.id: row.correct for row in ours.rows}
    assert lmms_results["results"]["vlmkit_synth_gen"]["exact_match,none"] == pytest.approx(ours.accuracy)


def test_replies_depend_on_where_the_images_go(lmms_evaluator, lmms_results, checkpoint, tasks):
    """The check above can fail: the same task asked with the images after the text (a layout
    `vlmkit eval` does not use for this benchmark) gets other replies."""
    after = run_lmms(lmms_evaluator, checkpoint, tasks, ["vlmkit_synth_gen"], images_after_text=True)
    before = replies_by_id(lmms_results["samples"]["vlmkit_synth_gen"])
    moved = replies_by_id(after["samples"]["vlmkit_synth_gen"])
    assert moved.keys() == before.keys() and moved != before


def test_choices_equal_vlmkit_ppl(lmms_results, checkpoint, world):
    """Each option's value is the loss `vlmkit eval --mode ppl` ranks options by (minus its
    length-normalised log-likelihood), so lmms-eval's pick (the smallest) is vlmkit's on every
    item; greedy decoding gives a taught yes/no answer and nothing else."""
    model = VLM.load(checkpoint)
    bench = read_benchmark(world / "choice.jsonl")
    ours = {row.id: row for row in evaluate(model, bench, mode="ppl", batch_size=BATCH_SIZE, progress=False).rows}
    items = {item.id: item for item in bench.items}
    taught = {item.id for item in read_benchmark(world / "bench.jsonl").items[::2]}
    samples = lmms_results["samples"]["vlmkit_synth_choice"]
    assert {s["doc"]["id"] for s in samples} == ours.keys()
    assert {s["doc"]["id"]: bool(s["acc"]) for s in samples} == {id: row.correct for id, row in ours.items()}
    assert 0 < lmms_results["results"]["vlmkit_synth_choice"]["acc,none"] < 1
    for sample in samples:
        item, row = items[sample["doc"]["id"]], ours[sample["doc"]["id"]]
        losses = [resp[0][0] for resp in sample["resps"]]
        greedy = [resp[0][1] for resp in sample["resps"]]
        assert losses == pytest.approx([-score for score in row.scores], abs=1e-4)
        assert sum(greedy) <= 1
        if item.kind == "yesno" and item.id in taught:
            assert greedy == [option == item.answer for option in ("yes", "no")], item.id


def test_requests_that_cannot_be_asked_are_counted(checkpoint, tmp_path):
    """A missing image, a file that is not an image, an audio clip and a prompt past the context
    each get an empty reply or -inf, are counted by reason, and leave the other requests as they are."""
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    docs = [{"visual": str(good), "question": "What color is the shape?"},
            {"visual": str(tmp_path / "missing.png"), "question": "What color is the shape?"},
            {"visual": str(tmp_path / "broken.png"), "question": "What color is the shape?"},
            {"visual": {"array": [0.0], "sampling_rate": 16000}, "question": "What color is the shape?"},
            {"visual": str(good), "question": "color " * CONTEXT}]

    def doc_to_visual(doc):
        visual = doc["visual"]
        return [Image.open(visual).convert("RGB") if isinstance(visual, str) else visual]

    lm = VlmkitLMM(pretrained=str(checkpoint), batch_size="2", device="cpu", dtype="float32")
    lm.task_dict = {"local": {"test": docs}}

    def request(kind: str, doc_id: int, second) -> Instance:
        return Instance(kind, (docs[doc_id]["question"], second, doc_to_visual, doc_id, "local", "test"), 0,
                        {"task": "local", "doc_id": doc_id, "repeats": 1})

    replies = lm.generate_until([request("generate_until", i, {"max_new_tokens": 4}) for i in range(len(docs))])
    assert replies[0] and replies[1:] == ["", "", "", ""]
    reasons = ["unreadable_visual", "unreadable_visual", "unsupported_visual", "too_long"]
    assert [(b.index, b.reason) for b in lm.bad_requests] == list(zip(range(1, 5), reasons))

    requests = [request("loglikelihood", i, " red") for i in range(len(docs))]
    scores = lm.continuation_scores(requests)
    assert 0 < scores[0][0] < float("inf") and all(score == (float("inf"), False) for score in scores[1:])
    assert [b.reason for b in lm.bad_requests[4:]] == reasons
    assert [result.text for result in lm.loglikelihood(requests)] == scores
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])


def test_reply_stops_before_until(checkpoint, world):
    bench = read_benchmark(world / "bench.jsonl")
    lm = VlmkitLMM(pretrained=str(checkpoint), device="cpu")
    docs = [{"images": [ref.path for ref in item.images], "question": item.question} for item in bench.items]
    lm.task_dict = {"local": {"test": docs}}

    def doc_to_visual(doc):
        return [Image.open(path).convert("RGB") for path in doc["images"]]

    def ask(until: list[str]) -> list[str]:
        kwargs = {"max_new_tokens": DEFAULT_REPLY_TOKENS, "until": until}
        return lm.generate_until([Instance("generate_until", (doc["question"], dict(kwargs), doc_to_visual, i,
                                                              "local", "test"), 0,
                                           {"task": "local", "doc_id": i, "repeats": 1})
                                  for i, doc in enumerate(docs)])

    full = ask([])
    long_reply = next(reply for reply in full if len(reply) >= 4)
    stop = long_reply[2:4]
    assert ask([stop]) == [reply[:reply.index(stop)] if stop in reply else reply for reply in full]


def test_generation_settings():
    greedy = sampling_params({"until": "\n\n", "max_new_tokens": 5, "temperature": 0, "do_sample": False}, 16)
    assert greedy.greedy and greedy.stop == ["\n\n"] and greedy.max_new_tokens == 5
    assert sampling_params({}, 16).max_new_tokens == 16 and sampling_params({}, 16).greedy
    assert sampling_params({"temperature": 0.7}, 16).temperature == 0.7
    assert sampling_params({"temperature": 0.7, "do_sample": False}, 16).greedy
    assert sampling_params({"do_sample": True}, 16).temperature == SAMPLING_TEMPERATURE
    assert sampling_params({"top_p": None, "top_k": 5, "until": None}, 16).top_k == 5
