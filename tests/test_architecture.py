"""The import graph follows the layers of docs/architecture.md and has no cycle; nothing cites a
file outside the repository.

Every `import vlmkit...` / `from vlmkit... import` in the package is read with `ast` (function-level
imports included: a lazy import that goes the wrong way is still a wrong dependency).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vlmkit"

# Layers, lowest first: a module may import from its own layer or lower ones (docs/architecture.md,
# "Layers and imports"). Siblings inside a layer that must stay apart are listed in SEPARATE.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vlmkit.constants", "vlmkit.errors", "vlmkit.schema")),
    ("models+data", ("vlmkit.models", "vlmkit.data")),
    ("infer", ("vlmkit.infer",)),
    ("api", ("vlmkit.api",)),
    ("run config", ("vlmkit.config",)),
    ("train+eval+serve", ("vlmkit.train", "vlmkit.eval", "vlmkit.serve")),
    ("commands", ("vlmkit.cli", "vlmkit.__main__", "vlmkit.build_cli", "vlmkit.export_cli", "vlmkit.chat_cli",
                  "vlmkit.data.cli", "vlmkit.train.cli", "vlmkit.train.demo", "vlmkit.train.post_train_demo",
                  "vlmkit.eval.cli",
                  "vlmkit.serve.cli")),
]
SEPARATE = [("vlmkit.models", "vlmkit.data"), ("vlmkit.train", "vlmkit.eval"), ("vlmkit.train", "vlmkit.serve"),
            ("vlmkit.eval", "vlmkit.serve")]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The vlmkit modules `path` imports (relative imports resolved; `from a import b` counts as
    a.b when that is a module, else a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vlmkit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vlmkit":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer of docs/architecture.md; add it to LAYERS (and the doc)")
    return best


def group_of(name: str, prefixes) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "vlmkit":
            layer_of(name)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, targets in graph.items():
        if name == "vlmkit":  # the package's lazy `VLM` re-export (vlmkit/__init__.py)
            continue
        for target in targets - {"vlmkit"}:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
            for a, b in SEPARATE:
                src, dst = group_of(name, (a, b)), group_of(target, (a, b))
                if src and dst and src != dst and layer_of(name) == layer_of(target):
                    wrong.append(f"{name} imports {target}: {a} and {b} stay apart")
    return sorted(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    edges = {n: {t for t in ts if t in graph and t != "vlmkit"} for n, ts in graph.items() if n != "vlmkit"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_go_down_the_layers():
    wrong = layer_violations(GRAPH)
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_a_wrong_import_and_a_cycle():
    bad = {"vlmkit.models.vlm": {"vlmkit.data.prompt"}, "vlmkit.data.prompt": {"vlmkit.infer.engine"},
           "vlmkit.infer.engine": {"vlmkit.models.vlm"}}
    wrong = layer_violations(bad)
    assert any("vlmkit.models.vlm imports vlmkit.data.prompt" in w for w in wrong)
    assert any("vlmkit.data.prompt (models+data) imports vlmkit.infer.engine (infer)" in w for w in wrong)
    assert find_cycle(bad) == ["vlmkit.data.prompt", "vlmkit.infer.engine", "vlmkit.models.vlm",
                               "vlmkit.data.prompt"]
    assert find_cycle({"vlmkit.api": {"vlmkit.models.vlm"}, "vlmkit.models.vlm": set()}) is None


def test_nothing_cites_a_file_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.toml", "Makefile"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"DESIGN\.md|STYLE\.md|shared/")
    cited = [f"{f}:{i}" for f in files if f != "tests/test_architecture.py"
             for i, line in enumerate((REPO / f).read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not cited, f"citations of files outside the repository (docs/architecture.md is the map): {cited}"
    assert (REPO / "docs" / "architecture.md").is_file()
