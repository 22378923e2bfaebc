"""Export of native-resolution VLMs back to transformers (`VLM.export_hf`, `vlmkit export --to hf`):
for Qwen2-VL, Qwen2.5-VL and Qwen3-VL a tiny random transformers model, loaded by `VLM.from_hf` and
exported, loads in transformers with no missing or unexpected tensor and gives the original's
logits; a vlmkit checkpoint exported through the command line does too; the processor configs give
transformers' image processor vlmkit's pixels; what a family cannot express is refused."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.test_qwen_vl import MERGE, PATCH, TEMPORAL, TOLERANCE, _batch, _hf_model, _reference_logits
from tests.tokenizer_support import QWEN2_VL_TEMPLATE, qwen_vl_dir
from vlmkit import VLM
from vlmkit.cli import main
from vlmkit.constants import VISION_END, VISION_START
from vlmkit.data.native_images import FAMILIES, NativeImageProcessor, processor_config_from_dir
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.models.hf.qwen_vl import check_qwen_vl_exportable, qwen_vl_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def exported(request, tmp_path_factory):
    """(family, transformers model, its directory, VLM.from_hf of it, that model's export)."""
    family = request.param
    ref = _hf_model(family)
    source = tmp_path_factory.mktemp(f"{family}_source")
    ref.save_pretrained(source)
    ours = VLM.from_hf(source)
    out = ours.export_hf(tmp_path_factory.mktemp(f"{family}_export"))
    return family, ref, source, ours, out


def _load_reference(path, model_class=None):
    """A transformers model from `path` (the Auto class unless one is named); fails on any missing,
    unexpected or mis-shaped tensor."""
    model_class = model_class or transformers.AutoModelForImageTextToText
    model, info = model_class.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), problems
    return model.eval()


def _tensor_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_export_loads_in_transformers_with_the_original_logits(exported):
    family, ref, source, _, out = exported
    back = _load_reference(out)
    assert type(back) is type(ref)
    inputs = _batch(family)
    expected, got = _reference_logits(ref, inputs), _reference_logits(back, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=TOLERANCE)


def test_export_writes_what_transformers_writes(exported):
    """The tensor names transformers' save_pretrained gives the family (the released layout for
    Qwen2-VL and Qwen2.5-VL, the module layout for Qwen3-VL; no lm_head when tied), and a config
    that reads back as the same VLMConfig."""
    family, _, source, ours, out = exported
    assert _tensor_names(out) == _tensor_names(source)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["text_config"]["model_type"] == f"{family}_text"
    assert config["text_config"]["rope_parameters"]["mrope_section"] == ours.config.llm.mrope_section
    assert qwen_vl_config(config, "export") == ours.config


def test_export_reads_back_into_vlmkit(exported):
    family, _, _, ours, out = exported
    again = VLM.from_hf(out)
    inputs = _batch(family)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs), ours(**inputs), rtol=0, atol=0)


