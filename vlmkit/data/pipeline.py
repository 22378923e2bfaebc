"""Record -> Sample, skipping and counting what cannot be used (docs/architecture.md, "Data flow").

`SamplePipeline.encode(item)` decodes and tiles the record's images (data/prompt.py's
`encode_images`, the same path prompts take at inference; with a NativeImageProcessor images and
videos become patch rows and grids, carried by the Sample), tokenises
it with the chat template (data/template.py `encode_record`, which also builds the loss mask) and
returns a Sample, or None for a record that cannot be used. Each skip is counted under a stable
reason and the record is named in the log (logger "vlmkit.data"):

    malformed_json, malformed_record, unknown_role, remote_image, path_escapes_root, no_caption,
    empty_text (from the readers);  missing_image, empty_image, truncated_image, not_an_image,
    image_too_large (images);  unexpected_video, missing_video, empty_video, ... (videos);
    no_assistant_turn, placeholder_mismatch, no_supervised_tokens (template and here);  too_long
    (over max_length and not truncatable, or overflow="drop").

A sample longer than `max_length` is cut to it when overflow="truncate" (counted as truncated)
unless the cut would split an image's visual tokens, in which case it is dropped as too_long.
Past `min_records` records, a bad fraction above `max_bad_fraction` stops the run with
TooManyBadRecords naming examples of each reason: a broken source fails loudly, early.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from vlmkit.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.data.formats import BadRecord, Item
from vlmkit.data.images import ImageProcessor
from vlmkit.data.native_images import NativeImageProcessor
from vlmkit.data.prompt import VisualInputs, encode_images
from vlmkit.data.template import encode_record
from vlmkit.data.types import Record, Sample
from vlmkit.errors import BadRecordError, VlmkitError

log = logging.getLogger("vlmkit.data")
EXAMPLES_PER_REASON = 3


class TooManyBadRecords(VlmkitError):
    """A source has more unusable records than the run allows (RunConfig.max_bad_fraction)."""


class BadDataStats:
    """Counts of seen / ok / truncated records and of bad ones by reason, with a few examples each."""

    def __init__(self, name: str = "data"):
        self.name = name
        self.seen = self.ok = self.truncated = 0
        self.bad: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add_bad(self, reason: str, description: str) -> None:
        self.bad[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(description)
        level = logging.WARNING if self.bad[reason] <= 10 else logging.DEBUG
        log.log(level, "%s: skipped %s", self.name, description)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def check(self, max_bad_fraction: float, min_records: int) -> None:
        if self.seen >= min_records and self.num_bad > max_bad_fraction * self.seen:
            examples = "; ".join(f"{r} x{n} (e.g. {self.examples[r][0]})" for r, n in self.bad.most_common(5))
            raise TooManyBadRecords(
                f"source {self.name!r}: {self.num_bad} of {self.seen} records are unusable "
                f"({self.num_bad / self.seen:.1%} > max_bad_fraction {max_bad_fraction:.1%}): {examples}. "
                "Fix the data or raise max_bad_fraction.")

    def summary(self) -> str:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.bad.items())) or "none"
        return (f"{self.name}: {self.seen} records, {self.ok} ok, {self.num_bad} skipped ({reasons}), "
                f"{self.truncated} truncated")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "ok": self.ok, "truncated": self.truncated, "bad": dict(self.bad),
                "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.ok = int(state.get("seen", 0)), int(state.get("ok", 0))
        self.truncated = int(state.get("truncated", 0))
        self.bad = Counter(state.get("bad", {}))
        self.examples = {k: list(v) for k, v in state.get("examples", {}).items()}


def check_record(record: Record) -> None:
    """Structural checks worth doing before any image is decoded; raises BadRecordError."""
    if record.kind == "text":
        if not record.text.strip():
            raise BadRecordError("empty_text", "text is empty", record.id)
        return
    if not any(m.role == "assistant" and m.content.strip() for m in record.messages):
        raise BadRecordError("no_assistant_turn", "the conversation has no non-empty assistant turn", record.id)
    for placeholder, found, what in ((IMAGE_PLACEHOLDER, record.images, "images"),
                                     (VIDEO_PLACEHOLDER, record.videos, "videos")):
        placeholders = sum(m.content.count(placeholder) for m in record.messages)
        if placeholders != len(found):
            raise BadRecordError("placeholder_mismatch", f"{placeholders} {placeholder} placeholders but "
                                 f"{len(found)} {what}", record.id)


def describe(record: Record, error: BadRecordError) -> str:
    """`file:line (record ID): reason: message` for logs and error examples."""
    message = str(error).removesuffix(f" (record {record.id})")
    return f"{record.meta.get('where', record.source)} (record {record.id}): {message}"


def record_visuals(record: Record, processor, tokens_per_tile: int) -> VisualInputs:
    """A record's images (and videos) decoded, checked and tiled by `processor`; errors name the record."""
    if not record.images and not record.videos:
        return VisualInputs(pixel_values=None)
    try:
        return encode_images(record.images, processor, tokens_per_tile, record.videos)
    except BadRecordError as e:
        raise BadRecordError(e.reason, str(e), record.id) from None


