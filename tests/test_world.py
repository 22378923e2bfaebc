"""The synthetic world on disk (data/world.py): deterministic files that parse and the eval reader
reads (the text corpus's text-only chats too), settings checked, the tokenizer trained on
`tokenizer_texts`, a world on disk reused only when it matches the run's world settings, the fixed world byte for byte as it was (question
first), the image-first layout as the same records with the image moved, and native worlds with
clips."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.world_support import digest
from vlmkit.cli import main
from vlmkit.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vlmkit.data.formats import read_records
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.synth import (CATEGORIES, CLIP_FRAMES, DEFAULT_PROMPT_LAYOUT, MOTION_CATEGORIES, VIDEO_PLACEHOLDER,
                               answer_space, layout_chance)
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.types import Record
from vlmkit.data.world import (TOKENIZER_DIR, WorldSpec, generate, prepare_world, tokenizer_texts,
                               world_prompt_layout)
from vlmkit.errors import ConfigError
from vlmkit.schema import build

SMALL = dict(n_train=60, n_val=20, n_test=30, text_corpus=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("world"), **SMALL)


def test_generate_is_deterministic(world, tmp_path):
    again = generate(tmp_path, **SMALL)
    root, other = Path(world["dir"]), Path(again["dir"])
    for name in ("qa_train.json", "qa_val.jsonl", "captions_train.json", "synth.jsonl", "world.json"):
        assert digest(root / name) == digest(other / name), name
    for image in sorted((root / "images").iterdir())[::17]:
        assert digest(image) == digest(other / "images" / image.name)
    assert digest(root / "qa_test.json") != digest(Path(generate(tmp_path / "s1", seed=1, **SMALL)["dir"])
                                                   / "qa_test.json")


def test_files_parse_and_reference_existing_images(world):
    root = Path(world["dir"])
    for key in ("captions_train", "captions_val", "qa_train", "qa_val", "qa_test"):
        records = json.loads(Path(world[key]).read_text())
        assert records and len({r["id"] for r in records}) == len(records)
        for r in records:
            assert (root / r["image"]).is_file()
            conv = r["conversations"]
            assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
            # the image first, then the question (the default prompt layout)
            assert conv[0]["value"].startswith(IMAGE_PLACEHOLDER + "\n") and not conv[0]["value"].endswith("\n")
            assert sum(c["value"].count(IMAGE_PLACEHOLDER) for c in conv) == 1
    for key in ("qa_train_messages", "qa_val_messages", "qa_test_messages"):
        for line in open(world[key]):
            r = json.loads(line)
            first = r["messages"][0]["content"]
            assert first[1]["type"] == "text" and first[1]["text"]
            assert first[0] == {"type": "image", "image": first[0]["image"]} and (root / first[0]["image"]).is_file()
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2)
    items = [json.loads(line) for line in open(world["test"])]
    assert {i["category"] for i in items} == set(CATEGORIES)
    for item in items:
        assert set(item) >= {"id", "images", "question", "answer", "category"}
        if item["category"] == "multiple_choice":
            assert len(item["choices"]) == 4 and item["answer"] in "ABCD"
        else:
            assert "choices" not in item and item["answer"] in answer_space(item["category"])
    meta = json.loads((root / "world.json").read_text())
    assert meta["prompt_layout"] == DEFAULT_PROMPT_LAYOUT == "image-then-text" == world_prompt_layout(root)
    assert meta["categories"]["ocr"]["chance"] == pytest.approx(0.1)
    assert meta["counts"]["test"]["scenes"] == SMALL["n_test"]
    assert meta["counts"]["test"]["records"] == len(items) == sum(meta["counts"]["test"]["questions"].values())
    assert {k: str(root / v) for k, v in meta["files"].items()} == {k: world[k] for k in meta["files"]}


def test_benchmark_file_reads_with_the_eval_reader(world):
    benchmarks = pytest.importorskip("vlmkit.eval.benchmarks")
    bench = benchmarks.read_benchmark(world["test"])
    assert not bench.bad_rows and len(bench.items) == sum(1 for _ in open(world["test"]))
    kinds = Counter(item.kind for item in bench.items)
    assert kinds["choice"] and kinds["yesno"] and kinds["open"]


def test_bad_settings_fail_clearly(tmp_path):
    for bad in (dict(image_size=16), dict(n_train=-1), dict(ocr_fraction=1.5), dict(turns_per_record=0),
                dict(train_questions={"size": 2}), dict(train_questions={"color": -1}),
                dict(prompt_layout="image-only")):
        with pytest.raises(ConfigError):
            generate(tmp_path, **{**SMALL, **bad})


def test_train_questions_change_train_only(tmp_path):
    base = generate(tmp_path / "base", **SMALL)
    more = generate(tmp_path / "more", train_questions={"color": 3}, turns_per_record=1, **SMALL)
    root, other = Path(base["dir"]), Path(more["dir"])
    assert digest(root / "synth.jsonl") == digest(other / "synth.jsonl")
    records = json.loads((other / "qa_train.json").read_text())
    assert all(len(r["conversations"]) == 2 for r in records)  # one question a record
    assert more["counts"]["train"]["questions"]["color"] > 2 * base["counts"]["train"]["questions"]["color"]


# ---------------------------------------------------------------------------------------------
# The tokenizer's texts, and the world as a run's data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run's world: files with the text corpus, and its tokenizer."""
    spec = WorldSpec(dir=str(tmp_path_factory.mktemp("run") / "world"), n_train=30, n_val=0, n_test=5, vocab_size=300)
    return spec, prepare_world(spec, progress=False)


