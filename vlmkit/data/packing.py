"""Packing, not padding: samples concatenated into flat micro-batches of at most `budget` tokens.

As lmms-engine's packing + "rmpad": a PackedBatch is one flat sequence (T,) with cu_seqlens
marking where each sample starts, position ids restarting at 0 per sample and every image tile
in sample order, so attention and positions never cross samples and no compute goes to padding.
A sample's length already counts its visual tokens (every tile), so the budget bounds real cost.

`SourceStream` reads one source for one data-parallel rank, a disjoint share: every world-th
row, or for a directory of at least `world` shard files (WebDataset, parquet, arrow) every
world-th file, so no rank reads another's bytes. Epoch after epoch, shuffled in blocks by (seed,
epoch, block). Each item carries its position
(epoch, index), which is what a cursor stores. Its files are listed once, when it is made; one
that later cannot be read (deleted, permissions, an I/O error) raises `UnreadableSource`, which
the stage's data counts as a bad source (train/data.py).

`Packer` keeps a buffer of encoded samples and fills each pack first-fit-decreasing: longest
first, then whatever still fits, so the short samples the buffer accumulates close the gaps
(>= 98% of the budget on a log-uniform 16..512 mix at 4096). A sample passed over `max_wait`
times goes first, so none starves. Its cursor (`state_dict`) is a small JSON-able dict: the
stream position, the positions of the buffered samples and the pipeline's counters; restoring it
re-reads and re-encodes those few samples, so the following packs are exactly the same.

Samples of native-resolution models (data/native_images.py) carry patch rows instead of tiles,
and their image and video grids (`grid_thw`) and seconds per temporal group are concatenated in
sample order beside them.

Shape suffixes: T = tokens of a pack, S = samples, N = image tiles; native: P = patch rows, D =
values per row, I = images, V = videos.
"""

from __future__ import annotations

import errno
import functools
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlmkit.data.formats import Item, data_files, read_records
from vlmkit.data.types import PackedBatch, Sample
from vlmkit.errors import ConfigError, VlmkitError

SHARDED_FORMATS = ("webdataset", "parquet", "hf_dataset")  # directories of similar-sized shard files
Position = tuple[int, int]  # (epoch, index of the item in this rank's shuffled epoch)


class UnreadableSource(VlmkitError):
    """A source's data could not be read while streaming (a file deleted, its permissions taken
    away, an I/O error); `source` names it, `error` is the OSError."""

    def __init__(self, source: str, error: OSError):
        self.source, self.error = source, error
        super().__init__(f"data source {source!r} cannot be read: {error}")


def path_not_found(path: str | Path) -> FileNotFoundError:
    """The error opening a vanished data path raises (read_records takes a missing path for a
    mistake in the config, a ConfigError; mid-run it is an unreadable file)."""
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))


def collate(samples: list[Sample], budget: int) -> PackedBatch:
    """Concatenate samples into one PackedBatch (no padding)."""
    lengths = [len(s) for s in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)  # (S+1,)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return PackedBatch(
        input_ids=torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long),  # (T,)
        labels=torch.tensor([t for s in samples for t in s.labels], dtype=torch.long),  # (T,)
        position_ids=torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]) if samples
        else torch.zeros(0, dtype=torch.long),  # (T,)
        cu_seqlens=cu,
        pixel_values=_cat_or_none([s.pixel_values for s in samples]),  # (N, 3, H, W); native (P, D)
        tiles_per_image=[n for s in samples for n in s.tiles_per_image],
        sample_ids=[s.id for s in samples],
        sources=[s.source for s in samples],
        budget=budget,
        image_grid_thw=_cat_or_none([s.image_grid_thw for s in samples]),  # (I, 3)
        pixel_values_videos=_cat_or_none([s.pixel_values_videos for s in samples]),  # (P, D)
        video_grid_thw=_cat_or_none([s.video_grid_thw for s in samples]),  # (V, 3)
        second_per_grid_ts=[t for s in samples for t in s.second_per_grid_ts],
    )


def _cat_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The samples' tensors of one field concatenated in sample order; None when none has one."""
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None


