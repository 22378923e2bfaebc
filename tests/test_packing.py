"""data/packing.py: invariants of packs (no sample crosses a boundary, positions restart), the
efficiency on a log-uniform 16..512 mix at 4096, rank shares, and exact resume from a cursor."""

import json
import math
import random

import pytest
import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.formats import BadRecord
from vlmkit.data.packing import Packer, SourceStream, collate, packing_efficiency
from vlmkit.data.types import Record, Sample
from vlmkit.errors import ConfigError


class LengthEncoder:
    """Encodes the test's text records `"<n>"` into samples of n tokens whose ids name the record."""

    def __init__(self):
        self.seen = self.bad = 0

    def encode(self, item):
        self.seen += 1
        if isinstance(item, BadRecord):
            self.bad += 1
            return None
        n, tag = int(item.text), int(item.id)
        pixels = torch.full((1, 3, 2, 2), float(tag)) if item.meta.get("image") else None
        return Sample(item.id, item.source, [tag] * n, [IGNORE_INDEX] + [tag] * (n - 1), pixels,
                      [1] if pixels is not None else [])

    def state_dict(self):
        return {"seen": self.seen, "bad": self.bad}

    def load_state_dict(self, state):
        self.seen, self.bad = state["seen"], state["bad"]


def log_uniform_records(n, seed=0, lo=16, hi=512, images=False):
    rng = random.Random(seed)
    return [Record(str(i), "mix", "text", text=str(int(math.exp(rng.uniform(math.log(lo), math.log(hi))))),
                   meta={"image": images and i % 3 == 0}) for i in range(n)]


def stream_of(records, **kw):
    return SourceStream("mix", reader=lambda: iter(records), **kw)


def test_collate_layout():
    a = Sample("a", "s", [1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Sample("b", "s", [4, 5], [4, 5], torch.zeros(2, 3, 4, 4), [2])
    batch = collate([a, b], budget=8)
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5] and batch.labels.tolist() == [IGNORE_INDEX, 2, 3, 4, 5]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1] and batch.cu_seqlens.tolist() == [0, 3, 5]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.pixel_values.shape == (2, 3, 4, 4)
    assert batch.tiles_per_image == [2] and batch.max_seqlen == 3 and batch.modality == "image"


def test_invariants_and_efficiency():
    records = log_uniform_records(3000)
    packer = Packer(stream_of(records, loop=False), LengthEncoder(), 4096)
    packs = list(packer)
    seen = []
    for p in packs:
        assert p.num_tokens <= 4096
        cu = p.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == p.num_tokens
        for sid, s, e in zip(p.sample_ids, cu[:-1], cu[1:]):
            # No sample crosses a boundary: each span holds exactly one record's ids, positions restart.
            assert set(p.input_ids[s:e].tolist()) == {int(sid)}
            assert p.position_ids[s:e].tolist() == list(range(e - s))
            assert e - s == int(records[int(sid)].text)
        seen += p.sample_ids
    assert sorted(seen, key=int) == [r.id for r in records]  # finite pass: every sample exactly once
    assert packing_efficiency(packs) >= 0.98  # even with the drained tail of a finite pass
    training = Packer(stream_of(records, seed=1), LengthEncoder(), 4096)  # epoch-looping stream
    assert packing_efficiency([training.next_pack() for _ in range(150)]) >= 0.98


def test_rank_shares_are_disjoint_and_complete():
    records = log_uniform_records(100)
    ids = []
    for rank in range(3):
        ids.append([item.id for _, item in stream_of(records, rank=rank, world=3, loop=False).iter_from()])
    assert sum(len(x) for x in ids) == 100 and len(set().union(*ids)) == 100


def test_epochs_loop_in_a_seeded_order():
    records = log_uniform_records(50)
    a = [i.id for _, i in zip(range(120), (x for _, x in stream_of(records, seed=1, shuffle_block=16).iter_from()))]
    b = [i.id for _, i in zip(range(120), (x for _, x in stream_of(records, seed=1, shuffle_block=16).iter_from()))]
    c = [i.id for _, i in zip(range(120), (x for _, x in stream_of(records, seed=2, shuffle_block=16).iter_from()))]
    assert a == b and a != c and sorted(a[:50], key=int) == [r.id for r in records]


def test_resume_from_cursor_gives_the_same_batches():
    records = log_uniform_records(400, seed=3, images=True)
    records.insert(7, BadRecord("malformed_json", "x", "f:8"))

    def make():
        return Packer(stream_of(records, seed=5, shuffle_block=64), LengthEncoder(), 2048, buffer_size=64)

    first = make()
    for _ in range(30):  # past one epoch, so the cursor spans an epoch boundary
        first.next_pack()
    cursor = json.loads(json.dumps(first.state_dict()))  # a small JSON-able dict
    assert len(json.dumps(cursor)) < 4000
    expected = [first.next_pack() for _ in range(20)]
    second = make()
    second.load_state_dict(cursor)
    assert second.pipeline.seen == cursor["pipeline"]["seen"]
    for want, got in zip(expected, (second.next_pack() for _ in range(20))):
        assert got.sample_ids == want.sample_ids
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.cu_seqlens, want.cu_seqlens)
        assert (got.pixel_values is None) == (want.pixel_values is None)
        if got.pixel_values is not None:
            assert torch.equal(got.pixel_values, want.pixel_values)