def test_tokenizer_texts_are_the_corpus_captions_and_turns(prepared):
    _, root = prepared
    texts = list(tokenizer_texts(root))
    corpus = [json.loads(line)["text"] for line in open(root / "text_train.jsonl")]
    records = json.loads((root / "captions_train.json").read_text()) + json.loads((root / "qa_train.json").read_text())
    turns = [turn["value"] for r in records for turn in r["conversations"]]
    assert texts == corpus + [t.replace(IMAGE_PLACEHOLDER, "") for t in turns]
    assert any("What color" in t for t in texts) and any("shapes:" in t for t in texts)
    assert not any(IMAGE_PLACEHOLDER in t for t in texts)
    assert not any(json.loads(line)["text"] in texts for line in open(root / "text_heldout.jsonl"))


def test_a_world_without_a_corpus_gives_captions_and_turns(world):
    texts = list(tokenizer_texts(world["dir"]))
    first = json.loads(Path(world["captions_train"]).read_text())[0]["conversations"][0]["value"]
    assert texts[0] == first.replace(IMAGE_PLACEHOLDER, "")


def test_prepare_world_trains_the_tokenizer_on_tokenizer_texts(prepared, tmp_path):
    spec, root = prepared
    Tokenizer.train(tokenizer_texts(root), vocab_size=spec.vocab_size).save(tmp_path / "again")
    assert digest(root / TOKENIZER_DIR / "tokenizer.json") == digest(tmp_path / "again" / "tokenizer.json")
    before = digest(root / "world.json")
    assert prepare_world(spec, progress=False) == root and digest(root / "world.json") == before


def test_the_corpus_text_chats_are_listed_and_train_as_text_only_chats(prepared):
    """text_chat_{train,heldout}.json (data/corpus.py) in world.json, read by the LLaVA reader as
    chats without an image, whose supervised tokens are the reply."""
    _, root = prepared
    meta = json.loads((root / "world.json").read_text())
    tokenizer = Tokenizer.load(root / TOKENIZER_DIR)
    pipeline = SamplePipeline(tokenizer, None, tokens_per_image=1)  # no image processor: text only
    for part in ("train", "heldout"):
        assert meta["files"][f"text_chat_{part}"] == f"text_chat_{part}.json"
        records = list(read_records(root / meta["files"][f"text_chat_{part}"]))
        assert len(records) == meta["counts"]["text"][part]["chat_records"] > 0
        for record in records:
            assert isinstance(record, Record) and record.kind == "chat" and record.modality == "text"
            assert [m.role for m in record.messages] == ["user", "assistant"]
        sample = pipeline.encode(records[0])
        supervised = [t for t in sample.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(supervised).strip() == records[0].messages[1].content
    # the tokenizer does not read them: their replies are in the corpus it reads already
    texts = set(tokenizer_texts(root))
    assert not any(r.messages[0].content in texts for r in read_records(root / "text_chat_train.json"))


def test_a_world_whose_corpus_has_no_text_chats_is_refused(tmp_path):
    """Worlds written before the corpus gave text-only chats; a world without a corpus has none to give."""
    fake_world(tmp_path / "w", files={"text_train": "text_train.jsonl", "text_heldout": "text_heldout.jsonl"})
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, prompt_layout="text-then-image")
    with pytest.raises(ConfigError, match="text_chats: False on disk, True in the config"):
        prepare_world(spec, progress=False)
    fake_world(tmp_path / "bare", files={"qa_train": "qa_train.json"})
    with pytest.raises(ConfigError) as err:  # refused for its turns, not for chats it never had
        prepare_world(WorldSpec(dir=str(tmp_path / "bare"), n_train=40, n_val=0, n_test=5, turns_per_record=1,
                                prompt_layout="text-then-image"), progress=False)
    assert "turns_per_record" in str(err.value) and "text_chats" not in str(err.value)


