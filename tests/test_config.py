"""Run config: typed loading, dotted-path errors, --set overrides, ready configs."""

import pytest

from vlmkit.config import CONFIG_DIR, RunConfig, Stage, apply_overrides, find_config, load_config
from vlmkit.errors import ConfigError


def base() -> dict:
    return {
        "model": {"config": {"llm": {"num_layers": 2}}},
        "data": {"qa": {"path": "qa.jsonl", "format": "messages"}, "text": {"path": "t.jsonl", "kind": "text"}},
        "stages": [
            {"name": "align", "adapter_lr": 1e-3, "steps": 5, "mixture": {"qa": 1.0}},
            {"name": "sft", "llm_lr": 1e-4, "adapter_lr": 1e-4, "steps": 7},
        ],
    }


def test_loads_typed_sections():
    cfg = load_config(base())
    assert isinstance(cfg, RunConfig) and isinstance(cfg.stages[0], Stage)
    assert cfg.stages[1].llm_lr == 1e-4 and cfg.stages[0].llm_lr == 0.0
    assert cfg.stage_mixture(1) == {"qa": 1.0, "text": 1.0}
    assert cfg.stages[0].betas == (0.9, 0.95)


def test_yaml_exponent_without_dot_is_a_float():
    raw = base()
    raw["stages"][0]["adapter_lr"] = "1e-3"  # how PyYAML reads `1e-3`
    assert load_config(raw).stages[0].adapter_lr == pytest.approx(1e-3)


@pytest.mark.parametrize("override, needle", [
    (["stages.0.stepz=3"], "stages.0.stepz"),
    (["stages.1.steps=abc"], "stages.1.steps: expected an integer"),
    (["stages.0.schedule=linear"], "stages.0.schedule: must be one of"),
    (["stages.0.betas=[0.9]"], "stages.0.betas"),
    (["stages.0.precision=fp8"], "stages.0.precision"),
    (["data.qa.weight=heavy"], "data.qa.weight"),
    (["model.config.llm.num_layerz=1"], "model.config"),
    (["stages.0.adapter_lr=0"], "every module is frozen"),
    (["stages.0.mixture={nope: 1}"], "stages.0.mixture: unknown source"),
    (["stages.0.steps=0"], "steps must be >= 1"),
    (["stages.5.steps=1"], "out of range"),
    (["trainer.steps=1"], "unknown key(s) trainer"),
    (["stages.0.steps"], "KEY=VALUE"),
    (["stages.0.gradient_checkpointing=maybe"], "expected true or false"),
    (["model.processor={patch_size: 16}"], "model.processor: patch_size cannot be changed"),  # at load, before any data
])
def test_bad_values_name_the_dotted_path(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(base(), override)
    assert needle in str(info.value)


def test_overrides_parse_yaml_values():
    cfg = load_config(base(), ["stages.1.llm_lr=2.0e-5", "stages.0.gradient_checkpointing=true",
                               "stages.0.mixture={qa: 2, text: 1}", "model.config.llm.num_layers=3",
                               "stages.-1.name=last", "num_threads=2"])
    assert cfg.stages[1].llm_lr == 2e-5 and cfg.stages[0].gradient_checkpointing is True
    assert cfg.stages[0].mixture == {"qa": 2.0, "text": 1.0}
    assert cfg.model.config["llm"]["num_layers"] == 3
    assert cfg.stages[1].name == "last" and cfg.num_threads == 2


def test_overrides_do_not_touch_the_input():
    raw = base()
    apply_overrides(raw, ["stages.0.steps=99"])
    assert raw["stages"][0]["steps"] == 5


def test_model_source_must_be_exactly_one():
    raw = base()
    raw["model"] = {"config": {}, "pretrained": "ckpt"}
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(raw)
    raw["model"] = {"hf_vision": "v"}
    with pytest.raises(ConfigError, match="hf_vision and hf_llm go together"):
        load_config(raw)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "data:\n  t: {path: corpus.jsonl, kind: text}\nstages:\n  - {llm_lr: 1.0e-3, adapter_lr: 0, steps: 1}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.resolve(cfg.data["t"].path) == str(tmp_path / "corpus.jsonl")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_ready_configs_load(name):
    path = find_config(name)
    assert path.parent == CONFIG_DIR
    cfg = load_config(name)
    assert cfg.stages


def test_unknown_config_name_lists_ready_ones():
    with pytest.raises(ConfigError, match="llava15"):
        find_config("no-such-config")


def test_stage_kinds_and_their_settings():
    raw = base()
    raw["stages"][1].update(kind="dpo", lora={"rank": 4, "alpha": 8}, dpo={"beta": 0.2})
    stage = load_config(raw).stages[1]
    assert stage.kind == "dpo" and stage.lora.rank == 4 and stage.lora.scaling == 2.0
    assert stage.dpo.beta == 0.2 and stage.grpo.group_size == 8  # other kinds' sections keep defaults
    assert load_config(base()).stages[0].kind == "sft" and load_config(base()).stages[0].lora is None


@pytest.mark.parametrize("override, needle", [
    (["stages.1.kind=ppo"], "stages.1.kind: must be one of"),
    (["stages.1.lora={rank: 0}"], "lora.rank must be >= 1"),
    (["stages.1.lora={targets: []}"], "lora.targets"),
    (["stages.1.kind=dpo", "stages.1.dpo={reference: lora_disabled}"], "needs a `lora` section"),
    (["stages.1.dpo={beta: 0}"], "dpo.beta must be > 0"),
    (["stages.1.grpo={group_size: 0}"], "grpo.group_size must be >= 1"),
    (["stages.1.grpo={clip_high: -0.1}"], "grpo.clip_high must be >= 0"),
])
def test_stage_kind_settings_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(base(), override)
