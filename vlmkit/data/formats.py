"""Readers: data files on disk -> a stream of Record (data/types.py), one reader per format.

Formats (DataSource.format in vlmkit/config.py):
- llava       LLaVA JSON (a list) or JSONL: {"id", "image": path | [paths], "conversations":
              [{"from": "human"|"gpt"|"user"|"assistant"|"system", "value": "...<image>..."}]}.
              A record with images but no `<image>` placeholder gets one per image prepended to
              its first user turn, as LLaVA's preprocessing does. Videos (LLaVA-Video's form):
              "video": a video file or frame directory | [frame paths] (one clip) | [[frame
              paths], ...] (several), with `<video>` placeholders (prepended likewise when absent).
- messages    OpenAI-style chat JSONL: {"messages": [{"role", "content": str | [parts]}]} where a
              part is {"type": "text", "text"}, {"type": "image", "image": path} or
              {"type": "image_url", "image_url": {"url": path | file:// | data: URL}}, a video
              {"type": "video", "video": [frame paths] | path} or {"type": "video_url",
              "video_url": {"url": path | file://}}, read by data/messages.py as every
              OpenAI-style conversation is.
- text        language data JSONL: {"text": "..."} (every token supervised).
- parquet     parquet files (one, or a directory of them), rows in any of the shapes above, or
              caption rows {"image", "caption"|"text"}; an image cell is bytes, a path, or an
              HF-datasets struct {"bytes", "path"} (or a list of those).
- hf_dataset  a directory written by `datasets.Dataset.save_to_disk`: its .arrow files are read
              with pyarrow directly (no `datasets` import), rows as for parquet.
- webdataset  WebDataset tar shards, streamed with tarfile: members `KEY.jpg|png|...` plus
              `KEY.txt` (the caption) or `KEY.json` ({"caption"|"text"} or a conversation).

Every reader yields Record or BadRecord and never raises on one bad row: malformed JSON is named
by file:line, a bad image path by record. What a row becomes is `record_from_row`'s decision unless
the caller passes its own (`interpret`: data/preference.py reads chosen / rejected pairs so).
Image paths resolve under a root (the file's directory unless stated); a path that leaves it
(`..`, an absolute path elsewhere, a symlink pointing out) makes the record bad
("path_escapes_root"); `image_ref` is that rule, for benchmark files too
(eval/benchmarks.py); a video's frames and a video path follow the same rule. Images and videos
are not opened here (data/images.py and data/native_images.py do).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vlmkit.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlmkit.data.messages import ROLES, read_conversation
from vlmkit.data.types import ImageRef, Message, Record, VideoRef
from vlmkit.errors import BadRecordError, ConfigError

FORMATS = ("llava", "messages", "text", "parquet", "hf_dataset", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class BadRecord:
    """A row that cannot become a Record; `reason` is a stable key for counting."""

    reason: str
    message: str
    where: str  # file:line, file#row or shard/key
    record_id: str | None = None

    def __str__(self) -> str:
        rid = f" (record {self.record_id})" if self.record_id else ""
        return f"{self.where}{rid}: {self.reason}: {self.message}"


Item = Record | BadRecord


# --- format detection ----------------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """Guess the format of a file or directory from its extension, then from its first row."""
    path = Path(path)
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise ConfigError(f"{path}: no data files (.json, .jsonl, .parquet, .arrow, .tar) in this directory")
        return detect_format(files[0]) if files[0].suffix != ".arrow" else "hf_dataset"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "hf_dataset"
    if suffix in (".tar", ".tgz") or path.name.endswith(".tar.gz"):
        return "webdataset"
    if suffix in (".json", ".jsonl"):
        return _shape_of(_first_row(path)) or "llava"
    raise ConfigError(f"{path}: cannot tell the data format from the name; set format to one of {FORMATS}")


def _shape_of(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "llava"
    if "messages" in row:
        return "messages"
    if "text" in row:
        return "text"
    return None


def _first_row(path: Path):
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip()
    if head.startswith("["):  # a JSON array: find the first object without loading it all
        head = head[1:].lstrip()
    try:
        return json.JSONDecoder().raw_decode(head)[0]
    except ValueError:
        return None


def _data_files(directory: Path) -> list[Path]:
    wanted = (".json", ".jsonl", ".parquet", ".arrow", ".tar")
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in wanted
                  and not p.name.startswith(("dataset_info", "state", "dataset_dict")))


# --- entry point ---------------------------------------------------------------------------------

def data_files(path: str | Path, format: str = "auto") -> tuple[str, list[Path]]:
    """(format, the files read for `path`, in order): the file itself, or a directory's data files."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data path {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}; choose one of {FORMATS} or auto")
    files = _data_files(path) if path.is_dir() else [path]
    if path.is_dir() and fmt == "webdataset":
        files = [f for f in files if f.suffix == ".tar"]
    return fmt, files


