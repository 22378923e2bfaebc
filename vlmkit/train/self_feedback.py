"""Preference pairs from a model's own answers, judged by a checker (RLAIF-V's self-feedback idea).

    self_feedback_pairs(vlm, prompts, checker, samples_per_prompt=8, temperature=1.0, ...)
        -> SelfFeedback(rows, stats)
    write_pairs(rows, path)        the rows as preference JSONL (data/preference.py reads it)

For each prompt the model samples N replies with vlmkit's engine (infer/engine.py; temperature > 0,
so the replies differ); `checker(reply, item) -> bool` judges each, and a correct reply becomes the
chosen one of a pair whose rejected one is an incorrect reply to the same prompt. A prompt whose
replies are all correct or all wrong gives no pair (counted). What cannot be used is counted,
never fatal: a prompt that cannot be read or that would overflow the model's context with
`max_new_tokens`, and a reply whose checker raised (left out of both sides).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.data.prompt import Prompt
from vlmkit.errors import BadRecordError
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import prompt_for
from vlmkit.infer.sampling import SamplingParams

log = logging.getLogger("vlmkit.train")

LOGGED_CHECKER_ERRORS = 10
"""Checker failures logged as warnings; the rest go to the debug log (all are counted)."""

Checker = Callable[[str, Any], bool]
"""(a reply, the prompt's item) -> whether the reply is correct."""


@dataclass
class FeedbackPrompt:
    """One prompt to sample: its conversation and what the checker needs to judge a reply."""

    id: str
    messages: list[dict]
    """OpenAI-style prompt turns (data/messages.py); image parts hold paths or PIL images."""
    item: Any
    """Passed to the checker with each reply (e.g. the question's answer and category)."""


@dataclass
class FeedbackStats:
    """What became of the prompts and the samples."""

    prompts: int = 0
    samples: int = 0
    correct: int = 0
    pairs: int = 0
    all_correct: int = 0
    """Prompts whose replies were all correct: nothing to reject."""
    all_wrong: int = 0
    """Prompts whose replies were all wrong: nothing to choose."""
    bad_prompts: dict[str, int] = field(default_factory=dict)
    """Prompts skipped, by reason (a BadRecordError's reason, or too_long)."""
    checker_errors: int = 0
    """Replies whose checker raised; they are neither chosen nor rejected."""
    reference_pairs: int = 0
    """Pairs whose chosen reply is the prompt's reference, because every sample was wrong
    (`reference_of` given)."""


@dataclass
class SelfFeedback:
    rows: list[dict]
    """Preference rows in vlmkit's layout: {"id", "messages", "chosen", "rejected"}."""
    stats: FeedbackStats


def self_feedback_pairs(vlm, prompts: Sequence[FeedbackPrompt], checker: Checker, *, samples_per_prompt: int = 8,
                        pairs_per_prompt: int = 1, temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                        max_batch: int | None = None,
                        reference_of: Callable[[Any], str] | None = None) -> SelfFeedback:
    """Sample `samples_per_prompt` replies to each prompt, judge them, and pair correct with wrong
    ones: up to `pairs_per_prompt` pairs a prompt, each distinct reply used in turn. `seed` fixes
    the samples (the caller's random state is left as it was). `reference_of(item)`: the prompt's
    reference reply, chosen against the model's wrong replies when none of its samples is right
    (the data's reply preferred to the model's own, as self-play fine-tuning pairs them), so a
    weak model still gets pairs on the questions it cannot yet answer."""
    stats = FeedbackStats(prompts=len(prompts))
    engine = Engine(vlm)
    usable, built = [], []
    for prompt in prompts:
        ready = _prompt(vlm, prompt, max_new_tokens, engine, stats)
        if ready is not None:
            usable.append(prompt)
            built.append(ready)
    runs = [ready for ready in built for _ in range(samples_per_prompt)]
    texts = [""] * len(runs)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # each sequence draws its sampling seed from it, in order
        for index, delta in engine.run(runs, params, max_batch):
            texts[index] += delta
    stats.samples = len(runs)
    rows = []
    for i, prompt in enumerate(usable):
        replies = texts[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        reference = reference_of(prompt.item) if reference_of is not None else None
        rows += _pairs_of(prompt, replies, checker, pairs_per_prompt, stats, reference)
    return SelfFeedback(rows, stats)


def _prompt(vlm, prompt: FeedbackPrompt, max_new_tokens: int, engine: Engine, stats: FeedbackStats) -> Prompt | None:
    """The prompt built for the model, or None when it cannot be used (counted and logged)."""
    try:
        built = prompt_for(vlm, prompt.messages)
    except BadRecordError as e:
        reason = e.reason
    else:
        if len(built.input_ids) + max_new_tokens <= engine.max_positions:
            return built
        reason = "too_long"
    stats.bad_prompts[reason] = stats.bad_prompts.get(reason, 0) + 1
    log.warning("self-feedback: skipped prompt %s (%s)", prompt.id, reason)
    return None


def _pairs_of(prompt: FeedbackPrompt, texts: list[str], checker: Checker, limit: int,
              stats: FeedbackStats, reference: str | None = None) -> list[dict]:
    """A prompt's pairs: its distinct correct replies against its distinct wrong ones (against
    `reference` when no reply is correct and a reference is given)."""
    correct, wrong = [], []
    for text in texts:
        if not text.strip():  # an empty reply is no side of a pair (the reader refuses it)
            continue
        try:
            verdict = bool(checker(text, prompt.item))
        except Exception as e:  # a checker is the caller's code: a failure costs one reply, not the run
            stats.checker_errors += 1
            level = logging.WARNING if stats.checker_errors <= LOGGED_CHECKER_ERRORS else logging.DEBUG
            log.log(level, "self-feedback: the checker raised on a reply to %s: %r", prompt.id, e)
            continue
        stats.correct += verdict
        side = correct if verdict else wrong
        if text not in side:
            side.append(text)
    if not correct and wrong and reference is not None:
        correct = [reference]
        stats.reference_pairs += min(limit, len(wrong))
    if not correct or not wrong:
        if correct:
            stats.all_correct += 1
        elif wrong:
            stats.all_wrong += 1
        return []
    count = min(limit, max(len(correct), len(wrong)))
    stats.pairs += count
    return [{"id": f"{prompt.id}-{i}", "messages": prompt.messages, "chosen": correct[i % len(correct)],
             "rejected": wrong[i % len(wrong)]} for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_pairs(rows: list[dict], path: str | Path, image_root: str | Path | None = None) -> Path:
    """Preference rows as JSONL. Image paths are written relative to `image_root` (default: the
    file's directory, where the reader resolves them unless its source names a `root`) when they
    lie under it, else absolute; PIL images as PNG data URLs."""
    path = Path(path)
    root = Path(image_root if image_root is not None else path.parent).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, "messages": [_portable_turn(m, root) for m in row["messages"]]}) + "\n")
    return path


def _portable_turn(message: dict, root: Path) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [_portable_part(part, root) for part in content]}


def _portable_part(part: dict, root: Path) -> dict:
    if part.get("type") != "image":
        return part
    image = part["image"]
    if isinstance(image, str) and image.startswith("data:"):
        return part
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {**part, "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}
    resolved = Path(image).resolve()
    return {**part, "image": os.path.relpath(resolved, root) if resolved.is_relative_to(root) else str(resolved)}
