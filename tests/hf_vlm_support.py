"""Shared pieces of the tests that check an imported transformers VLM (tests/test_internvl.py,
tests/test_idefics3.py) against the reference: random weights, test images and conversations,
the processor built without its video half, the packed-loss and cached-decoding comparisons, and
edited copies of a saved directory for the refusal tests."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers.processing_utils import ProcessorMixin

from vlmkit import VLM
from vlmkit.data.prompt import build_prompt
from vlmkit.infer.engine import Engine
from vlmkit.infer.sampling import SamplingParams

WEIGHT_STD = 0.2
"""Random weights (scales around 1) larger than transformers' init, so that every norm, bias, scale
and position matters."""
TOLERANCE = 1e-4
IMAGE_SIZES = [(40, 90), (32, 32), (70, 24), (64, 64)]  # (height, width): wide, one tile, tall, 2 x 2
NEW_TOKENS = 6


def randomized(model: torch.nn.Module, is_scale: Callable[[str, torch.Tensor], bool]) -> torch.nn.Module:
    """`model` with seeded random weights: around 1 where `is_scale(name, parameter)`, else around 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if is_scale(name, p) else 0.0, WEIGHT_STD)
    return model.eval()


@contextlib.contextmanager
def without_video_processor() -> Iterator[None]:
    """A processor may be built with no video processor (which needs torchvision): the class check of
    the absent one is skipped."""
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
        yield


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]


def image_parts(images) -> list[dict]:
    return [{"type": "image", "image": image} for image in images]


# Conversations: images before, after and between text; a second turn; an image part alone.
CONVERSATIONS = [
    lambda im: [{"role": "user", "content": [*image_parts(im[:2]), {"type": "text", "text": "What color is it?"}]}],
    lambda im: [{"role": "user", "content": [{"type": "text", "text": "Describe the image."}, *image_parts(im[2:3])]}],
    lambda im: [{"role": "system", "content": "You are fine."},
                {"role": "user", "content": [{"type": "text", "text": "How many"}, *image_parts(im[3:]),
                                             {"type": "text", "text": "shapes?"}]},
                {"role": "assistant", "content": "There are three shapes."},
                {"role": "user", "content": image_parts(im[:1])}],
]


def conversation_images(conversation) -> list:
    return [p["image"] for m in conversation if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image"]


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """(B, T, V) logits equal within TOLERANCE at the batch's real (not padding) positions."""
    real = attention_mask.bool()
    assert got.shape == expected.shape and got.shape[:2] == real.shape
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


def check_checkpoint_round_trip(ours: VLM, directory: Path, batch, template: str) -> None:
    """`ours` saved as a vlmkit checkpoint and loaded back: the same config and chat format, bit for
    bit the same weights, the same outputs on the processor's `batch` (up to the last bits: two
    copies of the same weights at other addresses may take other kernel paths), the same prompt ids."""
    ours.save_pretrained(directory)
    again = VLM.load(directory)
    assert again.config == ours.config and again.tokenizer.template == template
    want = ours.state_dict()
    assert again.state_dict().keys() == want.keys()
    assert all(torch.equal(tensor, want[name]) for name, tensor in again.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), ours(**batch), rtol=0, atol=1e-5)
    conversation = CONVERSATIONS[2](sample_images())
    tokens_per_tile = ours.config.tokens_per_tile
    assert build_prompt(conversation, again.tokenizer, again.image_processor(), tokens_per_tile).input_ids == (
        build_prompt(conversation, ours.tokenizer, ours.image_processor(), tokens_per_tile).input_ids)


def check_packed_loss(ours, batch, pixel_values: torch.Tensor) -> None:
    """A training pack (the padded batch's rows back to back, positions restarting per sample, with
    `pixel_values` as the pack's tiles) gives each token the loss the padded call gives it."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    rows = [ids[b][real[b]] for b in range(len(ids))]
    flat = torch.cat(rows)
    cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    with torch.no_grad():
        packed = ours.compute_loss(flat, flat, positions, cu_seqlens, pixel_values)
        logits = ours(**batch)
    for b, row in enumerate(rows):
        expected = F.cross_entropy(logits[b][real[b]][:-1], row[1:], reduction="none")
        start = int(cu_seqlens[b])
        torch.testing.assert_close(packed.token_loss[start + 1:start + len(row)], expected, rtol=0, atol=TOLERANCE)


def check_cached_greedy_decoding(ours, ref, reference_inputs: Callable) -> None:
    """The first two CONVERSATIONS decode together through the engine's KV cache and give the tokens
    of transformers' generate on `reference_inputs(conversation)` (the processor's)."""
    engine = Engine(ours)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    conversations = [make(sample_images()) for make in CONVERSATIONS[:2]]
    seqs = [engine.add(build_prompt(c, ours.tokenizer, ours.image_processor(), ours.config.tokens_per_tile), params)
            for c in conversations]
    while engine.rows:
        engine.step()
        for seq in [s for s in engine.rows if s.finished]:
            engine.remove(seq)
    for conversation, seq in zip(conversations, seqs):
        inputs = reference_inputs(conversation)
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert seq.output_ids == expected and len(set(expected)) > 1


def tensor_names(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def edited_copy(source: Path, target: Path, config=None, preprocessor=None, processor=None) -> Path:
    """A copy of a saved directory with keys of its config.json, preprocessor_config.json and
    processor_config.json changed (a dict value updates a dict in place)."""
    shutil.copytree(source, target)
    for name, changes in (("config.json", config), ("preprocessor_config.json", preprocessor),
                          ("processor_config.json", processor)):
        if changes:
            data = json.loads((target / name).read_text())
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key].update(value)
                else:
                    data[key] = value
            (target / name).write_text(json.dumps(data))
    return target
