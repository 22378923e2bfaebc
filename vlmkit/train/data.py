"""From the run config to the data pipeline: one Mixture per stage, one packer per source.

The pipeline itself lives in vlmkit.data (formats -> SamplePipeline -> Packer -> Mixture); this
module only wires a stage's config into it: each source of the stage's mixture becomes a
SourceStream over this rank's disjoint share, a SamplePipeline with the stage's token budget as
max length, and a Packer; the Mixture picks the modality of each step from (seed, step), the
same on every rank, with the stage's modality warm-up.
"""

from __future__ import annotations

from vlmkit.config import DataSource, RunConfig
from vlmkit.data.mixture import Mixture, MixtureSource
from vlmkit.data.packing import Packer, SourceStream
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.types import Modality, PackedBatch
from vlmkit.train.stages import stage_seed


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
                 rank: int = 0, world: int = 1):
        stage = cfg.stages[index]
        seed = stage_seed(cfg, index)
        sources = [MixtureSource(name, _packer(cfg, name, tokenizer, processor, tokens_per_tile, stage.token_budget,
                                               rank=rank, world=world, seed=seed),
                                 weight, source_modality(cfg.data[name]))
                   for name, weight in cfg.stage_mixture(index).items() if weight > 0]
        self.mixture = Mixture(sources, seed=seed,
                               image_share_start=stage.image_share_start if stage.modality_warmup_steps else None,
                               warmup_steps=stage.modality_warmup_steps)

    def modality(self, step: int) -> Modality:
        return self.mixture.modality(step)

    def next_batch(self, modality: Modality) -> PackedBatch:
        return self.mixture.next_batch(modality)

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state)


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
