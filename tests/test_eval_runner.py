"""evaluate() with a real tiny VLM: batching never changes a row, images stay with their rows,
perplexity scoring picks what a model was trained to answer, text perplexity, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.api import VLM
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.template import encode_record
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.types import Message, Record
from vlmkit.eval.benchmarks import read_benchmark
from vlmkit.eval.runner import blank_like, evaluate, evaluate_with_blind
from vlmkit.models.config import VLMConfig

WORDS = ("red blue green yellow circle square what colour is it which word shape how many yes no "
         "there a the in image picture answer one two three").split()
COLORS = {"red": (220, 40, 40), "blue": (50, 100, 235), "green": (50, 180, 70), "yellow": (235, 225, 50),
          "white": (250, 250, 250), "black": (5, 5, 5)}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    return Tokenizer.train(texts, vocab_size=320)


def tiny_vlm(tok, seed=0) -> VLM:
    torch.manual_seed(seed)
    cfg = VLMConfig(vision=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2),
                    adapter=dict(kind="pixel_shuffle", scale_factor=2),
                    llm=dict(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_layers=2,
                             num_heads=4, num_kv_heads=2),
                    image_token_id=tok.image_token_id)
    return VLM(cfg, tokenizer=tok).eval()


def write_images(root):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        image = Image.new("RGB", (16, 16), rgb)
        image.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (0, 0, 8, 8))  # not flat: patches differ
        image.save(root / "img" / f"{name}.png")


def write_bench(root, rows, name="bench.jsonl"):
    write_images(root)
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MIXED_ROWS = [
    {"id": "c1", "images": ["img/red.png"], "question": "What colour is it?", "choices": ["red", "blue", "green"],
     "answer": "A", "category": "colour"},
    {"id": "c2", "images": ["img/blue.png"], "question": "What colour is it?", "choices": ["red", "blue", "green"],
     "answer": "B", "category": "colour"},
    {"id": "y1", "images": ["img/green.png"], "question": "Is there a circle?", "answer": "yes", "category": "exist"},
    {"id": "y2", "images": ["img/yellow.png"], "question": "Is there a circle?", "answer": "no", "category": "exist"},
    {"id": "o1", "images": ["img/white.png"], "question": "How many?", "answer": "two", "category": "count"},
    {"id": "o2", "images": ["img/black.png"], "question": "How many?", "answer": "three", "category": "count"},
    {"id": "t1", "images": [], "question": "Which word?", "choices": ["one", "two"], "answer": "two",
     "category": "text"},
]


def _visual_boost(model):
    # A random model barely looks at its images; scale the adapter so that visual tokens dominate
    # and a row's reply depends on its own image (what the pairing checks below need).
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.mul_(30.0)


def test_gen_batched_equals_unbatched_and_rows_keep_their_images(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    _visual_boost(model)
    bench = read_benchmark(write_bench(tmp_path, MIXED_ROWS))
    kw = dict(mode="gen", max_new_tokens=4, progress=False)
    one = {r.id: r.prediction for r in evaluate(model, bench, batch_size=1, **kw).rows}
    four = {r.id: r.prediction for r in evaluate(model, bench, batch_size=4, **kw).rows}
    assert one == four
    # Rows in another order (so other neighbours in every batch) still get the same replies.
    bench.items.reverse()
    assert {r.id: r.prediction for r in evaluate(model, bench, batch_size=3, **kw).rows} == one
    # The replies depend on the images: same question, different image -> different reply.
    same_question = [one[i] for i in ("c1", "c2", "y1", "y2", "o1", "o2")]
    assert len(set(same_question)) > 1
    blind = {r.id: r.prediction for r in evaluate(model, bench, batch_size=4, blind=True, **kw).rows}
    assert blind != one


def test_ppl_batched_equals_unbatched(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    _visual_boost(model)
    bench = read_benchmark(write_bench(tmp_path, MIXED_ROWS))
    one = {r.id: r.scores for r in evaluate(model, bench, mode="ppl", batch_size=1, progress=False).rows}
    three = {r.id: r.scores for r in evaluate(model, bench, mode="ppl", batch_size=3, progress=False).rows}
    assert one.keys() == three.keys() == {r["id"] for r in MIXED_ROWS}
    for key in one:
        assert three[key] == pytest.approx(one[key], abs=1e-4), key
    # Scores follow the image: the two colour questions differ only in their image.
    assert one["c1"] != pytest.approx(one["c2"], abs=1e-3)
    # Open questions are scored over their category's gold answers (two, three).
    assert len(one["o1"]) == 2 and len(one["y1"]) == 2 and len(one["c1"]) == 3


def test_ppl_score_equals_padded_forward(tmp_path, tokenizer):
    """The packed score of one option equals its mean log-probability from the HF-style call."""
    model = tiny_vlm(tokenizer)
    bench = read_benchmark(write_bench(tmp_path, MIXED_ROWS[:1]))
    [row] = evaluate(model, bench, mode="ppl", prompt_format=None, progress=False).rows
    processor = model.image_processor()
    pixels = processor(Image.open(tmp_path / "img" / "red.png").convert("RGB"))
    from vlmkit.eval.prompts import LLAVA_PROMPTS, question_text

    text = "<image>\n" + question_text(bench.items[0], LLAVA_PROMPTS, list_options=False)
    record = Record(id="x", source="t", kind="chat",
                    messages=[Message("user", text), Message("assistant", "blue")])
    ids, labels = encode_record(record, tokenizer, [pixels.shape[0] * model.config.tokens_per_image])
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pixels)[0]  # (T, V)
    targets = torch.tensor(labels[1:])
    logp = -F.cross_entropy(logits[:-1], targets.clamp(min=0), reduction="none")[targets != IGNORE_INDEX]
    assert row.scores[1] == pytest.approx(float(logp.mean()), abs=1e-4)


@pytest.mark.parametrize("layout", ["image-then-text", "text-then-image", None])
@pytest.mark.parametrize("choices", [None, ["red", "blue", "green"]])
def test_synth_prompt_matches_the_world_training_records(tmp_path, tokenizer, choices, layout):
    """The synthetic benchmark is asked token for token as its world's training records ask, in the
    prompt layout its world.json records (None: no world.json beside the file, images first)."""
    from vlmkit.data import synth
    from vlmkit.data.prompt import build_prompt
    from vlmkit.eval.prompts import chat_messages, question_text
    from vlmkit.eval.runner import benchmark_prompt_format

    model = tiny_vlm(tokenizer)
    row = {"id": "q", "images": ["img/red.png"], "question": "What colour is it?", "answer": "red",
           "category": "colour", **({"choices": choices, "answer": "A"} if choices else {})}
    if layout is not None:
        (tmp_path / "world.json").write_text(json.dumps({"prompt_layout": layout}))
    bench = read_benchmark(write_bench(tmp_path, [row], name="synth.jsonl"))
    fmt = benchmark_prompt_format(bench)
    [item] = bench.items
    image = Image.open(tmp_path / "img" / "red.png").convert("RGB")
    prompt = build_prompt(chat_messages(item, [image], fmt, list_options=True), tokenizer,
                          model.image_processor(), model.config.tokens_per_image)
    question = question_text(item, fmt, list_options=True)
    conv = synth._llava("x", "img/red.png", [(question, item.answer)],
                        prompt_layout=layout or synth.DEFAULT_PROMPT_LAYOUT)["conversations"]
    record = Record(id="x", source="t", kind="chat",
                    messages=[Message("user", conv[0]["value"]), Message("assistant", conv[1]["value"])])
    ids, labels = encode_record(record, tokenizer, [model.config.tokens_per_image])
    first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert prompt.input_ids == ids[:first_target]
    image_at = ids.index(tokenizer.image_token_id)
    question_ids = tokenizer.encode(question)
    after_image = ids[image_at:first_target]
    question_after_image = any(after_image[i:i + len(question_ids)] == question_ids for i in range(len(after_image)))
    assert question_after_image == (layout != "text-then-image")


def test_only_the_world_benchmarks_take_the_world_layout(tmp_path):
    """A benchmark file named as one of the world's is asked in its world's layout, with no
    instruction; any other file beside the same world.json in LLaVA's wording, images first."""
    from vlmkit.eval.prompts import LLAVA_PROMPTS
    from vlmkit.eval.runner import benchmark_prompt_format

    (tmp_path / "world.json").write_text(json.dumps({"prompt_layout": "text-then-image"}))
    row = {"id": "q", "images": ["img/red.png"], "question": "What colour is it?", "answer": "red"}
    clips = benchmark_prompt_format(read_benchmark(write_bench(tmp_path, [row], name="synth_clips.jsonl")))
    assert clips.images_after_text and not clips.short_instruction
    assert benchmark_prompt_format(read_benchmark(write_bench(tmp_path, [row], name="mine.jsonl"))) == LLAVA_PROMPTS


