"""The transformers families vlmkit imports (LLaVA-OneVision, DeepSeek-VL hybrid, InternVL, Idefics3)
work end to end, each from a tiny random directory as transformers saves it (the ones their
parity tests build): `vlmkit train` with the directory as `model.pretrained` on LLaVA JSON data
(images of several sizes, a two-image row, a text-only row) trains the adapter and the LLM into a
final model of the same family, a run stopped past a checkpoint and resumed ends bit for bit where
an uninterrupted one does, `vlmkit eval` scores a benchmark in both modes, batched generation gives
each row what it gives alone, and `vlmkit chat` and the server (driven by the `openai` client, an
image in the request) answer what `VLM.generate` answers."""

import json
import math
from pathlib import Path

import openai
import pytest
import torch
import yaml

from tests.hf_vlm_support import sample_images
from tests.serving_support import data_url, live_server
from tests.test_deepseek_vl import _save as save_deepseek_vl
from tests.test_idefics3 import _save as save_idefics3
from tests.test_internvl import _save_internvl as save_internvl
from tests.test_onevision import saved as onevision_saved  # noqa: F401 (a fixture: the OneVision directory)
from tests.train_support import Stopped, assert_same_weights, final_weights, kept_thread_count, stop_after
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.config import MODULES
from vlmkit.data.formats import read_records
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.prompt import build_prompt
from vlmkit.infer.engine import Engine
from vlmkit.serve.app import create_app
from vlmkit.serve.settings import ServerSettings
from vlmkit.train.stages import module_parameters

BUILDERS = {  # each writes a tiny random transformers directory into the path it is given
    "deepseek_vl_hybrid": lambda path: save_deepseek_vl(path, "deepseek_vl_hybrid"),
    "internvl": lambda path: save_internvl(path, "internvl3"),
    "idefics3": lambda path: save_idefics3(path, "idefics3"),
}
FAMILIES = ["onevision", *BUILDERS]

STEPS, SAVE_EVERY, STOP_AFTER = 4, 2, 3
"""The run trains 4 steps with a checkpoint at step 2; the stopped run loses step 3 and redoes it."""
NEW_TOKENS = 5
QUESTION = "What is in the picture?"
BENCH_ROWS = [{"id": f"q{i}", "images": [f"img/{i}.png"], "question": "What colour is the shape?",
               "choices": ["red", "blue", "green"], "answer": "ABC"[i % 3]} for i in range(4)]
BENCH_ROWS.append({"id": "y0", "images": ["img/1.png"], "question": "Is there a circle?", "answer": "yes"})


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with the sample images (wide, one tile, tall, 2 x 2 tiles), training rows in LLaVA
    JSON (one image each, two images, none) and a benchmark in JSONL."""
    root = tmp_path_factory.mktemp("family-data")
    (root / "img").mkdir()
    for i, image in enumerate(sample_images()):
        image.save(root / "img" / f"{i}.png")
    rows = [{"id": f"one-{i}", "image": f"img/{i}.png", "conversations": _turns("<image>\nWhat is it?", f"Shape {i}.")}
            for i in range(len(sample_images()))]
    rows.append({"id": "two", "image": ["img/0.png", "img/3.png"],
                 "conversations": _turns("<image>\n<image>\nHow do they differ?", "The first is wider.")})
    rows.append({"id": "text", "conversations": _turns("Say a colour.", "Red.")})
    (root / "qa.json").write_text(json.dumps(rows))
    (root / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in BENCH_ROWS))
    return root


@pytest.fixture(scope="module")
def directories(onevision_saved, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 (the imported fixture)
    """family -> its transformers directory."""
    out = {"onevision": onevision_saved[1]}
    for family, save in BUILDERS.items():
        out[family] = tmp_path_factory.mktemp(family)
        save(out[family])
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_dir(family, directories) -> Path:
    return directories[family]


@pytest.fixture(scope="module")
def model(hf_dir) -> VLM:
    return VLM.load(hf_dir).eval()


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


@pytest.fixture(scope="module")
def run_config(hf_dir, data, tmp_path_factory) -> Path:
    """A run config: the directory as `model.pretrained`, one stage training the adapter and the
    LLM (the vision tower frozen) on the LLaVA JSON rows, with a checkpoint every SAVE_EVERY steps."""
    config = {"model": {"pretrained": str(hf_dir)},
              "data": {"qa": {"path": str(data / "qa.json"), "format": "llava", "kind": "chat"}},
              "stages": [{"name": "sft", "adapter_lr": 1e-3, "llm_lr": 1e-3, "steps": STEPS, "save_every": SAVE_EVERY,
                          "token_budget": 512}],
              "num_threads": 1, "progress": False, "tensorboard": False}
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(run_config, one_thread, tmp_path_factory) -> Path:
    """The output folder of an uninterrupted `vlmkit train`."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(run_config), "--out", str(out)]) == 0
    return out


