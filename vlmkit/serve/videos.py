"""Turning a request's `video_url` parts into videos the model's processor reads, within limits.

    RequestVideos(limits, scratch, takes_video)   the video resolver of one request
                                                  (data/messages.py calls it for each video part)

A video is a file:// path under --allow-dir (a video file, a directory of frame images, an
animated GIF / WebP / PNG) or a data URL of a video or an animated image, which is written into
the request's scratch directory so that data/native_images.py's `open_video` reads it like a file
(frame rate included). Each video is opened here, its size and frame count checked and its first
frame decoded, so a bad video is refused naming its part before any prompt is built; the model's
processor then samples, decodes and sizes the frames.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.data.native_images import FRAME_SUFFIXES, open_video
from vlmkit.errors import BadRecordError
from vlmkit.serve.protocol import APIError, bad_request, too_large
from vlmkit.serve.settings import ImageLimits
from vlmkit.serve.urls import allowed_path, read_data_url, refuse_scheme, url_scheme

DATA_URL_SUFFIXES = {"image/gif": ".gif", "image/webp": ".webp", "image/png": ".png", "image/apng": ".png"}
"""Animated-image mime types -> the suffix that sends `open_video` to Pillow; other video/* data
goes to PyAV, which reads the container from its bytes."""
CONTAINER_SUFFIX = ".video"
"""The suffix of any other video data URL (not an animated-image suffix, so PyAV reads it)."""


def video_error(error: BadRecordError, param: str) -> APIError:
    """A video's BadRecordError as the client's error: 413 for frames over the pixel limit, else 400."""
    if error.reason == "image_too_large":
        return too_large(f"{param}: {error}", param)
    return bad_request(f"{param}: {error}", param, "invalid_video")


class RequestVideos:
    """The video resolver of one request: videos in user messages only, at most `max_videos`, each
    within the byte, frame and pixel limits, to a model that takes videos (`takes_video`: a
    native-resolution model). Returns the video's path; raises APIError (400 / 413) naming the part."""

    def __init__(self, limits: ImageLimits, scratch: Path, takes_video: bool):
        self.limits = limits
        self.scratch = scratch
        """Where data-URL videos are written; the caller removes it once the prompt is built."""
        self.takes_video = takes_video
        self.parts: list[str] = []
        """Where each resolved video is (messages[i].content[j]), in order."""

    def __call__(self, url: str, where: str, role: str) -> Path:
        if not self.takes_video:
            raise bad_request(f"{where}: this model takes images only; video parts need a native-resolution "
                              "model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)", where, "unexpected_video")
        if len(self.parts) >= self.limits.max_videos:
            raise bad_request(f"{where}: more than {self.limits.max_videos} videos in one request", where,
                              "too_many_videos")
        if role != "user":
            raise bad_request(f"{where}: videos are allowed in user messages only", where)
        path = self._video_path(url, where)
        self._check(path, where)
        self.parts.append(where)
        return path

    def _video_path(self, url: str, where: str) -> Path:
        scheme = url_scheme(url)
        if scheme == "data":
            mime, raw = read_data_url(url, self.limits.max_video_bytes, where, "video")
            if not mime.startswith("video/") and mime not in DATA_URL_SUFFIXES:
                raise bad_request(f"{where}: a video data URL must be video/* or an animated image "
                                  f"({', '.join(DATA_URL_SUFFIXES)}), got {mime or 'no type'}", where,
                                  "invalid_video_url")
            path = self.scratch / f"video-{len(self.parts)}{DATA_URL_SUFFIXES.get(mime, CONTAINER_SUFFIX)}"
            path.write_bytes(raw)
            return path
        if scheme != "file":
            refuse_scheme(url, where, "video")
        path = allowed_path(url, self.limits.allow_dir, where, "video")
        if not path.exists():
            raise bad_request(f"{where}: no such file or directory {path}", where, "missing_video")
        if path.is_dir():
            _refuse_frames_outside(path, self.limits.allow_dir, where)
        size = _size_on_disk(path)
        if size > self.limits.max_video_bytes:
            raise too_large(f"{where}: video is {size} bytes; the limit is {self.limits.max_video_bytes}", where)
        return path

    def _check(self, path: Path, where: str) -> None:
        """Open the video and decode its first frame: unreadable, empty, too long or too large is refused."""
        try:
            source = open_video(path, self.limits.max_pixels)
            if source.total_frames > self.limits.max_video_frames:
                raise too_large(f"{where}: video has {source.total_frames} frames; the limit is "
                                f"{self.limits.max_video_frames}", where)
            source.decode([0])  # the first frame: a corrupt or cut-off file fails here, named
        except BadRecordError as e:
            raise video_error(e, where) from None


def _refuse_frames_outside(directory: Path, allow_dir: Path, where: str) -> None:
    """A frame directory under --allow-dir may not link to frames outside it (a symlinked frame)."""
    root = allow_dir.resolve()
    for frame in directory.iterdir():
        if frame.suffix.lower() in FRAME_SUFFIXES and not frame.resolve().is_relative_to(root):
            raise bad_request(f"{where}: frame {frame.name} links outside the allowed directory {root}", where,
                              "file_url_refused")


def _size_on_disk(path: Path) -> int:
    """A video file's bytes, or a frame directory's frame files together."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    return path.stat().st_size