RowInterpreter = Callable[[dict, Path, str, str], Record]
"""(a parsed row, the image root, the row's id, the source name) -> what the row is; raises
BadRecordError. The default is `record_from_row`; data/preference.py reads preference pairs."""


def read_records(path: str | Path, format: str = "auto", *, root: str | Path | None = None,
                 kind: str | None = None, source: str | None = None,
                 files: list[Path] | None = None, interpret: RowInterpreter | None = None) -> Iterator[Item]:
    """Every row of a file or directory, in file order, as Record or BadRecord.

    root: directory image paths resolve under (default: the data file's directory).
    kind: override the records' supervision kind (chat | caption | text).
    source: name carried by each record (default: the file or directory stem).
    files: read only these of the directory's files (a data-parallel rank's shards).
    interpret: what a row becomes (default `record_from_row`); the item it returns must carry a
    `meta` dict, where the row's file:line goes.
    """
    path = Path(path)
    fmt, all_files = data_files(path, format)
    files = all_files if files is None else files
    source = source or path.stem
    for file in files:
        base = Path(root) if root is not None else (path if path.is_dir() else file.parent)
        ctx = _Context(file, base.resolve(), source, kind, interpret or record_from_row)
        if fmt == "webdataset":
            yield from _read_webdataset(ctx)
        elif fmt in ("parquet", "hf_dataset"):
            yield from _read_arrow(ctx)
        else:
            yield from _read_json(ctx)


@dataclass
class _Context:
    file: Path
    root: Path
    source: str
    kind: str | None
    interpret: RowInterpreter


def _convert(ctx: _Context, row, where: str, default_id: str) -> Item:
    """One parsed row -> Record, or BadRecord naming what is wrong and where."""
    rid = str(row.get("id", default_id)) if isinstance(row, dict) else default_id
    try:
        if not isinstance(row, dict):
            raise BadRecordError("malformed_record", f"expected a JSON object, got {type(row).__name__}")
        record = ctx.interpret(row, ctx.root, rid, ctx.source)
    except BadRecordError as e:
        return BadRecord(e.reason, str(e).split(": ", 1)[-1], where, rid)
    if ctx.kind is not None:
        record.kind = ctx.kind
    record.meta.setdefault("where", where)
    return record


def _read_json(ctx: _Context) -> Iterator[Item]:
    if ctx.file.suffix.lower() == ".json" and _starts_with_array(ctx.file):
        try:
            rows = json.loads(ctx.file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            line = getattr(e, "lineno", 0)
            yield BadRecord("malformed_json", f"the JSON array cannot be parsed: {e}", f"{ctx.file}:{line}")
            return
        for i, row in enumerate(rows):
            yield _convert(ctx, row, f"{ctx.file}#{i}", f"{ctx.file.stem}:{i}")
        return
    with ctx.file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{ctx.file}:{lineno}"
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                yield BadRecord("malformed_json", f"line is not valid JSON: {e}", where)
                continue
            yield _convert(ctx, row, where, f"{ctx.file.stem}:{lineno}")


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _read_arrow(ctx: _Context) -> Iterator[Item]:
    # pyarrow is imported by the readers that need it: it takes a noticeable time to import and
    # most runs read JSON only.
    import pyarrow as pa
    import pyarrow.parquet as pq

    if ctx.file.suffix == ".parquet":
        batches = pq.ParquetFile(ctx.file).iter_batches(batch_size=256)
    else:  # datasets.save_to_disk writes the IPC stream format; older versions the file format
        try:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(ctx.file))))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_file(pa.memory_map(str(ctx.file))).to_batches())
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield _convert(ctx, row, f"{ctx.file}#{index}", f"{ctx.file.stem}:{index}")
            index += 1