class SamplePipeline:
    """Record -> Sample with bad-record accounting; see the module docstring for the reasons."""

    def __init__(self, tokenizer, processor: ImageProcessor | NativeImageProcessor | None, tokens_per_image: int, *,
                 max_length: int | None = None, overflow: str = "truncate", max_bad_fraction: float = 0.01,
                 min_records: int = 100, name: str = "data"):
        if overflow not in ("truncate", "drop"):
            raise VlmkitError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        self.tokenizer, self.processor = tokenizer, processor
        self.tokens_per_image = tokens_per_image
        self.max_length, self.overflow = max_length, overflow
        self.max_bad_fraction, self.min_records = max_bad_fraction, min_records
        self.stats = BadDataStats(name)

    def encode(self, item: Item) -> Sample | None:
        """A Sample, or None when the item is skipped (counted; TooManyBadRecords past the limit)."""
        self.stats.seen += 1
        try:
            if isinstance(item, BadRecord):
                raise BadRecordError(item.reason, item.message, item.record_id)
            sample = self._encode(item)
        except BadRecordError as e:
            self.stats.add_bad(e.reason, str(item) if isinstance(item, BadRecord) else describe(item, e))
            sample = None
        else:
            self.stats.ok += 1
        self.stats.check(self.max_bad_fraction, self.min_records)
        return sample

    def _encode(self, record: Record) -> Sample:
        check_record(record)
        visual = self._visual(record)
        input_ids, labels = encode_record(record, self.tokenizer, visual.visual_tokens, visual.video_tokens)
        input_ids, labels = self._fit(record, list(input_ids), list(labels))
        if all(t == IGNORE_INDEX for t in labels[1:]):  # labels[0] is never a target
            raise BadRecordError("no_supervised_tokens", "no supervised token is left after templating", record.id)
        return visual.sample(record.id, record.source, input_ids, labels)

    def _visual(self, record: Record) -> VisualInputs:
        """The record's images (and videos) decoded, checked and tiled; errors name the record."""
        if (record.images or record.videos) and self.processor is None:
            raise BadRecordError("unexpected_image", "this source is read without an image processor", record.id)
        return record_visuals(record, self.processor, self.tokens_per_image)

    def pixels(self, record: Record) -> torch.Tensor | None:
        """The (N, 3, S, S) tiles (native: (P, D) patch rows) of a record that encode() accepted,
        made again (for the packer, when its buffer is past its byte cap for tiles)."""
        return self._visual(record).pixel_values

    def _fit(self, record: Record, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        limit = self.max_length
        if limit is None or len(input_ids) <= limit:
            return input_ids, labels
        visual_ids = {getattr(self.tokenizer, "image_token_id", None), getattr(self.tokenizer, "video_token_id", None)}
        cut_visual = (record.images or record.videos) and not visual_ids.isdisjoint(input_ids[limit:])
        if self.overflow == "drop" or cut_visual:
            raise BadRecordError("too_long", f"{len(input_ids)} tokens > max_length {limit}"
                                 + (" (cutting would split an image)" if self.overflow == "truncate" else ""),
                                 record.id)
        self.stats.truncated += 1
        log.debug("%s: truncated %s from %d to %d tokens", self.stats.name, record.id, len(input_ids), limit)
        return input_ids[:limit], labels[:limit]

    def log_summary(self) -> str:
        text = self.stats.summary()
        log.info("%s", text)
        return text

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)
