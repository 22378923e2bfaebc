"""`evaluate`: a checkpoint on a benchmark, in one of two modes.

  gen  greedy generation, batched through the inference engine (vlmkit.infer.engine), then
       answer extraction (data/answers.py) and exact match.
  ppl  multiple choice by length-normalised log-likelihood of each option (eval/ppl.py).

Both modes put a question as one OpenAI-style user turn, or an item with a history as its whole
conversation (eval/prompts.py), and read it as every conversation is read (data/messages.py,
data/prompt.py). eval/follow_up.py turns a finished evaluation into follow-up items (each question
asked after another one about the same image and the model's own reply to it).

`blind=True` evaluates the same model with every image replaced by a blank one of the same size
(the mean colour of the encoder's normalisation, i.e. all-zero pixel values), and every video by
as many blank frames of its frame size, so that the prompt and the number of visual tokens are
unchanged and only the visual information is gone: the image-free baseline a model that really
sees must beat. `evaluate_with_blind` runs both.

A row with a video is asked with a video part (eval/prompts.py); a model whose image processor
takes images only refuses it, and the row is a bad row (reason unexpected_video).

Rows whose images cannot be decoded, whose prompt cannot be built, or (gen mode) whose prompt
leaves no room in the context for the reply are reported as bad rows (with their file row and
reason) and left out; the rest are evaluated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from PIL import Image
from tqdm import tqdm

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.images import ImageProcessor
from vlmkit.data.messages import keep_image, read_conversation
from vlmkit.data.native_images import open_video
from vlmkit.data.prompt import Prompt, build_prompt, encode_images
from vlmkit.data.template import encode_prompt, encode_record
from vlmkit.data.types import ImageRef, Message, Record, Sample, VideoRef
from vlmkit.data.world import generate as generate_world
from vlmkit.errors import BadRecordError, VlmkitError
from vlmkit.eval.benchmarks import LETTERS, Benchmark, BadRow, BenchItem, circular_items, read_benchmark
from vlmkit.eval.metrics import RowResult, score_reply, summarize
from vlmkit.eval.ppl import length_normalised, sequence_logprobs
from vlmkit.eval.prompts import LLAVA_PROMPTS, SYNTH_PROMPTS, PromptFormat, chat_messages, world_prompt_format
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams

Mode = Literal["gen", "ppl"]

GEN_CHUNK_BATCHES = 4
"""Gen mode builds prompts and decodes this many batches' worth of rows at a time, so the
progress bar moves while the whole benchmark is never held as prompts at once."""


@dataclass
class EvalResult:
    benchmark: str
    mode: str
    circular: bool
    blind: bool
    summary: dict[str, Any]
    """n, correct, accuracy, per_category, unparsed; yes_no and vanilla when they apply."""
    rows: list[RowResult] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    seconds: float = 0.0
    prompt_format: PromptFormat = LLAVA_PROMPTS
    """How the questions were worded (a follow-up evaluation repeats an earlier question as asked)."""

    @property
    def accuracy(self) -> float:
        return self.summary["accuracy"]

    @property
    def per_category(self) -> dict[str, dict[str, Any]]:
        return self.summary["per_category"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: settings, the summary, the bad rows (all of them) and the time taken."""
        return {"benchmark": self.benchmark, "mode": self.mode, "circular": self.circular, "blind": self.blind,
                **self.summary,
                "bad_rows": {"count": len(self.bad_rows), "rows": [b.to_dict() for b in self.bad_rows]},
                "seconds": round(self.seconds, 3)}


@dataclass
class Question:
    """A question ready to ask: the item, its decoded (or, blind, blanked) images, and its videos
    (as read: frames or a path; blind: blank frames)."""

    item: BenchItem
    images: list[Image.Image]
    videos: list[VideoRef | list[Image.Image]] = field(default_factory=list)

    def messages(self, fmt: PromptFormat, *, list_options: bool) -> list[dict]:
        """The question as an OpenAI-style conversation: one user turn, or its history first (eval/prompts.py)."""
        return chat_messages(self.item, self.images, fmt, list_options=list_options, videos=self.videos)


