"""Weighted multi-source mixtures with a modality schedule, as DeepSeek-VL trains (Lu et al. 2024).

Each source is packed on its own (data/packing.py), so a pack holds one modality: text-only packs
never wait on image decoding and the vision tower is skipped on language steps. A source's
modality is "text" for language data and "image" otherwise (text-only rows of an image source
ride along in its image packs).

The modality of optimizer step `step` is drawn from (seed, step) alone, never the rank, so every
data-parallel rank takes the same kind of step; the image share follows the schedule
`image_share_at(step)`: a linear modality warm-up from `image_share_start` (language-heavy) to
the share the weights imply, over `warmup_steps`, then constant. Within a modality a source is
drawn by weight from (seed, call count), identical on every rank as well; each rank reads its
own disjoint share of every source (SourceStream's rank / world).

`state_dict()` holds the call count and every source's packer cursor (stream position, buffered
samples, counters): restoring it continues the exact same sequence of packs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlmkit.data.packing import Packer
from vlmkit.data.types import Modality, PackedBatch
from vlmkit.errors import ConfigError

MODALITIES: tuple[Modality, Modality] = ("image", "text")


@dataclass
class MixtureSource:
    name: str
    packer: Packer
    weight: float
    modality: Modality


class Mixture:
    """Micro-batches from several sources: `modality(step)`, then `next_batch(modality)` per micro-batch."""

    def __init__(self, sources: list[MixtureSource], *, seed: int = 0, image_share_start: float | None = None,
                 warmup_steps: int = 0):
        self.sources = [s for s in sources if s.weight > 0]
        if not self.sources:
            raise ConfigError("mixture: no source has a positive weight")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"mixture: source names repeat: {names}")
        self.seed, self.warmup_steps = seed, warmup_steps
        weight = {m: sum(s.weight for s in self.sources if s.modality == m) for m in MODALITIES}
        self.image_share = weight["image"] / (weight["image"] + weight["text"])
        self.image_share_start = self.image_share if image_share_start is None else image_share_start
        if not 0.0 <= self.image_share_start <= 1.0:
            raise ConfigError(f"image_share_start must be in [0, 1], got {self.image_share_start}")
        self.calls = 0

    def image_share_at(self, step: int) -> float:
        """Share of image steps at `step` under the modality warm-up."""
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.image_share
        t = step / self.warmup_steps
        return self.image_share_start + t * (self.image_share - self.image_share_start)

    def modality(self, step: int) -> Modality:
        """The modality of optimizer step `step`: a function of (seed, step) only."""
        share = self.image_share_at(step)
        if share >= 1.0 or share <= 0.0:
            wanted: Modality = "image" if share >= 1.0 else "text"
        else:
            wanted = "image" if random.Random(f"{self.seed}:modality:{step}").random() < share else "text"
        if not any(s.modality == wanted for s in self.sources):
            return "text" if wanted == "image" else "image"
        return wanted

    def next_batch(self, modality: Modality) -> PackedBatch:
        """The next pack of a source of `modality`, drawn by weight; StopIteration if finite and used up."""
        pool = [s for s in self.sources if s.modality == modality]
        if not pool:
            raise ConfigError(f"mixture has no {modality} source; sources: {[s.name for s in self.sources]}")
        rng = random.Random(f"{self.seed}:source:{self.calls}")
        self.calls += 1
        source = rng.choices(pool, weights=[s.weight for s in pool])[0]
        return source.packer.next_pack()

    def summaries(self) -> dict[str, str]:
        """Bad-record summary of each source (its pipeline's counters)."""
        return {s.name: s.packer.pipeline.stats.summary() for s in self.sources
                if hasattr(s.packer.pipeline, "stats")}

    def state_dict(self) -> dict:
        return {"calls": self.calls, "sources": {s.name: s.packer.state_dict() for s in self.sources}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(state["sources"]) ^ {s.name for s in self.sources})
        if missing:
            raise ConfigError(f"data cursor does not match the mixture: sources {missing} differ")
        self.calls = int(state["calls"])
        for s in self.sources:
            s.packer.load_state_dict(state["sources"][s.name])