def fake_world(root, **settings):
    root.mkdir(parents=True, exist_ok=True)
    world = {"seed": 0, "turns_per_record": 8, "train_questions": None, "prompt_layout": "text-then-image",
             "answer_style": "worked", "counts": {"train": {"scenes": 40}, "val": {"scenes": 0}, "test": {"scenes": 5}}}
    world.update(settings)
    (root / "world.json").write_text(json.dumps(world))


def test_a_world_with_other_settings_is_refused_with_what_differs(tmp_path):
    fake_world(tmp_path / "w")
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=1,
                     train_questions={"color": 2})
    with pytest.raises(ConfigError) as err:
        prepare_world(spec, progress=False)
    message = str(err.value)
    assert "turns_per_record: 8 on disk, 1 in the config" in message
    assert "train_questions" in message and "n_train" not in message


def test_a_world_of_the_other_prompt_layout_is_refused(tmp_path):
    fake_world(tmp_path / "w")  # asked text first
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=8)
    with pytest.raises(ConfigError, match="prompt_layout: 'text-then-image' on disk, 'image-then-text' in the config"):
        prepare_world(spec, progress=False)
    fake_world(tmp_path / "i", prompt_layout="image-then-text")
    spec = WorldSpec(dir=str(tmp_path / "i"), n_train=40, n_val=0, n_test=5, prompt_layout="text-then-image")
    with pytest.raises(ConfigError, match="prompt_layout: 'image-then-text' on disk, 'text-then-image' in the config"):
        prepare_world(spec, progress=False)


def test_a_world_without_a_prompt_layout_is_refused(tmp_path):
    """Worlds written before the layout was recorded (no prompt_layout in world.json)."""
    fake_world(tmp_path / "w", prompt_layout=None)
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=8)
    with pytest.raises(ConfigError, match="prompt_layout: None on disk, 'image-then-text' in the config"):
        prepare_world(spec, progress=False)


def test_world_prompt_layout_reads_world_json(tmp_path):
    """What the evaluation asks a world's benchmarks in: world.json's layout; without one (or
    without the key, as worlds before layouts were recorded, which showed the image first) images first."""
    assert world_prompt_layout(tmp_path) == "image-then-text"
    fake_world(tmp_path / "t")
    assert world_prompt_layout(tmp_path / "t") == "text-then-image"
    fake_world(tmp_path / "old", prompt_layout=None)
    assert world_prompt_layout(tmp_path / "old") == "image-then-text"


def test_a_world_answering_in_one_word_is_refused(tmp_path):
    """Worlds written before relation and option answers were worked (no answer_style)."""
    fake_world(tmp_path / "w", answer_style=None)
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=8)
    with pytest.raises(ConfigError, match="answer_style: None on disk, 'worked' in the config"):
        prepare_world(spec, progress=False)


def test_world_spec_checks_turns_per_record():
    with pytest.raises(ConfigError, match="turns_per_record"):
        WorldSpec(turns_per_record=0)


# ---------------------------------------------------------------------------------------------
# The fixed world stays as it is; native scenes and clips
# ---------------------------------------------------------------------------------------------

