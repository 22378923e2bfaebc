"""The synthetic world on disk: its files (`generate`), its tokenizer, and its settings as the data
of a run (`WorldSpec`, `prepare_world`).

The world's content (scenes, clips, pixels, captions, questions, records) is data/synth.py; this
module writes it in the formats users bring: images/*.png, LLaVA JSON (captions and QA), messages
JSONL (OpenAI-style content parts), the test split as the generic benchmark JSONL, the text corpus
(data/corpus.py) as text JSONL and as text-only chats in LLaVA JSON, and world.json (settings,
counts, answer sets, chance per category), written last. A native-layout world (`layout="native"`)
has scenes of many sizes; clips (`n_*_clips`) add clips/*/NN.png frames and their own QA files with
video parts; reasoning scenes (`n_*_reasoning`) add their images, their own QA files and benchmark,
and optionally their records mixed into the QA files (`reasoning_in_qa`); small-text scenes
(`n_*_small_text`) add their images (192 px, a digit drawn small), their own QA files and benchmark.
With the defaults (fixed layout, no clips, no reasoning scenes) the files are those of the demo's
world, byte for byte. A run's world also holds the byte-level BPE tokenizer trained on its texts
(`tokenizer_texts`) in tokenizer/ (a native world's in the Qwen-VL chat format, with image and video
tokens).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from vlmkit.data.corpus import write_corpus
from vlmkit.data.synth import (ANSWER_STYLE, CATEGORIES, CLIP_FRAMES, DEFAULT_PROMPT_LAYOUT, GRID, IMAGE_SIZE,
                               LAYOUTS, MAX_MOVERS, MIN_IMAGE_SIZE, MOTION_CATEGORIES, NATIVE_CELL_SIZES,
                               NATIVE_GRIDS, PROMPT_LAYOUTS, REASONING_CATEGORIES, SMALL_TEXT_CATEGORIES,
                               SMALL_TEXT_CELL_SIZE, SMALL_TEXT_GLYPH, VISUAL_PLACEHOLDERS, Clip, ClipRecords,
                               PromptLayout, Scene, SceneRecords, chance_accuracy, layout_answers, layout_chance,
                               render, split_clip_records, split_clips, split_reasoning_records,
                               split_reasoning_scenes, split_records, split_scenes, split_small_text_records,
                               split_small_text_scenes)
from vlmkit.data.tokenizer import TOKENIZER_FILE, Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.schema import require_at_least

WORLD_FILE = "world.json"
"""Settings, counts, answer sets and chance per category; written last, so its presence means a
complete world."""
TOKENIZER_DIR = "tokenizer"
"""The world's tokenizer, inside the world's directory."""
IMAGE_WRITERS = 4
"""Threads that encode and write the PNGs (PNG encoding and file writes release the GIL, so they
overlap with building the records)."""


@dataclass
class WorldSpec:
    """The synthetic world as the data of a run (the run config's `world` section): generated, with
    a tokenizer trained on its text, the first time a run needs it, then reused. With a world,
    relative data paths resolve inside `dir`, and a model built from `config` takes the
    tokenizer's vocabulary size and image (and video) token ids."""

    dir: str = "runs/world"
    """Where the world is written (relative to the working directory)."""
    n_train: int = 2000
    """Training scenes (each gives a caption and a conversation of several questions)."""
    n_val: int = 100
    """Validation scenes."""
    n_test: int = 300
    """Held-out test scenes (the benchmark file `synth.jsonl`)."""
    seed: int = 0
    """Seed of the world (scenes, questions, splits)."""
    vocab_size: int = 2048
    """Size of the tokenizer trained on the world's text (captions, QA and the text corpus)."""
    turns_per_record: int = 8
    """Questions per train QA record (a conversation about one image; 1 = one question a record)."""
    train_questions: dict[str, int] | None = None
    """Distinct questions asked per category of each train scene (None: one per category)."""
    layout: Literal["fixed", "native"] = "fixed"
    """fixed: the demo's 3x3 scenes at one image size; native: grids of several shapes and cell
    sizes, for models that read images at their own size (data/synth.py, docs/data-synthetic.md)."""
    prompt_layout: PromptLayout = DEFAULT_PROMPT_LAYOUT
    """Where each record's image (or clip) goes in its first user turn: before the question
    (LLaVA's layout) or after it (synth.PROMPT_LAYOUTS); the world's benchmarks are asked the same way."""
    n_train_clips: int = 0
    """Training clips (frames where shapes move, asked motion questions); 0: a world of stills."""
    n_val_clips: int = 0
    n_test_clips: int = 0
    """Held-out clips (the benchmark file `synth_clips.jsonl`)."""
    n_train_reasoning: int = 0
    """Training reasoning scenes (digits and shapes asked the reasoning categories, in
    `qa_reasoning_train.json`); 0: a world without them."""
    n_val_reasoning: int = 0
    n_test_reasoning: int = 0
    """Held-out reasoning scenes (the benchmark file `synth_reasoning.jsonl`)."""
    reasoning_categories: list[str] = field(default_factory=lambda: list(REASONING_CATEGORIES))
    """Which reasoning categories the reasoning scenes are asked (synth.REASONING_CATEGORIES)."""
    reasoning_in_qa: bool = False
    """Also mix the reasoning scenes' records into qa_{split} (spread evenly through them) and
    their held-out questions into synth.jsonl, so a run's QA and its evaluation include them."""
    n_train_small_text: int = 0
    """Training small-text scenes (192 px scenes with a digit drawn small, asked small_text and the
    default categories, in `qa_small_text_train.json`); 0: a world without them."""
    n_val_small_text: int = 0
    n_test_small_text: int = 0
    """Held-out small-text scenes (the benchmark file `synth_small_text.jsonl`)."""

    def __post_init__(self):
        require_at_least(self, ("n_train", "n_test", "vocab_size", "turns_per_record"), 1, "world.")
        require_at_least(self, ("n_val", "n_train_clips", "n_val_clips", "n_test_clips", "n_train_reasoning",
                                "n_val_reasoning", "n_test_reasoning", "n_train_small_text", "n_val_small_text",
                                "n_test_small_text"), 0, "world.")
        _check_reasoning_categories(self.reasoning_categories)

    @property
    def reasoning_counts(self) -> dict[str, int]:
        return {"train": self.n_train_reasoning, "val": self.n_val_reasoning, "test": self.n_test_reasoning}

    @property
    def small_text_counts(self) -> dict[str, int]:
        return {"train": self.n_train_small_text, "val": self.n_val_small_text, "test": self.n_test_small_text}


# ---------------------------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------------------------


def generate(out_dir: str | Path, *, n_train: int = 20000, n_val: int = 500, n_test: int = 1000,
             image_size: int = IMAGE_SIZE, seed: int = 0, ocr_fraction: float = 0.35, turns_per_record: int = 8,
             train_questions: dict[str, int] | None = None, text_corpus: bool = True, layout: str = "fixed",
             n_train_clips: int = 0, n_val_clips: int = 0, n_test_clips: int = 0, n_train_reasoning: int = 0,
             n_val_reasoning: int = 0, n_test_reasoning: int = 0,
             reasoning_categories: Sequence[str] = REASONING_CATEGORIES, reasoning_in_qa: bool = False,
             n_train_small_text: int = 0, n_val_small_text: int = 0, n_test_small_text: int = 0,
             prompt_layout: str = DEFAULT_PROMPT_LAYOUT, progress: bool = False) -> dict:
    """Write the synthetic world into `out_dir`; return the file paths and counts.

    n_*: scenes per split. Train QA records are conversations of up to `turns_per_record` questions
    about one image (the first turn carries the image); val and test records hold one question.
    `train_questions` asks up to that many distinct questions per category of each train scene
    (default: one per category, as val and test always do), so a run can see more of the
    categories that take longest to learn. `layout` picks the scenes (synth.LAYOUTS: "fixed" 3x3
    at `image_size`, "native" grids of several shapes and cell sizes); n_*_clips: clips per split;
    n_*_reasoning: reasoning scenes per split, asked `reasoning_categories`, and with
    `reasoning_in_qa` also mixed into the QA files and synth.jsonl; n_*_small_text: small-text
    scenes per split (synth.split_small_text_scenes), asked small_text and the default categories.
    `prompt_layout` (synth.PROMPT_LAYOUTS) puts each record's image or clip before or after its
    first question's text. Layout (paths relative to out_dir; image paths inside files are relative to out_dir):

        images/{split}_{index}.png                 one PNG per scene
        captions_{train,val}.json                  LLaVA JSON, one caption per scene (kind caption)
        qa_{train,val,test}.json                   LLaVA JSON, QA conversations (kind chat)
        qa_{train,val,test}.jsonl                  the same as messages JSONL (OpenAI content parts)
        synth.jsonl                                the test split as the generic benchmark JSONL
        text_train.jsonl, text_heldout.jsonl       the language corpus (data/corpus.py), text JSONL
        text_chat_{train,heldout}.json             LLaVA JSON, text-only chats: a question about each
                                                   corpus document's unit, its opening as the reply
        world.json                                 settings, counts, answer sets, chance per category

    and with clips:

        clips/{split}_clip_{index}/{frame}.png     a clip's frames
        clips_{train,val,test}.json                LLaVA JSON, "video": [frames], <video> in the first turn
        clips_{train,val,test}.jsonl               messages JSONL, {"type": "video", "video": [frames]}
        synth_clips.jsonl                          the test clips' questions, "video": [frames]

    and with reasoning scenes:

        images/reasoning_{split}_{index}.png       one PNG per reasoning scene
        qa_reasoning_{train,val,test}.json         LLaVA JSON, their QA (grouped as qa_{split}.json's)
        qa_reasoning_{train,val,test}.jsonl        the same as messages JSONL
        synth_reasoning.jsonl                      their test split as benchmark JSONL

    and with small-text scenes, the same as reasoning scenes' under `small_text` in place of
    `reasoning` (images/small_text_{split}_{index}.png, qa_small_text_*, synth_small_text.jsonl).
    """
    clip_counts = {"train": n_train_clips, "val": n_val_clips, "test": n_test_clips}
    reasoning_counts = {"train": n_train_reasoning, "val": n_val_reasoning, "test": n_test_reasoning}
    small_text_counts = {"train": n_train_small_text, "val": n_val_small_text, "test": n_test_small_text}
    _check_settings(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                    ocr_fraction=ocr_fraction, turns_per_record=turns_per_record, train_questions=train_questions,
                    layout=layout, clip_counts=clip_counts, reasoning_counts=reasoning_counts,
                    reasoning_categories=reasoning_categories, small_text_counts=small_text_counts,
                    prompt_layout=prompt_layout)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    with_clips = any(clip_counts.values())
    with_reasoning = any(reasoning_counts.values())
    with_small_text = any(small_text_counts.values())
    total = (sum(counts.values()) + sum(clip_counts.values()) + sum(reasoning_counts.values())
             + sum(small_text_counts.values()))
    with tqdm(total=total, desc="synth scenes", unit="scene", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=min(IMAGE_WRITERS, os.cpu_count() or 1)) as pool:
        writer = _ImageWriter(out, image_size, pool, bar)
        reasoning = {}
        if with_reasoning:  # made first: with reasoning_in_qa, the QA files hold them too
            reasoning = _reasoning_records(writer, seed=seed, counts=reasoning_counts, layout=layout,
                                           turns_per_record=turns_per_record, categories=reasoning_categories,
                                           prompt_layout=prompt_layout)
        files, stats = _write_scenes(out, writer, seed=seed, counts=counts, layout=layout, ocr_fraction=ocr_fraction,
                                     turns_per_record=turns_per_record, train_questions=train_questions,
                                     mixed_in=reasoning if reasoning_in_qa else {}, prompt_layout=prompt_layout)
        if with_clips:
            clip_files, stats["clips"] = _write_clips(out, writer, seed=seed, counts=clip_counts, layout=layout,
                                                      ocr_fraction=ocr_fraction, turns_per_record=turns_per_record,
                                                      prompt_layout=prompt_layout)
            files.update(clip_files)
        if with_reasoning:
            reasoning_files, stats["reasoning"] = _write_apart(out, "reasoning", reasoning)
            files.update(reasoning_files)
        if with_small_text:
            small_text_files, stats["small_text"] = _write_apart(
                out, "small_text", _small_text_records(writer, seed=seed, counts=small_text_counts,
                                                       turns_per_record=turns_per_record, prompt_layout=prompt_layout))
            files.update(small_text_files)
        writer.wait()
    if text_corpus:
        corpus = write_corpus(out, seed=seed)
        files.update({"text_train": corpus["train"], "text_heldout": corpus["heldout"],
                      "text_chat_train": corpus["chat_train"], "text_chat_heldout": corpus["chat_heldout"]})
        stats["text"] = corpus["counts"]
    categories = CATEGORIES + (MOTION_CATEGORIES if with_clips else ()) + (
        tuple(reasoning_categories) if with_reasoning else ()) + (SMALL_TEXT_CATEGORIES if with_small_text else ())
    world = {
        "seed": seed, **_layout_settings(layout, image_size), "ocr_fraction": ocr_fraction,
        "turns_per_record": turns_per_record, "train_questions": train_questions, "prompt_layout": prompt_layout,
        "answer_style": ANSWER_STYLE, "counts": stats, "categories": _categories(layout, categories),
        "files": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
    }
    if with_clips:
        world["clips"] = {"frames": list(CLIP_FRAMES), "max_movers": MAX_MOVERS}
    if with_reasoning:
        world["reasoning"] = {"categories": list(reasoning_categories), "in_qa": reasoning_in_qa}
    if with_small_text:
        world["small_text"] = {"image_size": SMALL_TEXT_CELL_SIZE * GRID, "glyph": list(SMALL_TEXT_GLYPH)}
    (out / WORLD_FILE).write_text(json.dumps(world, indent=2) + "\n")
    return {"dir": str(out), **files, "world": str(out / WORLD_FILE), "counts": stats}


class _ImageWriter:
    """Encodes and writes PNGs on a thread pool while the records are built; `wait` re-raises the
    first failed write."""

    def __init__(self, out: Path, image_size: int, pool: ThreadPoolExecutor, bar: tqdm):
        self.out, self.image_size, self.pool, self.bar = out, image_size, pool, bar
        self.jobs: list = []

    def scene(self, scene: Scene, path: str) -> None:
        self.jobs.append(self.pool.submit(_write_image, scene, self.image_size, self.out / path))
        self.bar.update(1)

    def clip(self, clip: Clip, paths: list[str]) -> None:
        (self.out / paths[0]).parent.mkdir(parents=True, exist_ok=True)
        for t, path in enumerate(paths):
            self.jobs.append(self.pool.submit(_write_image, clip.frame(t), self.image_size, self.out / path))
        self.bar.update(1)

    def wait(self) -> None:
        for job in self.jobs:
            job.result()


def _write_scenes(out: Path, writer: _ImageWriter, *, seed: int, counts: dict[str, int], layout: str,
                  ocr_fraction: float, turns_per_record: int, train_questions: dict[str, int] | None,
                  mixed_in: dict[str, list[SceneRecords]],
                  prompt_layout: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Every split's scenes (images queued on `writer`) and files, with `mixed_in[split]`'s records
    spread through the split's QA files; returns (files, counts by split, of the scenes alone)."""
    files: dict[str, str] = {}
    stats: dict[str, dict] = {}
    for split, scenes in split_scenes(seed, counts, ocr_fraction, layout).items():
        records = _queued(writer, scenes, split_records(seed, split, scenes, turns_per_record=turns_per_record,
                                                        train_questions=train_questions, prompt_layout=prompt_layout))
        files.update(_write_split(out, split, records, mixed_in.get(split, [])))
        stats[split] = _split_counts(records)
    return files, stats


def _reasoning_records(writer: _ImageWriter, *, seed: int, counts: dict[str, int], layout: str,
                       turns_per_record: int, categories: Sequence[str],
                       prompt_layout: str) -> dict[str, list[SceneRecords]]:
    """Every split's reasoning scenes (images queued on `writer`) and their records, by split."""
    out = {}
    for split, scenes in split_reasoning_scenes(seed, counts, layout).items():
        out[split] = _queued(writer, scenes, split_reasoning_records(
            seed, split, scenes, turns_per_record=turns_per_record, categories=categories, prompt_layout=prompt_layout))
    return out


def _small_text_records(writer: _ImageWriter, *, seed: int, counts: dict[str, int],
                        turns_per_record: int, prompt_layout: str) -> dict[str, list[SceneRecords]]:
    """Every split's small-text scenes (images queued on `writer`) and their records, by split."""
    out = {}
    for split, scenes in split_small_text_scenes(seed, counts).items():
        out[split] = _queued(writer, scenes, split_small_text_records(
            seed, split, scenes, turns_per_record=turns_per_record, prompt_layout=prompt_layout))
    return out


def _queued(writer: _ImageWriter, scenes: list[Scene], made: Iterable[SceneRecords]) -> list[SceneRecords]:
    """`made` (the records of `scenes`, in order) as a list, each scene's image queued on `writer`
    as its records are drawn."""
    records = []
    for scene, rec in zip(scenes, made):
        writer.scene(scene, rec.image)
        records.append(rec)
    return records


def _write_apart(out: Path, kind: str, records_by_split: dict[str, list[SceneRecords]]
                 ) -> tuple[dict[str, str], dict[str, dict]]:
    """The own QA files (`qa_{kind}_{split}`) and benchmark (`synth_{kind}.jsonl`, key
    `test_{kind}`) of scenes kept apart from the default ones (reasoning, small text); returns
    (files, counts by split)."""
    files: dict[str, str] = {}
    for split, records in records_by_split.items():
        files.update(_write_qa(out, f"qa_{kind}_{split}", split, records, f"synth_{kind}.jsonl", f"test_{kind}"))
    return files, {split: _split_counts(records) for split, records in records_by_split.items()}


def _write_clips(out: Path, writer: _ImageWriter, *, seed: int, counts: dict[str, int], layout: str,
                 ocr_fraction: float, turns_per_record: int,
                 prompt_layout: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Every split's clips (frames queued on `writer`) and files; returns (files, counts by split)."""
    files: dict[str, str] = {}
    stats: dict[str, dict] = {}
    for split, clips in split_clips(seed, counts, ocr_fraction, layout).items():
        records = []
        made = split_clip_records(seed, split, clips, turns_per_record=turns_per_record, prompt_layout=prompt_layout)
        for clip, rec in zip(clips, made):
            writer.clip(clip, rec.frames)
            records.append(rec)
        files.update(_write_qa(out, f"clips_{split}", split, records, "synth_clips.jsonl", "test_clips"))
        stats[split] = _split_counts(records, unit="clips")
    return files, stats


def _layout_settings(layout: str, image_size: int) -> dict:
    """world.json's description of the scenes: the fixed world's image size and grid (its keys
    as they have always been), or the native layout's grids and cell sizes."""
    if layout == "fixed":
        return {"image_size": image_size, "grid": GRID}
    return {"layout": layout, "grids": [g.name for g in NATIVE_GRIDS], "cell_sizes": list(NATIVE_CELL_SIZES)}


def _categories(layout: str, categories: tuple[str, ...]) -> dict:
    """Answer set and chance of each category over the layout's grids; a native world also gives
    the chance on each grid (positions and their chance depend on the grid)."""
    out = {}
    for c in categories:
        out[c] = {"answers": layout_answers(c, layout), "chance": layout_chance(c, layout)}
        if layout != "fixed":
            out[c]["chance_by_grid"] = {g.name: chance_accuracy(c, g) for g in NATIVE_GRIDS}
    return out


def _check_settings(*, n_train: int, n_val: int, n_test: int, image_size: int, ocr_fraction: float,
                    turns_per_record: int, train_questions: dict[str, int] | None, layout: str,
                    clip_counts: dict[str, int], reasoning_counts: dict[str, int],
                    reasoning_categories: Sequence[str], small_text_counts: dict[str, int], prompt_layout: str) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size {image_size} is too small for a {GRID}x{GRID} grid of legible objects "
                          f"(use >= {MIN_IMAGE_SIZE})")
    if turns_per_record < 1:
        raise ConfigError(f"turns_per_record must be >= 1, got {turns_per_record}")
    if min(n_train, n_val, n_test) < 0:
        raise ConfigError(f"scene counts must be >= 0, got n_train={n_train} n_val={n_val} n_test={n_test}")
    unknown = sorted(set(train_questions or {}) - set(CATEGORIES))
    if unknown or any(int(n) < 0 for n in (train_questions or {}).values()):
        raise ConfigError(f"train_questions takes a count >= 0 per category of {', '.join(CATEGORIES)}; "
                          f"got {train_questions}")
    if not 0.0 <= ocr_fraction <= 1.0:
        raise ConfigError(f"ocr_fraction must be in [0, 1], got {ocr_fraction}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if prompt_layout not in PROMPT_LAYOUTS:
        raise ConfigError(f"prompt_layout must be one of {', '.join(PROMPT_LAYOUTS)}, got {prompt_layout!r}")
    if min(clip_counts.values()) < 0:
        raise ConfigError(f"clip counts must be >= 0, got {clip_counts}")
    if min(reasoning_counts.values()) < 0:
        raise ConfigError(f"reasoning scene counts must be >= 0, got {reasoning_counts}")
    if min(small_text_counts.values()) < 0:
        raise ConfigError(f"small-text scene counts must be >= 0, got {small_text_counts}")
    _check_reasoning_categories(reasoning_categories)


def _check_reasoning_categories(categories: Sequence[str]) -> None:
    if not categories or len(set(categories)) < len(categories) or not set(categories) <= set(REASONING_CATEGORIES):
        raise ConfigError(f"reasoning_categories takes one or more of {', '.join(REASONING_CATEGORIES)}, each "
                          f"once; got {list(categories)}")


def _write_split(out: Path, split: str, records: list[SceneRecords], mixed_in: list[SceneRecords]) -> dict[str, str]:
    """Write one split's files; returns their paths by key (captions_{split} outside the test
    split, qa_{split}, qa_{split}_messages, and for the test split the benchmark as `test`).
    The records of `mixed_in` (which have no caption) go into the QA files, spread evenly."""
    files = {}
    if split != "test":
        files[f"captions_{split}"] = _write_json_list(out / f"captions_{split}.json", [r.caption for r in records])
    files.update(_write_qa(out, f"qa_{split}", split, _interleave(records, mixed_in), "synth.jsonl", "test"))
    return files


def _write_qa(out: Path, stem: str, split: str, records: list[SceneRecords] | list[ClipRecords], bench_file: str,
              bench_key: str) -> dict[str, str]:
    """One split's QA records as LLaVA JSON `{stem}.json` and messages JSONL `{stem}.jsonl`, and
    for the test split their benchmark items as `bench_file`; returns the paths by key (`stem`,
    `{stem}_messages`, `bench_key`)."""
    files = {stem: _write_json_list(out / f"{stem}.json", [x for r in records for x in r.llava]),
             f"{stem}_messages": _write_jsonl(out / f"{stem}.jsonl", [x for r in records for x in r.messages])}
    if split == "test":
        files[bench_key] = _write_jsonl(out / bench_file, [x for r in records for x in r.bench])
    return files


def _interleave(main: list, extra: list) -> list:
    """`extra` spread evenly through `main`, each in its order: a run reads a QA file in shuffled
    blocks and often stops before its end, so appended records would come late or never."""
    keyed = [((i + 0.5) / len(main), 0, i) for i in range(len(main))]
    keyed += [((j + 0.5) / len(extra), 1, j) for j in range(len(extra))]
    return [(extra if which else main)[i] for _, which, i in sorted(keyed)]


def _split_counts(records: list[SceneRecords] | list[ClipRecords], unit: str = "scenes") -> dict:
    """Scenes (or clips), QA records, and questions per category (in the order categories were
    first asked)."""
    per_category: dict[str, int] = {}
    for r in records:
        for qa in r.asked:
            per_category[qa.category] = per_category.get(qa.category, 0) + 1
    return {unit: len(records), "records": sum(len(r.llava) for r in records), "questions": per_category}


def _write_image(scene: Scene, image_size: int, path: Path) -> None:
    render(scene, image_size).save(path, format="PNG", compress_level=1)


def _write_json_list(path: Path, rows: list[dict]) -> str:
    with open(path, "w") as f:  # one record per line: diffable, and still a JSON list
        f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return str(path)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# The world as a run's data: files and tokenizer, made once and reused
# ---------------------------------------------------------------------------------------------


def tokenizer_texts(world_dir: str | Path) -> Iterator[str]:
    """What the world's tokenizer is trained on: every text of the train split a model reads or
    writes, i.e. the text corpus (when the world has one), captions, questions and answers (of
    clips too, when the world has them), with the image and video placeholders removed. Reads the
    files that world.json lists. Reasoning scenes kept apart (`qa_reasoning_train.json`) are not
    read, so adding them leaves the tokenizer as it was: a model trained on the world without them
    (the demo's) keeps its token ids when a run names the world with them. Mixed into qa_train
    (`reasoning_in_qa`), they are read with it. The corpus's text-only chats
    (`text_chat_train.json`) are not read either: their replies are openings of the corpus's
    documents, read already, and their questions a few templates around a topic's name."""
    world_dir = Path(world_dir)
    files = json.loads((world_dir / WORLD_FILE).read_text())["files"]
    if "text_train" in files:
        with open(world_dir / files["text_train"]) as f:
            for line in f:
                yield json.loads(line)["text"]
    for key in ("captions_train", "qa_train", "clips_train"):
        if key not in files:  # a world without clips
            continue
        for record in json.loads((world_dir / files[key]).read_text()):
            for turn in record["conversations"]:
                yield _without_placeholders(turn["value"])


def world_prompt_layout(world_dir: str | Path) -> PromptLayout:
    """The prompt layout a world on disk was written in (world.json's `prompt_layout`). A directory
    without world.json, or a world.json without the key (written before layouts could be chosen,
    when every record showed its image first), gives LLaVA's image-first layout."""
    path = Path(world_dir) / WORLD_FILE
    if not path.is_file():
        return DEFAULT_PROMPT_LAYOUT
    return json.loads(path.read_text()).get("prompt_layout") or DEFAULT_PROMPT_LAYOUT


def _without_placeholders(text: str) -> str:
    for placeholder in VISUAL_PLACEHOLDERS.values():
        text = text.replace(placeholder, "")
    return text


def prepare_world(spec: WorldSpec, progress: bool = True) -> Path:
    """Generate the world and train its tokenizer unless `spec.dir` already holds them.

    world.json is written last by the generator and the tokenizer directory is renamed into place,
    so a run killed half-way regenerates what is missing on its next start.
    """
    world_dir = Path(spec.dir)
    if (world_dir / WORLD_FILE).is_file():
        _check_world(spec, json.loads((world_dir / WORLD_FILE).read_text()), world_dir)
    else:
        generate(world_dir, n_train=spec.n_train, n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed,
                 turns_per_record=spec.turns_per_record, train_questions=spec.train_questions, layout=spec.layout,
                 n_train_clips=spec.n_train_clips, n_val_clips=spec.n_val_clips, n_test_clips=spec.n_test_clips,
                 n_train_reasoning=spec.n_train_reasoning, n_val_reasoning=spec.n_val_reasoning,
                 n_test_reasoning=spec.n_test_reasoning, reasoning_categories=spec.reasoning_categories,
                 reasoning_in_qa=spec.reasoning_in_qa, n_train_small_text=spec.n_train_small_text,
                 n_val_small_text=spec.n_val_small_text, n_test_small_text=spec.n_test_small_text,
                 prompt_layout=spec.prompt_layout, progress=progress)
    tok_dir = world_dir / TOKENIZER_DIR
    if not (tok_dir / TOKENIZER_FILE).is_file():
        tmp = world_dir / f".{TOKENIZER_DIR}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # A native world's models read images and videos in the Qwen-VL chat format.
        Tokenizer.train(tokenizer_texts(world_dir), vocab_size=spec.vocab_size,
                        qwen_vl=spec.layout == "native").save(tmp)
        os.replace(tmp, tok_dir)
    return world_dir


def _check_world(spec: WorldSpec, world: dict, world_dir: Path) -> None:
    """A world on disk is reused only when it was generated with the spec's settings."""
    counts = world.get("counts", {})
    clips = counts.get("clips", {})  # absent: a world of stills
    reasoning = counts.get("reasoning", {})  # absent: a world without reasoning scenes
    small_text = counts.get("small_text", {})  # absent: a world without small-text scenes
    settings = world.get("reasoning", {})
    files = world.get("files", {})
    have = {"seed": world.get("seed"), "n_train": counts.get("train", {}).get("scenes"),
            "n_val": counts.get("val", {}).get("scenes"), "n_test": counts.get("test", {}).get("scenes"),
            "turns_per_record": world.get("turns_per_record"), "train_questions": world.get("train_questions"),
            "prompt_layout": world.get("prompt_layout"), "answer_style": world.get("answer_style"),
            "layout": world.get("layout", "fixed"),  # a fixed world writes no layout key (_layout_settings)
            **{f"n_{split}_clips": clips.get(split, {}).get("clips", 0) for split in ("train", "val", "test")},
            **{f"n_{split}_reasoning": reasoning.get(split, {}).get("scenes", 0) for split in ("train", "val", "test")},
            **{f"n_{split}_small_text": small_text.get(split, {}).get("scenes", 0)
               for split in ("train", "val", "test")},
            "reasoning_categories": settings.get("categories"), "reasoning_in_qa": settings.get("in_qa"),
            # a corpus written before the corpus gave text-only chats lacks their files
            "text_chats": "text_chat_train" in files or "text_train" not in files}
    with_reasoning = any(spec.reasoning_counts.values())  # else the reasoning settings do not apply
    want = {"seed": spec.seed, "n_train": spec.n_train, "n_val": spec.n_val, "n_test": spec.n_test,
            "turns_per_record": spec.turns_per_record, "train_questions": spec.train_questions,
            "prompt_layout": spec.prompt_layout,  # a world asked in the other layout trains another prompt
            "answer_style": ANSWER_STYLE,  # a world of one-word relation and option answers, another style
            "layout": spec.layout, "n_train_clips": spec.n_train_clips, "n_val_clips": spec.n_val_clips,
            "n_test_clips": spec.n_test_clips,
            **{f"n_{split}_reasoning": n for split, n in spec.reasoning_counts.items()},
            **{f"n_{split}_small_text": n for split, n in spec.small_text_counts.items()},
            "reasoning_categories": list(spec.reasoning_categories) if with_reasoning else None,
            "reasoning_in_qa": spec.reasoning_in_qa if with_reasoning else None, "text_chats": True}
    differ = [f"{k}: {have[k]!r} on disk, {want[k]!r} in the config" for k in want if have[k] != want[k]]
    if differ:
        raise ConfigError(f"{world_dir} holds a world generated with other settings ({'; '.join(differ)}); "
                          "delete it or point world.dir elsewhere")
