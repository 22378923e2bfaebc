"""bench/gpu_train_step.py on the CPU: its tiny --smoke run, the transformers peer's shape, the
padded batches and the FLOP count behind its MFU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.vision import VisionEncoder
from vlmkit.models.vlm import VLMModel

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_train_step.py"
spec = importlib.util.spec_from_file_location("gpu_train_step", BENCH)
bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
spec.loader.exec_module(bench)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, peer_class", [("0.5b", "InternVLForConditionalGeneration"),
                                              ("1.5b", "LlavaForConditionalGeneration")])
def test_smoke_run_reports_every_side(name, peer_class, capsys):
    assert bench.main(["--smoke", "--shape", name]) == 0
    out = capsys.readouterr().out
    for side in ("vlmkit packed:", "vlmkit padded (sdpa):", f"transformers {peer_class} padded (sdpa):"):
        assert side in out and "tokens/s" in out.split(side)[1].splitlines()[0]
    assert f"ratio vlmkit packed / transformers {peer_class} padded (sdpa):" in out


@pytest.mark.parametrize("name", ["0.5b", "1.5b"])
def test_peer_has_the_same_shape(name):
    cfg = bench.shape(name, smoke=True).config
    ours, peer = VLMModel(cfg), bench.peer_model(cfg, "sdpa")
    assert _count(peer.model.language_model) == _count(ours.llm)  # the LM head is tied to the embedding
    assert peer.lm_head.weight is peer.model.language_model.embed_tokens.weight
    assert _count(peer.model.multi_modal_projector) == _count(ours.adapter)
    extra = 0
    if name == "0.5b":  # InternViT: a class token and its position, layer scale on both branches of each block
        v = cfg.vision
        extra = 2 * v.hidden_size + 2 * v.num_layers * v.hidden_size
    assert _count(peer.model.vision_tower) == _count(ours.vision) + extra


@pytest.mark.parametrize("name, tokens_per_image, decoder", [("0.5b", 64, (24, 896, 14, 2, 4864, 32000)),
                                                             ("1.5b", 729, (28, 1536, 12, 2, 8960, 151936))])
def test_real_shapes(name, tokens_per_image, decoder):
    cfg = bench.shape(name).config
    d = cfg.llm
    assert cfg.tokens_per_image == tokens_per_image
    assert (d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.intermediate_size, d.vocab_size) == decoder
    assert d.tie_embeddings
    text = bench.peer_config(cfg).text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == decoder


def test_padded_batch_holds_the_packed_samples():
    s = bench.shape("0.5b", smoke=True)
    [batch] = bench.make_batches(s, 1, budget=512)
    ids, labels, mask = batch.padded()
    assert mask.sum(1).tolist() == batch.lengths
    starts = batch.cu_seqlens[:-1].tolist()
    for b, (start, n) in enumerate(zip(starts, batch.lengths)):
        assert torch.equal(ids[b, :n], batch.input_ids[start:start + n])
        assert torch.equal(labels[b, :n], batch.labels[start:start + n])
        assert (labels[b, n:] == IGNORE_INDEX).all()
    n_image_tokens = int((batch.input_ids == s.config.image_token_id).sum())
    assert n_image_tokens == batch.pixels.shape[0] * s.config.tokens_per_image


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_vision_flops_count_the_towers_weights(feature_layer):
    """The dense part of the vision FLOPs is 6 x (the weights of the layers read + the patch
    embedding) per patch: checked against a built tower's own weight matrices."""
    cfg = bench.shape("1.5b", smoke=True).config.vision
    cfg.feature_layer = feature_layer
    tower = VisionEncoder(cfg)
    used = tower.feature_layer_index()
    weights = sum(m.weight.numel() for layer in tower.layers[:used] for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    weights += tower.embeddings.patch_embedding.weight.numel()
    P = (cfg.image_size // cfg.patch_size) ** 2
    attention = 12 * used * P * P * cfg.hidden_size
    assert bench.vision_flops_per_image(cfg) == 6 * P * weights + attention
