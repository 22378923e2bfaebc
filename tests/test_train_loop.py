"""The step loop on a tiny real VLM: freezing per stage, the optimizer over trainable parameters
only, loss normalisation across micro-batches of different target counts (and under each
`loss_weighting`), and the step's sums per data source through the all-reduce."""

import copy

import pytest
import torch

from vlmkit.api import VLM
from vlmkit.config import Stage
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.packing import collate
from vlmkit.data.types import Sample
from vlmkit.errors import ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.vlm import VLMModel
from vlmkit.train.distributed import Dist
from vlmkit.train.loop import StepSums, Trainer, target_weights, targets_per_sample
from vlmkit.train.stages import apply_freezing, build_optimizer

IMG = 5


def tiny_model(cls: type[VLMModel] = VLMModel) -> VLMModel:
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2),
                    adapter=dict(kind="mlp"), llm=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_layers=2, num_heads=2),
                    image_token_id=IMG)
    return cls(cfg)


def sample(i: int, n: int, image: bool, gen: torch.Generator) -> Sample:
    ids = torch.randint(6, 64, (n,), generator=gen).tolist()
    labels = list(ids)
    labels[0] = IGNORE_INDEX
    pixels = None
    tiles = []
    if image:  # 4 visual tokens (2x2 patches, mlp adapter) after the first token
        ids[1:5] = [IMG] * 4
        labels[1:5] = [IGNORE_INDEX] * 4
        pixels = torch.randn(1, 3, 16, 16, generator=gen)
        tiles = [1]
    return Sample(id=f"s{i}", source="a" if i % 2 else "b", input_ids=ids, labels=labels, pixel_values=pixels,
                  tiles_per_image=tiles)


def step(model, stage: Stage, steps: int = 2):
    gen = torch.Generator().manual_seed(1)
    apply_freezing(model, stage)
    opt = build_optimizer(model, stage)
    for _ in range(steps):
        batch = collate([sample(i, 12 + i, True, gen) for i in range(3)], 64)
        model.compute_loss(batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens,
                           pixel_values=batch.pixel_values).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("lrs, trained", [
    ({"adapter_lr": 1e-2}, {"adapter"}),
    ({"adapter_lr": 0.0, "llm_lr": 1e-2}, {"llm"}),
    ({"vision_lr": 1e-2, "adapter_lr": 1e-2, "llm_lr": 1e-2}, {"vision", "adapter", "llm"}),
])
def test_frozen_modules_stay_unchanged_and_trainable_ones_change(lrs, trained):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    opt = step(model, Stage(**lrs))
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    for module in ("vision", "adapter", "llm"):
        for name, p in getattr(model, module).named_parameters():
            key = f"{module}.{name}"
            if module in trained:
                assert id(p) in in_optimizer
            else:
                assert id(p) not in in_optimizer and not p.requires_grad
                assert torch.equal(p, before[key]), key
        changed = any(not torch.equal(p, before[f"{module}.{n}"]) for n, p in getattr(model, module).named_parameters())
        assert changed == (module in trained), module


def test_stage_hand_off_keeps_weights_and_refreezes():
    model = tiny_model()
    step(model, Stage(adapter_lr=1e-2))
    after_align = copy.deepcopy(model.state_dict())
    step(model, Stage(adapter_lr=0.0, llm_lr=1e-2), steps=1)
    assert all(torch.equal(p, after_align[f"adapter.{n}"]) for n, p in model.adapter.named_parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.adapter.parameters())


def test_targets_per_sample_matches_the_model():
    gen = torch.Generator().manual_seed(3)
    model = tiny_model()
    batch = collate([sample(i, n, i % 2 == 0, gen) for i, n in enumerate((7, 13, 9))], 64)
    out = model.compute_loss(batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens,
                             pixel_values=batch.pixel_values)
    per = targets_per_sample(batch)
    assert int(per.sum()) == int(out.num_targets)
    cu = batch.cu_seqlens.tolist()
    for i in range(3):  # token_loss of a sample sums over exactly its own targets
        assert (out.token_loss[cu[i]:cu[i + 1]] > 0).sum() == per[i]


