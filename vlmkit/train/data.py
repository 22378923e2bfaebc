"""From the run config to the data pipeline: one Mixture per stage, one packer per source.

The pipeline itself lives in vlmkit.data (formats -> SamplePipeline -> Packer -> Mixture); this
module only wires a stage's config into it: each source of the stage's mixture becomes a
SourceStream over this rank's disjoint share, a SamplePipeline with the stage's token budget as
max length, and a Packer; the Mixture picks the modality of each step from (seed, step), the
same on every rank, with the stage's modality warm-up.

A source whose files cannot be read (deleted or made unreadable mid-run, permissions, I/O errors:
data/packing.py's `UnreadableSource`; or whose path is missing when the stage starts) is a bad
source: reported, recorded in the cursor, and the stage goes on with the other sources, unless the unreadable sources carried more than
`max_bad_fraction` of the stage's mixture weight, which stops the run with TooManyBadRecords. So
does losing the last source of a modality under several ranks: each rank reads its own files, and
ranks that took steps of different modalities would wait on each other's collectives forever.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlmkit.config import DataSource, RunConfig
from vlmkit.data.mixture import MODALITIES, Mixture, MixtureSource
from vlmkit.data.packing import Packer, SourceStream, UnreadableSource, path_not_found
from vlmkit.data.pipeline import SamplePipeline, TooManyBadRecords
from vlmkit.data.types import Modality, PackedBatch
from vlmkit.train.stages import stage_seed

log = logging.getLogger("vlmkit.data")


def source_modality(src: DataSource) -> Modality:
    """Text sources give text-only packs; every other source gives image packs."""
    return "text" if src.kind == "text" or src.format == "text" else "image"


def _packer(cfg: RunConfig, name: str, tokenizer, processor, tokens_per_tile: int, budget: int, *,
            rank: int, world: int, seed: int, loop: bool = True, shuffle_block: int = 1024) -> Packer:
    src = cfg.data[name]
    stream = SourceStream(cfg.resolve(src.path), src.format, root=cfg.resolve(src.root), kind=src.kind, name=name,
                          rank=rank, world=world, seed=seed, loop=loop, shuffle_block=shuffle_block)
    pipeline = SamplePipeline(tokenizer, processor if source_modality(src) == "image" else None, tokens_per_tile,
                              max_length=budget, max_bad_fraction=cfg.max_bad_fraction, name=name)
    return Packer(stream, pipeline, budget)


class StageData:
    """The micro-batches of one stage for one rank: `modality(step)`, `next_batch(modality)`,
    and a JSON-able cursor (`state_dict` / `load_state_dict`)."""

    def __init__(self, cfg: RunConfig, index: int, tokenizer, processor, tokens_per_tile: int, *,
                 rank: int = 0, world: int = 1, mixture: dict[str, float] | None = None,
                 token_budget: int | None = None):
        """`mixture`: read these sources (name -> weight) instead of the stage's own mixture, and
        `token_budget`: pack them to this many tokens instead of the stage's (both for the stage's
        replayed data, config.ReplaySettings)."""
        stage = cfg.stages[index]
        seed = stage_seed(cfg, index)
        mixture = cfg.stage_mixture(index) if mixture is None else mixture
        self.weights = {name: weight for name, weight in mixture.items() if weight > 0}
        self.modalities = {name: source_modality(cfg.data[name]) for name in self.weights}
        self.max_bad_fraction, self.world = cfg.max_bad_fraction, world
        self.unreadable: dict[str, str] = {}
        """Sources dropped because they could not be read: name -> the error."""
        for name in self.weights:  # a path gone since the run started (or misspelt) is a bad source now
            path = cfg.resolve(cfg.data[name].path)
            if not Path(path).exists():
                self._drop(UnreadableSource(name, path_not_found(path)))
        budget = stage.token_budget if token_budget is None else token_budget
        sources = [MixtureSource(name, _packer(cfg, name, tokenizer, processor, tokens_per_tile, budget,
                                               rank=rank, world=world, seed=seed),
                                 weight, self.modalities[name])
                   for name, weight in self.weights.items() if name not in self.unreadable]
        self.mixture = Mixture(sources, seed=seed,
                               image_share_start=stage.image_share_start if stage.modality_warmup_steps else None,
                               warmup_steps=stage.modality_warmup_steps)

    def modality(self, step: int) -> Modality:
        return self.mixture.modality(step)

    def next_batch(self, modality: Modality) -> PackedBatch:
        while True:
            if not any(s.modality == modality for s in self.mixture.sources):  # its last source was just dropped
                modality = next(m for m in MODALITIES if m != modality)
            try:
                return self.mixture.next_batch(modality)
            except UnreadableSource as e:
                self._drop(e)
                self._keep_readable()

    def _drop(self, error: UnreadableSource) -> None:
        """Count a source that cannot be read and go on without it, or stop (module docstring)."""
        self.unreadable[error.source] = str(error.error)
        left = [name for name in self.weights if name not in self.unreadable]
        lost = sum(self.weights[name] for name in self.unreadable) / sum(self.weights.values())
        if not left:
            raise TooManyBadRecords(f"{error}; no readable source of this stage is left. Make the files readable "
                                    "and continue with --resume") from error
        if lost > self.max_bad_fraction:
            raise TooManyBadRecords(
                f"{error}; the unreadable sources {sorted(self.unreadable)} carry {lost:.1%} of this stage's data, "
                f"more than max_bad_fraction {self.max_bad_fraction:.1%}. Make the files readable and continue "
                "with --resume, or raise max_bad_fraction") from error
        modality = self.modalities[error.source]
        if self.world > 1 and all(self.modalities[name] != modality for name in left):
            raise TooManyBadRecords(f"{error}; it was the last {modality} source, which a run of several "
                                    "processes cannot go on without. Make the files readable and continue with "
                                    "--resume") from error
        log.warning("%s; counted as a bad source, the stage goes on with %s (%.1f%% of its data lost)", error, left,
                    100 * lost)

    def _keep_readable(self) -> None:
        self.mixture.sources = [s for s in self.mixture.sources if s.name not in self.unreadable]

    def state_dict(self) -> dict:
        return {**self.mixture.state_dict(), "unreadable": dict(self.unreadable)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor. Sources it records as unreadable stay dropped (as in the run that
        wrote it, even if they can be read again); one that cannot be read now is dropped as it
        would be mid-run."""
        self.unreadable.update(state.get("unreadable", {}))
        self._keep_readable()
        while True:
            readable = {name: cursor for name, cursor in state["sources"].items() if name not in self.unreadable}
            try:
                self.mixture.load_state_dict({**state, "sources": readable})
                return
            except UnreadableSource as e:
                self._drop(e)
                self._keep_readable()


def eval_batches(cfg: RunConfig, name: str, tokenizer, processor, tokens_per_tile: int, budget: int, *,
                 rank: int = 0, world: int = 1) -> list[PackedBatch]:
    """The first `cfg.eval_batches` packs of a source in file order (the same at every eval point)."""
    packer = _packer(cfg, name, tokenizer, processor, tokens_per_tile, budget, rank=rank, world=world, seed=0,
                     loop=False, shuffle_block=1)
    out = []
    for batch in packer:
        out.append(batch)
        if len(out) >= cfg.eval_batches:
            break
    return out
