"""Preference data: prompts with a chosen and a rejected reply, read, encoded and packed in pairs.

    read_pairs(path, format, root)             a file or directory -> PreferencePair | BadRecord
    PairPipeline(tok, processor, ...).encode   a pair -> EncodedPair (two Samples), or None (counted)
    PairPacker(stream, pipeline, budget)       pairs -> PreferenceBatch packs, a pair never split

Two row layouts are read, from any container data/formats.py reads (JSON, JSONL, parquet, arrow):

- vlmkit's: {"id", "messages": [prompt turns, content parts as data/messages.py reads them, images
  as paths / file:// / data: URLs under the image root], "chosen": "reply" | [assistant messages],
  "rejected": the same}.
- TRL's columns: "prompt" (a string, or a list of messages whose image parts are bare
  {"type": "image"} placeholders), "chosen" and "rejected" (strings or assistant message lists), and
  "images" filling the placeholders in order (paths, bytes or HF-datasets {"bytes", "path"} structs;
  with a string prompt the images go before its text). Without "prompt", "chosen" and "rejected"
  are whole conversations and their common leading messages are the prompt (TRL's implicit prompt).

A row without a chosen or a rejected reply is a BadRecord (reasons `no_chosen`, `no_rejected`), as
is one whose replies are the same (`same_replies`: nothing to prefer); a pipeline counts them like
every other bad record (data/pipeline.py's BadDataStats) and the run goes on.

Encoding: the chosen and the rejected reply each become a Sample of the whole conversation (the
prompt's tokens and images in both), supervised on the reply only, through the same template and
image code as every other sample (data/template.py, data/prompt.py). Nothing is cut: a pair whose
two samples together exceed the pack budget is a bad record (`too_long`), so image tokens are never
truncated. Packing keeps each pair's two samples adjacent in one pack (chosen first), each its own
sample of `cu_seqlens`, so neither attends to the other and no token is padding. The packer reads
pairs in stream order and closes a pack when the next pair does not fit; its cursor is the stream
position plus the one pair held over for the next pack.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import BadRecord, image_ref, read_records, row_images, video_ref
from vlmkit.data.messages import Conversation, read_conversation, user_content
from vlmkit.data.packing import PackSource, Position, SourceStream, collate
from vlmkit.data.pipeline import SamplePipeline, check_record
from vlmkit.data.prompt import VisualInputs
from vlmkit.data.template import encode_prompt, encode_record
from vlmkit.data.types import ImageRef, Message, PackedBatch, Record, Sample, VideoRef
from vlmkit.errors import BadRecordError, ConfigError

REPLIES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """A prompt and two replies to it, images not yet decoded."""

    id: str
    source: str
    prompt: list[Message]
    """The conversation before the reply, with a placeholder per image and video."""
    chosen: list[Message]
    """The preferred reply: assistant messages (usually one)."""
    rejected: list[Message]
    images: list[ImageRef] = field(default_factory=list)
    videos: list[VideoRef] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    """`where`: the row's file:line (set by the reader)."""

    @property
    def key(self) -> str:
        """What names this pair in its source whatever the reading order (its file:line)."""
        return self.meta.get("where", self.id)


# --- rows -> PreferencePair ----------------------------------------------------------------------

def read_pairs(path: str | Path, format: str = "auto", *, root: str | Path | None = None,
               source: str | None = None) -> Iterator[PreferencePair | BadRecord]:
    """Every row of a preference file or directory, in file order (data/formats.py's readers, each
    row interpreted by `pair_from_row`)."""
    return read_records(path, format, root=root, source=source, interpret=pair_from_row)


def pair_from_row(row: dict, root: Path, rid: str, source: str) -> PreferencePair:
    """One row of either layout (module docstring) -> PreferencePair; raises BadRecordError."""
    for name in REPLIES:
        if _is_empty(row.get(name)):
            raise BadRecordError(f"no_{name}", f"the row has no {name} reply")
    if "messages" in row or "prompt" in row:
        turns = row["messages"] if "messages" in row else row["prompt"]
        chosen, rejected = row["chosen"], row["rejected"]
    else:  # TRL's implicit prompt: the replies are whole conversations sharing their start
        turns, chosen, rejected = _split_common_prompt(row["chosen"], row["rejected"])
    conversation = _read_prompt(turns, row_images(row, root), root)
    replies = [_read_reply(value, name) for value, name in ((chosen, "chosen"), (rejected, "rejected"))]
    if replies[0] == replies[1]:
        raise BadRecordError("same_replies", "chosen and rejected are the same reply")
    return PreferencePair(rid, source, conversation.messages, replies[0], replies[1], conversation.images,
                          conversation.videos)


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, list) and not value)


