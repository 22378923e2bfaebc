"""VLMModel invariants: placeholder counts, interleaved images, packed == padded, checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from vlmkit.constants import IGNORE_INDEX
from vlmkit.errors import BadRecordError
from vlmkit.models.config import VLMConfig
from vlmkit.models.vlm import VLMModel, shift_labels

IMG = 3  # image token id


def _model(adapter="pixel_shuffle", **kw) -> VLMModel:
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4),
                    adapter=dict(kind=adapter, num_queries=3),
                    llm=dict(vocab_size=50, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                             num_kv_heads=2),
                    image_token_id=IMG, **kw)
    return VLMModel(cfg).eval()


def _ids(*parts):
    """Token ids from ints and ("img", n) runs of n image tokens."""
    out = []
    for p in parts:
        out += [IMG] * p[1] if isinstance(p, tuple) else [p]
    return out


def test_count_mismatch_names_both_numbers():
    model = _model()  # 4 tokens per image
    ids = torch.tensor([_ids(5, ("img", 4), 6, ("img", 4), 7)])
    with pytest.raises(BadRecordError, match=r"8 image token\(s\) but the images give 4 visual token\(s\)") as e:
        model(ids, torch.randn(1, 3, 16, 16))
    assert e.value.reason == "placeholder_mismatch"
    with pytest.raises(BadRecordError, match="no pixel_values"):
        model(ids)
    with pytest.raises(BadRecordError, match=r"0 image token\(s\)"):
        model(torch.tensor([[5, 6, 7]]), torch.randn(1, 3, 16, 16))


def test_packed_mismatch_names_the_samples():
    model = _model()
    ids = torch.tensor(_ids(5, 6, 7, ("img", 4), 8))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(BadRecordError, match=r"per packed sample: \{1: 4\}"):
        model.compute_loss(ids, ids, torch.tensor([0, 1, 2, 0, 1, 2, 3, 4]), cu, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("adapter", ["mlp", "pixel_shuffle", "resampler"])
def test_interleaved_images_land_in_order(adapter):
    model = _model(adapter)
    n = model.config.tokens_per_image
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.tensor([_ids(5, ("img", n), 6, 7, ("img", n), ("img", n), 8)])
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)[0]
        visual = model.image_features(pixels)  # (3, n, D)
        positions = (ids[0] == IMG).nonzero().flatten()
        assert torch.equal(embeds[positions], visual.reshape(-1, visual.shape[-1]))
        text = (ids[0] != IMG).nonzero().flatten()
        assert torch.equal(embeds[text], model.llm.embed(ids[0, text]))
        # images are not interchangeable: swapping two changes the logits
        assert not torch.allclose(model(ids, pixels), model(ids, pixels[[1, 0, 2]]))


def test_text_only_equals_llm():
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids), model.llm(ids))


def test_shift_labels_never_crosses_samples():
    labels = torch.tensor([10, 11, 12, 20, 21, 30])
    cu = torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    assert shift_labels(labels, cu).tolist() == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX]


def _samples(model):
    n = model.config.tokens_per_image
    g = torch.Generator().manual_seed(3)
    samples = [  # (ids, labels, tiles)
        (_ids(5, ("img", n), 9, 10, 11, 12), [IGNORE_INDEX] * (n + 2) + [10, 11, 12], 1),
        (_ids(13, 14, 15), [13, 14, 15], 0),
        (_ids(6, ("img", n), 7, ("img", n), 16, 17), [IGNORE_INDEX] * (2 * n + 3) + [17], 2),
    ]
    pixels = torch.randn(3, 3, 16, 16, generator=g)
    return samples, pixels


def test_packed_loss_equals_padded_forward_loss():
    model = _model()
    samples, pixels = _samples(model)
    ids = torch.tensor([t for s in samples for t in s[0]])
    labels = torch.tensor([t for s in samples for t in s[1]])
    lengths = [len(s[0]) for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        out = model.compute_loss(ids, labels, pos, cu, pixels)
        B, T = len(samples), max(lengths)
        pad_ids = torch.zeros(B, T, dtype=torch.long)
        pad_labels = torch.full((B, T), IGNORE_INDEX)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, (i, lab, _) in enumerate(samples):
            pad_ids[b, :len(i)], pad_labels[b, :len(i)], mask[b, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
        logits = model(pad_ids, pixels, attention_mask=mask)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), pad_labels[:, 1:].flatten(), reduction="none")
    assert int(out.num_targets) == 6  # a sample's first label is never a target
    assert torch.allclose(out.loss_sum, ce.sum(), atol=1e-5)
    assert torch.allclose(out.loss, ce.sum() / 6, atol=1e-6)
    # token_loss sits on each target's own position, sums per sample to that sample's loss
    per_sample = [float(out.token_loss[cu[i]:cu[i + 1]].sum()) for i in range(3)]
    per_row = ce.view(B, T - 1).sum(1).tolist()
    assert per_sample == pytest.approx(per_row, abs=1e-5)
    assert out.token_loss[labels == IGNORE_INDEX].abs().sum() == 0


@pytest.mark.parametrize("adapter", ["mlp", "resampler"])
def test_gradient_checkpointing_same_loss_and_grads(adapter):
    model = _model(adapter).train()
    n = model.config.tokens_per_image
    ids = torch.tensor(_ids(5, ("img", n), 9, 10, 11, 12, 13, 14))
    cu = torch.tensor([0, 4, ids.numel()], dtype=torch.int32)
    pos = torch.cat([torch.arange(4), torch.arange(ids.numel() - 4)])
    pixels = torch.randn(1, 3, 16, 16)

    def run():
        model.zero_grad()
        out = model.compute_loss(ids, ids, pos, cu, pixels)
        out.loss.backward()
        return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = run()
    model.set_gradient_checkpointing(True)
    loss_b, grads_b = run()
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("vision.") for k in grads_a)
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-6), k


def test_tiles_and_other_image_sizes():
    model = _model("mlp")  # 16 tokens per 16 px tile
    with torch.no_grad():
        ids = torch.tensor([_ids(5, ("img", 3 * 16), 6)])  # one image as 3 tiles
        assert model(ids, torch.randn(3, 3, 16, 16)).shape == (1, 50, 50)
        ids = torch.tensor([_ids(5, ("img", 4 * 6), 6)])  # a 16x24 image: a 4x6 grid
        assert model(ids, torch.randn(1, 3, 16, 24)).shape == (1, 26, 50)
