"""train/data.py: a world on disk is reused only when it matches the run's world settings."""

import json

import pytest

from vlmkit.config import WorldSpec
from vlmkit.errors import ConfigError
from vlmkit.train.data import prepare_world


def fake_world(root, **settings):
    root.mkdir(parents=True, exist_ok=True)
    world = {"seed": 0, "turns_per_record": 8, "train_questions": None, "prompt_layout": "text-then-image",
             "answer_style": "worked", "counts": {"train": {"scenes": 40}, "val": {"scenes": 0}, "test": {"scenes": 5}}}
    world.update(settings)
    (root / "world.json").write_text(json.dumps(world))


def test_a_world_with_other_settings_is_refused_with_what_differs(tmp_path):
    fake_world(tmp_path / "w")
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=1,
                     train_questions={"color": 2})
    with pytest.raises(ConfigError) as err:
        prepare_world(spec, progress=False)
    message = str(err.value)
    assert "turns_per_record: 8 on disk, 1 in the config" in message
    assert "train_questions" in message and "n_train" not in message


def test_a_world_asked_image_first_is_refused(tmp_path):
    """Worlds written before the question-then-image layout (no prompt_layout in world.json)."""
    fake_world(tmp_path / "w", prompt_layout=None)
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=8)
    with pytest.raises(ConfigError, match="prompt_layout: None on disk, 'text-then-image' in the config"):
        prepare_world(spec, progress=False)


def test_a_world_answering_in_one_word_is_refused(tmp_path):
    """Worlds written before relation and option answers were worked (no answer_style)."""
    fake_world(tmp_path / "w", answer_style=None)
    spec = WorldSpec(dir=str(tmp_path / "w"), n_train=40, n_val=0, n_test=5, turns_per_record=8)
    with pytest.raises(ConfigError, match="answer_style: None on disk, 'worked' in the config"):
        prepare_world(spec, progress=False)


def test_world_spec_checks_turns_per_record():
    with pytest.raises(ConfigError, match="turns_per_record"):
        WorldSpec(turns_per_record=0)