def _split_common_prompt(chosen, rejected) -> tuple[list, list, list]:
    """(prompt, chosen reply, rejected reply) of two whole conversations: the prompt is the longest
    run of leading messages they share."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise BadRecordError("malformed_record", "a row needs `messages` or `prompt`, or chosen and rejected "
                             "as whole conversations (message lists)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise BadRecordError("malformed_record", "chosen and rejected share no prompt messages")
    for reply, name in ((chosen[shared:], "chosen"), (rejected[shared:], "rejected")):
        if not reply:
            raise BadRecordError(f"no_{name}", f"the {name} conversation has nothing after the shared prompt")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _read_prompt(turns, images: list[ImageRef], root: Path) -> Conversation:
    """The prompt turns (a string is one user turn) with the row's image column filling its bare
    image parts in order; images and videos in parts resolve under `root`."""
    if isinstance(turns, str):
        turns = [{"role": "user", "content": user_content(turns, images) if images else turns}]
    elif images:
        turns = _fill_image_parts(turns, images)

    def resolve_image(value, where: str, role: str) -> ImageRef:
        return value if isinstance(value, ImageRef) else image_ref(value, root)

    def resolve_video(value, where: str, role: str) -> VideoRef:
        return video_ref(value, root, where)

    return read_conversation(turns, resolve_image, resolve_video)


def _fill_image_parts(turns, images: list[ImageRef]) -> list:
    """TRL's conversational prompt: each bare {"type": "image"} part takes the next image."""
    if not isinstance(turns, list):
        raise BadRecordError("malformed_record", "the prompt must be a string or a list of messages")
    filled, used = [], 0
    for turn in turns:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is None:
                    if used == len(images):
                        raise BadRecordError("placeholder_mismatch", f"the prompt has more image parts than the "
                                             f"{len(images)} image(s) of the row")
                    part = {**part, "image": images[used]}
                    used += 1
                parts.append(part)
            turn = {**turn, "content": parts}
        filled.append(turn)
    if used != len(images):
        raise BadRecordError("placeholder_mismatch", f"{len(images)} image(s) in the row but {used} bare image "
                             "part(s) in the prompt")
    return filled


def _read_reply(value, name: str) -> list[Message]:
    """A reply: a string, or a list of assistant messages (text only: images belong to the prompt)."""
    if isinstance(value, str):
        return [Message("assistant", value)]
    if not isinstance(value, list):
        raise BadRecordError("malformed_record", f"{name} must be a string or a list of assistant messages")

    def refuse(value, where: str, role: str):
        raise BadRecordError("malformed_record", f"{name} {where}: images and videos belong to the prompt")

    messages = read_conversation(value, refuse, refuse).messages
    if any(m.role != "assistant" for m in messages):
        raise BadRecordError("malformed_record", f"{name} must hold assistant messages only")
    return messages


# --- pairs -> samples ----------------------------------------------------------------------------

@dataclass
class EncodedPair:
    """A pair as two samples that share the prompt's tokens and images."""

    chosen: Sample
    rejected: Sample
    key: str
    """The pair's `PreferencePair.key`."""

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


class PairPipeline(SamplePipeline):
    """PreferencePair -> EncodedPair with SamplePipeline's accounting (bad pairs counted by reason,
    named in the log, the run stopped past `max_bad_fraction`). `max_length` bounds the two samples
    together (the pack budget): a longer pair is skipped as too_long, never cut."""

    def _encode(self, pair: PreferencePair) -> EncodedPair:
        visual = self._visual(pair)
        prompt_length = len(encode_prompt(pair.prompt, self.tokenizer, visual.visual_tokens, visual.video_tokens))
        chosen, rejected = (self._reply_sample(pair, reply, name, visual, prompt_length)
                            for reply, name in ((pair.chosen, "chosen"), (pair.rejected, "rejected")))
        encoded = EncodedPair(chosen, rejected, pair.key)
        if self.max_length is not None and len(encoded) > self.max_length:
            raise BadRecordError("too_long", f"chosen + rejected take {len(encoded)} tokens > {self.max_length}, "
                                 "the pack budget (a pair is never cut)", pair.id)
        return encoded

    def _reply_sample(self, pair: PreferencePair, reply: list[Message], name: str, visual: VisualInputs,
                      prompt_length: int) -> Sample:
        """The prompt and one reply as a sample supervised on the reply alone (a prompt's own
        assistant turns are context); the prompt's `prompt_length` tokens start it, as they start
        the generation prompt (data/template.py tokenises headers and contents apart)."""
        record = Record(f"{pair.id}:{name}", pair.source, "chat", pair.prompt + reply, pair.images,
                        videos=pair.videos)
        check_record(record)
        input_ids, labels = encode_record(record, self.tokenizer, visual.visual_tokens, visual.video_tokens)
        labels = [IGNORE_INDEX] * prompt_length + labels[prompt_length:]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadRecordError("no_supervised_tokens", f"the {name} reply has no token to score", pair.id)
        return visual.sample(record.id, pair.source, input_ids, labels)