FIXED_DIGESTS = {
    "captions_train.json": "a2b8247dda5d288ea17ff890a0ce0704669e3480129cd9444aa6b9bf3a2fa589",
    "captions_val.json": "9ec4bc665420a37b2a54745f791e9a27b98f643969521ccd6289a63801907944",
    "qa_train.json": "e1ba3235be77ef9937f8302d3ff13a40ce74fe54a0eaefad4390a2148f0bc363",
    "qa_train.jsonl": "b7318a355aebb6b546daa986eb867f6ab07c9d3eee9ead10696dbe327bdb527c",
    "qa_val.json": "36b0e9fca14f96bedc706a3bb52d187b6ef82df518573834ad97bf8606745b83",
    "qa_test.json": "720841448fc2184c3ac749219c8b95dbdaca8b59dfa52fec314286fc5a0b89d8",
    "qa_test.jsonl": "875e1e4ff99fe4c0fd5e6b6bbbe61e2d9b47be45d5570232296cec350c0ef9e1",
    "synth.jsonl": "0765f8dd77ce91d9baaf2f88dd9d462af6f6da2287543c6287b2a3c194eff040",
    "world.json": "99629d00540093e89f60fd82aa2b7adea9175e4133a74835ced53c81c98cc0d6",
}
"""The SMALL fixed world's files as the generator wrote them before native scenes and clips
existed: the demo's numbers depend on them."""
FIXED_PIXELS = "470b9cb556c4d09a91b004054fc7129b09bb82700bd8c114449ae88659a568b0"
"""Its images' names and decoded RGB pixels (not the PNG bytes, which depend on the zlib build)."""


def pixel_digest(images_dir):
    h = hashlib.sha256()
    for path in sorted(images_dir.iterdir()):
        h.update(path.name.encode())
        h.update(Image.open(path).convert("RGB").tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def text_first(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("text_first"), prompt_layout="text-then-image", **SMALL)


def test_the_fixed_world_is_byte_identical(text_first):
    """Asked question first (the layout it was written in then), the fixed world is as it was."""
    root = Path(text_first["dir"])
    assert {name: digest(root / name) for name in FIXED_DIGESTS} == FIXED_DIGESTS
    assert pixel_digest(root / "images") == FIXED_PIXELS
    assert not (root / "clips").exists() and "layout" not in json.loads((root / "world.json").read_text())


def image_moved_first(record: dict) -> dict:
    """A text-first record as the image-first layout writes it: the first user turn's placeholder
    line (LLaVA JSON) or visual part (messages) moved before the question."""
    record = json.loads(json.dumps(record))
    if "conversations" in record:
        first = record["conversations"][0]
        text, placeholder = first["value"].rsplit("\n", 1)
        first["value"] = f"{placeholder}\n{text}"
    else:
        first = record["messages"][0]
        first["content"] = first["content"][::-1]
    return record


def test_the_image_first_world_is_the_same_records_with_the_image_moved(world, text_first):
    """The layout moves the image and nothing else: same questions, answers, ids and pixels, the
    same benchmark file, world.json differing in prompt_layout only."""
    image_first, question_first = Path(world["dir"]), Path(text_first["dir"])
    for name in ("captions_train.json", "qa_train.json", "qa_val.json", "qa_test.json"):
        before = json.loads((question_first / name).read_text())
        assert json.loads((image_first / name).read_text()) == [image_moved_first(r) for r in before], name
    for name in ("qa_train.jsonl", "qa_test.jsonl"):
        before = [json.loads(line) for line in open(question_first / name)]
        assert [json.loads(line) for line in open(image_first / name)] == [image_moved_first(r) for r in before]
    assert digest(image_first / "synth.jsonl") == digest(question_first / "synth.jsonl")
    assert pixel_digest(image_first / "images") == FIXED_PIXELS
    meta, old = (json.loads((root / "world.json").read_text()) for root in (image_first, question_first))
    assert old["prompt_layout"] == "text-then-image" and meta == {**old, "prompt_layout": "image-then-text"}


def test_both_layouts_train_the_same_tokenizer(world, text_first, tmp_path):
    """The tokenizer's texts differ only in where a newline sits, which the byte-level pre-tokenizer
    splits off either way, so a world's token ids do not depend on its layout."""
    assert list(tokenizer_texts(world["dir"])) != list(tokenizer_texts(text_first["dir"]))
    for name, w in (("image_first", world), ("text_first", text_first)):
        Tokenizer.train(tokenizer_texts(w["dir"]), vocab_size=400).save(tmp_path / name)
    assert digest(tmp_path / "image_first" / "tokenizer.json") == digest(tmp_path / "text_first" / "tokenizer.json")


def test_data_synth_takes_the_prompt_layout(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--scenes", "4", "--prompt-layout",
                 "text-then-image"]) == 0
    capsys.readouterr()
    assert world_prompt_layout(tmp_path / "w") == "text-then-image"
    first = json.loads((tmp_path / "w" / "qa_test.json").read_text())[0]["conversations"][0]["value"]
    assert first.endswith("\n" + IMAGE_PLACEHOLDER)


