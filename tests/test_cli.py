import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "vlmkit", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("demo", "train", "eval", "chat", "serve", "export", "data"):
        assert name in out.stdout


def test_unknown_command_fails():
    out = run("frobnicate")
    assert out.returncode != 0