def _train_on(model, tok, examples, steps=20):
    """A few AdamW steps on (user text, image or None, reply) chat examples, packed in one batch."""
    from vlmkit.data.packing import collate
    from vlmkit.data.types import Sample

    processor = model.image_processor()
    samples = []
    for text, image, reply in examples:
        pixels = processor(image) if image is not None else None
        visual = [pixels.shape[0] * model.config.tokens_per_image] if image is not None else []
        record = Record(id="t", source="t", kind="chat", messages=[
            Message("user", ("<image>\n" if image is not None else "") + text), Message("assistant", reply)])
        ids, labels = encode_record(record, tok, visual)
        samples.append(Sample("t", "t", ids, labels, pixels, [pixels.shape[0]] if image is not None else []))
    batch = collate(samples, budget=sum(len(s) for s in samples))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model.compute_loss(batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens,
                                 batch.pixel_values)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    return float(out.loss.detach())


def test_ppl_picks_the_trained_option(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer, seed=1)
    write_images(tmp_path)
    red = Image.open(tmp_path / "img" / "red.png").convert("RGB")
    # Trained to answer "blue" to the image question and "green" to a text-only one.
    loss = _train_on(model, tokenizer, [("What colour is it?", red, "blue"), ("Which word?", None, "green")])
    assert loss < 0.5
    rows = [
        {"id": "img", "images": ["img/red.png"], "question": "What colour is it?",
         "choices": ["red", "blue", "green", "yellow"], "answer": "blue"},
        {"id": "txt", "question": "Which word?", "choices": ["yellow", "red", "green"], "answer": "C"},
    ]
    result = evaluate(model, write_bench(tmp_path, rows), mode="ppl", prompt_format=_plain(), progress=False)
    assert [r.parsed for r in result.rows] == ["B", "C"]
    assert result.accuracy == 1.0
    # CircularEval: the trained option wins under every rotation.
    circular = evaluate(model, write_bench(tmp_path, rows), mode="ppl", circular=True, prompt_format=_plain(),
                        progress=False)
    assert len(circular.rows) == 7 and circular.accuracy == 1.0 and circular.summary["circular"]


