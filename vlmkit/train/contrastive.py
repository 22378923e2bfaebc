"""A `kind: contrastive` stage: the vision tower learns from image-caption pairs with SigLIP's
sigmoid loss (models/contrastive.py), before any stage that reads its features.

Data. The stage's mixture names caption sources (records with one image and a caption: LLaVA
caption files, WebDataset / parquet image-text rows). Each record becomes a pair: its image as one
tile of the tower's size (the whole image, resized: a tiling model's tiles are a later stage's
business), and the caption's own tokens plus the end-of-text token, with no chat template. A
micro-batch is `contrastive.pairs_per_step` pairs of one source (drawn by weight, as data/mixture.py
draws packs); its captions run through the text tower as one packed sequence (data/packing.py's
`collate`: `cu_seqlens`, positions restarting per caption). The sigmoid loss scores each
micro-batch's pairs all against all: with `grad_accum` > 1 the negatives of a pair are those of
its own micro-batch. Pairs whose captions are identical (the synthetic world repeats short ones)
are positives of each other, not negatives.

What learns: the vision tower (`vision_lr`) through the features the adapter reads
(`feature_layer`; blocks past it get no gradient), and the stage's heads (`contrastive.heads_lr`):
an image head, a text side of its own and the learned scale and bias. The text side is the
stage's own rather than the LLM's embeddings, so the stage works wherever it sits in a curriculum
(first, before the LLM has learned any language; or on a pretrained LLM it must not disturb): a
small causal tower, or with `text_layers: 0` a bag of its own word embeddings (models/contrastive.py,
`TextTower`; what each costs and reaches on the demo world: docs/training.md, "Vision
pretraining"). The heads are dropped at the stage end; the tower carries over.

Held-out retrieval (`evaluate`): over the first `contrastive.eval_pairs` pairs of the eval source,
image -> caption and caption -> image top-1 accuracy by cosine similarity; a retrieval counts as a
hit when the retrieved caption is the same text as the true one (several scenes can share a
caption), and the chance level is computed the same way (1 / N when all captions differ).

Resume: the cursor is the mixture's (each source's stream position and bad-record counters); the
heads are checkpointed by the trainer (heads.safetensors).

Fixed-size towers only (SigLIP / CLIP / AIMv2 style): a native-resolution tower is refused with a
ConfigError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.config import RunConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.images import ImageProcessor
from vlmkit.data.mixture import Mixture, MixtureSource
from vlmkit.data.packing import Position, SourceStream, collate
from vlmkit.data.pipeline import SamplePipeline
from vlmkit.data.types import PackedBatch, Record, Sample
from vlmkit.errors import BadRecordError, ConfigError
from vlmkit.models.config import VisionConfig
from vlmkit.models.contrastive import ContrastiveHeads
from vlmkit.train.data import source_modality
from vlmkit.train.objective import Objective
from vlmkit.train.precision import forward_precision
from vlmkit.train.stages import stage_seed

HELD_OUT_SEED = 0
"""Held-out pairs are read in file order (no shuffle); the seed only names the stream."""
SHUFFLE_BLOCK = 1024
"""Training pairs are shuffled in blocks of this many records, as sft stages read their sources."""


def single_tile_processor(vision: VisionConfig) -> ImageProcessor:
    """Images -> one tile of the tower's size (the whole image, resized), normalised as the tower expects."""
    return ImageProcessor(image_size=vision.image_size, mean=vision.image_mean, std=vision.image_std)


class CaptionPairPipeline(SamplePipeline):
    """Record -> an image-caption pair as a Sample: `pixel_values` (1, 3, S, S), `input_ids` the
    caption's tokens and the end-of-text token (nothing supervised). Records that are not one
    image with a caption are skipped and counted (`not_a_pair`), as SamplePipeline counts its own."""

    def _encode(self, record: Record) -> Sample:
        if len(record.images) != 1 or record.videos:
            raise BadRecordError("not_a_pair", f"a contrastive pair needs exactly one image, got {len(record.images)} "
                                 f"image(s) and {len(record.videos)} video(s)", record.id)
        caption = "\n".join(m.content.strip() for m in record.messages if m.role == "assistant").strip()
        if not caption:
            raise BadRecordError("no_caption", "the record has no caption (assistant turn)", record.id)
        visual = self._visual(record)
        ids = self.tokenizer.encode(caption)
        if len(ids) >= self.max_length:  # keep room for the end-of-text token the text tower pools at
            ids = ids[:self.max_length - 1]
            self.stats.truncated += 1
        ids.append(self.tokenizer.eos_id)
        return visual.sample(record.id, record.source, ids, [IGNORE_INDEX] * len(ids))


