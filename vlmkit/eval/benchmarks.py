"""Benchmark readers: the files users bring, read into one item type.

Formats (docs/evaluation.md has examples of each):
  - MMBench-style TSV: index, question, hint, A, B, C, D (E...), answer (a letter), category,
    image (base64; an all-digit value refers to the image of the row with that index, as the
    MMBench dev files do for repeated images).
  - JSONL (or a JSON list) of objects, one item each. Keys are read through the alias table
    `JSONL_KEYS`, so one reader covers POPE (`image`, `text`, `label`), ScienceQA / SEED
    (`choices` list or `choice_a`..; `answer` as an index or a letter) and the generic
    vlmkit format `{id, images, question, choices?, answer, category?}` that
    vlmkit.data.synth writes for its test split; a row may also carry a video (`video` /
    `videos`: a list of frame paths, a frame directory or a video file; a list of such lists for
    several), as the synthetic world's `synth_clips.jsonl` does. A row may carry a conversation
    before its question (`history`: a list of `{"question", "reply"}` turns; docs/evaluation.md,
    "Follow-up questions").

Images are read by the data files' rule (data/formats.py's `image_ref`): data URLs, or paths
relative to `image_root` (by default the benchmark file's folder) that must stay inside it; MMBench
adds bare base64 and its back-references. Videos follow the same root rule (data/formats.py's
`video_ref`, frame by frame for a list of frames). A row that cannot be used (missing field, missing image
file, an image path outside the root, answer not among the choices) raises BadRecordError, and
becomes a `BadRow` with its index and reason that is counted; the rest of the file is still read.

Gold answers are stored canonically: the option letter for multiple-choice items, "yes" / "no"
for yes/no items, the text for open-ended items.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmkit.data.answers import LETTERS, AnswerKind, canonical_answer
from vlmkit.data.formats import image_ref, video_entries, video_ref
from vlmkit.data.types import ImageRef, VideoRef
from vlmkit.errors import BadRecordError, VlmkitError


class BenchmarkError(VlmkitError):
    """A benchmark file cannot be read at all (missing, unknown format, no usable header)."""


@dataclass
class Turn:
    """An earlier turn of an item's conversation: the user's text as sent, and the reply to it."""

    question: str
    reply: str


@dataclass
class BenchItem:
    """One question. For choice items `answer` is the gold option's letter (A = choices[0])."""

    id: str
    question: str
    answer: str
    kind: AnswerKind
    choices: list[str] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    videos: list[VideoRef] = field(default_factory=list)
    """Each video: its frames (a list of ImageRef) or the path of a frame directory or video file."""
    category: str = "all"
    hint: str = ""
    history: list[Turn] = field(default_factory=list)
    """Turns asked before the question, in order; the images and videos go with the first one."""
    source_id: str = ""
    """The id of the question this item was derived from (CircularEval rotations); else `id`."""
    rotation: int = 0
    """CircularEval: how many places the options were rotated (0 = as in the file)."""
    row: int = -1
    """0-based position of the item's row in its file (for error reports)."""

    def __post_init__(self):
        self.source_id = self.source_id or self.id

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


@dataclass
class BadRow:
    """A row that was skipped: its 0-based position in the file, its id when known, and why."""

    index: int
    reason: str
    message: str
    id: str | None = None

    @classmethod
    def from_error(cls, index: int, error: BadRecordError, id: str | None = None) -> "BadRow":
        return cls(index, error.reason, str(error), id)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "reason": self.reason, "message": self.message}


@dataclass
class Benchmark:
    name: str
    items: list[BenchItem]
    bad_rows: list[BadRow] = field(default_factory=list)
    path: str | None = None

    def head(self, limit: int | None) -> "Benchmark":
        """The first `limit` items (all with None); bad rows are kept as read."""
        return self if limit is None else replace(self, items=self.items[:limit])


# --- field aliases: first key present wins ------------------------------------------------------
JSONL_KEYS: dict[str, tuple[str, ...]] = {
    "id": ("id", "question_id", "qid", "index", "pid"),
    "question": ("question", "text", "prompt", "query"),
    "answer": ("answer", "label", "gt_answer", "gt", "target"),
    "choices": ("choices", "options", "candidates"),
    "images": ("images", "image", "image_path", "img", "image_file"),
    "videos": ("videos", "video"),
    "category": ("category", "question_type", "question_type_id", "subject", "type", "task"),
    "hint": ("hint", "context", "lecture_hint"),
    "history": ("history",),
}
SEED_CHOICE_KEYS = tuple(f"choice_{c}" for c in "abcdefgh")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*", b"MM*")
MAX_PATH_CHARS = 1024
"""An image value this long or longer is never taken for a path: MMBench's base64 images run to
hundreds of kilobytes, and the file system would refuse such a name."""


