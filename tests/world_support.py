"""Shared pieces of the synthetic-world tests: a file's digest, and the check that opt-in scenes
(reasoning, small text) leave the default world's files as they were."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DEFAULT_FILES = ("captions_train.json", "captions_val.json", "qa_train.json", "qa_train.jsonl", "qa_val.json",
                 "qa_val.jsonl", "qa_test.json", "qa_test.jsonl", "synth.jsonl")
"""The default world's record and benchmark files."""


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_default_files_unchanged(plain: Path, other: Path, image_stride: int) -> tuple[dict, dict]:
    """`other`'s default files, every `image_stride`-th default image and per-split scene counts
    equal `plain`'s (a world of the same settings without the opt-in scenes); returns both
    world.json contents (other's, plain's)."""
    for name in DEFAULT_FILES:
        assert digest(plain / name) == digest(other / name), name
    for image in sorted((plain / "images").iterdir())[::image_stride]:
        assert digest(image) == digest(other / "images" / image.name)
    meta, plain_meta = (json.loads((d / "world.json").read_text()) for d in (other, plain))
    for key in ("train", "val", "test"):
        assert meta["counts"][key] == plain_meta["counts"][key]
    return meta, plain_meta