def _read_webdataset(ctx: _Context) -> Iterator[Item]:
    group: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(ctx.file, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key and group:
                    yield _webdataset_sample(ctx, key, group)
                    group = {}
                key = member_key
                group[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield BadRecord("malformed_shard", f"tar shard cannot be read further: {e}", f"{ctx.file}/{key}")
    if group:
        yield _webdataset_sample(ctx, key, group)


def _webdataset_sample(ctx: _Context, key: str, group: dict[str, bytes]) -> Item:
    where = f"{ctx.file}/{key}"
    image = next((group[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in group), None)
    row: dict = {"id": key}
    try:
        if "json" in group:
            meta = json.loads(group["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            row.update(meta)
            row["id"] = key
        if "txt" in group:
            row["caption"] = group["txt"].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        return BadRecord("malformed_json", f"sample metadata cannot be parsed: {e}", where, key)
    if image is not None:
        row["image"] = image
    return _convert(ctx, row, where, key)


# --- rows -> Record ------------------------------------------------------------------------------

def record_from_row(row: dict, root: Path, rid: str, source: str) -> Record:
    """Interpret one row of any supported shape; raises BadRecordError."""
    images = row_images(row, root)
    videos = [video_ref(v, root, "video") for v in video_entries(row.get("video", row.get("videos")))]
    if "conversations" in row:
        messages = _with_placeholders(_llava_messages(row["conversations"]), len(images), len(videos))
        return Record(rid, source, "chat", messages, images, videos=videos)
    if "messages" in row:
        conversation = read_conversation(row["messages"], functools.partial(_message_image, root=root),
                                         functools.partial(_message_video, root=root))
        images, videos = images + conversation.images, videos + conversation.videos
        messages = _with_placeholders(conversation.messages, len(images), len(videos))
        return Record(rid, source, "chat", messages, images, videos=videos)
    caption = row.get("caption", row.get("text"))
    if images:
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecordError("no_caption", "an image row needs a non-empty caption / text")
        messages = [Message("user", IMAGE_PLACEHOLDER * len(images)), Message("assistant", caption)]
        return Record(rid, source, "caption", messages, images)
    if isinstance(caption, str):
        if not caption.strip():
            raise BadRecordError("empty_text", "text is empty")
        return Record(rid, source, "text", text=caption)
    raise BadRecordError("malformed_record", "row has none of conversations / messages / text / image+caption; "
                         f"keys: {sorted(row)[:8]}")


def row_images(row: dict, root: Path) -> list[ImageRef]:
    """The images of a row's `image` (or `images`) column: one entry or a list, each by `image_ref`."""
    return [image_ref(v, root) for v in _as_list(row.get("image", row.get("images")))]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _llava_messages(turns) -> list[Message]:
    if not isinstance(turns, list):
        raise BadRecordError("malformed_record", "conversations must be a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecordError("malformed_record", f"conversations[{i}] is not an object")
        who = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if who not in ROLES:
            raise BadRecordError("unknown_role", f"conversations[{i}] has role {who!r}; expected one of {sorted(ROLES)}")
        if not isinstance(text, str):
            raise BadRecordError("malformed_record", f"conversations[{i}] has no text value")
        messages.append(Message(ROLES[who], text))
    return messages


def _message_image(value, where: str, role: str, *, root: Path) -> ImageRef:
    """An image part of a messages record (data/messages.py's resolver): a path, file:// or data:
    URL, resolved under the record's image root."""
    if not isinstance(value, str):
        raise BadRecordError("malformed_record", f"{where} has no image path / url")
    return image_ref(value, root)


def _message_video(value, where: str, role: str, *, root: Path) -> VideoRef:
    """A video part of a messages record: its frame paths, or a video file / frame directory path,
    resolved under the record's image root."""
    return video_ref(value, root, where)


def video_entries(value) -> list:
    """LLaVA's "video" value -> one entry per video: a path, or a list of frame paths (one clip),
    or a list of such lists (several clips)."""
    if value is None:
        return []
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return value
    return [value]


def _with_placeholders(messages: list[Message], n_images: int, n_videos: int = 0) -> list[Message]:
    """LLaVA convention: images (or videos) without any placeholder of their kind go before the
    first user turn's text, videos first."""
    missing = ""
    if n_videos and not any(VIDEO_PLACEHOLDER in m.content for m in messages):
        missing += (VIDEO_PLACEHOLDER + "\n") * n_videos
    if n_images and not any(IMAGE_PLACEHOLDER in m.content for m in messages):
        missing += (IMAGE_PLACEHOLDER + "\n") * n_images
    if not missing:
        return messages
    for m in messages:
        if m.role == "user":
            m.content = missing + m.content
            break
    return messages


def video_ref(value, root: Path, where: str) -> VideoRef:
    """One video entry -> VideoRef: a list of frames (each by `image_ref`'s rule) or a path / file://
    URL of a video file or frame directory under `root` (the same root rule). Raises BadRecordError
    (malformed_record: none of these, or a video given as bytes; remote_image; path_escapes_root)."""
    if isinstance(value, list):
        if not value:
            raise BadRecordError("malformed_record", f"{where}: a video needs at least one frame")
        return [image_ref(frame, root) for frame in value]
    ref = image_ref(value, root) if isinstance(value, str) else None
    if ref is None or ref.path is None:
        raise BadRecordError("malformed_record", f"{where}: a video is a list of frames or a path, "
                             f"got {str(value)[:60]!r}")
    return ref


def image_ref(value, root: Path) -> ImageRef:
    """One image entry -> ImageRef: the one rule for image references in files users bring (data
    files here, benchmark files in eval/benchmarks.py).

    value: bytes; an HF-datasets Image struct {"bytes", "path"}; a `data:` URL; a `file://` URL;
    or a path, relative to `root` or absolute, that must resolve (symlinks followed) inside `root`.
    Raises BadRecordError: malformed_record (none of these, or a data URL that is not valid
    base64), remote_image (http / https: never fetched), path_escapes_root. Nothing is opened
    here: whether the file exists and decodes is data/images.py's question.
    """
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BadRecordError("malformed_record", f"image entry {str(value)[:60]!r} is neither a path nor bytes")
    if value.startswith("data:"):
        return ImageRef(data=_data_url_bytes(value))
    if value.startswith(("http://", "https://")):
        raise BadRecordError("remote_image", f"{value[:80]}: remote images are not fetched; download them and "
                             "refer to local paths")
    if value.startswith("file://"):
        value = urllib.parse.unquote(urllib.parse.urlparse(value).path)
    return ImageRef(path=resolve_image_path(value, root))


def _data_url_bytes(url: str) -> bytes:
    """The payload of a `data:` URL: base64 (`;base64`) or percent-encoded."""
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRecordError("malformed_record", "image data URL is not valid base64") from None


def resolve_image_path(value: str, root: Path) -> Path:
    """`value` under `root` (symlinks followed); raises BadRecordError if it leaves the root."""
    root = root.resolve()
    resolved = (root / value).resolve()  # an absolute `value` replaces root, as intended
    if not resolved.is_relative_to(root):
        raise BadRecordError("path_escapes_root", f"image path {value!r} resolves to {resolved}, outside the "
                             f"image root {root}")
    return resolved
