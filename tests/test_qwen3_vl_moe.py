"""Qwen3-VL-MoE loaded from and exported to transformers: a tiny random
`Qwen3VLMoeForConditionalGeneration` (four experts, top-2, a dense first layer) gives transformers'
logits on the Qwen-VL tests' batch (a text-only row, three image sizes, a video), its greedy tokens
through the KV cache, a packed loss equal to the padded call; its fused experts load in either
orientation; its export loads in transformers with the same logits and tensor names. Qwen3-MoE
decoders (`load_llm`) load and export too; what vlmkit's MoE cannot compute is refused by name.
`vlmkit build` puts a Qwen-VL directory's tower in front of a Qwen3-MoE decoder (Seed1.5-VL's shape)."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_qwen_vl import TEXT, TOKENS, TOLERANCE, VISION, _batch, _randomized, _reference_logits
from tests.test_qwen_vl import _hf_model as dense_hf_model
# The Qwen-VL parity tests, collected here once more: this module's `pair` fixture runs them on the MoE model.
from tests.test_qwen_vl import test_cached_greedy_decoding_gives_transformers_tokens  # noqa: F401
from tests.test_qwen_vl import test_deepstack_is_what_makes_qwen3_vl_equal  # noqa: F401
from tests.test_qwen_vl import test_image_tokens_and_grids_must_agree  # noqa: F401
from tests.test_qwen_vl import test_load_tells_a_transformers_directory_from_a_vlmkit_checkpoint  # noqa: F401
from tests.test_qwen_vl import test_logits_equal_transformers  # noqa: F401
from tests.test_qwen_vl import test_packed_loss_equals_the_padded_batch  # noqa: F401
from tests.test_qwen_vl import test_save_and_load_round_trip  # noqa: F401
# ... and the export tests, by its `exported` fixture.
from tests.test_qwen_vl_export import _load_reference, _tensor_names
from tests.test_qwen_vl_export import test_checkpoint_exported_through_the_cli  # noqa: F401
from tests.test_qwen_vl_export import test_export_loads_in_transformers_with_the_original_logits  # noqa: F401
from tests.test_qwen_vl_export import test_export_reads_back_into_vlmkit  # noqa: F401
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.models.hf.llm import llm_config_from_hf, llm_config_to_hf, llm_state_dict_to_hf, load_llm
from vlmkit.models.hf.qwen_vl import check_qwen_vl_exportable, qwen_vl_config
from vlmkit.models.mrope import packed_rope_positions

transformers = pytest.importorskip("transformers")

EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 24
MOE = dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_WIDTH)
ROPE = dict(rope_type="default", rope_theta=500.0, mrope_section=[6, 5, 5], mrope_interleaved=True)


def _hf_config(**text) -> dict:
    """A tiny Qwen3-VL-MoE config.json (as a dict): Qwen3-VL's tower of test_qwen_vl, a decoder of
    three layers, the first dense (mlp_only_layers), the others with four experts, top-2."""
    config = transformers.Qwen3VLMoeConfig(
        text_config={**TEXT, "head_dim": 32, "rope_parameters": ROPE, **MOE, "mlp_only_layers": [0], **text},
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=64,
                           num_position_embeddings=36, deepstack_visual_indexes=[0, 1], **VISION), **TOKENS)
    return config.to_dict()


def _hf_model():
    return _randomized(transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(**_hf_config())))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """("qwen3_vl", transformers model, VLM.from_hf of it, its directory): what test_qwen_vl's tests take."""
    ref = _hf_model()
    path = tmp_path_factory.mktemp("qwen3_vl_moe")
    ref.save_pretrained(path)
    return "qwen3_vl", ref, VLM.from_hf(path), path


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):
    """(family, transformers model, its directory, VLM.from_hf of it, that model's export)."""
    family, ref, ours, source = pair
    return family, ref, source, ours, ours.export_hf(tmp_path_factory.mktemp("qwen3_vl_moe_export"))


# --- loading -------------------------------------------------------------------------------------------


