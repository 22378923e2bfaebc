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

The corpus also gives text-only chat records, one per document: the user asks about the
document's unit in words ("Tell me about the assert statement."), and the assistant answers with
the document's opening (its first sentences; a document whose first sentence is too long for a
reply has no record), so that a model's supervised chats are not all about an image.
"""

from __future__ import annotations

import ast
import json
import random
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
HEADING_UNDERLINE = "*=-~^"
"""The characters of a reST heading's underline."""
SPLIT_BUCKETS = 10_000
"""A unit goes to held-out when crc32(seed:unit) % SPLIT_BUCKETS < heldout_fraction * SPLIT_BUCKETS."""
REPLY_CHARS = 300
"""A text-only chat reply is its document's first sentences up to this many characters."""
QUESTION_TEMPLATES = ("Tell me about {}.", "What can you tell me about {}?", "Explain {}.", "Describe {}.")
"""How a text-only chat asks about a unit (one drawn per record); each reads for a singular or a
plural phrase."""
CHAT_ID_SEPARATOR = "#"
"""Between a text-only chat id's unit and document index: `topic:assert#0`."""
_SENTENCE_END = re.compile(r"[.!?][\"')]?(?=\s+[^a-z\s]|\s*$)")  # "e.g. the" is not an end


def clean_paragraphs(text: str, min_chars: int = 60) -> list[str]:
    """Prose paragraphs of `text`, each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or lines[0][:1].isspace():  # indented: code or grammar
            continue
        if len(lines) > 1 and set(lines[-1].strip()) <= set(HEADING_UNDERLINE):  # a heading and its underline
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


def split_documents(units: list[tuple[str, str]], seed: int = 0, heldout_fraction: float = 0.05,
                    max_chars: int = 1200) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(unit, document), ...], "heldout": [...]}: the units' documents, split by unit."""
    split: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for unit, doc in documents(units, max_chars=max_chars):
        bucket = zlib.crc32(f"{seed}:{unit}".encode()) % SPLIT_BUCKETS
        split["heldout" if bucket < heldout_fraction * SPLIT_BUCKETS else "train"].append((unit, doc))
    return split


def unit_phrase(unit: str, text: str) -> str:
    """A unit (its name and raw text) as words a user would ask about: a module as "the json
    module"; a help topic by its heading ('The "assert" statement' -> "the assert statement"), or
    as its key reads ("attribute-access" -> "attribute access") when it has none. The keys of
    `pydoc_data.topics` are the reference's section labels, several of them abbreviations
    ("augassign", "typesseq"), while every topic opens with its section's heading."""
    kind, name = unit.split(":", 1)
    if kind == "module":
        return f"the {name} module"
    heading, underline = (text.strip().split("\n", 2) + ["", ""])[:2]
    if not underline.strip() or set(underline.strip()) - set(HEADING_UNDERLINE):
        return name.replace("-", " ")
    heading = heading.split(" — ")[0]  # 'Mapping Types — "dict"': the words before the dash
    return heading.replace('"', "").lower()


def opening(document: str, max_chars: int = REPLY_CHARS) -> str | None:
    """The document's first sentences, up to `max_chars`, cut where a sentence ends or a paragraph
    ends (one ending in ":" introduces what follows, so it is no end); None when its first sentence
    is longer (such openings are lists of names or fields run together, not a reply)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(document) if m.end() <= max_chars]
    ends += [i for i, ch in enumerate(document[:max_chars + 1]) if ch == "\n" and document[i - 1] != ":"]
    if len(document) <= max_chars and not document.endswith(":"):
        ends.append(len(document))
    return document[:max(ends)].rstrip() if ends else None


def chat_id(unit: str, index: int) -> str:
    """A text-only chat's id: its unit and which of the unit's documents it answers with (from 0)."""
    return f"{unit}{CHAT_ID_SEPARATOR}{index}"


def chat_unit(record_id: str) -> str:
    """The unit a text-only chat (by its `chat_id`) asks about."""
    return record_id.rsplit(CHAT_ID_SEPARATOR, 1)[0]


def chat_records(docs: list[tuple[str, str]], phrases: dict[str, str], rng: random.Random) -> list[dict]:
    """A text-only LLaVA record per (unit, document) whose `opening` fits: a question about the
    unit (its phrase in `phrases`, in a template drawn from `rng`), answered with that opening;
    ids by `chat_id`."""
    records, index = [], {}
    for unit, doc in docs:
        index[unit] = index.get(unit, -1) + 1
        reply = opening(doc)
        if reply is None:
            continue
        question = rng.choice(QUESTION_TEMPLATES).format(phrases[unit])
        records.append({"id": chat_id(unit, index[unit]), "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": reply}]})
    return records


def write_corpus(out_dir: str | Path, seed: int = 0, heldout_fraction: float = 0.05) -> dict:
    """Write into out_dir, per part (train, heldout): text_{part}.jsonl (`{"text": ...}` per
    document) and text_chat_{part}.json (LLaVA JSON, `chat_records` of the same documents in the
    same order). Returns the paths by key (`train`, `heldout`, `chat_train`, `chat_heldout`) and
    `counts` per part (documents, chars, chat records)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = pydoc_units() + docstring_units()
    split = split_documents(units, seed, heldout_fraction)
    phrases = {unit: unit_phrase(unit, text) for unit, text in units}
    rng = random.Random(seed)  # the question templates, drawn train then held-out
    paths, counts = {}, {}
    for name, docs in split.items():
        path = out / f"text_{name}.jsonl"
        with open(path, "w") as f:
            for _, doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        chats = chat_records(docs, phrases, rng)
        chat_path = out / f"text_chat_{name}.json"
        chat_path.write_text(json.dumps(chats, indent=1) + "\n")
        paths.update({name: str(path), f"chat_{name}": str(chat_path)})
        counts[name] = {"documents": len(docs), "chars": sum(len(doc) for _, doc in docs), "chat_records": len(chats)}
    return {**paths, "counts": counts}
