"""What `vlmkit data inspect` reports about data files: records by modality, bad records by reason
(with examples), truncated samples, a histogram of text-token lengths, and the packing efficiency
the data reaches at a budget. Each file is read with the format readers and every image decoded
(the same checks as training).

Token lengths: with a tokenizer every record goes through the real pipeline (chat template, loss
mask) and lengths are exact. Without one, lengths are byte-level: the UTF-8 bytes of the text
(placeholders removed) plus the visual tokens. A byte-level count is an upper bound on any
byte-level BPE tokenizer's count (typically 3-5x more than a trained one on English), so it is
useful for spotting outliers and bad records, not for sizing budgets; pass a tokenizer for that.
Visual tokens are `tiles * tokens_per_image` (tiles per `image_size` / `max_tiles`); videos are
checked for structure only (decoding them needs a native-resolution processor).
"""

from __future__ import annotations

from collections import Counter

from vlmkit.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.data.formats import Item
from vlmkit.data.images import ImageProcessor
from vlmkit.data.packing import Packer, SourceStream
from vlmkit.data.pipeline import SamplePipeline, check_record
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.types import Record, Sample

HISTOGRAM_EDGES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ByteLengthPipeline(SamplePipeline):
    """SamplePipeline whose samples are byte-level lengths: no tokenizer or template needed.

    Same checks and counting as training (readers, structure, every image decoded); the sample's
    ids are placeholders of the right length (UTF-8 bytes of the text + visual tokens).
    """

    def _encode(self, record: Record) -> Sample:
        check_record(record)
        tiles = [self.processor.num_tiles(*self.processor.load(ref).size) for ref in record.images]
        text = record.text if record.kind == "text" else "".join(m.content for m in record.messages)
        text = text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
        n = len(text.encode("utf-8")) + sum(tiles) * self.tokens_per_image
        ids, labels = self._fit(record, [0] * n, [0] * n)
        return Sample(record.id, record.source, ids, labels, None, tiles)


class _Inspector:
    """The packer's pipeline for inspect: counts lengths and modalities; never stops a run."""

    def __init__(self, pipeline: SamplePipeline):
        self.pipeline, self.stats = pipeline, pipeline.stats
        self.text_lengths: list[int] = []
        self.modalities: Counter[str] = Counter()

    def encode(self, item: Item) -> Sample | None:
        sample = self.pipeline.encode(item)
        if sample is None:
            return None
        visual = sum(sample.tiles_per_image) * self.pipeline.tokens_per_image
        self.text_lengths.append(len(sample) - visual)
        self.modalities[sample.modality] += 1
        sample.pixel_values = None  # lengths are all the packer needs here
        return sample


def inspect_paths(paths: list[str], *, fmt: str = "auto", root: str | None = None, tokenizer_dir: str | None = None,
                  budget: int = 4096, tokens_per_image: int = 64, image_size: int = 384, max_tiles: int = 1) -> dict:
    """Read every record of `paths` and return the report `vlmkit data inspect --json` prints."""
    tokenizer = Tokenizer.load(tokenizer_dir) if tokenizer_dir is not None else None
    processor = ImageProcessor(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_tiles=max_tiles)
    kind = SamplePipeline if tokenizer is not None else ByteLengthPipeline
    inspector = _Inspector(kind(tokenizer, processor, tokens_per_image, max_length=budget, max_bad_fraction=1.0,
                                name="inspect"))
    packs = 0
    tokens = 0
    for path in paths:
        stream = SourceStream(path, fmt, root=root, shuffle_block=1, loop=False)
        for batch in Packer(stream, inspector, budget):
            packs += 1
            tokens += batch.num_tokens
    lengths = inspector.text_lengths
    stats = inspector.stats
    return {
        "paths": [str(p) for p in paths],
        "records": stats.seen,
        "ok": stats.ok,
        "bad": dict(sorted(stats.bad.items())),
        "bad_examples": stats.examples,
        "truncated": stats.truncated,
        "modality": dict(inspector.modalities),
        "tokenizer": tokenizer_dir or "bytes",
        "text_tokens": {"mean": sum(lengths) / len(lengths) if lengths else 0.0, "max": max(lengths, default=0),
                        "histogram": _histogram(lengths)},
        "budget": budget,
        "packs": packs,
        "packing_efficiency": tokens / (packs * budget) if packs else 0.0,
    }


def _histogram(lengths: list[int]) -> dict[str, int]:
    bins = Counter()
    for n in lengths:
        upper = next((e for e in HISTOGRAM_EDGES if n < e), None)
        bins[f"<{upper}" if upper else f">={HISTOGRAM_EDGES[-1]}"] += 1
    order = [f"<{e}" for e in HISTOGRAM_EDGES] + [f">={HISTOGRAM_EDGES[-1]}"]
    return {k: bins[k] for k in order if bins[k]}


def format_report(report: dict) -> str:
    lines = [f"{', '.join(report['paths'])}",
             f"records: {report['records']}  ok: {report['ok']}  bad: {sum(report['bad'].values())}  "
             f"truncated: {report['truncated']}  by modality: {report['modality']}"]
    for reason, n in report["bad"].items():
        lines.append(f"  bad {reason}: {n}  e.g. {report['bad_examples'][reason][0]}")
    t = report["text_tokens"]
    lines.append(f"text tokens ({report['tokenizer']}): mean {t['mean']:.1f}, max {t['max']}")
    peak = max(t["histogram"].values(), default=1)
    for label, n in t["histogram"].items():
        lines.append(f"  {label:>7} {n:8d} {'#' * max(1, round(40 * n / peak))}")
    lines.append(f"packing at budget {report['budget']}: {report['packs']} packs, "
                 f"efficiency {report['packing_efficiency']:.1%}")
    return "\n".join(lines)