def test_decoder_config_read_from_the_checkpoint(pair):
    _, ref, ours, _ = pair
    llm = ours.config.llm
    assert llm.qk_norm and not llm.qkv_bias and llm.mrope_interleaved
    assert dataclasses.asdict(llm.moe) == dict(
        num_experts=EXPERTS, top_k=TOP_K, num_shared_experts=0, expert_intermediate_size=EXPERT_WIDTH,
        score_func="softmax", norm_topk_prob=True, bias_update_rate=0.0, aux_loss_coef=0.0, first_dense_layers=1)
    assert [type(block.mlp).__name__ for block in ours.llm.layers] == ["SwiGLU", "MoE", "MoE"]
    assert [type(layer.mlp).__name__ for layer in ref.model.language_model.layers] == [
        "Qwen3VLMoeTextMLP", "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextSparseMoeBlock"]


def test_fused_experts_are_split_per_expert(pair):
    """Expert e's gate and up are rows [0, I) and [I, 2I) of gate_up_proj[e]; its down is down_proj[e];
    the router is the gate; the selection bias is zero."""
    _, ref, ours, _ = pair
    theirs, mine = ref.model.language_model.layers[2].mlp, ours.llm.layers[2].mlp
    for e in range(EXPERTS):
        gate_up = theirs.experts.gate_up_proj[e]
        assert torch.equal(mine.experts[e].gate_proj.weight, gate_up[:EXPERT_WIDTH])
        assert torch.equal(mine.experts[e].up_proj.weight, gate_up[EXPERT_WIDTH:])
        assert torch.equal(mine.experts[e].down_proj.weight, theirs.experts.down_proj[e])
    assert torch.equal(mine.router.weight, theirs.gate.weight)
    assert not mine.router.score_bias.any()


def test_the_released_orientation_loads_the_same_model(pair, tmp_path):
    """The released files store the fused experts transposed ((E, D, 2I), (E, I, D)); they load as
    transformers loads them, into the same weights."""
    _, _, ours, path = pair
    state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v
             for k, v in load_file(path / "model.safetensors").items()}
    assert state["model.language_model.layers.1.mlp.experts.gate_up_proj"].shape == (EXPERTS, 64, 2 * EXPERT_WIDTH)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    released = VLM.from_hf(tmp_path)
    for name, t in ours.state_dict().items():
        assert torch.equal(released.state_dict()[name], t), name


def test_a_mis_shaped_fused_tensor_is_named(pair, tmp_path):
    _, _, _, path = pair
    state = load_file(path / "model.safetensors")
    name = "model.language_model.layers.2.mlp.experts.down_proj"
    state[name] = state[name][:, :, :-1].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.experts\.down_proj has shape \(4, 64, 23\)"):
        VLM.from_hf(tmp_path)


def test_routing_is_what_makes_the_logits_equal(pair):
    """Each expert's place matters: the model with two experts' down projections swapped in one
    layer gives other logits."""
    _, ref, _, path = pair
    swapped = VLM.from_hf(path)
    experts = swapped.llm.layers[1].mlp.experts
    with torch.no_grad():
        down = experts[0].down_proj.weight.clone()
        experts[0].down_proj.weight.copy_(experts[1].down_proj.weight)
        experts[1].down_proj.weight.copy_(down)
        inputs = _batch("qwen3_vl")
        got = swapped(**inputs)
    real = inputs["attention_mask"].bool()
    assert (got[real] - _reference_logits(ref, inputs)[real]).abs().max() > 1e-2


@pytest.mark.parametrize("text,dense", [(dict(mlp_only_layers=[1]), [1]),
                                        (dict(mlp_only_layers=[], decoder_sparse_step=2), [0, 2])])
def test_dense_layers_other_than_a_leading_range_are_refused(text, dense):
    with pytest.raises(CheckpointError, match=re.escape(f"dense layers {dense} ") + ".* first layers only"):
        qwen_vl_config(_hf_config(**text), "test")


def test_a_decoder_without_experts_is_dense():
    cfg = qwen_vl_config(_hf_config(mlp_only_layers=[0, 1, 2]), "test")
    assert cfg.llm.moe is None and cfg.llm.qk_norm


