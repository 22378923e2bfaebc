"""LoRA (vlmkit/models/lora.py, models/hf/peft.py): adapters on chosen linear layers, merged and
unmerged, switched off for a reference model, saved in peft's format under the names of the
transformers export so that peft reproduces vlmkit's logits on that export, loaded back through
the API and the command line, and trained by a run config's LoRA stage with exact resume."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.test_decode_paths import greedy_full_forward, greedy_with_cache
from tests.test_deepseek_vl import FAMILIES as DEEPSEEK_VL_FAMILIES
from tests.test_deepseek_vl import _parity_batch as deepseek_vl_batch
from tests.test_deepseek_vl import _reference_processor as deepseek_vl_processor
from tests.test_deepseek_vl import _save as save_deepseek_vl
from tests.test_internvl import SHAPES as INTERNVL_SHAPES
from tests.test_internvl import _parity_batch as internvl_batch
from tests.test_internvl import _reference_processor as internvl_processor
from tests.test_internvl import _save_internvl
from tests.test_llava import IMG, _inputs, exportable_config, with_random_norms
from tests.test_llm import samples
from tests.test_onevision import _parity_batch as onevision_batch
from tests.test_onevision import _reference_processor as onevision_processor
from tests.test_onevision import save_onevision
from tests.test_llm import tiny as tiny_llm
from tests.test_qwen_vl import TOLERANCE, _batch, _hf_model, _reference_logits
from tests.train_support import Stopped, assert_same_weights, prepared_world, stop_after
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.config import load_config
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.config import VLMConfig
from vlmkit.models.hf.common import rename
from vlmkit.models.hf.llava import LAYOUTS, llava_state_dict
from vlmkit.models.hf.peft import transformers_module_names
from vlmkit.models.lora import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoRAConfig, LoRALinear, apply_lora,
                                has_lora, is_lora_parameter, linear_layers, load_adapter, lora_disabled,
                                lora_layers, merge_and_unload, merge_lora, save_adapter, unmerge_lora)
from vlmkit.models.vlm import VLMModel
from vlmkit.train.checkpoint import list_checkpoints
from vlmkit.train.loop import ADAPTERS_DIR, train

transformers = pytest.importorskip("transformers")

EVERY_PART = ["vision.*", "adapter.*", "llm.*"]
"""Targets that adapt every linear layer of the model (tower, adapter, decoder)."""
B_STD = 0.1
"""Adapters are tested with random B (a fresh one is zero and would hide every mistake)."""


def llava_shaped(style: str = "siglip") -> VLM:
    """A tiny VLM that exports to llava-hf, with non-trivial norms (as tests/test_llava.py builds);
    the same weights at every call."""
    torch.manual_seed(0)
    return with_random_norms(VLM(exportable_config(style, tie_embeddings=False)).eval())


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * B_STD)


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(*_inputs(16))


def with_adapters(targets=None) -> VLM:
    """`llava_shaped()` with rank-4 adapters (default targets unless given), B random."""
    model = llava_shaped()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, **({"targets": targets} if targets else {})))
    randomise_adapters(model)
    return model


# --- the adapters ------------------------------------------------------------------------------


def test_default_targets_are_the_decoders_projections_and_names_are_peft_s():
    model = llava_shaped()
    base_keys = set(model.state_dict())
    assert apply_lora(model, LoRAConfig(rank=4)) == 2 * 7  # q k v o gate up down per decoder layer
    wrapped = lora_layers(model)
    assert all(name.startswith("llm.layers.") and name.endswith("_proj") for name in wrapped)
    added = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())  # the base tensors keep their names
    assert added == {f"{name}.{m}.weight" for name in wrapped for m in ("lora_A", "lora_B")}
    assert all(is_lora_parameter(k) for k in added) and not any(is_lora_parameter(k) for k in base_keys)
    layer = wrapped["llm.layers.0.attn.q_proj"]
    assert layer.lora_A.weight.shape == (4, 48) and layer.lora_B.weight.shape == (48, 4)


def test_a_fresh_adapter_changes_nothing_and_starts_from_the_seed():
    base = llava_shaped()
    expected = logits(base)
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    apply_lora(model, LoRAConfig(rank=4))
    assert torch.equal(logits(model), expected)  # B starts at zero
    again = copy.deepcopy(base)
    torch.manual_seed(5)
    apply_lora(again, LoRAConfig(rank=4))
    other = copy.deepcopy(base)
    torch.manual_seed(6)
    apply_lora(other, LoRAConfig(rank=4))
    for name, layer in lora_layers(model).items():
        assert not layer.lora_B.weight.any() and layer.lora_A.weight.any()
        assert torch.equal(layer.lora_A.weight, lora_layers(again)[name].lora_A.weight)
        assert not torch.equal(layer.lora_A.weight, lora_layers(other)[name].lora_A.weight)


def test_targets_that_match_no_linear_layer_are_named():
    model = llava_shaped()
    with pytest.raises(ConfigError, match=r"llm\.nothing\.\*"):
        apply_lora(model, LoRAConfig(targets=["llm.nothing.*", "llm.layers.*.attn_norm"]))
    assert not has_lora(model)
    apply_lora(model, LoRAConfig())
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_lora_forward_equals_the_merged_model():
    model = with_adapters(EVERY_PART)
    expected = logits(model)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    unloaded = merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert torch.equal(logits(unloaded), logits(merged))
    # unloaded: a plain model with the base's keys, the merged weights in them
    assert not has_lora(unloaded) and all(type(m) is not LoRALinear for m in unloaded.modules())
    assert set(unloaded.state_dict()) == set(llava_shaped().state_dict())
    for name, layer in lora_layers(merged).items():
        assert torch.equal(unloaded.get_submodule(name).weight, layer.weight)


def test_merge_then_unmerge_restores_the_base_bitwise():
    model = with_adapters(EVERY_PART)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model)
    merge_lora(model)
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)
    unmerge_lora(model)
    assert_same_weights(before, model.state_dict())
    assert torch.equal(logits(model), expected)


def test_lora_disabled_is_the_base_model_and_restores_the_adapters():
    base = llava_shaped()
    expected_base = logits(base)
    model = with_adapters(EVERY_PART)
    expected = logits(model)
    with lora_disabled(model):
        assert torch.equal(logits(model), expected_base)
        with lora_disabled(model):
            pass
        assert torch.equal(logits(model), expected_base)  # a nested view leaves the outer one as it was
    assert torch.equal(logits(model), expected)
    merge_lora(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with lora_disabled(model):
        assert torch.equal(logits(model), expected_base)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert_same_weights(merged, model.state_dict())
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        with lora_disabled(base):
            pass


def test_a_frozen_base_with_gradient_checkpointing_gives_the_adapters_their_gradients():
    """The embeddings and every base weight are frozen, so a checkpointed block's inputs need no
    gradient; the adapters inside it must still get theirs, the same as without checkpointing."""
    grads = {}
    for checkpointing in (False, True):
        model = with_adapters(EVERY_PART).train()
        for name, p in model.named_parameters():
            p.requires_grad_(is_lora_parameter(name))
        model.set_gradient_checkpointing(checkpointing)
        model(*_inputs(16)).float().square().mean().backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys()
    # every adapter but those of the tower's last block, which the features (layer -2) never reach
    unused = {name for name in grads[True] if name.startswith("vision.layers.1.")}
    assert unused and all(grads[c][name] is None for c in grads for name in unused)
    for name in grads[True].keys() - unused:
        assert grads[True][name] is not None and grads[True][name].any(), name
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)


def test_decode_steps_apply_the_adapters():
    """A KV-cache decode step (`Block.step`, which calls the projections as modules) computes what
    a full forward of the LoRA model computes."""
    model = tiny_llm()
    apply_lora(model, LoRAConfig(rank=4, targets=["layers.*"]))
    randomise_adapters(model)
    prompts = samples([5, 3], seed=4)
    step_path = greedy_with_cache(model, prompts)
    with lora_disabled(model):
        base_path = greedy_with_cache(model, prompts)
    assert not torch.allclose(step_path["logits"], base_path["logits"])
    for b, prompt in enumerate(prompts):
        tokens, expected = greedy_full_forward(model, prompt)
        assert step_path["tokens"][b].tolist() == tokens
        torch.testing.assert_close(step_path["logits"][b], expected, atol=1e-5, rtol=1e-5)


# --- peft's format on the transformers export ------------------------------------------------------


def _peft_model(export_dir, adapter_dir):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("style", ["siglip", "clip"])
def test_peft_loads_the_adapter_onto_the_llava_export_with_the_same_logits(tmp_path, style):
    model = llava_shaped(style)
    model.export_hf_llava(tmp_path / "export")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=EVERY_PART))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert "model.language_model.layers.0.self_attn.q_proj" in config["target_modules"]
    ids, pixels = _inputs(16)
    with torch.no_grad():
        got = _peft_model(tmp_path / "export", tmp_path / "adapter")(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_peft_loads_the_adapter_onto_the_qwen_vl_export_with_the_same_logits(tmp_path, family):
    _hf_model(family).save_pretrained(tmp_path / "source")
    model = VLM.from_hf(tmp_path / "source")
    model.export_hf(tmp_path / "export")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["vision.*", "llm.*"]))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    inputs = _batch(family)
    with torch.no_grad():
        expected = model(**inputs)
    got = _reference_logits(_peft_model(tmp_path / "export", tmp_path / "adapter"), inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("shape", INTERNVL_SHAPES)
def test_peft_loads_the_adapter_onto_the_internvl_export_with_the_same_logits(tmp_path, shape):
    _save_internvl(tmp_path / "source", shape)
    model = VLM.from_hf(tmp_path / "source")
    model.export_hf(tmp_path / "export")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=EVERY_PART))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    batch = internvl_batch(internvl_processor(tmp_path / "source"))
    with torch.no_grad():
        expected = model(**batch)
        got = _peft_model(tmp_path / "export", tmp_path / "adapter")(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


def _peft_logits_equal_ours(tmp_path, batch) -> None:
    """The model imported from tmp_path/source, exported, given random adapters on every part and
    saved; peft's model from the export and the adapter gives vlmkit's logits on `batch`."""
    model = VLM.from_hf(tmp_path / "source")
    model.export_hf(tmp_path / "export")
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=EVERY_PART))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(**batch)
        got = _peft_model(tmp_path / "export", tmp_path / "adapter")(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


def test_peft_loads_the_adapter_onto_the_onevision_export_with_the_same_logits(tmp_path):
    save_onevision(tmp_path / "source")
    _peft_logits_equal_ours(tmp_path, onevision_batch(onevision_processor(tmp_path / "source")))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert {"model.multi_modal_projector.linear_1", "model.vision_tower.encoder.layers.0.mlp.fc1",
            "model.language_model.layers.0.self_attn.q_proj"} <= set(config["target_modules"])


@pytest.mark.parametrize("family", list(DEEPSEEK_VL_FAMILIES))
def test_peft_loads_the_adapter_onto_the_deepseek_vl_export_with_the_same_logits(tmp_path, family):
    save_deepseek_vl(tmp_path / "source", family)
    _peft_logits_equal_ours(tmp_path, deepseek_vl_batch(deepseek_vl_processor(tmp_path / "source", family)))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    expected = {"model.vision_model.encoder.layers.0.mlp.fc1", "model.language_model.layers.0.self_attn.q_proj"}
    expected |= ({"model.aligner.linear1"} if family == "deepseek_vl" else
                 {"model.aligner.vision_proj", "model.aligner.high_res_vision_proj",
                  "model.high_res_vision_model.vision_encoder.layers.0.attn.qkv"})
    assert expected <= set(config["target_modules"])


def test_llava_module_names_are_llava_s_layouts_read_backwards():
    """Every module name the adapter uses maps, by the importer's LAYOUTS, to the tensor name the
    export writes for that layer."""
    model = llava_shaped()
    exported = set(llava_state_dict(model))
    names = transformers_module_names(model.config, linear_layers(model))
    normalised, _ = rename([f"{m}.weight" for m in names.values()], LAYOUTS)
    assert set(normalised.values()) <= exported
    assert len(set(names.values())) == len(names)


def test_an_adapter_reloads_and_merges_through_the_api_and_the_export_command(tmp_path):
    model = with_adapters(EVERY_PART)
    llava_shaped().save_pretrained(tmp_path / "base")  # the base `model` was built on
    save_adapter(model, tmp_path / "adapter")
    expected = logits(model)

    attached = VLM.from_pretrained(tmp_path / "base")
    assert load_adapter(attached, tmp_path / "adapter") == len(lora_layers(model))
    assert torch.equal(logits(attached), expected)

    merged = VLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert not has_lora(merged)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)

    assert main(["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--to", "hf-llava", str(tmp_path / "hf")]) == 0
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = _inputs(16)
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids, pixel_values=pixels).logits, expected, rtol=0,
                                   atol=1e-4)


def test_a_model_the_export_cannot_write_keeps_vlmkit_names(tmp_path):
    torch.manual_seed(0)
    cfg = VLMConfig(vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2), adapter=dict(kind="pixel_shuffle", scale_factor=2),
                    llm=dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4),
                    image_token_id=IMG)
    model = VLMModel(cfg).eval()
    plain = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(rank=2))
    randomise_adapters(model)
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE)))
    assert "base_model.model.llm.layers.0.attn.q_proj.lora_A.weight" in keys
    load_adapter(plain, tmp_path)
    assert_same_weights(model.state_dict(), plain.state_dict())


def _adapter_dir(tmp_path, edit_tensors=None, edit_config=None):
    model = with_adapters()
    save_adapter(model, tmp_path)
    if edit_tensors is not None:
        tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
        edit_tensors(tensors)
        save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS_FILE))
    if edit_config is not None:
        config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
        config.update(edit_config)
        (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    return tmp_path


Q_PROJ = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit_tensors,edit_config,match", [
    (lambda t: t.update({"base_model.model.model.nowhere.lora_A.weight": torch.zeros(4, 4)}), None,
     "model.nowhere.lora_A.weight"),
    (lambda t: t.pop(f"{Q_PROJ}.lora_B.weight"), None, r"missing tensors \(1\).*layers.0.attn.q_proj.lora_B"),
    (lambda t: t.update({f"{Q_PROJ}.lora_A.weight": torch.zeros(3, 48)}), None, r"q_proj.lora_A.weight \(3, 48\)"),
    (None, {"use_dora": True}, "DoRA"),
    (None, {"peft_type": "IA3"}, "peft_type 'IA3'"),
], ids=["unknown module", "missing matrix", "wrong rank", "dora", "other method"])
def test_a_bad_adapter_is_refused_with_the_reason_and_leaves_the_model_as_it_was(tmp_path, edit_tensors, edit_config,
                                                                                match):
    directory = _adapter_dir(tmp_path, edit_tensors, edit_config)
    model = llava_shaped()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        load_adapter(model, directory)
    assert not has_lora(model)
    assert_same_weights(before, model.state_dict())


def test_a_directory_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a LoRA adapter directory"):
        load_adapter(llava_shaped(), tmp_path)


# --- a LoRA stage of a run ------------------------------------------------------------------------------

LORA_RUN = ["num_threads=1", "progress=false", "tensorboard=false", "stages.0.steps=3", "stages.1.steps=4",
            "stages.1.save_every=2", "stages.1.lora={rank: 4, alpha: 8}"]
"""tiny.yaml with its second stage (sft) a LoRA stage: checkpoints at global steps 3 (end of
align), 5 (inside the LoRA stage) and 7 (its end)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(prepared_world(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    threads = torch.get_num_threads()  # the trainer sets the process's thread count
    out = tmp_path_factory.mktemp("lora-run")
    train(load_config("tiny", [f"world.dir={world}", *LORA_RUN]), out)
    torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_a_lora_stage_trains_the_adapters_and_ends_with_a_merged_model(lora_run):
    adapter = lora_run / ADAPTERS_DIR / "sft"
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert any(t.any() for k, t in load_file(str(adapter / ADAPTER_WEIGHTS_FILE)).items() if ".lora_B." in k)
    inside = load_file(str(lora_run / "checkpoints" / "step-00000005" / "model.safetensors"))
    assert any(is_lora_parameter(k) for k in inside)  # a checkpoint inside the stage: base + adapters
    final = load_file(str(lora_run / "final" / "model.safetensors"))
    assert not any(is_lora_parameter(k) for k in final)
    meta = json.loads((lora_run / "final" / "vlmkit.json").read_text())
    assert [s["lora"] for s in meta["stages"]] == [False, True]
    # The base stayed frozen through the stage: final = that base + the saved adapter, merged.
    model = VLM.from_pretrained(lora_run / "final")
    base = {k: t for k, t in inside.items() if not is_lora_parameter(k)}
    model.load_state_dict(base)
    load_adapter(model, adapter)
    merge_and_unload(model)
    state = model.state_dict()
    for name, tensor in final.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stopped_after", [5, 6], ids=["at a checkpoint inside the stage", "between checkpoints"])
def test_a_lora_stage_resumes_bitwise(world, lora_run, monkeypatch, tmp_path, stopped_after):
    threads = torch.get_num_threads()
    cfg = load_config("tiny", [f"world.dir={world}", *LORA_RUN])
    stop_after(monkeypatch, stopped_after)
    with pytest.raises(Stopped):
        train(cfg, tmp_path)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000005"
    train(load_config("tiny", [f"world.dir={world}", *LORA_RUN]), tmp_path, resume=True)
    torch.set_num_threads(threads)
    assert_same_weights(load_file(str(lora_run / "final" / "model.safetensors")),
                        load_file(str(tmp_path / "final" / "model.safetensors")))
    adapter = f"{ADAPTERS_DIR}/sft/{ADAPTER_WEIGHTS_FILE}"
    assert_same_weights(load_file(str(lora_run / adapter)), load_file(str(tmp_path / adapter)))


# --- FSDP2 ------------------------------------------------------------------------------------------

FSDP_SCRIPT = """
import copy, json, sys
import torch
from safetensors.torch import load_file, save_file
from vlmkit.models.config import VLMConfig
from vlmkit.models.lora import (LoRAConfig, apply_lora, is_lora_parameter, lora_layers, merge_and_unload,
                                save_adapter)
from vlmkit.models.vlm import VLMModel
from vlmkit.train.distributed import Dist, full_state_dict, shard_model

ctx = Dist.from_env()
config, inputs, out = sys.argv[1:]
torch.manual_seed(0)
model = VLMModel(VLMConfig.from_dict(json.loads(config))).train()
apply_lora(model, LoRAConfig(rank=4, targets=["vision.*", "adapter.*", "llm.*"]))  # before fully_shard
with torch.no_grad():
    for layer in lora_layers(model).values():
        layer.lora_B.weight.normal_(std=0.1)
for name, p in model.named_parameters():
    p.requires_grad_(is_lora_parameter(name))
single = copy.deepcopy(model)
shard_model(model, ctx)
model.set_gradient_checkpointing(True)
batch = load_file(inputs)
for m in (model, single):
    m(batch["ids"], batch["pixels"]).square().mean().backward()
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2).step()
trained = full_state_dict(model, ctx)  # every rank takes part; rank 0 gets the tensors
if ctx.is_main:  # the adapter of the sharded model, from the gathered state
    save_adapter(model, out + "/sharded", trained)
    save_adapter(single, out + "/single")
with torch.no_grad():  # a forward, as the trainer's stage-end evaluation: it leaves the root unsharded
    model(batch["ids"], batch["pixels"])
model.reshard()  # the root's parameters back to their shards, so that the merge writes into those
merge_and_unload(model)
merge_and_unload(single)
merged = full_state_dict(model, ctx)
if ctx.is_main:
    save_file(merged, out + "/merged.safetensors")
    save_file(single.state_dict(), out + "/single.safetensors")
ctx.close()
"""


@pytest.mark.slow
def test_adapters_applied_before_fsdp2_sharding_train_and_merge_like_one_process(tmp_path):
    """What a LoRA stage needs under torchrun: adapters applied before `fully_shard`, a step with
    gradient checkpointing and a frozen base, then (the root resharded) the merge, on 2 gloo
    processes, equal to one process."""
    model = llava_shaped()
    ids, pixels = _inputs(16)
    save_file({"ids": ids, "pixels": pixels}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "script.py").write_text(FSDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "script.py"), json.dumps(model.config.to_dict()),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = load_file(str(tmp_path / "sharded" / ADAPTER_WEIGHTS_FILE))
    single = load_file(str(tmp_path / "single" / ADAPTER_WEIGHTS_FILE))
    assert sharded.keys() == single.keys() and sharded
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-7)
    merged, expected = load_file(str(tmp_path / "merged.safetensors")), load_file(str(tmp_path / "single.safetensors"))
    assert merged.keys() == expected.keys() and not any(is_lora_parameter(k) for k in merged)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-7)