class SourceStream:
    """One source's items for one rank, in a seeded order; `loop=False` reads one epoch."""

    def __init__(self, path: str | Path, format: str = "auto", *, root=None, kind=None, name: str | None = None,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle_block: int = 1024, loop: bool = True,
                 reader: Callable[[], Iterator[Item]] | None = None):
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world size {world}")
        self.name = name or Path(path).stem
        self.rank, self.world, self.seed = rank, world, seed
        self.row_shards = True  # every world-th row; or whole shard files per rank (below)
        if reader is None:
            fmt, files = data_files(path, format)
            if fmt in SHARDED_FORMATS and world > 1 and len(files) >= world:
                files, self.row_shards = files[rank::world], False
            reader = functools.partial(self._read_files, path, format, root, kind, files)
        self._read = reader
        self.shuffle_block, self.loop = shuffle_block, loop

    def _read_files(self, path, format: str, root, kind, files: list[Path]) -> Iterator[Item]:
        if not Path(path).exists():
            raise path_not_found(path)
        yield from read_records(path, format, root=root, kind=kind, source=self.name, files=files)

    def _items(self) -> Iterator[Item]:
        """One pass over the source's items; UnreadableSource when a file cannot be read."""
        try:
            yield from self._read()
        except OSError as e:
            raise UnreadableSource(self.name, e) from e

    def _epoch(self, epoch: int) -> Iterator[Item]:
        block: list[Item] = []
        n_blocks = 0
        for i, item in enumerate(self._items()):
            if self.row_shards and i % self.world != self.rank:
                continue
            block.append(item)
            if len(block) == self.shuffle_block:
                yield from self._shuffled(block, epoch, n_blocks)
                block, n_blocks = [], n_blocks + 1
        yield from self._shuffled(block, epoch, n_blocks)

    def _shuffled(self, block: list[Item], epoch: int, n: int) -> list[Item]:
        if self.shuffle_block > 1:
            random.Random(f"{self.seed}:{epoch}:{n}").shuffle(block)
        return block

    def iter_from(self, start: Position = (0, 0)) -> Iterator[tuple[Position, Item]]:
        epoch = start[0]
        while True:
            empty = True
            for index, item in enumerate(self._epoch(epoch)):
                empty = False
                if (epoch, index) >= start:
                    yield (epoch, index), item
            if empty:
                raise ConfigError(f"data source {self.name!r} has no records for rank {self.rank} of {self.world}")
            if not self.loop:
                return
            epoch += 1


@dataclass
class _Entry:
    pos: Position
    sample: Sample  # pixel_values dropped while buffered (past the byte cap) when the pipeline can redo them
    wait: int = 0
    item: Item | None = None  # the record whose pixels are redone at pack time
    pixel_bytes: int = 0  # bytes of pixel_values this entry keeps in the buffer


class PackSource:
    """A source of packs: call `next_pack()` until it raises StopIteration, or iterate."""

    def next_pack(self) -> PackedBatch:
        raise NotImplementedError

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            try:
                yield self.next_pack()
            except StopIteration:
                return