def test_no_sample_starves():
    # Longest-first would pass over a 60 forever while 70s keep coming (70 + 60 > 100): max_wait stops that.
    records = [Record(str(i), "m", "text", text="70") for i in range(500)]
    records[0] = Record("0", "m", "text", text="60")
    packer = Packer(stream_of(records, loop=False, shuffle_block=1), LengthEncoder(), 100, buffer_size=50, max_wait=5)
    first_ids = [p.sample_ids for _, p in zip(range(7), packer)]
    assert ["0"] in first_ids


def test_a_source_without_usable_records_stops():
    records = [BadRecord("malformed_json", "x", f"f:{i}") for i in range(5)]
    with pytest.raises(ConfigError, match="no usable record"):
        Packer(stream_of(records), LengthEncoder(), 100).next_pack()


def test_shard_directories_are_split_by_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k in range(4):
        pq.write_table(pa.table({"text": [f"{k}-{i}" for i in range(5)]}), tmp_path / f"part-{k}.parquet")
    shares = [[item.text for _, item in SourceStream(tmp_path, rank=r, world=2, loop=False).iter_from()]
              for r in range(2)]
    assert {t.split("-")[0] for t in shares[0]} == {"0", "2"} and {t.split("-")[0] for t in shares[1]} == {"1", "3"}
    rows = [[item.text for _, item in SourceStream(tmp_path, rank=r, world=8, loop=False).iter_from()]
            for r in range(8)]  # fewer files than ranks: rows are split instead
    assert sum(map(len, rows)) == 20 and len(set().union(*rows)) == 20


class RedoingEncoder(LengthEncoder):
    """Can make a record's pixels again, and counts how often it is asked to."""

    def __init__(self):
        super().__init__()
        self.redone = 0

    def pixels(self, item):
        self.redone += 1
        return torch.full((1, 3, 2, 2), float(int(item.id)))


def test_buffered_tiles_kept_under_the_byte_cap_and_redone_past_it():
    records = log_uniform_records(300, seed=4, images=True)
    packs = {}
    for cap in (1 << 20, 0, 3 * 48):  # everything kept / nothing kept / three tiles of 48 bytes kept
        encoder = RedoingEncoder()
        packer = Packer(stream_of(records, loop=False, shuffle_block=1), encoder, 1024, buffer_size=32,
                        max_pixel_bytes=cap)
        packs[cap] = (list(packer), encoder.redone)
        assert packer._pixel_bytes == 0  # every kept tile was handed out
    images = sum(1 for r in records if r.meta["image"])
    assert packs[1 << 20][1] == 0 and packs[0][1] == images and 0 < packs[3 * 48][1] < images
    for cap in (0, 3 * 48):  # the same packs either way
        for a, b in zip(packs[1 << 20][0], packs[cap][0]):
            assert a.sample_ids == b.sample_ids
            assert (a.pixel_values is None and b.pixel_values is None) or torch.equal(a.pixel_values, b.pixel_values)


def test_collate_concatenates_native_grids_in_sample_order():
    grid = lambda *rows: torch.tensor(rows, dtype=torch.int64)  # noqa: E731
    image = Sample("image", "s", [1, 2], [1, 2], torch.ones(16, 8), image_grid_thw=grid((1, 4, 4)))
    text = Sample("text", "s", [3], [3])
    both = Sample("both", "s", [4, 5, 6], [4, 5, 6], torch.zeros(8, 8), image_grid_thw=grid((1, 2, 4)),
                  pixel_values_videos=torch.full((32, 8), 2.0), video_grid_thw=grid((2, 4, 4)),
                  second_per_grid_ts=[0.5])
    video = Sample("video", "s", [7], [7], pixel_values_videos=torch.full((16, 8), 3.0),
                   video_grid_thw=grid((1, 4, 4)), second_per_grid_ts=[1.0])
    batch = collate([image, text, both, video], budget=8)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]
    assert batch.video_grid_thw.tolist() == [[2, 4, 4], [1, 4, 4]] and batch.second_per_grid_ts == [0.5, 1.0]
    assert batch.pixel_values.shape == (24, 8) and batch.pixel_values_videos[:, 0].unique().tolist() == [2.0, 3.0]
    assert batch.pixel_values_videos.shape[0] == int(batch.video_grid_thw.prod(-1).sum())
    assert [s.modality for s in (image, text, both, video)] == ["image", "text", "image", "image"]
    assert collate([video], budget=8).modality == "image"
    tiles = collate([Sample("a", "s", [1], [1], torch.zeros(1, 3, 4, 4), [1])], budget=8)
    assert tiles.image_grid_thw is None and tiles.video_grid_thw is None and tiles.second_per_grid_ts == []