# --- packing -------------------------------------------------------------------------------------

@dataclass
class PreferenceBatch(PackedBatch):
    """A pack of pairs: samples 2i and 2i + 1 are pair i's chosen and rejected replies."""

    pair_keys: list[str] = field(default_factory=list)
    """Each pair's key, in pack order."""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_keys)


def collate_pairs(pairs: list[EncodedPair], budget: int) -> PreferenceBatch:
    """Pairs -> one pack (data/packing.py's collate), each pair's chosen then its rejected sample."""
    packed = collate([s for p in pairs for s in (p.chosen, p.rejected)], budget)
    return PreferenceBatch(**vars(packed), pair_keys=[p.key for p in pairs])


class PairPacker(PackSource):
    """Packs one stream's pairs, in order, into PreferenceBatch of at most `budget` tokens; iterate
    or call next_pack(). Its cursor (`state_dict`) is the stream position, the position of the pair
    held over for the next pack, and the pipeline's counters; restoring it continues with exactly
    the same packs."""

    def __init__(self, stream: SourceStream, pipeline: PairPipeline, budget: int):
        self.stream, self.pipeline, self.budget = stream, pipeline, budget
        self.next_pos: Position = (0, 0)
        self.held: tuple[Position, EncodedPair] | None = None
        """The pair read but left for the next pack (it did not fit)."""
        self.packs = 0
        self._items: Iterator[tuple[Position, object]] | None = None
        self._barren_epochs = 0  # epoch starts since the last usable pair

    def _read(self) -> tuple[Position, EncodedPair] | None:
        """The next pair that encodes (bad ones are counted and skipped); None at the end of a
        finite stream."""
        if self._items is None:
            self._items = self.stream.iter_from(self.next_pos)
        for pos, item in self._items:
            if pos[0] != self.next_pos[0]:  # a new epoch began
                self._barren_epochs += 1
                if self._barren_epochs >= 2:
                    raise ConfigError(f"data source {self.stream.name!r}: a whole epoch gave no usable pair "
                                      "(see the skipped-record log)")
            self.next_pos = (pos[0], pos[1] + 1)
            pair = self.pipeline.encode(item)
            if pair is not None:
                self._barren_epochs = 0
                return pos, pair
        return None

    def next_pack(self) -> PreferenceBatch:
        """The next pack; raises StopIteration when a finite stream is used up."""
        pairs, room = [], self.budget
        while True:
            entry = self.held if self.held is not None else self._read()
            self.held = None
            if entry is None:
                break
            if len(entry[1]) > room:
                self.held = entry
                break
            pairs.append(entry[1])
            room -= len(entry[1])
        if not pairs:
            self.pipeline.log_summary()  # the end of a finite pass: what was skipped, and why
            raise StopIteration
        self.packs += 1
        return collate_pairs(pairs, self.budget)

    def state_dict(self) -> dict:
        return {"next": list(self.next_pos), "held": list(self.held[0]) if self.held is not None else None,
                "packs": self.packs, "pipeline": self.pipeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor: the held pair is read and encoded again, then reading goes on."""
        self.next_pos = (int(state["next"][0]), int(state["next"][1]))
        self.packs, self.held, self._items = int(state["packs"]), None, None
        if state["held"] is not None:
            held = (int(state["held"][0]), int(state["held"][1]))
            pos, item = next(self.stream.iter_from(held))
            pair = self.pipeline.encode(item) if pos == held else None
            if pair is None:
                raise ConfigError(f"cannot restore the data cursor of source {self.stream.name!r}: the held pair "
                                  f"{held} no longer encodes (did the data change?)")
            self.held = (held, pair)
        self.pipeline.load_state_dict(state["pipeline"])
