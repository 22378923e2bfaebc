"""The wheel is complete: built, installed (not editable) into a fresh virtual environment, it runs
`vlmkit demo --quick` and `vlmkit train tiny` from a directory outside the repository, so the ready
configs and the web page travel inside the package.

Nothing is downloaded: the fresh environment sees this environment's site-packages (torch and the
other dependencies) through a `.pth` file, which puts those directories on sys.path without running
the `.pth` files inside them, so the editable install of vlmkit there stays out of the way.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vlmkit.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("vlmkit/configs/tiny.yaml", "vlmkit/configs/demo.yaml", "vlmkit/serve/static/index.html")
DEPENDENCIES_PTH = "vlmkit-test-dependencies.pth"


def dependency_dirs() -> list[str]:
    """The site-packages directories this interpreter imports torch and the rest from (its own,
    and any a `.pth` file or --system-site-packages added)."""
    return [p for p in dict.fromkeys(sys.path)
            if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def check_run(args: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources: an in-tree build would leave build/ in the
    repository, and a stale build/lib there could carry deleted modules into the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO / "vlmkit", src / "vlmkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    check_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-w", tmp / "dist", src])
    (whl,) = (tmp / "dist").glob("vlmkit-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("venv")
    check_run([sys.executable, "-m", "venv", root])
    bin_dir = root / "bin"
    # Installed before the dependencies become visible, so pip sees no vlmkit already there.
    check_run([bin_dir / "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", wheel])
    site = check_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.stdout.strip()) / DEPENDENCIES_PTH).write_text("\n".join(dependency_dirs()) + "\n")
    return bin_dir


@pytest.fixture
def outside(tmp_path) -> tuple[Path, dict]:
    """A working directory outside the repository, and os.environ without the variables that could
    lead Python back to the repository or the project's environment."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return cwd, env


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in PACKAGE_DATA:
        assert name in names, name


def test_installed_vlmkit_is_the_wheel_not_the_repository(venv, outside):
    cwd, env = outside
    done = check_run([venv / "python", "-c", "import vlmkit.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
                     cwd=cwd, env=env)
    module, config_dir = (Path(line) for line in done.stdout.split())
    assert module.is_relative_to(venv.parent) and not module.is_relative_to(REPO), module
    assert (config_dir / "tiny.yaml").is_file() and config_dir.is_relative_to(venv.parent), config_dir


def test_installed_demo_quick_runs_outside_the_repository(venv, outside):
    cwd, env = outside
    out = cwd.parent / "demo"
    check_run([venv / "vlmkit", "demo", "--quick", "--out", out, "--set", "progress=false"], cwd=cwd, env=env)
    report = json.loads((out / "report.json").read_text())
    for key in ("overall_accuracy", "blind_accuracy", "chance_accuracy", "per_category", "stages",
                "language_perplexity", "test_questions"):
        assert key in report, key
    assert [s["stage"] for s in report["stages"]] == [stage.name for stage in load_config("demo").stages]
    assert (out / "final" / "model.safetensors").is_file()


def test_installed_train_tiny_runs_outside_the_repository(venv, outside):
    cwd, env = outside
    out = cwd.parent / "tiny"
    done = check_run([venv / "vlmkit", "train", "tiny", "--out", out, "--set", "progress=false"], cwd=cwd, env=env)
    assert str(out / "final") in done.stdout
    assert (out / "final" / "model.safetensors").is_file()
    # world.dir of the tiny config is relative: the world is written under the working directory
    assert (cwd / "runs" / "world-tiny" / "world.json").is_file()
