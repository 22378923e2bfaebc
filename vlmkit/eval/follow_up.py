"""Follow-up questions: a benchmark's questions asked again, each after another question about the
same image and the model's own reply to it, in one conversation.

A model trained on one question per conversation can answer a first question and still fail the
second one of a chat (the reply of the wrong kind). `follow_up_items` measures that from a finished
evaluation: the items of each image (or video) with at least two answered questions are put in a
seeded order, and each item becomes the follow-up of the one before it in that order (the first
item follows the last), so every such question is asked once as a follow-up. The earlier question goes
into the item's history worded as the first evaluation asked it (its prompt format and mode), with
the reply the model gave there; an earlier item that had a history of its own passes it on, so a
follow-up of follow-ups asks a third turn. The items evaluate like any others (eval/runner.py),
and their summary is per category as for any benchmark.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import replace

from vlmkit.eval.benchmarks import Benchmark, BenchItem, Turn
from vlmkit.eval.prompts import question_text
from vlmkit.eval.runner import EvalResult


def follow_up_items(items: list[BenchItem], first: EvalResult, *, seed: int) -> list[BenchItem]:
    """Each item of an image with two or more questions answered in `first` (its unrotated row under
    CircularEval), with the question of another item of the same image and the model's reply to it
    as its history; in the order of `items`. Items without images or videos, without a row in
    `first` (bad rows, left out by a limit) or alone with their image are left out."""
    replies = {row.source_id: row.prediction for row in first.rows if row.rotation == 0}
    by_visual: dict[Hashable, list[int]] = defaultdict(list)  # positions in `items`
    for index, item in enumerate(items):
        if item.source_id in replies and (item.images or item.videos):
            by_visual[_visual_key(item)].append(index)
    rng = random.Random(seed)
    asked_before: dict[int, BenchItem] = {}  # position -> the item asked before it
    for group in by_visual.values():
        if len(group) < 2:
            continue
        order = list(group)
        rng.shuffle(order)
        asked_before.update((index, items[order[k - 1]]) for k, index in enumerate(order))
    list_options = first.mode == "gen"  # ppl mode asked cloze-style, options not listed
    follow_ups = []
    for index in sorted(asked_before):
        before = asked_before[index]
        turn = Turn(question_text(before, first.prompt_format, list_options=list_options), replies[before.source_id])
        follow_ups.append(replace(items[index], history=[*before.history, turn]))
    return follow_ups


def follow_up_benchmark(benchmark: Benchmark, first: EvalResult, *, seed: int) -> Benchmark:
    """`benchmark` with its items as follow-ups (`follow_up_items`), under the same name so that it is
    asked with the same wording and reply length; the file's bad rows were reported by `first`."""
    return replace(benchmark, items=follow_up_items(benchmark.items, first, seed=seed), bad_rows=[])


def _visual_key(item: BenchItem) -> Hashable:
    """What identifies an item's images and videos: their paths or bytes, in order."""
    videos = [video if isinstance(video, list) else [video] for video in item.videos]
    return (tuple((ref.path, ref.data) for ref in item.images),
            tuple(tuple((ref.path, ref.data) for ref in frames) for frames in videos))
