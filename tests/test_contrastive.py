"""Vision pretraining as a stage (`kind: contrastive`): SigLIP's sigmoid loss against its formula
(value and gradient), the pairs a stage reads, held-out retrieval with repeated captions, a stage
that trains the tower (and only the tower) and resumes bit for bit from inside it, the config's
checks, and continued pretraining of a tower loaded from HF directories."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_support import (Stopped, assert_same_weights, final_weights, kept_thread_count, prepared_world,
                                 stop_after)
from vlmkit.config import CONFIG_DIR, load_config
from vlmkit.data.formats import read_records
from vlmkit.data.images import ImageProcessor
from vlmkit.data.packing import SourceStream
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.world import TOKENIZER_DIR
from vlmkit.errors import ConfigError
from vlmkit.models import load_vision
from vlmkit.models.contrastive import ContrastiveHeads, TextTower, sigmoid_contrastive_loss
from vlmkit.train.checkpoint import HEADS_FILE, list_checkpoints
from vlmkit.train.contrastive import (CaptionPairPipeline, ContrastiveObjective, PairBatches, caption_groups,
                                      captions_of, retrieval_accuracy)
from vlmkit.train.loop import Trainer, train

# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def reference_loss(img, txt, scale, bias, labels):
    """The formula written out: normalise, t * cosine + b, -1/N sum log sigmoid(label * logit)."""
    z = img / img.pow(2).sum(dim=1, keepdim=True).sqrt()
    w = txt / txt.pow(2).sum(dim=1, keepdim=True).sqrt()
    logits = torch.exp(scale) * (z @ w.T) + bias
    return -torch.log(1 / (1 + torch.exp(-labels * logits))).sum() / img.shape[0]


def loss_inputs(n: int = 5, dim: int = 7):
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(n, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    return img, txt, scale, bias


def test_sigmoid_loss_is_the_formula():
    img, txt, scale, bias = (t.detach() for t in loss_inputs())
    n = img.shape[0]
    expected = 0.0
    for i in range(n):  # element by element, in plain floats
        for j in range(n):
            cos = float(img[i] @ txt[j] / (img[i].norm() * txt[j].norm()))
            label = 1.0 if i == j else -1.0
            expected -= math.log(1.0 / (1.0 + math.exp(-label * (3.0 * cos - 1.5))))
    expected /= n
    assert abs(float(sigmoid_contrastive_loss(img, txt, scale, bias)) - expected) < 1e-12


def test_sigmoid_loss_gradient_is_the_formulas():
    img, txt, scale, bias = loss_inputs()
    labels = 2 * torch.eye(img.shape[0], dtype=torch.float64) - 1
    ours = torch.autograd.grad(sigmoid_contrastive_loss(img, txt, scale, bias), (img, txt, scale, bias))
    ref = torch.autograd.grad(reference_loss(img, txt, scale, bias, labels), (img, txt, scale, bias))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(sigmoid_contrastive_loss, (img, txt, scale, bias))


def test_identical_captions_are_positives():
    img, txt, scale, bias = loss_inputs(n=4)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 2] = positives[2, 0] = True  # pairs 0 and 2 share a caption
    labels = positives.double() * 2 - 1
    ours = sigmoid_contrastive_loss(img, txt, scale, bias, positives)
    assert torch.allclose(ours, reference_loss(img, txt, scale, bias, labels), rtol=1e-12)
    assert not torch.allclose(ours, sigmoid_contrastive_loss(img, txt, scale, bias))


def test_the_heads():
    heads = ContrastiveHeads(vision_width=8, num_patches=4, patch_dim=2, vocab_size=20, embed_dim=4,
                             text_hidden_size=8, text_layers=1, text_heads=2, max_caption_tokens=8,
                             temperature_init=10.0, bias_init=-10.0)
    assert heads.logit_scale.exp().item() == pytest.approx(10.0) and heads.logit_bias.item() == -10.0
    features = torch.randn(2, 4, 8)
    assert heads.image(features).shape == (2, 4)
    # the image head knows where each patch is: the same patches elsewhere are another image
    assert not torch.allclose(heads.image(features[:, [1, 0, 2, 3]]), heads.image(features))
    ids = torch.tensor([3, 4, 5, 1, 6, 7, 1])
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    out = heads.text(ids, torch.tensor([0, 1, 2, 3, 0, 1, 2]), cu)
    assert out.shape == (2, 4)
    # each caption is read alone: the second one's embedding does not depend on the first
    alone = heads.text(ids[4:], torch.tensor([0, 1, 2]), torch.tensor([0, 3], dtype=torch.int32))
    assert torch.allclose(out[1], alone[0], atol=1e-6)
    swapped = torch.tensor([3, 5, 4, 1, 6, 7, 1])  # the first caption's words in another order
    assert not torch.allclose(heads.text(swapped, torch.tensor([0, 1, 2, 3, 0, 1, 2]), cu)[0], out[0])


def test_a_text_side_without_blocks_is_a_bag_of_words():
    bag = TextTower(vocab_size=20, hidden_size=8, num_layers=0, num_heads=2, max_tokens=8, embed_dim=4)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    out = bag(torch.tensor([3, 4, 5, 1, 6, 7, 1]), positions, cu)
    assert torch.allclose(bag(torch.tensor([5, 4, 3, 1, 6, 7, 1]), positions, cu), out)
    mean = bag.embed_tokens(torch.tensor([6, 7, 1])).mean(0)
    assert torch.allclose(out[1], bag.proj(mean), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pairs and retrieval
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepared_world(tmp_path_factory.mktemp("world"), n_val=24)  # held-out captions (captions_val.json)


def pair_pipeline(world: Path, max_length: int = 77) -> CaptionPairPipeline:
    tokenizer = Tokenizer.load(world / TOKENIZER_DIR)
    return CaptionPairPipeline(tokenizer, ImageProcessor(48, (0.5,) * 3, (0.5,) * 3), 1, max_length=max_length,
                               max_bad_fraction=1.0, name="pairs")


def test_a_caption_record_becomes_one_tile_and_its_caption_tokens(world):
    pipeline = pair_pipeline(world, max_length=1024)
    record = next(r for r in read_records(world / "captions_train.json"))
    sample = pipeline.encode(record)
    caption = record.messages[-1].content
    assert sample.pixel_values.shape == (1, 3, 48, 48)
    assert sample.input_ids == pipeline.tokenizer.encode(caption) + [pipeline.tokenizer.eos_id]
    short = pair_pipeline(world, max_length=5).encode(record)
    assert len(short.input_ids) == 5 and short.input_ids[-1] == pipeline.tokenizer.eos_id


def test_records_that_are_not_pairs_are_counted(world, tmp_path):
    rows = [{"id": "two", "image": ["images/train_000000.png", "images/train_000001.png"],
             "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
            {"id": "text", "text": "no image here"}]
    path = world / "not_pairs.json"
    path.write_text(json.dumps(rows))
    pipeline = pair_pipeline(world)
    assert [pipeline.encode(r) for r in read_records(path)] == [None, None]
    assert pipeline.stats.bad == {"not_a_pair": 2}


def test_pair_batches_resume_where_they_stopped(world):
    def batches():
        return PairBatches(SourceStream(world / "captions_train.json", seed=3), pair_pipeline(world), 8)

    first = batches()
    first.next_pack()
    cursor = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_pack() for _ in range(3)]
    again = batches()
    again.load_state_dict(cursor)
    for a, b in zip(expected, (again.next_pack() for _ in range(3))):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert expected[0].num_samples == 8 and expected[0].pixel_values.shape[0] == 8


def test_retrieval_counts_a_same_text_caption_as_a_hit():
    groups = caption_groups([(1, 2), (3,), (1, 2), (4,)])  # pairs 0 and 2 share a caption
    assert groups.tolist() == [0, 1, 0, 2]
    img = torch.eye(4)
    txt = torch.eye(4)[[2, 1, 0, 1]]  # image 0 is nearest caption 2 (same text); image 3 nearest caption 1
    scores = retrieval_accuracy(img, txt, groups)
    assert scores["i2t"] == 0.75  # images 0, 1, 2 hit; image 3 retrieves caption 1 ("(3,)" != "(4,)")
    assert scores["t2i"] == 0.75  # caption 3's nearest image is 0, another text; the others hit
    assert scores["chance"] == pytest.approx((2 + 1 + 2 + 1) / 16)


def test_caption_tokens_of_a_batch(world):
    batch = PairBatches(SourceStream(world / "captions_train.json", loop=False, shuffle_block=1),
                        pair_pipeline(world), 3).next_pack()
    captions = captions_of(batch)
    assert len(captions) == 3 and sum(map(len, captions)) == batch.num_tokens


# ---------------------------------------------------------------------------------------------
# The stage in a run
# ---------------------------------------------------------------------------------------------

CONTRASTIVE = {"pairs_per_step": 8, "embed_dim": 16, "text_layers": 1, "text_hidden_size": 32, "text_heads": 2,
               "eval_source": "held_out", "eval_pairs": 16}
STAGE_STEPS = 4  # the contrastive stage; its checkpoints: step 2 (inside) and 4 (its end)
RUN_STEPS = STAGE_STEPS + 2
KEEP_ALL = 10  # no checkpoint of these runs is pruned


def run_config(world: Path, **overrides):
    raw = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    raw["world"].update(dir=str(world), n_val=24)
    raw["data"]["held_out"] = {"path": "captions_val.json", "format": "llava", "kind": "caption"}
    raw.update(num_threads=1, progress=False, tensorboard=False, **overrides)
    raw["stages"] = [
        {"name": "vision", "kind": "contrastive", "vision_lr": 3e-3, "adapter_lr": 0, "mixture": {"captions": 1.0},
         "steps": STAGE_STEPS, "save_every": 2, "grad_accum": 2, "eval_every": 2, "warmup_steps": 1,
         "keep_last": KEEP_ALL, "contrastive": dict(CONTRASTIVE)},
        {"name": "align", "adapter_lr": 1e-3, "mixture": {"captions": 1.0}, "steps": RUN_STEPS - STAGE_STEPS,
         "token_budget": 1024, "save_every": 1, "keep_last": KEEP_ALL},
    ]
    return load_config(raw)


@pytest.fixture(scope="module")
def one_thread():
    with kept_thread_count():
        yield


@pytest.fixture(scope="module")
def reference(world, one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    trainer = Trainer(run_config(world), out)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    torch.save(start, out / "start.pt")
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_stage_trains_the_tower_only_and_reports_retrieval(reference):
    start = torch.load(reference / "start.pt")
    after_stage = load_file(str(reference / "checkpoints" / f"step-{STAGE_STEPS:08d}" / "model.safetensors"))
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], after_stage[k])}
    assert changed == {"vision"}
    steps = [r for r in metrics(reference) if r.get("kind") == "contrastive"]
    assert [r["step"] for r in steps] == list(range(1, STAGE_STEPS + 1))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(r["pairs"] == 2 * CONTRASTIVE["pairs_per_step"] and r["tokens"] > 0 for r in steps)
    evals = [r for r in metrics(reference) if r.get("eval") and r["stage"] == 0]
    assert [r["global_step"] for r in evals] == [2, STAGE_STEPS]
    for r in evals:
        assert r["retrieval_pairs/held_out"] == 16 and 0 < r["retrieval_chance/held_out"] <= 1
        assert 0 <= r["retrieval_i2t/held_out"] <= 1 and 0 <= r["retrieval_t2i/held_out"] <= 1
    history = json.loads((reference / "final" / "vlmkit.json").read_text())["stages"]
    assert history[0]["kind"] == "contrastive" and "retrieval_i2t/held_out" in history[0]["eval"]
    assert history[0]["trainable"] == {"vision": True, "adapter": False, "llm": False}
    # The heads live in the checkpoints inside the stage, and are gone from its end on.
    with_heads = [int(p.name.split("-")[1]) for p in list_checkpoints(reference) if (p / HEADS_FILE).exists()]
    assert with_heads == [2]


# Stopped before the stage's first checkpoint (1: the run starts over), one step past its
# checkpoint inside (3: the tower, heads, optimizer, data cursor and RNG come back from step 2),
# at the stage end (4: the next stage starts from the trained tower, without the heads).
@pytest.mark.slow
@pytest.mark.parametrize("stopped_after", [1, 3, STAGE_STEPS])
def test_the_stage_resumes_bitwise(world, reference, monkeypatch, tmp_path, stopped_after):
    stop_after(monkeypatch, stopped_after)
    with pytest.raises(Stopped):
        train(run_config(world), tmp_path)
    monkeypatch.undo()
    train(run_config(world), tmp_path, resume=True)
    assert_same_weights(final_weights(reference), final_weights(tmp_path))
    steps = [r["global_step"] for r in metrics(tmp_path) if not r.get("eval")]
    assert steps == list(range(1, RUN_STEPS + 1))
    evals = [r for r in metrics(tmp_path) if r.get("eval") and r["stage"] == 0]
    assert evals[-1] == [r for r in metrics(reference) if r.get("eval") and r["stage"] == 0][-1]


# ---------------------------------------------------------------------------------------------
# Config checks and refusals
# ---------------------------------------------------------------------------------------------


def contrastive_stage(**fields) -> dict:
    return {"name": "v", "kind": "contrastive", "vision_lr": 1e-3, "adapter_lr": 0, **fields}


def config_with(stage: dict) -> dict:
    return {"model": {"config": {}}, "data": {"c": {"path": "c.json", "kind": "caption"}}, "stages": [stage]}


@pytest.mark.parametrize("stage, message", [
    (contrastive_stage(adapter_lr=1e-3), "adapter_lr: 0 and llm_lr: 0"),
    (contrastive_stage(vision_lr=0, contrastive={"heads_lr": 0}), "nothing to train"),
    (contrastive_stage(contrastive={"eval_source": "nope"}), "unknown source 'nope'"),
    (contrastive_stage(contrastive={"text_hidden_size": 30, "text_heads": 4}), "divisible"),
    (contrastive_stage(contrastive={"pairs_per_step": 0}), "pairs_per_step"),
])
def test_config_refuses(stage, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_with(stage))


def test_heads_alone_may_learn():
    cfg = load_config(config_with(contrastive_stage(vision_lr=0)))
    assert cfg.stages[0].contrastive.heads_lr > 0


def test_a_native_tower_is_refused():
    cfg = load_config(config_with(contrastive_stage()))
    trainer = SimpleNamespace(cfg=cfg, model=SimpleNamespace(config=SimpleNamespace(is_native=True)))
    with pytest.raises(ConfigError, match="native-resolution"):
        ContrastiveObjective(trainer, 0)


def test_a_text_source_is_refused(world, tmp_path):
    cfg = run_config(world)
    cfg.stages[0].mixture = {"text": 1.0}
    with pytest.raises(ConfigError, match="source 'text' is text"):
        train(cfg, tmp_path)


# ---------------------------------------------------------------------------------------------
# Continued pretraining of an HF tower
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_continues_pretraining_a_tower_loaded_from_hf(world, one_thread, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4))
    siglip.save_pretrained(tmp_path / "vision")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    cfg = run_config(world, model={"hf_vision": str(tmp_path / "vision"), "hf_llm": str(tmp_path / "llm")})
    cfg.stages = cfg.stages[:1]
    final = train(cfg, tmp_path / "run")
    start = load_vision(tmp_path / "vision").state_dict()
    trained = {k.removeprefix("vision."): v for k, v in load_file(str(final / "model.safetensors")).items()
               if k.startswith("vision.")}
    assert trained.keys() == start.keys()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    # From the HF tower's weights on: the blocks up to the layer the adapter reads (-2: the first
    # of two) learned; the last block and the post-layernorm, past that layer, did not.
    assert "layers.0.self_attn.q_proj.weight" in changed and "embeddings.patch_embedding.weight" in changed
    assert not any(k.startswith(("layers.1.", "post_layernorm.")) for k in changed)
    evals = [r for r in metrics(tmp_path / "run") if r.get("eval")]
    assert evals[-1]["retrieval_pairs/held_out"] == 16