def _plain():
    from vlmkit.eval.prompts import PLAIN_PROMPTS

    return PLAIN_PROMPTS


def test_text_perplexity_matches_forward(tmp_path, tokenizer):
    from vlmkit.eval.ppl import text_perplexity

    model = tiny_vlm(tokenizer)
    docs = ["red circle in the image", "how many yes no", "which word is the answer one two three"]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "not json\n")
    out = text_perplexity(model, path, max_tokens=16)  # several packs
    total, count = 0.0, 0
    for d in docs:
        ids, labels = encode_record(Record(id="d", source="t", kind="text", text=d), tokenizer, [])
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        total += float(F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), reduction="sum"))
        count += len(ids) - 1
    assert out["documents"] == 3 and out["tokens"] == count
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_blank_image_is_zero_after_normalisation(tokenizer):
    model = tiny_vlm(tokenizer)
    blank = blank_like(Image.new("RGB", (20, 16), (200, 10, 10)), model.config.vision.image_mean)
    assert blank.size == (20, 16)
    assert model.image_processor()(blank).abs().max() < 0.01


def test_bad_images_are_bad_rows(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    write_images(tmp_path)
    (tmp_path / "img" / "cut.png").write_bytes((tmp_path / "img" / "red.png").read_bytes()[:40])
    rows = [MIXED_ROWS[0], {"id": "cut", "images": ["img/cut.png"], "question": "q?", "answer": "yes"},
            {"id": "gone", "images": ["img/none.png"], "question": "q?", "answer": "yes"}]
    result = evaluate(model, write_bench(tmp_path, rows), mode="gen", max_new_tokens=2, progress=False)
    assert [r.id for r in result.rows] == ["c1"]
    assert [(b.index, b.id, b.reason) for b in result.bad_rows] == [(2, "gone", "missing_image"),
                                                                    (1, "cut", "truncated_image")]
    assert result.to_dict()["bad_rows"]["count"] == 2


@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_prompts_that_cannot_be_built_are_bad_rows(tmp_path, tokenizer, mode):
    model = tiny_vlm(tokenizer)
    # "<image>" in the text is a second image placeholder for the row's one image
    rows = [MIXED_ROWS[0], {**MIXED_ROWS[1], "question": "What colour is <image>?"}]
    result = evaluate(model, write_bench(tmp_path, rows), mode=mode, max_new_tokens=2, progress=False)
    assert [r.id for r in result.rows] == ["c1"]
    [bad] = result.bad_rows
    assert (bad.index, bad.id, bad.reason) == (1, "c2", "placeholder_mismatch")
    assert result.to_dict()["bad_rows"]["count"] == 1


def test_prompts_without_room_for_the_reply_are_bad_rows(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    context = model.config.llm.max_position_embeddings
    result = evaluate(model, write_bench(tmp_path, MIXED_ROWS[:2]), mode="gen", max_new_tokens=context,
                      progress=False)
    assert result.rows == [] and [b.reason for b in result.bad_rows] == ["too_long", "too_long"]
    assert f"exceeds the context of {context}" in result.bad_rows[0].message


def test_evaluate_with_blind(tmp_path, tokenizer):
    model = tiny_vlm(tokenizer)
    both = evaluate_with_blind(model, write_bench(tmp_path, MIXED_ROWS), mode="ppl", progress=False)
    assert both["model"].blind is False and both["blind"].blind is True
    assert both["model"].summary["n"] == both["blind"].summary["n"] == len(MIXED_ROWS)


def test_cli_eval_writes_reports(tmp_path, tokenizer, capsys):
    from vlmkit.cli import main

    model = tiny_vlm(tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    bench = write_bench(tmp_path, MIXED_ROWS + [{"id": "bad", "question": "no answer"}])
    out = tmp_path / "report"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": "red circle in the image"}) + "\n")
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--bench", str(bench), "--batch-size", "4",
                 "--max-new-tokens", "3", "--out", str(out), "--json", "--no-progress", "--circular",
                 "--text", str(heldout)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_perplexity"]["documents"] == 1 and report["text_perplexity"]["perplexity"] > 1
    assert report["n"] == len(MIXED_ROWS) and report["circular"] is True
    assert set(report["per_category"]) == {"colour", "exist", "count", "text"}
    assert report["bad_rows"]["count"] == 1 and report["bad_rows"]["rows"][0]["reason"] == "missing_answer"
    assert {"precision", "recall", "f1", "yes_ratio"} <= set(report["yes_no"])
    for name in ("eval.json", "eval.md", "eval.png", "eval.predictions.jsonl"):
        assert (out / name).is_file()
    # 2 colour questions x 3 rotations + 2 text-only rotations + 4 others.
    assert len((out / "eval.predictions.jsonl").read_text().splitlines()) == 12


def test_cli_builtin_synth(tmp_path, tokenizer, capsys):
    from vlmkit.cli import main

    tiny_vlm(tokenizer).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "synth-report"
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--bench", "synth", "--mode", "ppl", "--limit", "6",
                 "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "synth" and report["n"] == 6 and report["bad_rows"]["count"] == 0
    assert (out / "cache").is_dir() and (out / "eval.png").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "give --bench (a benchmark file or 'synth') and/or --text (held-out text JSONL)"),
    (["--bench", "{tmp}/nope.tsv"], "benchmark file {tmp}/nope.tsv does not exist"),
    (["--bench", "{tmp}/bench.csv"], "{tmp}/bench.csv: unknown benchmark format '.csv'; use .tsv (MMBench) or "
                                     ".jsonl / .json"),
    (["--bench", "{tmp}/bench.jsonl", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--text", "{tmp}/nope.jsonl"], "text file {tmp}/nope.jsonl does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, tokenizer, capsys, args, message):
    from vlmkit.cli import main

    tiny_vlm(tokenizer).save_pretrained(tmp_path / "ckpt")
    write_bench(tmp_path, MIXED_ROWS[:1])
    (tmp_path / "bench.csv").write_text("question,answer\n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"vlmkit eval: error: {message.format(tmp=tmp_path)}\n"
