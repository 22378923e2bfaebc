"""What the CPU training benches of vlmkit (packed) against a transformers VLM (padded) share
(bench/native_train_throughput.py, bench/family_train_throughput.py): their arguments, the
right-padded ids / mask / labels of a step's samples, one side's model, optimizer and batches, and
the measurement itself: the first-batch loss check (the same weights and samples must give the
same loss, or the comparison is void), a warm-up step per side, timed repeats that interleave the
sides so that a change of load on a shared machine reaches both alike, and the report of non-pad
training tokens/s (each side's best repeat) with the ratio vlmkit / transformers; and the random
examples both draw (an image of random size, a text of log-uniform length)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from train_throughput import lengths_mix
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.types import Sample

LEARNING_RATE = 1e-4
LOSS_RTOL = 1e-4
WARMUP_STEPS = 1  # per side, untimed: first-call allocations and kernel selection
OURS, THEIRS = "vlmkit", "transformers"


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per side, interleaved")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (a padded batch / one pack)")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def random_examples(n: int, seed: int, min_side: int, max_side: int, vocab: int) -> list[tuple[Image.Image, list[int]]]:
    """n (image, text ids) pairs: random pixels with sides drawn independently in min_side..max_side
    (a mix of sizes and aspect ratios), then a text of log-uniform length of ids below `vocab`."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths_mix(n, gen):
        height, width = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        out.append((image, torch.randint(0, vocab, (length,), generator=gen).tolist()))
    return out


def step_slices(batch: int, steps: int) -> list[slice]:
    """The samples of each step (warm-up steps first): the next `batch` each time."""
    return [slice(i * batch, (i + 1) * batch) for i in range(steps)]


def right_padded(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """transformers' text inputs for these samples: ids, attention mask and labels, right-padded to
    the longest (pad id 0, labels IGNORE_INDEX)."""
    B, T = len(samples), max(len(s) for s in samples)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n], mask[b, :n], labels[b, :n] = torch.tensor(s.input_ids), 1, torch.tensor(s.labels)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def timed_token_counts(padded: list[dict]) -> tuple[int, int]:
    """(non-pad tokens, slots) of the timed padded batches (past the warm-up)."""
    timed = padded[WARMUP_STEPS:]
    return sum(int(b["attention_mask"].sum()) for b in timed), sum(b["input_ids"].numel() for b in timed)


class Side:
    """One framework's model, optimizer and prepared batches; keeps its best timed repeat."""

    def __init__(self, model: torch.nn.Module, loss_fn, batches: list):
        self.model, self.loss_fn, self.batches = model.train(), loss_fn, batches
        self.opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        self.best = float("inf")

    def step(self, i: int) -> None:
        self.loss_fn(self.model, self.batches[i]).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, first: int, steps: int) -> None:
        start = time.perf_counter()
        for i in range(first, first + steps):
            self.step(i)
        self.best = min(self.best, time.perf_counter() - start)


def measure(sides: dict[str, Side], steps: int, repeats: int) -> None:
    """Check the sides' first-batch losses agree, warm each up, then time `repeats` x `steps`
    steps of each, interleaved (theirs, ours, theirs, ...)."""
    with torch.no_grad():
        losses = [side.loss_fn(side.model, side.batches[0]).item() for side in sides.values()]
    if not np.isclose(*losses, rtol=LOSS_RTOL):
        raise RuntimeError(f"the two sides' losses differ on the first batch: {losses}")
    for side in sides.values():
        for i in range(WARMUP_STEPS):
            side.step(i)
    for _ in range(repeats):
        for side in sides.values():
            side.timed(WARMUP_STEPS, steps)


def report_rates(sides: dict[str, Side], timed_tokens: int) -> None:
    """Print each side's non-pad training tokens/s (its best repeat) and the ratio."""
    rates = {name: timed_tokens / side.best for name, side in sides.items()}
    for name, rate in rates.items():
        print(f"{name:>12}: {rate:8.0f} non-pad tokens/s")
    print(f"ratio vlmkit / transformers: {rates[OURS] / rates[THEIRS]:.2f}x")