def _first(obj: dict, field_name: str) -> Any:
    for key in JSONL_KEYS[field_name]:
        if key in obj and obj[key] is not None:
            return obj[key]
    return None


def _missing(value: Any) -> bool:
    """pandas writes missing TSV cells as 'nan'; treat those and blanks as absent."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def benchmark_image(value: Any, root: Path) -> ImageRef:
    """An image field of a benchmark row -> ImageRef: a data URL, or an existing file under `root`
    (data/formats.py's `image_ref`, so a path leaving the root is refused as in data files), else
    bare base64 of an image (MMBench TSV). Raises BadRecordError."""
    if not isinstance(value, str) or not value.strip():
        raise BadRecordError("bad_image_field", f"image must be a non-empty string, got {value!r:.60}")
    value = value.strip()
    outside = None
    if value.startswith("data:") or len(value) < MAX_PATH_CHARS:
        try:
            ref = image_ref(value, root)
        except BadRecordError as e:
            if e.reason != "path_escapes_root":
                raise
            outside = e  # "/9j/4AAQ..." is both an absolute path and the base64 of a JPEG
        else:
            if ref.data is not None or ref.path.is_file():
                return ref
    data = _bare_base64_image(value)
    if data is not None:
        return ImageRef(data=data)
    if outside is not None:
        raise outside
    where = root / value if len(value) < MAX_PATH_CHARS else "<long value>"
    raise BadRecordError("missing_image", f"no image file at {where} and not base64 of an image")


def benchmark_video(value: Any, root: Path) -> VideoRef:
    """A video entry of a benchmark row -> VideoRef by the data files' rule (`video_ref`: frames or a
    path under `root`); every frame file, or the directory / video file, must exist. Raises
    BadRecordError."""
    ref = video_ref(value, root, "video")
    paths = [frame.path for frame in ref if frame.path is not None] if isinstance(ref, list) else [ref.path]
    missing = [path for path in paths if not path.exists()]
    if missing:
        raise BadRecordError("missing_video", f"no video frame or file at {missing[0]}")
    return ref


def _bare_base64_image(value: str) -> bytes | None:
    """The bytes `value` encodes, if it is base64 of an image (by its magic number); else None."""
    if not _BASE64_RE.match(value):
        return None
    try:
        data = base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(_IMAGE_MAGIC) else None


def make_item(*, id: str, question: Any, answer: Any, choices: list[str] | None, images: list[ImageRef],
              category: Any = None, hint: Any = None, videos: list[VideoRef] | None = None,
              history: Any = None) -> BenchItem:
    """Validate fields and decide the item's kind (choice / yesno / open)."""
    if _missing(question) or not isinstance(question, str):
        raise BadRecordError("missing_question", "no question text")
    if _missing(answer) and not isinstance(answer, int):
        raise BadRecordError("missing_answer", "no answer")
    choices = [str(c) for c in (choices or [])]
    if len(choices) > len(LETTERS):
        raise BadRecordError("too_many_choices", f"{len(choices)} choices (at most {len(LETTERS)})")
    if len(choices) == 1:
        raise BadRecordError("one_choice", "a multiple-choice item needs at least two choices")
    common = dict(id=id, question=question, images=images, videos=list(videos or []),
                  category="all" if _missing(category) else str(category), hint="" if _missing(hint) else str(hint),
                  history=read_history(history))
    kind, gold = canonical_answer(answer, choices)
    return BenchItem(answer=gold, kind=kind, choices=choices, **common)