def blank_like(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """An image of the same size filled with the normalisation mean (all-zero pixel values)."""
    return Image.new("RGB", image.size, tuple(round(255 * m) for m in mean))


def blank_video(video: VideoRef, mean: tuple[float, ...]) -> list[Image.Image]:
    """A video's blind stand-in: as many frames as it has, each blank at its first frame's size
    (one image shared by every frame). Raises BadRecordError (data/native_images.py `open_video`)."""
    source = open_video(video.path if isinstance(video, ImageRef) else video)
    return [blank_like(source.decode([0])[0], mean)] * source.total_frames


def _chunks(seq: list, size: int) -> Iterator[list]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


# --- gen mode ----------------------------------------------------------------------------------------

def _generate_rows(model, items: list[Question], *, batch_size: int, fmt: PromptFormat, max_new_tokens: int,
                   bar: tqdm) -> tuple[list[RowResult], list[BadRow]]:
    """Greedy replies through the engine, `batch_size` rows decoding together (rows that finish
    leave and the next prompts join, as in the server); prompts are prefilled one by one, so a
    reply never depends on its batch."""
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    rows, bad = [], []
    for chunk in _chunks(items, GEN_CHUNK_BATCHES * batch_size):
        ready, prompts = [], []
        for question in chunk:
            item = question.item
            try:
                prompt = reply_prompt(engine, question.messages(fmt, list_options=True), max_new_tokens)
            except BadRecordError as e:
                bad.append(BadRow.from_error(item.row, e, item.id))
                continue
            prompts.append(prompt)
            ready.append(item)
        replies = engine_replies(engine, prompts, params, batch_size)
        rows += [score_reply(item, reply) for item, reply in zip(ready, replies)]
        bar.update(len(chunk))
    return rows, bad


def reply_prompt(engine: Engine, messages: list[dict], max_new_tokens: int) -> Prompt:
    """A conversation's generation prompt for the engine's model, videos taken as given (what both
    `vlmkit eval` and the lmms-eval plugin, eval/lmms.py, ask with). Raises BadRecordError: an
    unreadable image or video, a malformed turn, or a prompt that leaves no room in the context
    for `max_new_tokens` (too_long)."""
    model = engine.vlm
    prompt = build_prompt(messages, model.tokenizer, model.image_processor(), model.config.tokens_per_tile,
                          resolve_video=keep_image)
    if len(prompt.input_ids) + max_new_tokens > engine.max_positions:
        raise BadRecordError("too_long", f"prompt of {len(prompt.input_ids)} tokens + {max_new_tokens} new "
                                         f"tokens exceeds the context of {engine.max_positions}")
    return prompt


def engine_replies(engine: Engine, prompts: list[Prompt], params: SamplingParams, batch_size: int) -> list[str]:
    """Each prompt's reply, `batch_size` rows decoding together (rows that finish leave and the
    next prompts join, as in the server)."""
    replies = [""] * len(prompts)
    for index, delta in engine.run(prompts, params, max_batch=batch_size):
        replies[index] += delta
    return replies


# --- ppl mode ----------------------------------------------------------------------------------------

def option_set(item: BenchItem, answers_by_category: dict[str, list[str]]) -> tuple[list[str], int]:
    """The options a ppl-mode item is scored over, and the index of the gold one."""
    if item.kind == "choice":
        return item.choices, item.answer_index
    if item.kind == "yesno":
        return ["yes", "no"], ["yes", "no"].index(item.answer)
    options = answers_by_category[item.category]
    return options, options.index(item.answer)


def _open_answers(benchmark: Benchmark) -> dict[str, list[str]]:
    """Each category's distinct gold answers of open questions, in file order: the option set ppl
    mode scores an open question over."""
    answers: dict[str, list[str]] = {}
    for item in benchmark.items:
        if item.kind == "open" and item.answer not in answers.setdefault(item.category, []):
            answers[item.category].append(item.answer)
    return answers


def _option_samples(model, processor: ImageProcessor, question: Question, fmt: PromptFormat,
                    options: list[str]) -> list[Sample]:
    """One sample per option: the question's user turn (options not listed, cloze-style), then the
    option as the assistant's reply (`reply_samples`). Raises BadRecordError."""
    return reply_samples(model, processor, question.messages(fmt, list_options=False), options, question.item.id)


def reply_samples(model, processor: ImageProcessor, messages: list[dict], replies: list[str],
                  sample_id: str) -> list[Sample]:
    """One sample per reply: the conversation `messages`, ending with a user turn (images decoded
    once for all), then the reply as the assistant's turn, supervised as training supervises a reply
    (the reply's tokens and its end-of-turn token): what eval/ppl.py's `sequence_logprobs` scores.
    Earlier assistant turns are context only: everything up to the reply's generation prompt is
    left unsupervised. Raises BadRecordError."""
    asked = read_conversation(messages, keep_image, keep_image)
    visual = encode_images(asked.images, processor, model.config.tokens_per_tile, asked.videos)
    context = len(encode_prompt(asked.messages, model.tokenizer, visual.visual_tokens, visual.video_tokens))
    samples = []
    for reply in replies:
        record = Record(id=sample_id, source="eval", kind="chat",
                        messages=asked.messages + [Message("assistant", reply)])
        ids, labels = encode_record(record, model.tokenizer, visual.visual_tokens, visual.video_tokens)
        labels = [IGNORE_INDEX] * context + list(labels[context:])
        samples.append(visual.sample(sample_id, "eval", list(ids), labels))
    return samples


def _ppl_rows(model, items: list[Question], *, batch_size: int, fmt: PromptFormat,
              answers_by_category: dict[str, list[str]], bar: tqdm) -> tuple[list[RowResult], list[BadRow]]:
    """Each item's options scored by length-normalised log-likelihood, `batch_size` items' options
    in one packed pass; the best-scoring option is the answer."""
    processor = model.image_processor()
    rows, bad = [], []
    for chunk in _chunks(items, batch_size):
        seqs, spans = [], []  # spans[i]: (item, options, gold, first sequence index)
        for question in chunk:
            item = question.item
            options, gold = option_set(item, answers_by_category)
            if len(options) < 2:
                bad.append(BadRow(item.row, "no_options", f"category {item.category!r} has a single answer", item.id))
                continue
            try:
                samples = _option_samples(model, processor, question, fmt, options)
            except BadRecordError as e:
                bad.append(BadRow.from_error(item.row, e, item.id))
                continue
            spans.append((item, options, gold, len(seqs)))
            seqs += samples
        scores = length_normalised(sequence_logprobs(model, seqs))
        for item, options, gold, start in spans:
            option_scores = scores[start:start + len(options)]
            best = max(range(len(options)), key=option_scores.__getitem__)
            parsed = LETTERS[best] if item.kind == "choice" else options[best]
            rows.append(RowResult(id=item.id, source_id=item.source_id, category=item.category, kind=item.kind,
                                  answer=item.answer, prediction=options[best], parsed=parsed, correct=best == gold,
                                  rotation=item.rotation, scores=option_scores))
        bar.update(len(chunk))
    return rows, bad


# --- benchmarks ----------------------------------------------------------------------------------------

def load_benchmark(bench: Benchmark | str | Path, *, image_root: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> Benchmark:
    """A Benchmark, a file path, or a built-in name ("synth": the synthetic world's test split)."""
    if isinstance(bench, Benchmark):
        return bench
    if str(bench) in BUILTIN:
        return BUILTIN[str(bench)](cache_dir)
    return read_benchmark(bench, image_root)


def synth_test_split(cache_dir: str | Path | None, n_test: int = 1000, seed: int = 0) -> Path:
    """The synthetic world's test split as benchmark JSONL, generated once into `cache_dir`."""
    root = Path(cache_dir if cache_dir is not None else Path.home() / ".cache" / "vlmkit") / f"synth-{seed}-{n_test}"
    path = root / "synth.jsonl"
    if not path.is_file():
        files = generate_world(root, n_train=0, n_val=0, n_test=n_test, seed=seed, text_corpus=False)
        path = Path(files["test"])
    return path


BUILTIN = {"synth": lambda cache_dir: read_benchmark(synth_test_split(cache_dir))}
WORLD_BENCHMARKS = ("synth", "synth_clips", "synth_reasoning")
"""Benchmark names asked exactly as their training data asks (`benchmark_prompt_format`): the
synthetic world's test split, test clips and reasoning questions (data/world.py)."""
# Longest reply per benchmark name (gen mode): the synthetic world's worked replies run to ~26 tokens.
REPLY_TOKENS: dict[str, int] = {"synth": 40, "synth_clips": 40, "synth_reasoning": 64}
DEFAULT_REPLY_TOKENS = 16


def _load_questions(model, benchmark: Benchmark, *, blind: bool,
                    circular: bool) -> tuple[list[Question], list[BadRow]]:
    """Decode each item's images once (blanked when blind; videos are decoded when the prompt is
    built, or blanked here when blind), then expand CircularEval rotations; items whose images or
    (blind) videos cannot be decoded are bad rows."""
    processor = model.image_processor()
    # a blank image is the normalisation mean: all-zero pixel values after the processor
    mean = model.native_processor_config().mean if model.config.is_native else model.config.vision.image_mean
    ready, bad = [], []
    for item in benchmark.items:
        try:
            images = [processor.load(ref) for ref in item.images]
            videos = [blank_video(video, mean) for video in item.videos] if blind else item.videos
        except BadRecordError as e:
            bad.append(BadRow.from_error(item.row, e, item.id))
            continue
        if blind:
            images = [blank_like(image, mean) for image in images]
        ready += [Question(variant, images, videos)
                  for variant in (circular_items([item]) if circular else [item])]
    return ready, bad


def evaluate(model, bench: Benchmark | str | Path, *, mode: Mode = "gen", circular: bool = False,
             limit: int | None = None, batch_size: int = 8, blind: bool = False, max_new_tokens: int | None = None,
             prompt_format: PromptFormat | None = None, image_root: str | Path | None = None,
             cache_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `model` (a vlmkit VLM with its tokenizer) on `bench`; see the module docstring.

    bench: a Benchmark, a file (.tsv / .jsonl / .json) or "synth". `limit` keeps the first N
    questions (before CircularEval expands them into rotations). `prompt_format` defaults to
    LLaVA's wording, and for the synthetic world's benchmarks to their world's training wording
    and prompt layout (`benchmark_prompt_format`);
    `max_new_tokens` to REPLY_TOKENS for the benchmark's name, else DEFAULT_REPLY_TOKENS.
    `image_root`: the folder a benchmark file's image paths resolve under (and must stay in).
    """
    if mode not in ("gen", "ppl"):
        raise VlmkitError(f"unknown eval mode {mode!r}; use 'gen' or 'ppl'")
    if batch_size < 1:
        raise VlmkitError(f"batch_size must be >= 1, got {batch_size}")
    if model.tokenizer is None:
        raise VlmkitError("the model has no tokenizer; evaluate a checkpoint saved with one")
    start = time.perf_counter()
    benchmark = load_benchmark(bench, image_root=image_root, cache_dir=cache_dir)
    fmt = prompt_format or benchmark_prompt_format(benchmark)
    if max_new_tokens is None:
        max_new_tokens = REPLY_TOKENS.get(benchmark.name, DEFAULT_REPLY_TOKENS)
    answers_by_category = _open_answers(benchmark)  # the whole benchmark's, also under `limit`
    benchmark = benchmark.head(limit)
    ready, bad_rows = _load_questions(model, benchmark, blind=blind, circular=circular)

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ready), desc=f"eval {benchmark.name} ({mode})", unit="q", disable=not progress)
    try:
        if mode == "gen":
            rows, more_bad = _generate_rows(model, ready, batch_size=batch_size, fmt=fmt,
                                            max_new_tokens=max_new_tokens, bar=bar)
        else:
            rows, more_bad = _ppl_rows(model, ready, batch_size=batch_size, fmt=fmt,
                                       answers_by_category=answers_by_category, bar=bar)
    finally:
        bar.close()
        model.train(was_training)
    return EvalResult(benchmark=benchmark.name, mode=mode, circular=circular, blind=blind, summary=summarize(rows),
                      rows=rows, bad_rows=benchmark.bad_rows + bad_rows + more_bad,
                      seconds=time.perf_counter() - start, prompt_format=fmt)


def benchmark_prompt_format(benchmark: Benchmark) -> PromptFormat:
    """How a benchmark is asked by default: one of the synthetic world's (WORLD_BENCHMARKS) in the
    prompt layout of the world its file sits in (eval/prompts.py `world_prompt_format`), any other
    in LLaVA's wording."""
    if benchmark.name not in WORLD_BENCHMARKS:
        return LLAVA_PROMPTS
    return world_prompt_format(Path(benchmark.path).parent) if benchmark.path else SYNTH_PROMPTS


def evaluate_with_blind(model, bench: Benchmark | str | Path, **kw) -> dict[str, EvalResult]:
    """The model and its blind baseline on the same benchmark, read once: {"model": ..., "blind": ...}.
    Keyword arguments as `evaluate` (except `blind`)."""
    benchmark = load_benchmark(bench, image_root=kw.pop("image_root", None), cache_dir=kw.pop("cache_dir", None))
    return {"model": evaluate(model, benchmark, **kw), "blind": evaluate(model, benchmark, blind=True, **kw)}
