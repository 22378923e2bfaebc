"""Padding waste: naive padded batching (batches of 8, padded to the longest) vs vlmkit's packing.

Both see the same samples: lengths drawn log-uniformly from 16..512 (short answers to long
documents), in the same order. Waste is the share of token slots that hold padding; for packing
that is the room left in each pack of `--budget` tokens (1 - packing efficiency). Run: .venv/bin/python bench/packing.py
"""

from __future__ import annotations

import argparse
import math
import random

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.packing import Packer, SourceStream, packing_efficiency
from vlmkit.data.types import Record, Sample


class LengthPipeline:
    """Record whose text is a length -> a Sample of that many tokens (the bench measures lengths only)."""

    def encode(self, record: Record) -> Sample:
        n = int(record.text)
        return Sample(record.id, record.source, [1] * n, [IGNORE_INDEX] + [1] * (n - 1))


def lengths(n: int, seed: int, lo: int = 16, hi: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(n)]


def padded_waste(lens: list[int], batch_size: int) -> float:
    slots = sum(max(lens[i:i + batch_size]) * len(lens[i:i + batch_size]) for i in range(0, len(lens), batch_size))
    return 1.0 - sum(lens) / slots


def packed_waste(lens: list[int], budget: int) -> tuple[float, int]:
    records = [Record(str(i), "bench", "text", text=str(n)) for i, n in enumerate(lens)]
    stream = SourceStream("bench", reader=lambda: iter(records), loop=False)
    packs = list(Packer(stream, LengthPipeline(), budget))
    assert sum(p.num_samples for p in packs) == len(lens)
    return 1.0 - packing_efficiency(packs), len(packs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lens = lengths(args.samples, args.seed)
    naive = padded_waste(lens, args.batch_size)
    packed, n_packs = packed_waste(lens, args.budget)
    print(f"samples: {len(lens)}, mean length {sum(lens) / len(lens):.1f} tokens (log-uniform 16..512)")
    print(f"padded batches of {args.batch_size}: {naive:.1%} of token slots are padding")
    print(f"packed, budget {args.budget}: {packed:.2%} of token slots are unused ({n_packs} packs)")
    print(f"padding waste ratio (padded / packed): {naive / max(packed, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