def read_history(value: Any) -> list[Turn]:
    """A row's `history` (absent: no earlier turns) -> its turns. Raises BadRecordError (bad_history)
    unless it is a list of objects, each with a non-empty string `question` and a string `reply`."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRecordError("bad_history", f"history must be a list of turns, got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecordError("bad_history", f"history[{i}] must be an object with 'question' and 'reply', "
                                                f"got {type(turn).__name__}")
        question, reply = turn.get("question"), turn.get("reply")
        if not isinstance(question, str) or not question.strip():
            raise BadRecordError("bad_history",
                                 f"history[{i}].question must be a non-empty string, got {question!r:.60}")
        if not isinstance(reply, str):
            raise BadRecordError("bad_history", f"history[{i}].reply must be a string, got {reply!r:.60}")
        turns.append(Turn(question, reply))
    return turns


def _jsonl_item(obj: Any, index: int, root: Path) -> BenchItem:
    if not isinstance(obj, dict):
        raise BadRecordError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    raw_id = _first(obj, "id")
    choices = _first(obj, "choices")
    if choices is None and any(k in obj for k in SEED_CHOICE_KEYS):
        choices = [obj[k] for k in SEED_CHOICE_KEYS if not _missing(obj.get(k))]
    if choices is not None and not isinstance(choices, list):
        raise BadRecordError("bad_choices", f"choices must be a list, got {type(choices).__name__}")
    images = _first(obj, "images")
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    return make_item(id=str(index) if raw_id is None else str(raw_id), question=_first(obj, "question"),
                     answer=_first(obj, "answer"), choices=choices,
                     images=[benchmark_image(v, root) for v in images],
                     category=_first(obj, "category"), hint=_first(obj, "hint"), history=_first(obj, "history"),
                     videos=[benchmark_video(v, root) for v in video_entries(_first(obj, "videos"))])


def read_jsonl(path: str | Path, image_root: str | Path | None = None) -> Benchmark:
    """POPE / ScienceQA / SEED / generic JSONL (or a .json list); see JSONL_KEYS."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise BenchmarkError(f"{path}: a .json benchmark must hold a list of objects")
        lines = [json.dumps(r) for r in rows]
    else:
        lines = text.splitlines()
    items, bad = [], []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        obj = None
        try:
            obj = json.loads(line)
            items.append(replace(_jsonl_item(obj, index, root), row=index))
        except json.JSONDecodeError as e:
            bad.append(BadRow(index, "bad_json", f"line {index + 1}: {e}"))
        except BadRecordError as e:
            raw_id = _first(obj, "id") if isinstance(obj, dict) else None
            bad.append(BadRow.from_error(index, e, None if raw_id is None else str(raw_id)))
    return Benchmark(name=path.stem, items=items, bad_rows=bad, path=str(path))


def read_mmbench_tsv(path: str | Path, image_root: str | Path | None = None) -> Benchmark:
    """MMBench-style TSV with base64 images; options are the single-letter columns present."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return Benchmark(name=path.stem, items=[], path=str(path))
    header = list(rows[0].keys())
    for need in ("question", "answer"):
        if need not in header:
            raise BenchmarkError(f"{path}: TSV header has no {need!r} column (header: {header})")
    option_cols = [c for c in LETTERS if c in header]
    images_by_index = {r.get("index"): r.get("image") for r in rows if not _missing(r.get("image"))}
    items, bad = [], []
    for i, row in enumerate(rows):
        row_id = row.get("index") or str(i)
        try:
            if None in row:
                raise BadRecordError("bad_columns",
                                     f"row has {len(header) + len(row[None])} cells, header has {len(header)}")
            choices = []
            for col in option_cols:  # options stop at the first empty column (A, B, C; D empty)
                if _missing(row[col]):
                    break
                choices.append(row[col])
            image = row.get("image")
            if not _missing(image) and image.strip().isdigit():
                image = images_by_index.get(image.strip())  # MMBench: a reference to another row's image
            images = [] if _missing(image) else [benchmark_image(image, root)]
            items.append(replace(make_item(id=row_id, question=row["question"], answer=row["answer"],
                                           choices=choices, images=images, category=row.get("category"),
                                           hint=row.get("hint")), row=i))
        except BadRecordError as e:
            bad.append(BadRow.from_error(i, e, row_id))
    return Benchmark(name=path.stem, items=items, bad_rows=bad, path=str(path))


def read_benchmark(path: str | Path, image_root: str | Path | None = None) -> Benchmark:
    """Pick the reader by file extension (.tsv -> MMBench; .jsonl / .json -> JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist")
    if path.suffix == ".tsv":
        return read_mmbench_tsv(path, image_root)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path, image_root)
    raise BenchmarkError(f"{path}: unknown benchmark format {path.suffix!r}; use .tsv (MMBench) or .jsonl / .json")


def circular_items(items: list[BenchItem]) -> list[BenchItem]:
    """CircularEval (MMBench): every multiple-choice item once per rotation of its options.

    Rotation r presents choices[r:] + choices[:r]; a question counts as right only when every
    rotation is answered right (metrics.summarize groups by `source_id`). Other items pass through.
    """
    out = []
    for item in items:
        if item.kind != "choice":
            out.append(item)
            continue
        k = len(item.choices)
        for r in range(k):
            out.append(replace(item, id=f"{item.id}@{r}", source_id=item.source_id, rotation=r,
                               choices=item.choices[r:] + item.choices[:r],
                               answer=LETTERS[(item.answer_index - r) % k]))
    return out