def _module_of(model: VLM) -> dict[str, str]:
    """Full parameter name -> the stage module (vision, adapter, llm) it belongs to."""
    owner = {id(p): module for module in MODULES for _, p in module_parameters(model, module)}
    return {name: owner[id(p)] for name, p in model.named_parameters()}


def _step_metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def _trained_steps(out: Path) -> list[int]:
    return [r["global_step"] for r in _step_metrics(out)]


def test_every_training_row_becomes_a_sample(model, data):
    pipeline = SamplePipeline(model.tokenizer, model.image_processor(), model.config.tokens_per_tile)
    samples = [pipeline.encode(item) for item in read_records(data / "qa.json", "llava", kind="chat")]
    assert pipeline.stats.num_bad == 0
    assert [len(s.tiles_per_image) for s in samples] == [1, 1, 1, 1, 2, 0]  # images per sample


@pytest.mark.slow
def test_training_ends_in_a_model_of_the_family(run, model):
    steps = _step_metrics(run)
    assert _trained_steps(run) == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # the same rows again and again: the loss falls
    final = VLM.from_pretrained(run / "final")
    assert final.config == model.config and final.tokenizer.template == model.tokenizer.template
    after = dict(final.named_parameters())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, after[name])}
    modules = _module_of(model)
    assert {modules[name] for name in changed} == {"adapter", "llm"}  # the vision tower stayed frozen


@pytest.mark.slow
def test_stopped_run_resumes_bitwise(run_config, run, one_thread, monkeypatch, tmp_path):
    stop_after(monkeypatch, STOP_AFTER)
    with pytest.raises(Stopped):
        main(["train", str(run_config), "--out", str(tmp_path)])
    monkeypatch.undo()
    assert not (tmp_path / "final").exists() and (tmp_path / "checkpoints" / f"step-{SAVE_EVERY:08d}").is_dir()
    assert main(["train", str(run_config), "--out", str(tmp_path), "--resume"]) == 0
    assert_same_weights(final_weights(run), final_weights(tmp_path))
    assert _trained_steps(tmp_path) == list(range(1, STEPS + 1))  # on from the checkpoint, no step twice


@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_eval_reports_accuracy(hf_dir, data, mode, tmp_path, capsys):
    code = main(["eval", "--model", str(hf_dir), "--bench", str(data / "bench.jsonl"), "--mode", mode,
                 "--batch-size", "2", "--max-new-tokens", "4", "--out", str(tmp_path), "--json", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == mode and report["n"] == len(BENCH_ROWS) and report["bad_rows"]["count"] == 0
    rows = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in BENCH_ROWS]
    assert report["correct"] == sum(r["correct"] for r in rows)
    assert report["accuracy"] == pytest.approx(report["correct"] / len(BENCH_ROWS))
    if mode == "ppl":  # every option scored; the pick is the best-scored one
        for row in (r for r in rows if r["kind"] == "choice"):
            assert len(row["scores"]) == 3 and all(math.isfinite(s) for s in row["scores"])
            assert row["parsed"] == "ABC"[row["scores"].index(max(row["scores"]))]
    else:
        assert all(r["prediction"] for r in rows)


def _ask(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def test_batched_generation_gives_each_row_its_answer_alone(model, data):
    conversations = [_ask(str(data / "img" / f"{i}.png")) for i in range(len(BENCH_ROWS) - 1)]
    conversations.append([{"role": "user", "content": QUESTION}])  # a text-only row among them
    batched = model.generate(conversations, max_new_tokens=NEW_TOKENS, temperature=0.0)
    alone = [model.generate(c, max_new_tokens=NEW_TOKENS, temperature=0.0) for c in conversations]
    assert batched == alone and len(set(batched)) > 1  # rows keep their own images


def test_chat_answers_what_generate_answers(hf_dir, model, data, capsys):
    image = data / "img" / "0.png"
    code = main(["chat", "--model", str(hf_dir), "--image", str(image), "--max-new-tokens", str(NEW_TOKENS),
                 QUESTION])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out == model.generate(_ask(str(image)), max_new_tokens=NEW_TOKENS) + "\n"


@pytest.mark.slow
def test_server_answers_an_openai_client_with_an_image(family, model, data):
    image = data / "img" / "2.png"
    app = create_app(Engine(model), ServerSettings(model_name=family))
    content = [{"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
               {"type": "text", "text": QUESTION}]
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=family, max_tokens=NEW_TOKENS, temperature=0,
                                               messages=[{"role": "user", "content": content}])
    prompt = build_prompt(_ask(str(image)), model.tokenizer, model.image_processor(), model.config.tokens_per_tile)
    assert reply.usage.prompt_tokens == len(prompt.input_ids)
    assert reply.choices[0].message.content == model.generate(_ask(str(image)), max_new_tokens=NEW_TOKENS,
                                                              temperature=0.0)
