"""The `vlmkit` command: the subcommand table, and errors that name what was wrong in one line."""

import subprocess
import sys

import pytest

from vlmkit.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "vlmkit", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("demo", "train", "eval", "chat", "serve", "export", "build", "data"):
        assert name in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["build", "--help"], ["export", "--help"],
                                  ["data", "--help"], ["data", "synth", "--help"]])
def test_help_does_not_import_torch(args):
    """The subcommand modules import torch inside run(), so that help stays fast."""
    code = ("import sys\nfrom vlmkit.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_unknown_command_names_it_and_the_choices():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice: 'frobnicate'" in out.stderr and "'train'" in out.stderr


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_train_unknown_config_lists_the_ready_ones(capsys):
    assert main(["train", "nosuch"]) == 2
    err = error_line(capsys)
    assert err.startswith("vlmkit train: error: config 'nosuch'")
    assert "no such file, and not one of the ready configs" in err and "'tiny'" in err


@pytest.mark.parametrize("override, expected", [
    ("stages.0.nosuch=1", "unknown key(s) stages.0.nosuch"),
    ("stages.9.steps=1", "stages.9: index '9' out of range"),
    ("stages.0.steps=abc", "stages.0.steps: expected an integer"),
    ("novalue", "--set 'novalue': expected KEY=VALUE"),
])
def test_train_bad_override_names_the_dotted_key(override, expected, capsys):
    # the config is checked before any data or model is made, so nothing is written
    assert main(["train", "tiny", "--set", override]) == 2
    assert expected in error_line(capsys)


def test_train_without_a_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    assert "the following arguments are required: config" in capsys.readouterr().err


def test_build_names_the_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no-vision"
    assert main(["build", "--vision", str(missing), "--llm", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = error_line(capsys)
    assert err.startswith("vlmkit build: error:") and f"{missing}: no config.json" in err
    assert not (tmp_path / "out").exists()


def test_export_names_the_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert main(["export", "--model", str(missing), "--to", "hf-llava", str(tmp_path / "out")]) == 2
    err = error_line(capsys)
    assert err.startswith("vlmkit export: error:") and f"{missing}: no config.json" in err
    assert not (tmp_path / "out").exists()


def test_export_unknown_format_names_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(tmp_path), "--to", "onnx", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "argument --to: invalid choice: 'onnx' (choose from 'hf', 'hf-llava')" in capsys.readouterr().err