def test_checkpoint_exported_through_the_cli(exported, tmp_path, capsys):
    family, ref, _, ours, _ = exported
    ours.save_pretrained(tmp_path / "vlm")
    assert main(["export", "--model", str(tmp_path / "vlm"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "(hf)" in capsys.readouterr().out
    back = _load_reference(tmp_path / "hf", type(ref))
    inputs = _batch(family)
    with torch.no_grad():
        ours_logits = ours(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(_reference_logits(back, inputs)[real], ours_logits[real], rtol=0, atol=TOLERANCE)


def test_processor_configs_give_vlmkit_pixels(exported, tmp_path):
    """The model's processor settings (here other than the family's) written as
    preprocessor_config.json: transformers' PIL image processor makes vlmkit's pixels from them,
    and vlmkit reads every setting back, video ones included."""
    family, _, _, ours, _ = exported
    model = VLM.from_pretrained(ours.save_pretrained(tmp_path / "vlm"))
    model.processor_config = dataclasses.replace(
        FAMILIES[family], patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=8 * 8,
        max_pixels=32 * 32, video_max_pixels=48 * 48, max_frames=64)
    out = model.export_hf(tmp_path / "hf")
    assert processor_config_from_dir(out) == model.processor_config
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 36, 3), dtype=np.uint8))
    expected = transformers.Qwen2VLImageProcessorPil.from_pretrained(out)(images=[image], return_tensors="pt")
    got = NativeImageProcessor(model.processor_config).images([image])
    assert got.grid_thw.tolist() == expected["image_grid_thw"].tolist() == [[1, 4, 8]]
    assert torch.equal(got.pixel_values, expected["pixel_values"])


def test_tokenizer_and_vision_token_ids_are_exported(tmp_path):
    """A Qwen2-VL directory with its tokenizer: the export carries the tokenizer, its chat
    template and the vision start / end ids, and transformers' tokenizer loads it."""
    directory = qwen_vl_dir(tmp_path / "source", QWEN2_VL_TEMPLATE)
    tok = Tokenizer.load(directory)
    ref = _hf_model("qwen2_vl")
    ref.config.text_config.vocab_size = tok.vocab_size
    ref.resize_token_embeddings(tok.vocab_size)
    ref.save_pretrained(directory)
    out = VLM.from_hf(directory).export_hf(tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (
        tok.token_id(VISION_START), tok.token_id(VISION_END))
    assert Tokenizer.load(out).chat_template == QWEN2_VL_TEMPLATE
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.convert_tokens_to_ids(VISION_START) == tok.token_id(VISION_START)


# --- refusals ------------------------------------------------------------------------------------------


def _changed(cfg, **native):
    return dataclasses.replace(cfg, native_vision=dataclasses.replace(cfg.native_vision, **native))


def test_what_a_family_cannot_express_is_refused(exported):
    family, _, _, ours, _ = exported
    cfg = ours.config
    check_qwen_vl_exportable(cfg)  # the loaded model itself is exportable
    wrong_interleave = dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, mrope_interleaved=not cfg.llm.mrope_interleaved))
    with pytest.raises(ConfigError, match="interleave"):
        check_qwen_vl_exportable(wrong_interleave)
    with pytest.raises(ConfigError, match="only it, spaces video frames"):
        check_qwen_vl_exportable(dataclasses.replace(cfg, tokens_per_second=None if cfg.tokens_per_second else 2.0))
    if family == "qwen2_5_vl":
        with pytest.raises(ConfigError, match="always uses window attention"):
            check_qwen_vl_exportable(_changed(cfg, window_size=0, fullatt_block_indexes=()))
    if family == "qwen3_vl":
        with pytest.raises(ConfigError, match="always has a learned position grid"):
            check_qwen_vl_exportable(_changed(cfg, num_position_embeddings=0))


def test_refusal_writes_nothing_and_the_cli_says_why(tmp_path, capsys):
    cfg = qwen_vl_config(_hf_model("qwen2_5_vl").config.to_dict(), "test")
    model = VLM(_changed(cfg, window_size=0, fullatt_block_indexes=()))
    with pytest.raises(ConfigError):
        model.export_hf(tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    model.save_pretrained(tmp_path / "vlm")
    assert main(["export", "--model", str(tmp_path / "vlm"), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "always uses window attention" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    exportable = VLM(cfg)
    exportable.processor_config = FAMILIES["qwen3_vl"]  # Qwen3-VL's video rules on a Qwen2.5-VL model
    with pytest.raises(ConfigError, match="video processor follows qwen2_vl's rules"):
        exportable.export_hf(tmp_path / "mismatched")


def test_hf_exports_a_llava_shaped_model_as_llava(tmp_path):
    from tests.test_checkpoint_format import _save_hf_parts

    _save_hf_parts(tmp_path)
    assert main(["build", "--vision", str(tmp_path / "vision"), "--llm", str(tmp_path / "llm"), "--adapter", "mlp",
                 "--out", str(tmp_path / "vlm")]) == 0
    assert main(["export", "--model", str(tmp_path / "vlm"), "--to", "hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    _load_reference(tmp_path / "hf", transformers.LlavaForConditionalGeneration)