NATIVE = dict(n_train=40, n_val=5, n_test=30, text_corpus=False, layout="native", n_train_clips=20,
              n_val_clips=4, n_test_clips=16)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("native"), **NATIVE)


def test_native_world_is_deterministic(native, tmp_path):
    again = generate(tmp_path, **NATIVE)
    root, other = Path(native["dir"]), Path(again["dir"])
    for name in ("qa_train.json", "synth.jsonl", "clips_train.json", "clips_test.jsonl", "synth_clips.jsonl",
                 "world.json"):
        assert digest(root / name) == digest(other / name), name
    assert pixel_digest(root / "images") == pixel_digest(other / "images")
    for clip in sorted((root / "clips").iterdir())[::5]:
        assert pixel_digest(clip) == pixel_digest(other / "clips" / clip.name)


def test_native_world_files_read_and_reference_existing_frames(native):
    root = Path(native["dir"])
    sizes = {Image.open(p).size for p in (root / "images").iterdir()}
    assert len(sizes) > 3 and any(w != h for w, h in sizes)
    # the still records read as any user's data
    for key in ("captions_train", "qa_train", "qa_test", "qa_train_messages"):
        items = list(read_records(native[key]))
        assert items and all(isinstance(item, Record) for item in items), key
    for key in ("clips_train", "clips_val", "clips_test"):
        for record in json.loads(Path(native[key]).read_text()):
            frames = record["video"]
            assert len(frames) in CLIP_FRAMES and all((root / f).is_file() for f in frames)
            assert len({Image.open(root / f).size for f in frames}) == 1
            assert record["conversations"][0]["value"].startswith(VIDEO_PLACEHOLDER + "\n")
    for line in open(native["clips_test_messages"]):
        first = json.loads(line)["messages"][0]["content"]
        assert [part["type"] for part in first] == ["video", "text"]
    items = [json.loads(line) for line in open(native["test_clips"])]
    assert {i["category"] for i in items} == set(MOTION_CATEGORIES)
    meta = json.loads((root / "world.json").read_text())
    assert meta["layout"] == "native" and meta["counts"]["clips"]["test"]["clips"] == NATIVE["n_test_clips"]
    assert meta["counts"]["clips"]["test"]["records"] == len(items)
    position = meta["categories"]["position"]
    assert position["chance_by_grid"]["3x4"] == pytest.approx(1 / 12)
    assert position["chance"] == pytest.approx(layout_chance("position", "native"))
    assert "row 4, column 3" in position["answers"] and "top left" not in position["answers"]
    assert meta["categories"]["motion_which"]["chance"] == pytest.approx(1 / 24)
    assert {k: str(root / v) for k, v in meta["files"].items()} == {k: native[k] for k in meta["files"]}


def test_tokenizer_texts_take_the_clip_turns_too(native):
    texts = list(tokenizer_texts(native["dir"]))
    assert any(t.startswith("Where did the") for t in texts) and any("row 1, column" in t for t in texts)
    assert not any(VIDEO_PLACEHOLDER in t or IMAGE_PLACEHOLDER in t for t in texts)


def test_world_spec_reads_the_layout_and_clips(tmp_path):
    spec = build(WorldSpec, {"layout": "native", "n_test_clips": 3}, "world")
    assert spec.layout == "native" and spec.n_test_clips == 3 and spec.n_train_clips == 0
    assert spec.prompt_layout == "image-then-text"
    assert build(WorldSpec, {"prompt_layout": "text-then-image"}, "world").prompt_layout == "text-then-image"
    with pytest.raises(ConfigError, match="world.prompt_layout"):
        build(WorldSpec, {"prompt_layout": "image-only"}, "world")
    with pytest.raises(ConfigError, match="world.layout"):
        build(WorldSpec, {"layout": "square"}, "world")
    with pytest.raises(ConfigError, match="n_train_clips"):
        WorldSpec(n_train_clips=-1)
    with pytest.raises(ConfigError, match="layout"):
        generate(tmp_path, **{**SMALL, "layout": "square"})


def test_a_world_of_another_layout_or_clips_is_refused(tmp_path):
    fake_world(tmp_path / "w")  # a fixed world without clips
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, layout="native", n_test_clips=2)
    with pytest.raises(ConfigError) as err:
        prepare_world(spec, progress=False)
    assert "layout: 'fixed' on disk, 'native' in the config" in str(err.value)
    assert "n_test_clips: 0 on disk, 2 in the config" in str(err.value)
