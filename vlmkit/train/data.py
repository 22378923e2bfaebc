"""From the run config to the data pipeline: one Mixture per stage, one packer per source.

The pipeline itself lives in vlmkit.data (formats -> SamplePipeline -> Packer -> Mixture); this
module only wires a stage's config into it: each source of the stage's mixture becomes a
SourceStream over this rank's disjoint share, a SamplePipeline with the stage's token budget as
max length, and a Packer; the Mixture picks the modality of each step from (seed, step), the
same on every rank, with the stage's modality warm-up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vlmkit.config import DataSource, RunConfig, WorldSpec
from vlmkit.data.mixture import Mixture, MixtureSource
from vlmkit.data.packing import Packer, SourceStream
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.types import Modality, PackedBatch
from vlmkit.errors import ConfigError


def source_modality(src: DataSource) -> Modality:
    """Text sources give text-only packs; every other source gives image packs."""
    return "text" if src.kind == "text" or src.format == "text" else "image"


def _packer(cfg: RunConfig, name: str, tokenizer, processor, tokens_per_image: int, budget: int, *,
            rank: int, world: int, seed: int, loop: bool = True, shuffle_block: int = 1024) -> Packer:
    src = cfg.data[name]
    stream = SourceStream(cfg.resolve(src.path), src.format, root=cfg.resolve(src.root), kind=src.kind, name=name,
                          rank=rank, world=world, seed=seed, loop=loop, shuffle_block=shuffle_block)
    pipeline = SamplePipeline(tokenizer, processor if source_modality(src) == "image" else None, tokens_per_image,
                              max_length=budget, max_bad_fraction=cfg.max_bad_fraction, name=name)
    return Packer(stream, pipeline, budget)


class StageData:
    """The micro-batches of one stage for one rank: `modality(step)`, `next_batch(modality)`,
    and a JSON-able cursor (`state_dict` / `load_state_dict`)."""

    def __init__(self, cfg: RunConfig, index: int, tokenizer, processor, tokens_per_image: int, *,
                 rank: int = 0, world: int = 1):
        stage = cfg.stages[index]
        seed = stage.seed * 1000 + index
        sources = [MixtureSource(name, _packer(cfg, name, tokenizer, processor, tokens_per_image, stage.token_budget,
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


def eval_batches(cfg: RunConfig, name: str, tokenizer, processor, tokens_per_image: int, budget: int, *,
                 rank: int = 0, world: int = 1) -> list[PackedBatch]:
    """The first `cfg.eval_batches` packs of a source in file order (the same at every eval point)."""
    packer = _packer(cfg, name, tokenizer, processor, tokens_per_image, budget, rank=rank, world=world, seed=0,
                     loop=False, shuffle_block=1)
    out = []
    for batch in packer:
        out.append(batch)
        if len(out) >= cfg.eval_batches:
            break
    return out


# ---------------------------------------------------------------------------------------------
# The synthetic world as a run's data
# ---------------------------------------------------------------------------------------------

TOKENIZER_DIR = "tokenizer"


def world_texts(world_dir: Path):
    """Every text a model of the world reads or writes: corpus, captions, questions, answers."""
    with open(world_dir / "text_train.jsonl") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]
    for name in ("captions_train.json", "qa_train.json"):
        for row in json.loads((world_dir / name).read_text()):
            for turn in row["conversations"]:
                yield turn["value"].replace("<image>", "")


def prepare_world(spec: WorldSpec, progress: bool = True) -> Path:
    """Generate the world and train its tokenizer unless `spec.dir` already holds them.

    world.json is written last by the generator and the tokenizer directory is renamed into place,
    so a run killed half-way regenerates what is missing on its next start.
    """
    from vlmkit.data.synth import generate
    from vlmkit.data.tokenizer import Tokenizer

    world_dir = Path(spec.dir)
    if (world_dir / "world.json").is_file():
        _check_world(spec, json.loads((world_dir / "world.json").read_text()), world_dir)
    else:
        generate(world_dir, n_train=spec.n_train, n_val=spec.n_val, n_test=spec.n_test, seed=spec.seed,
                 turns_per_record=spec.turns_per_record, train_questions=spec.train_questions, progress=progress)
    tok_dir = world_dir / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        tmp = world_dir / f".{TOKENIZER_DIR}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        Tokenizer.train(world_texts(world_dir), vocab_size=spec.vocab_size).save(tmp)
        os.replace(tmp, tok_dir)
    return world_dir


def _check_world(spec: WorldSpec, world: dict, world_dir: Path) -> None:
    """A world on disk is reused only when it was generated with the spec's settings."""
    from vlmkit.data.synth import ANSWER_STYLE, PROMPT_LAYOUT

    counts = world.get("counts", {})
    have = {"seed": world.get("seed"), "n_train": counts.get("train", {}).get("scenes"),
            "n_val": counts.get("val", {}).get("scenes"), "n_test": counts.get("test", {}).get("scenes"),
            "turns_per_record": world.get("turns_per_record"), "train_questions": world.get("train_questions"),
            "prompt_layout": world.get("prompt_layout"), "answer_style": world.get("answer_style")}
    want = {"seed": spec.seed, "n_train": spec.n_train, "n_val": spec.n_val, "n_test": spec.n_test,
            "turns_per_record": spec.turns_per_record, "train_questions": spec.train_questions,
            "prompt_layout": PROMPT_LAYOUT,  # older worlds asked image-first
            "answer_style": ANSWER_STYLE}  # and answered relations and options in one word
    differ = [f"{k}: {have[k]!r} on disk, {want[k]!r} in the config" for k in want if have[k] != want[k]]
    if differ:
        raise ConfigError(f"{world_dir} holds a world generated with other settings ({'; '.join(differ)}); "
                          "delete it or point world.dir elsewhere")