class PairBatches:
    """One source's pairs for one rank, `pairs` per micro-batch, in the stream's order.

    It has the interface a Mixture draws from (Packer's: `next_pack`, `state_dict` /
    `load_state_dict`, `pipeline`), so several caption sources mix by weight as packs do. The
    cursor is the next stream position and the pipeline's counters: restoring it re-reads from
    there, so the following batches are exactly the same."""

    def __init__(self, stream: SourceStream, pipeline: CaptionPairPipeline, pairs: int):
        self.stream, self.pipeline, self.pairs = stream, pipeline, pairs
        self.next_pos: Position = (0, 0)
        self._items = None

    def next_pack(self) -> PackedBatch:
        """The next `pairs` pairs (fewer at the end of a finite stream); StopIteration when used up."""
        if self._items is None:
            self._items = self.stream.iter_from(self.next_pos)
        samples, start_epoch = [], self.next_pos[0]
        for pos, item in self._items:
            if pos[0] > start_epoch + 1 and not samples:
                raise ConfigError(f"data source {self.stream.name!r}: a whole epoch gave no usable pair "
                                  "(see the skipped-record log)")
            self.next_pos = (pos[0], pos[1] + 1)
            sample = self.pipeline.encode(item)
            if sample is not None:
                samples.append(sample)
                if len(samples) == self.pairs:
                    break
        if not samples:
            raise StopIteration
        return collate(samples, budget=sum(len(s) for s in samples))

    def state_dict(self) -> dict:
        return {"next": list(self.next_pos), "pipeline": self.pipeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.next_pos = (int(state["next"][0]), int(state["next"][1]))
        self.pipeline.load_state_dict(state["pipeline"])
        self._items = None


def captions_of(batch: PackedBatch) -> list[tuple[int, ...]]:
    """Each pair's caption tokens."""
    cu, ids = batch.cu_seqlens.tolist(), batch.input_ids.tolist()
    return [tuple(ids[cu[i]:cu[i + 1]]) for i in range(len(cu) - 1)]


def caption_groups(captions: list[tuple[int, ...]]) -> torch.Tensor:
    """(N,) int64: equal numbers for the pairs whose captions are the same tokens."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(c, len(seen)) for c in captions], dtype=torch.long)


def retrieval_accuracy(img_emb: torch.Tensor, txt_emb: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Top-1 retrieval over N pairs by cosine similarity: image -> caption (`i2t`) and caption ->
    image (`t2i`), a hit when the retrieved pair's caption equals the query's (`groups`, from
    `caption_groups`); `chance`: the accuracy of a uniformly random pick under the same rule."""
    sims = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T  # (N, N)
    groups = groups.to(sims.device)
    same = groups[:, None] == groups[None, :]  # (N, N)
    return {"i2t": float((groups[sims.argmax(dim=1)] == groups).float().mean()),
            "t2i": float((groups[sims.argmax(dim=0)] == groups).float().mean()),
            "chance": float(same.float().mean())}


class ContrastiveObjective(Objective):
    """The data, loss and held-out retrieval of a `kind: contrastive` stage (module docstring)."""

    def __init__(self, trainer, index: int):
        super().__init__(trainer, index)
        model, cfg, settings = trainer.model, trainer.cfg, self.stage.contrastive
        if model.config.is_native:
            raise ConfigError(f"stage {self.stage.name!r}: contrastive stages need a fixed-size vision tower "
                              "(siglip / clip / aimv2 style); native-resolution towers are not supported")
        self.settings = settings
        self.heads_lr = settings.heads_lr
        self.device = trainer.ctx.device
        self.processor = single_tile_processor(model.config.vision)
        self.mixture = Mixture(self._sources(cfg, index), seed=stage_seed(cfg, index))
        self.eval_name = settings.eval_source or next(
            (n for n in cfg.eval_sources if cfg.data[n].kind == "caption"), None)
        self._held_out: list[PackedBatch] | None = None
        with torch.random.fork_rng(devices=[]):  # the heads' draws leave the run's RNG as it was
            torch.manual_seed(stage_seed(cfg, index))
            self._heads = ContrastiveHeads(
                vision_width=model.config.vision.hidden_size, num_patches=model.config.vision.num_patches,
                patch_dim=settings.image_patch_dim, vocab_size=trainer.tokenizer.vocab_size,
                embed_dim=settings.embed_dim, text_hidden_size=settings.text_hidden_size,
                text_layers=settings.text_layers, text_heads=settings.text_heads,
                max_caption_tokens=settings.max_caption_tokens, temperature_init=settings.temperature_init,
                bias_init=settings.bias_init).to(self.device)
        self._heads.requires_grad_(settings.heads_lr > 0)

    def _pairs(self, cfg: RunConfig, name: str, *, seed: int, loop: bool, shuffle_block: int) -> PairBatches:
        src = cfg.data[name]
        if source_modality(src) == "text":
            raise ConfigError(f"stage {self.stage.name!r}: source {name!r} is text; a contrastive stage reads "
                              "image-caption pairs")
        stream = SourceStream(cfg.resolve(src.path), src.format, root=cfg.resolve(src.root), kind=src.kind, name=name,
                              rank=self.trainer.ctx.rank, world=self.trainer.ctx.world, seed=seed, loop=loop,
                              shuffle_block=shuffle_block)
        pipeline = CaptionPairPipeline(self.trainer.tokenizer, self.processor, 1,
                                       max_length=self.settings.max_caption_tokens,
                                       max_bad_fraction=cfg.max_bad_fraction, name=name)
        return PairBatches(stream, pipeline, self.settings.pairs_per_step)

    def _sources(self, cfg: RunConfig, index: int) -> list[MixtureSource]:
        seed = stage_seed(cfg, index)
        return [MixtureSource(name, self._pairs(cfg, name, seed=seed, loop=True, shuffle_block=SHUFFLE_BLOCK),
                              weight, "image")
                for name, weight in cfg.stage_mixture(index).items() if weight > 0]

    def heads(self) -> ContrastiveHeads:
        return self._heads

    # ------------------------------------------------------------------------------------------
    def embed(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of pairs -> image and caption embeddings (N, E) each, not yet normalised."""
        vision = self.trainer.model.vision
        pixels = batch.pixel_values.to(self.device, next(vision.parameters()).dtype)
        img = self._heads.image(vision.features(pixels))
        txt = self._heads.text(batch.input_ids.to(self.device), batch.position_ids.to(self.device),
                               batch.cu_seqlens.to(self.device))
        return img, txt

    def forward_backward(self, step: int) -> dict:
        """`grad_accum` micro-batches of pairs, each scored all against all; the step's loss is
        their mean. `tokens`: the captions' tokens plus the images' patches; `batch_i2t`: image ->
        caption top-1 within the step's own micro-batches."""
        accum = self.stage.grad_accum
        autocast = forward_precision(self.stage.precision, self.device)
        loss_sum, pairs, tokens, hits = 0.0, 0, 0, 0.0
        for _ in range(accum):
            batch = self.mixture.next_batch("image")
            groups = caption_groups(captions_of(batch)).to(self.device)
            with autocast:
                img, txt = self.embed(batch)
            loss = self._heads.loss(img.float(), txt.float(), groups[:, None] == groups[None, :])
            (loss / accum).backward()
            loss_sum += float(loss.detach())
            pairs += batch.num_samples
            tokens += batch.num_tokens + batch.pixel_values.shape[0] * self.trainer.model.config.vision.num_patches
            hits += retrieval_accuracy(img.detach(), txt.detach(), groups)["i2t"] * batch.num_samples
        return {"loss": loss_sum / accum, "pairs": pairs, "tokens": tokens, "batch_i2t": hits / pairs,
                "logit_scale": float(self._heads.logit_scale.detach().exp()),
                "logit_bias": float(self._heads.logit_bias.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Zero-shot retrieval over the held-out pairs: `retrieval_i2t/<source>`,
        `retrieval_t2i/<source>`, `retrieval_chance/<source>`, `retrieval_pairs/<source>`; {} without
        an eval source."""
        if self.eval_name is None:
            return {}
        batches = self.held_out()
        embedded = [self.embed(b) for b in batches]
        n = min(self.settings.eval_pairs, sum(b.num_samples for b in batches))
        img = torch.cat([i for i, _ in embedded])[:n]
        txt = torch.cat([t for _, t in embedded])[:n]
        groups = caption_groups([c for b in batches for c in captions_of(b)][:n])
        scores = retrieval_accuracy(img, txt, groups)
        name = self.eval_name
        return {f"retrieval_i2t/{name}": scores["i2t"], f"retrieval_t2i/{name}": scores["t2i"],
                f"retrieval_chance/{name}": scores["chance"], f"retrieval_pairs/{name}": n}

    def held_out(self) -> list[PackedBatch]:
        """The held-out pairs in batches of `pairs_per_step`, read once (the same at every eval point)."""
        if self._held_out is None:
            pairs = self._pairs(self.trainer.cfg, self.eval_name, seed=HELD_OUT_SEED, loop=False, shuffle_block=1)
            self._held_out, count = [], 0
            while count < self.settings.eval_pairs:
                try:
                    batch = pairs.next_pack()
                except StopIteration:
                    break
                self._held_out.append(batch)
                count += batch.num_samples
            if not self._held_out:
                raise ConfigError(f"stage {self.stage.name!r}: eval source {self.eval_name!r} has no usable "
                                  "image-caption pair (see the skipped-record log)")
        return self._held_out

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state)