def test_the_balance_loss_follows_output_router_logits():
    assert qwen_vl_config(_hf_config(), "test").llm.moe.aux_loss_coef == 0.0
    cfg = qwen_vl_config(_hf_config(output_router_logits=True, router_aux_loss_coef=0.01), "test")
    assert cfg.llm.moe.aux_loss_coef == 0.01


# --- export --------------------------------------------------------------------------------------------


def test_export_writes_what_transformers_writes(exported):
    """Qwen3-VL-MoE's names (fused experts, module layout) and a config that reads back as the same VLMConfig."""
    _, _, source, ours, out = exported
    assert _tensor_names(out) == _tensor_names(source)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert (config["model_type"], config["text_config"]["model_type"], config["vision_config"]["model_type"]) == (
        "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_vl_moe_vision")
    assert qwen_vl_config(config, "export") == ours.config
    assert type(_load_reference(out)).__name__ == "Qwen3VLMoeForConditionalGeneration"


def _with_moe(cfg, **moe):
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, moe=dataclasses.replace(cfg.llm.moe, **moe)))


@pytest.mark.parametrize("moe,reason", [(dict(num_shared_experts=1), "no shared experts"),
                                        (dict(score_func="sigmoid"), "by softmax, not sigmoid"),
                                        (dict(norm_topk_prob=False), "always renormalises")])
def test_what_qwen3_vl_moe_cannot_compute_is_refused(pair, moe, reason):
    _, _, ours, _ = pair
    check_qwen_vl_exportable(ours.config)
    with pytest.raises(ConfigError, match=f"cannot export to Qwen3VLMoeForConditionalGeneration: .*{reason}"):
        check_qwen_vl_exportable(_with_moe(ours.config, **moe))


def test_an_moe_decoder_under_a_qwen2_5_vl_tower_is_refused(pair):
    dense = qwen_vl_config(dense_hf_model("qwen2_5_vl").config.to_dict(), "test")
    moe = pair[2].config.llm.moe
    with pytest.raises(ConfigError, match="qwen2_5_vl's text model is dense"):
        check_qwen_vl_exportable(dataclasses.replace(dense, llm=dataclasses.replace(dense.llm, moe=moe)))


def test_moved_selection_biases_are_refused_and_nothing_is_written(pair, tmp_path):
    path = pair[3]
    model = VLM.from_hf(path)
    with torch.no_grad():
        model.llm.layers[1].mlp.router.score_bias[0] = 0.5
    with pytest.raises(ConfigError, match=r"selection biases \['layers\.1\.mlp\.router\.score_bias'\] are not zero"):
        model.export_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Qwen3-MoE decoders --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_decoder_loads_and_exports(tmp_path, norm_topk_prob):
    """A Qwen3MoeForCausalLM directory (experts one tensor each, as transformers writes it) gives
    transformers' logits, and its export (Qwen3-MoE's config and names) loads back in transformers
    with the same logits."""
    ref = _randomized(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **TEXT, head_dim=32, **MOE, mlp_only_layers=[0], norm_topk_prob=norm_topk_prob)))
    ref.save_pretrained(tmp_path / "src")
    ours = load_llm(tmp_path / "src")
    assert ours.config.moe.norm_topk_prob == norm_topk_prob and ours.config.moe.first_dense_layers == 1
    ids = torch.randint(0, TEXT["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=TOLERANCE)
    out = tmp_path / "out"
    out.mkdir()
    hf_config = llm_config_to_hf(ours.config)
    (out / "config.json").write_text(json.dumps(hf_config))
    state = llm_state_dict_to_hf(ours)
    assert set(state) == set(load_file(tmp_path / "src" / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    assert llm_config_from_hf(hf_config) == ours.config
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, expected, rtol=0, atol=TOLERANCE)


def test_an_moe_decoder_that_is_not_qwen3_moe_is_refused(tmp_path):
    cfg = llm_config_from_hf({"architectures": ["Qwen3MoeForCausalLM"], **TEXT, **MOE, "head_dim": 32})
    with pytest.raises(ConfigError, match="exports as Qwen3-MoE only: .*no shared experts"):
        llm_config_to_hf(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=1)))


# --- vlmkit build: a Qwen-VL tower in front of an MoE decoder (Seed1.5-VL's shape) ---------------------


def _moe_llm_dir(path, hidden_size: int):
    ref = _randomized(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **{**TEXT, "hidden_size": hidden_size}, head_dim=32, **MOE, norm_topk_prob=True)))
    ref.save_pretrained(path)
    return path


