"""data/mixture.py: modality schedule, rank agreement on each step's modality, weighted sources,
modality-pure packs, and exact resume of the whole mixture."""

import json

import pytest
import torch

from vlmkit.data.mixture import Mixture, MixtureSource
from vlmkit.data.packing import Packer, SourceStream
from vlmkit.errors import ConfigError
from tests.test_packing import LengthEncoder, log_uniform_records


def build(rank=0, world=1, seed=7, **kw):
    image = log_uniform_records(300, seed=1, images=True)
    for r in image:
        r.meta["image"] = True
    text = log_uniform_records(300, seed=2)
    sources = []
    for name, records, weight, modality in (("img", image, 3.0, "image"), ("txt", text, 7.0, "text")):
        for r in records:
            r.source = name
        stream = SourceStream(name, reader=lambda records=records: iter(records), name=name, rank=rank,
                              world=world, seed=seed)
        sources.append(MixtureSource(name, Packer(stream, LengthEncoder(), 1024, buffer_size=32), weight, modality))
    return Mixture(sources, seed=seed, **kw)


def test_schedule_warms_up_linearly_to_the_target():
    mix = build(image_share_start=1.0, warmup_steps=100)
    assert mix.image_share == pytest.approx(0.3)  # weights 3 : 7 -> language 70%
    assert mix.image_share_at(0) == 1.0
    assert mix.image_share_at(50) == pytest.approx(0.65)
    assert mix.image_share_at(100) == mix.image_share_at(10_000) == pytest.approx(0.3)
    late = [mix.modality(s) for s in range(1000, 3000)]
    assert abs(late.count("image") / len(late) - 0.3) < 0.04
    lang_heavy = build(image_share_start=0.0, warmup_steps=1000)
    early = [lang_heavy.modality(s) for s in range(0, 100)]
    assert early.count("text") > 90


def test_every_rank_agrees_on_the_modality_of_each_step():
    ranks = [build(rank=r, world=4, image_share_start=0.0, warmup_steps=50) for r in range(4)]
    for step in range(200):
        assert len({m.modality(step) for m in ranks}) == 1
    # ... while each rank reads a different share of the data.
    first = [m.next_batch("text").sample_ids for m in ranks]
    assert all(not set(a) & set(b) for i, a in enumerate(first) for b in first[i + 1:])


def test_packs_hold_one_modality_and_sources_follow_weights():
    mix = build()
    counts = {"img": 0, "txt": 0}
    for step in range(60):
        modality = mix.modality(step)
        batch = mix.next_batch(modality)
        assert batch.modality == modality
        counts[batch.sources[0]] += 1
        assert len(set(batch.sources)) == 1
    assert counts["img"] > 5 and counts["txt"] > counts["img"]


def test_resume_the_whole_mixture():
    a = build()
    for step in range(40):
        a.next_batch(a.modality(step))
    cursor = json.loads(json.dumps(a.state_dict()))
    want = [a.next_batch(a.modality(s)) for s in range(40, 70)]
    b = build()
    b.load_state_dict(cursor)
    got = [b.next_batch(b.modality(s)) for s in range(40, 70)]
    assert [x.sample_ids for x in got] == [x.sample_ids for x in want]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(got, want))
    with pytest.raises(ConfigError, match="sources"):
        b.load_state_dict({"calls": 0, "sources": {"other": {}}})


def test_single_modality_mixture_and_errors():
    mix = build()
    text_only = Mixture([s for s in mix.sources if s.modality == "text"], image_share_start=0.5, warmup_steps=10)
    assert {text_only.modality(s) for s in range(30)} == {"text"}
    with pytest.raises(ConfigError, match="no image source"):
        text_only.next_batch("image")
    with pytest.raises(ConfigError, match="positive weight"):
        Mixture([])