class Packer(PackSource):
    """Packs one stream's samples into PackedBatch by a token budget; iterate or call next_pack().

    `pipeline` is anything with `encode(item) -> Sample | None` (None: skipped and counted) and
    `state_dict()` / `load_state_dict()` for its counters (data/pipeline.py's SamplePipeline).
    If it also has `pixels(record) -> (N, 3, S, S)`, buffered samples keep their tiles only up to
    `max_pixel_bytes` in all (a buffer of hundreds of multi-tile images would take gigabytes); the
    others drop them and the tiles are made again when packed. Small images are thus decoded once.
    """

    def __init__(self, stream: SourceStream, pipeline, budget: int, *, buffer_size: int = 256, max_wait: int = 64,
                 max_pixel_bytes: int = 256 << 20):
        if budget <= 0 or buffer_size <= 0:
            raise ConfigError(f"packing needs budget > 0 and buffer_size > 0, got {budget}, {buffer_size}")
        self.stream, self.pipeline, self.budget = stream, pipeline, budget
        self.buffer_size, self.max_wait = buffer_size, max_wait
        # Buffered samples keep their decoded tiles up to this many bytes; past it they drop them and
        # the pipeline decodes the image again when the sample is packed (large tiled images).
        self.max_pixel_bytes = max_pixel_bytes
        self._pixel_bytes = 0
        self.buffer: list[_Entry] = []
        self.next_pos: Position = (0, 0)
        self.packs = 0
        self._items: Iterator[tuple[Position, Item]] | None = None
        self._exhausted = False
        self._barren_epochs = 0  # epoch starts since the last usable sample

    # --- filling -------------------------------------------------------------------------------
    def _fill(self) -> None:
        if self._items is None:
            self._items = self.stream.iter_from(self.next_pos)
        while len(self.buffer) < self.buffer_size and not self._exhausted:
            try:
                pos, item = next(self._items)
            except StopIteration:
                self._exhausted = True
                break
            if pos[0] != self.next_pos[0]:  # a new epoch began
                self._barren_epochs += 1
                if self._barren_epochs >= 2:
                    raise ConfigError(f"data source {self.stream.name!r}: a whole epoch gave no usable record "
                                      "(see the skipped-record log)")
            self.next_pos = (pos[0], pos[1] + 1)
            sample = self.pipeline.encode(item)
            if sample is None:
                continue
            self._barren_epochs = 0
            if len(sample) > self.budget:
                raise ConfigError(f"sample {sample.id} has {len(sample)} tokens, more than the packing budget "
                                  f"{self.budget}; set the pipeline's max_length <= the budget")
            self.buffer.append(self._entry(pos, sample, item))

    def _entry(self, pos: Position, sample: Sample, item: Item, wait: int = 0) -> _Entry:
        """Buffer a sample. Its image tiles stay while the buffer's tiles fit in max_pixel_bytes;
        past that they are dropped and redone when packed (if the pipeline can redo them)."""
        if sample.pixel_values is None:
            return _Entry(pos, sample, wait)
        nbytes = sample.pixel_values.numel() * sample.pixel_values.element_size()
        if self._pixel_bytes + nbytes <= self.max_pixel_bytes or not hasattr(self.pipeline, "pixels"):
            self._pixel_bytes += nbytes
            return _Entry(pos, sample, wait, pixel_bytes=nbytes)
        return _Entry(pos, replace(sample, pixel_values=None), wait, item)

    def _unbuffer(self, entry: _Entry) -> Sample:
        self._pixel_bytes -= entry.pixel_bytes
        if entry.item is None:
            return entry.sample
        return replace(entry.sample, pixel_values=self.pipeline.pixels(entry.item))  # (N, 3, S, S)

    # --- packing -------------------------------------------------------------------------------
    def next_pack(self) -> PackedBatch:
        """The next pack; raises StopIteration when a finite stream is used up."""
        self._fill()
        if not self.buffer:
            if hasattr(self.pipeline, "log_summary"):
                self.pipeline.log_summary()  # the end of a finite pass: what was skipped, and why
            raise StopIteration
        overdue = sorted((e for e in self.buffer if e.wait >= self.max_wait), key=lambda e: e.pos)
        rest = sorted((e for e in self.buffer if e.wait < self.max_wait), key=lambda e: (-len(e.sample), e.pos))
        room, chosen = self.budget, []
        for entry in overdue + rest:  # first fit, longest first
            if len(entry.sample) <= room:
                chosen.append(entry)
                room -= len(entry.sample)
        taken = {id(e) for e in chosen}
        self.buffer = [e for e in self.buffer if id(e) not in taken]
        for e in self.buffer:
            e.wait += 1
        self.packs += 1
        chosen.sort(key=lambda e: e.pos)
        return collate([self._unbuffer(e) for e in chosen], self.budget)

    # --- cursor --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next": list(self.next_pos), "packs": self.packs, "exhausted": self._exhausted,
                "buffer": [[*e.pos, e.wait] for e in self.buffer],
                "pipeline": self.pipeline.state_dict() if hasattr(self.pipeline, "state_dict") else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor: the buffered samples are re-read and re-encoded, then reading goes on."""
        self.next_pos = (int(state["next"][0]), int(state["next"][1]))
        self.packs, self._exhausted = int(state["packs"]), bool(state["exhausted"])
        waits = {(int(e), int(i)): int(w) for e, i, w in state["buffer"]}
        self.buffer, self._pixel_bytes = [], 0
        if waits:
            for pos, item in self.stream.iter_from(min(waits)):
                if pos >= self.next_pos:
                    break
                if pos in waits:
                    sample = self.pipeline.encode(item)
                    if sample is None:
                        raise ConfigError(f"cannot restore the data cursor: buffered item {pos} of source "
                                          f"{self.stream.name!r} no longer encodes (did the data change?)")
                    self.buffer.append(self._entry(pos, sample, item, waits[pos]))
            if len(self.buffer) != len(waits):
                raise ConfigError(f"cannot restore the data cursor of source {self.stream.name!r}: "
                                  f"{len(waits) - len(self.buffer)} buffered items are gone (did the data change?)")
        if hasattr(self.pipeline, "load_state_dict"):
            self.pipeline.load_state_dict(state.get("pipeline", {}))
        self._items = None


def packing_efficiency(batches: list[PackedBatch]) -> float:
    """Real tokens / budget, averaged over packs (1.0 = no room left in any pack)."""
    return sum(b.num_tokens / b.budget for b in batches) / max(len(batches), 1)
