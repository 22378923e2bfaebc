"""The language corpus of the demo: real English prose that ships with every Python install.

Sources:
  - `pydoc_data.topics`: the help topics of the Python language reference (~465K characters), a
    data module of strings;
  - docstrings of the standard library's top-level modules and packages (module, class and
    function docstrings), read from source with `ast` (never imported or executed).

Cleaning keeps prose paragraphs only: blocks separated by blank lines, with indented blocks (code,
grammar), doctests, headings and markup-heavy or symbol-heavy blocks dropped, reST roles and
literal quotes unwrapped, lines joined, and repeated paragraphs dropped. Paragraphs of one unit
(a topic or a module) are grouped in order into documents of at most `max_chars`. The train / held-out split is by unit
(a hash of the seed and the unit's name), so no topic or module is in both.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
import zlib
from pathlib import Path

# Modules whose docstrings are not prose or whose files are huge generated tables.
SKIP_MODULES = {"this", "antigravity", "idlelib", "lib2to3", "test", "pydoc_data", "encodings", "ensurepip",
                "turtledemo", "sre_constants", "sre_parse", "sre_compile"}

_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")
_SPACE = re.compile(r"\s+")
SPLIT_BUCKETS = 10_000
"""A unit goes to held-out when crc32(seed:unit) % SPLIT_BUCKETS < heldout_fraction * SPLIT_BUCKETS."""


def clean_paragraphs(text: str, min_chars: int = 60) -> list[str]:
    """Prose paragraphs of `text`, each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or lines[0][:1].isspace():  # indented: code or grammar
            continue
        if len(lines) > 1 and set(lines[-1].strip()) <= set("*=-~^"):  # a heading and its underline
            continue
        if ">>>" in block or "::=" in block or "..." == block.strip():
            continue
        para = _SPACE.sub(" ", " ".join(line.strip() for line in lines))
        para = _LITERAL.sub(lambda m: m.group(1) or m.group(2), _ROLE.sub(r"\1", para)).strip()
        if len(para) < min_chars:
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in para)
        if letters < 0.85 * len(para) or not para[0].isalpha():
            continue
        out.append(para)
    return out


def pydoc_units() -> list[tuple[str, str]]:
    """(unit name, text) of every pydoc help topic, in sorted order."""
    from pydoc_data.topics import topics  # deferred: a large module, read only when writing the corpus

    return [(f"topic:{k}", topics[k]) for k in sorted(topics)]


def _module_file(stdlib: Path, name: str) -> Path | None:
    for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if path.is_file():
            return path
    return None


def docstring_units() -> list[tuple[str, str]]:
    """(unit name, docstrings joined by blank lines) of each top-level standard-library module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    units = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        path = _module_file(stdlib, name)
        if path is None:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [d for d in docs if d]
        if docs:
            units.append((f"module:{name}", "\n\n".join(docs)))
    return units


def documents(units: list[tuple[str, str]], max_chars: int = 1200) -> list[tuple[str, str]]:
    """(unit, document): each unit's paragraphs grouped in order into documents <= max_chars
    (a longer single paragraph is its own document); a paragraph seen before is dropped."""
    out = []
    seen: set[str] = set()  # help topics repeat paragraphs of each other: keep the first copy only
    for unit, text in units:
        current = ""
        for para in clean_paragraphs(text):
            if para in seen:
                continue
            seen.add(para)
            if current and len(current) + 1 + len(para) > max_chars:
                out.append((unit, current))
                current = ""
            current = f"{current}\n{para}" if current else para
        if current:
            out.append((unit, current))
    return out


def split_documents(seed: int = 0, heldout_fraction: float = 0.05, max_chars: int = 1200) -> dict[str, list[str]]:
    """{"train": [...], "heldout": [...]}: the corpus documents, split by unit."""
    docs = documents(pydoc_units() + docstring_units(), max_chars=max_chars)
    split: dict[str, list[str]] = {"train": [], "heldout": []}
    for unit, doc in docs:
        bucket = zlib.crc32(f"{seed}:{unit}".encode()) % SPLIT_BUCKETS
        split["heldout" if bucket < heldout_fraction * SPLIT_BUCKETS else "train"].append(doc)
    return split


def write_corpus(out_dir: str | Path, seed: int = 0, heldout_fraction: float = 0.05) -> dict:
    """Write text_train.jsonl and text_heldout.jsonl (`{"text": ...}` per line) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_documents(seed, heldout_fraction)
    paths = {}
    for name, docs in split.items():
        path = out / f"text_{name}.jsonl"
        with open(path, "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        paths[name] = str(path)
    counts = {name: {"documents": len(docs), "chars": sum(map(len, docs))} for name, docs in split.items()}
    return {**paths, "counts": counts}