@pytest.mark.parametrize("llm_width", [64, 48])
def test_build_assembles_a_native_tower_and_an_moe_decoder(tmp_path, llm_width):
    """`vlmkit build --vision QWEN_VL_DIR --llm QWEN3_MOE_DIR`: the Qwen2.5-VL tower (its mergers
    too where the widths agree) and the MoE decoder keep their weights; the model runs the Qwen-VL
    batch, trains a packed step and saves and loads."""
    dense_hf_model("qwen2_5_vl").save_pretrained(tmp_path / "qwen_vl")
    source = VLM.from_hf(tmp_path / "qwen_vl")
    llm_dir = _moe_llm_dir(tmp_path / "moe", llm_width)
    assert main(["build", "--vision", str(tmp_path / "qwen_vl"), "--llm", str(llm_dir),
                 "--out", str(tmp_path / "vlm")]) == 0
    model = VLM.from_pretrained(tmp_path / "vlm")
    cfg = model.config
    assert cfg.native_vision.style == "qwen2_5_vl" and cfg.llm.moe is not None
    assert cfg.llm.mrope_section == source.config.llm.mrope_section and cfg.native_vision.out_hidden_size == llm_width
    tower, decoder = model.vision.state_dict(), load_llm(llm_dir).state_dict()
    for name, t in source.vision.state_dict().items():
        if llm_width == 64 or not name.startswith(("merger.", "deepstack_mergers.")):
            assert torch.equal(tower[name], t), name
    if llm_width != 64:  # the mergers map to another width: new, initialised
        assert torch.equal(tower["merger.norm.weight"], torch.ones_like(tower["merger.norm.weight"]))
    assert all(torch.equal(model.llm.state_dict()[name], t) for name, t in decoder.items())

    inputs = _batch("qwen2_5_vl")
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (*inputs["input_ids"].shape, TEXT["vocab_size"])

    real = inputs["attention_mask"].bool()
    rows = [inputs["input_ids"][b][real[b]] for b in range(len(real))]
    flat, cu_seqlens = torch.cat(rows), torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    grids = dict(image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"])
    positions = packed_rope_positions(flat, cu_seqlens, model.mrope_layout, **grids,
                                      video_seconds_per_grid=inputs["second_per_grid_ts"])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.compute_loss(flat, flat, positions, cu_seqlens, inputs["pixel_values"],
                              pixel_values_videos=inputs["pixel_values_videos"], **grids).loss
    loss.backward()
    expert = model.llm.layers[1].mlp.experts[0].down_proj.weight
    before = expert.detach().clone()
    assert torch.isfinite(loss) and model.vision.blocks[0].attn.qkv.weight.grad is not None
    optimizer.step()
    assert not torch.equal(expert, before)

    model.eval()
    model.save_pretrained(tmp_path / "trained")
    again = VLM.from_pretrained(tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs), model(**inputs), rtol=0, atol=0)


def test_build_refuses_a_decoder_the_m_rope_layout_does_not_fit(tmp_path):
    dense_hf_model("qwen2_5_vl").save_pretrained(tmp_path / "qwen_vl")
    ref = _randomized(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TEXT, head_dim=16, **MOE)))
    ref.save_pretrained(tmp_path / "moe")
    with pytest.raises(CheckpointError, match=r"tower in front of this decoder: .*must add up to head_dim / 2 = 8"):
        VLM.from_hf(vision=tmp_path / "qwen_vl", llm=tmp_path / "moe")