def test_loss_over_micro_batches_is_normalised_by_total_targets():
    """Two micro-batches with different target counts: the accumulated gradient equals the
    gradient of the mean over all targets (one pack holding both), not the mean of means."""
    gen = torch.Generator().manual_seed(4)
    samples = [sample(0, 30, False, gen), sample(1, 8, False, gen), sample(2, 6, False, gen)]
    model = tiny_model()
    whole = collate(samples, 64)
    model.compute_loss(whole.input_ids, whole.labels, whole.position_ids, whole.cu_seqlens).loss.backward()
    expected = [p.grad.clone() for p in model.llm.parameters()]
    model.zero_grad()
    micro = [collate(samples[:1], 64), collate(samples[1:], 64)]
    total = sum(int(targets_per_sample(b).sum()) for b in micro)
    for b in micro:
        (model.compute_loss(b.input_ids, b.labels, b.position_ids, b.cu_seqlens).loss_sum / total).backward()
    for g, e in zip((p.grad for p in model.llm.parameters()), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def bare_trainer(model: VLM) -> Trainer:
    """A Trainer holding only what its forward / backward passes read: the model and one process."""
    trainer = Trainer.__new__(Trainer)
    trainer.model, trainer.ctx = model, Dist()
    return trainer


def test_target_weights_per_weighting():
    targets = torch.tensor([4, 1, 0, 9])
    assert target_weights(targets, "token").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert target_weights(targets, "square").tolist() == pytest.approx([0.5, 1.0, 0.0, 1 / 3])
    assert target_weights(targets, "sample").tolist() == pytest.approx([0.25, 1.0, 0.0, 1 / 9])


@pytest.mark.parametrize("weighting, power", [("token", 0.0), ("square", 0.5), ("sample", 1.0)])
def test_trainer_step_weighs_each_sample_as_its_loss_weighting_says(weighting, power):
    """The trainer's passes over two micro-batches of samples with 25, 7 and 1 targets give the
    gradient of sum_i n_i^-p * (sum of sample i's token losses) / sum_i n_i^-p * n_i, each sample
    run alone: its own tokens, whichever micro-batch and pack it sits in."""
    gen = torch.Generator().manual_seed(6)
    samples = [sample(0, 30, True, gen), sample(1, 8, False, gen), sample(2, 6, True, gen)]
    model = tiny_model(VLM)
    losses, counts = [], []
    for s in samples:
        out = model.pack_loss(collate([s], 64))
        losses.append(out.loss_sum)
        counts.append(int(out.num_targets))
    weights = [n ** -power for n in counts]
    denominator = sum(w * n for w, n in zip(weights, counts))
    expected_loss = sum(w * loss for w, loss in zip(weights, losses)) / denominator
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    passes = bare_trainer(model)._forward_backward(Stage(llm_lr=1e-3),
                                                   [collate(samples[:1], 64), collate(samples[1:], 64)],
                                                   weighting=weighting)
    assert counts == [25, 7, 1] and passes.targets == sum(counts)
    assert passes.denominator == pytest.approx(denominator)
    assert passes.sums.weighted_loss_sum / passes.denominator == pytest.approx(float(expected_loss), rel=1e-5)
    assert passes.sums.loss_sum == pytest.approx(float(sum(losses)), rel=1e-5)  # `loss` stays the token mean
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_weightings_give_different_gradients():
    """square and sample move the gradient away from token's (the samples' target counts differ)."""
    gen = torch.Generator().manual_seed(7)
    batch = collate([sample(0, 30, False, gen), sample(1, 6, False, gen)], 64)
    grads = {}
    for weighting in ("token", "square", "sample"):
        model = tiny_model(VLM)
        bare_trainer(model)._forward_backward(Stage(llm_lr=1e-3), [batch], weighting=weighting)
        grads[weighting] = model.llm.embed_tokens.weight.grad.clone()
    assert not torch.allclose(grads["token"], grads["square"])
    assert not torch.allclose(grads["square"], grads["sample"])


def test_loss_weighting_belongs_to_sft_stages():
    assert Stage(llm_lr=1e-3, loss_weighting="square").loss_weighting == "square"
    with pytest.raises(ConfigError, match="loss_weighting 'square'.*contrastive stage has its own objective"):
        Stage(kind="contrastive", vision_lr=1e-4, adapter_lr=0.0, loss_weighting="square")


class TwoRanks(Dist):
    """An all-reduce over two ranks whose other rank summed exactly what this one did."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return [2 * v for v in values]


def test_step_sums_keep_each_source_apart_through_the_all_reduce():
    gen = torch.Generator().manual_seed(5)
    model = tiny_model()
    batch = collate([sample(i, n, i == 1, gen) for i, n in enumerate((7, 13, 9))], 64)  # sources b, a, b
    out = model.compute_loss(batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens,
                             pixel_values=batch.pixel_values)
    per = targets_per_sample(batch)
    sums = StepSums()
    sums.add(batch, out, per)
    cu = batch.cu_seqlens.tolist()
    assert sums.source_targets == {"b": float(per[0] + per[2]), "a": float(per[1])}
    assert sums.source_loss["a"] == pytest.approx(float(out.token_loss[cu[1]:cu[2]].sum()))
    assert sum(sums.source_loss.values()) == pytest.approx(sums.loss_sum, rel=1e-5)
    assert (sums.tokens, sums.budget) == (batch.num_tokens, 64)
    assert sums.all_reduced(Dist(), ["a", "b"]) == sums  # one process: the sums themselves
    total = sums.all_reduced(TwoRanks(rank=0, world=2), ["a", "b", "c"])  # "c": no sample on this rank
    assert total.source_targets == {"a": 2 * float(per[1]), "b": 2 * float(per[0] + per[2]), "c": 0.0}
    assert total.source_loss == {name: 2 * sums.source_loss.get(name, 0.0) for name in ("a", "b", "c")}
    assert (total.loss_sum, total.tokens, total.budget) == (2 * sums.loss_sum, 2 * batch.num_tokens, 128)

