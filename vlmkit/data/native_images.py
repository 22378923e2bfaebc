"""Images and video in, for native-resolution vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

These towers see an image at about its own size. `fit_to_grid` picks that size: each side a
multiple of one merge window (patch_size * merge_size pixels), the pixel count within
[min_pixels, max_pixels], the aspect ratio kept as closely as that allows. A larger image is
scaled down and a smaller one up; none is refused unless its sides are more than
MAX_ASPECT_RATIO apart. The image is resized there (bicubic), rescaled to [0, 1], normalised with
the family's mean / std and cut into patches.

A video is a stack of frames: sampled from its source (`sample_frame_indices`), all resized to one
size, and grouped in temporal groups of temporal_patch_size frames, the last frame repeated to
fill the last group. An image is a one-frame video whose frame fills its group.

Row layout (`patchify`): one row per patch, D = C * T * p * p values ordered (channel, frame of
the temporal group, y, x). Rows go temporal group by group, merge window by merge window
(row-major), and patch by patch inside a window (row-major), so every merge_size**2 consecutive
rows become one visual token. `grid_thw` holds (groups, patch rows, patch columns) per item; an
item takes t * h * w / merge_size**2 visual tokens.

Settings come from a checkpoint's processor configs (`processor_config_from_dir`) or a family's
published ones (`FAMILIES`); videos come from files, frame directories or frame lists
(`open_video`); `NativeImageProcessor` runs the whole path.

Images equal transformers' PIL-backend processor (`Qwen2VLImageProcessorPil`, which all three
families use) bit for bit. Video follows its video processors' frame sampling, sizing, grouping
and patch order; they resize with torchvision, where each frame here is resized with PIL as
images are (tests/test_native_images.py).

Shape suffixes: P = patches, D = C * T * p * p, F = frames, C = channels, H x W = resized frame.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageSequence

from vlmkit.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE_FACTOR
from vlmkit.data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb
from vlmkit.errors import BadRecordError, ConfigError
from vlmkit.schema import build

HALF_MEAN_STD = (0.5, 0.5, 0.5)
"""Qwen3-VL's mean and std (the reference's IMAGENET_STANDARD values)."""

MAX_ASPECT_RATIO = 200
"""Longest side / shortest side beyond which the reference refuses an image."""

VIDEO_CONTEXT_SHARE = 0.9
"""With cap_frame_pixels, the share of max_video_tokens a Qwen2-VL video's pixels may fill."""

CAP_FLOOR_OVER_MIN_PIXELS = 1.05
"""With cap_frame_pixels, a frame's budget never falls below this multiple of video_min_pixels."""

UNKNOWN_VIDEO_FPS = 24.0
"""Frame rate the reference assumes for frames given without one (timestamps, seconds per group)."""

VideoRules = Literal["qwen2_vl", "qwen3_vl"]

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class NativeProcessorConfig:
    """How a native-resolution model sizes, samples and normalises its pixels (HF's
    preprocessor_config.json and video_preprocessor_config.json)."""

    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    video_rules: VideoRules
    """qwen2_vl (also Qwen2.5-VL): the video pixel budget is per frame and frames are sampled on a
    stride; qwen3_vl: the budget covers the whole clip and frames are sampled evenly from the first
    to the last."""
    video_fps: float | None = None
    """Frames per second sampled from a video by default; None keeps every frame."""
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = RESCALE_FACTOR
    min_frames: int = 4
    max_frames: int = 768
    cap_frame_pixels: bool = False
    """Bound a video's pixels by max_video_tokens as qwen-vl-utils does (`video_pixel_budget`);
    off by default, as in transformers' video processors."""
    max_video_tokens: int = 128000
    """qwen2_vl: the context a whole video may fill (90% of it); qwen3_vl: the tokens of one frame."""

    @property
    def window(self) -> int:
        """Pixels per side of one merge window: every resized side is a multiple of it."""
        return self.patch_size * self.merge_size

    @property
    def timestamps_in_prompt(self) -> bool:
        """Whether the prompt writes `<t seconds>` before each temporal group of a video (Qwen3-VL)."""
        return self.video_rules == "qwen3_vl"

    @property
    def patch_dim(self) -> int:
        """Values in one patch row: C * T * p * p."""
        return len(self.mean) * self.temporal_patch_size * self.patch_size ** 2


SIZING_SETTINGS = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_fps", "min_frames",
                   "max_frames", "cap_frame_pixels", "max_video_tokens")
"""The settings a run may change (`with_sizing`): how many pixels and frames an item gets. The
others (patch, merge and temporal sizes, normalisation, video rules) are the tower's own."""


def check_sizing_keys(settings: dict, where: str = "model.processor") -> None:
    """ConfigError unless `settings` is a mapping of SIZING_SETTINGS only: a run config checks this
    when it loads, before any data is prepared; the values are checked against the model's own
    settings by `with_sizing`."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a mapping of sizing settings, got {settings!r}")
    fixed = sorted(set(settings) - set(SIZING_SETTINGS))
    if fixed:
        raise ConfigError(f"{where}: {', '.join(fixed)} cannot be changed (a processor setting the tower was "
                          f"built for, or no setting at all); the sizing settings are {list(SIZING_SETTINGS)}")


def with_sizing(config: NativeProcessorConfig, settings: dict, where: str = "model.processor"
                ) -> NativeProcessorConfig:
    """`config` with some of its SIZING_SETTINGS replaced, as Qwen-VL users set min_pixels /
    max_pixels: a larger min_pixels gives small images more visual tokens (they are scaled up to
    it), a smaller max_pixels bounds large ones. ConfigError names a key that is not a sizing
    setting or a pixel range no image size fits in."""
    check_sizing_keys(settings, where)
    new = build(NativeProcessorConfig, {**asdict(config), **settings}, where)
    for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
        lo, hi = getattr(new, low), getattr(new, high)
        if not new.window ** 2 <= lo <= hi:
            raise ConfigError(f"{where}: need {new.window ** 2} (one {new.window} px merge window) <= {low} "
                              f"<= {high}, got {low}={lo}, {high}={hi}")
    return new


# Published processor settings of each family's checkpoints (Qwen2-VL and Qwen2.5-VL ship no video
# config: their video processor reads preprocessor_config.json, so video sizes equal image sizes).
_QWEN2_VL = NativeProcessorConfig(
    patch_size=14, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384,
    video_min_pixels=56 * 56, video_max_pixels=14 * 14 * 4 * 16384, video_rules="qwen2_vl")
_QWEN3_VL = NativeProcessorConfig(
    patch_size=16, mean=HALF_MEAN_STD, std=HALF_MEAN_STD, min_pixels=256 * 256, max_pixels=4096 * 4096,
    video_min_pixels=64 * 64, video_max_pixels=16 * 16 * 4 * 24576, video_rules="qwen3_vl", video_fps=2.0,
    max_video_tokens=768)
FAMILIES: dict[str, NativeProcessorConfig] = {
    "qwen2_vl": _QWEN2_VL, "qwen2_5_vl": _QWEN2_VL, "qwen3_vl": _QWEN3_VL, "qwen3_vl_moe": _QWEN3_VL,
}
"""model_type (config.json) -> the family's processor settings."""


def processor_config_from_hf(model_type: str, image_config: dict, video_config: dict | None = None
                             ) -> NativeProcessorConfig:
    """The family's settings, overridden by what a checkpoint's processor configs say.

    image_config: preprocessor_config.json; video_config: video_preprocessor_config.json, or None
    where a checkpoint has none (its video processor then reads the image config, as HF's does)."""
    if model_type not in FAMILIES:
        raise ValueError(f"no native-resolution processor for model_type {model_type!r}; known: {sorted(FAMILIES)}")
    video_config = image_config if video_config is None else video_config
    base = FAMILIES[model_type]
    image_min, image_max = _pixel_range(image_config, base.min_pixels, base.max_pixels)
    video_min, video_max = _pixel_range(video_config, base.video_min_pixels, base.video_max_pixels)
    samples = video_config.get("do_sample_frames", base.video_fps is not None)
    return replace(
        base, min_pixels=image_min, max_pixels=image_max, video_min_pixels=video_min, video_max_pixels=video_max,
        patch_size=image_config.get("patch_size", base.patch_size),
        merge_size=image_config.get("merge_size", base.merge_size),
        temporal_patch_size=image_config.get("temporal_patch_size", base.temporal_patch_size),
        mean=tuple(image_config.get("image_mean", base.mean)), std=tuple(image_config.get("image_std", base.std)),
        rescale_factor=image_config.get("rescale_factor", base.rescale_factor),
        video_fps=video_config.get("fps", base.video_fps) if samples else None,
        min_frames=video_config.get("min_frames", base.min_frames),
        max_frames=video_config.get("max_frames", base.max_frames),
        cap_frame_pixels=bool(video_config.get("cap_pixels_per_frame")),
        max_video_tokens=video_config.get("max_video_tokens", base.max_video_tokens))


def _pixel_range(config: dict, default_min: int, default_max: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) of an HF processor config: top-level keys win over `size`."""
    size = config.get("size") or {}
    return (config.get("min_pixels", size.get("shortest_edge", default_min)),
            config.get("max_pixels", size.get("longest_edge", default_max)))


def processor_config_from_dir(path: str | Path) -> NativeProcessorConfig:
    """`processor_config_from_hf` for an HF model directory (config.json's model_type and its
    processor configs)."""
    path = Path(path)
    model_type = _read_json(path / HF_CONFIG_FILE)["model_type"]
    video_file = path / VIDEO_CONFIG_FILE
    video_config = _read_json(video_file) if video_file.is_file() else None
    return processor_config_from_hf(model_type, _read_json(path / IMAGE_CONFIG_FILE), video_config)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- sizes --------------------------------------------------------------------------------------------


def fit_to_grid(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) for an image: sides rounded to multiples of `factor`, then scaled (keeping
    the aspect ratio) into [min_pixels, max_pixels]. BadRecordError past MAX_ASPECT_RATIO."""
    _check_aspect_ratio(height, width)
    return _fit(height, width, factor, min_pixels, max_pixels, frames=1, frames_on_grid=1)


def fit_clip_to_grid(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                     min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) for the frames of a Qwen3-VL video: the pixel budget covers frames x height
    x width, and a frame narrower than `factor` is first scaled up to it (as the reference does)."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect_ratio(height, width)
    frames_on_grid = round(num_frames / temporal_factor) * temporal_factor
    return _fit(height, width, factor, min_pixels, max_pixels, num_frames, frames_on_grid)


def _check_aspect_ratio(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadRecordError("extreme_aspect_ratio", f"a {width}x{height} image: its sides are more than "
                             f"{MAX_ASPECT_RATIO} times apart")


def _fit(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int,
         frames_on_grid: int) -> tuple[int, int]:
    # Same operations in the same order as the reference: a different float path can land a side
    # one window away.
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if frames_on_grid * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames_on_grid * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- pixels -> patches --------------------------------------------------------------------------------


def normalise(frames: np.ndarray, config: NativeProcessorConfig) -> torch.Tensor:
    """(F, H, W, C) uint8 -> (F, C, H, W) float32 rescaled and normalised.

    Rescaled in float64 and rounded once to float32, then normalised in float32, as the reference
    does: a single float32 multiply differs from it in the last bit."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    scaled = (pixels.double() * config.rescale_factor).float()
    mean = torch.tensor(config.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(-1, 1, 1)
    return (scaled - mean) / std


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
             ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(F, C, H, W) -> ((P, D) patch rows in merge-window order, (t, h, w)); the last frame is
    repeated up to a whole number of temporal groups. H and W are multiples of patch * merge."""
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    num_frames, channels, height, width = frames.shape
    t, h, w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    grid = frames.reshape(t, temporal_patch_size, channels, h // m, m, p, w // m, m, p)
    # -> (t, window row, window col, row in window, col in window, channel, frame in group, y, x)
    rows = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return rows.reshape(t * h * w, channels * temporal_patch_size * p * p), (t, h, w)


def frames_to_patches(frames: Sequence[Image.Image], size: tuple[int, int], config: NativeProcessorConfig
                      ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """RGB frames of one item, resized to size = (height, width) -> (patch rows, (t, h, w))."""
    height, width = size
    resized = np.stack([np.asarray(f.resize((width, height), Image.Resampling.BICUBIC)) for f in frames])
    return patchify(normalise(resized, config), config.patch_size, config.merge_size, config.temporal_patch_size)


# --- frame sampling -----------------------------------------------------------------------------------


def sample_frame_indices(total_frames: int, config: NativeProcessorConfig, source_fps: float | None = None,
                         fps: float | None = None, num_frames: int | None = None) -> list[int]:
    """Indices of the frames of a total_frames-long video that the model sees.

    num_frames or fps (frames per second of video; at most one) override the config's `video_fps`;
    with none of them every frame is kept. Sampling by fps needs the video's own source_fps."""
    if fps is not None and num_frames is not None:
        raise ValueError("sample a video by fps or by num_frames, not both")
    if num_frames is None and fps is None:
        fps = config.video_fps
        if fps is None:
            return list(range(total_frames))
    sample = _stride_sample if config.video_rules == "qwen2_vl" else _even_sample
    indices = sample(total_frames, config, source_fps, fps, num_frames)
    if not indices:
        raise BadRecordError("empty_video", f"sampling a {total_frames}-frame video at fps={fps}, "
                             f"num_frames={num_frames} keeps no frame")
    return indices


def _stride_sample(total: int, config: NativeProcessorConfig, source_fps: float | None, fps: float | None,
                   num_frames: int | None) -> list[int]:
    """Qwen2-VL's rule: a count rounded to whole temporal groups, frames taken on a fixed stride."""
    group = config.temporal_patch_size
    if num_frames is not None:
        num_frames = round(num_frames / group) * group
    else:
        if source_fps is None:  # a list or folder of frames: no rate to sample by (as the reference)
            raise BadRecordError("unknown_frame_rate", f"this model samples videos at {fps} frames per second, "
                                 f"but these {total} frames come without a frame rate; send a video file, or "
                                 "frames already sampled with num_frames")
        longest = math.floor(min(config.max_frames, total) / group) * group
        wanted = min(max(total / source_fps * fps, config.min_frames), longest, total)
        num_frames = math.floor(wanted / group) * group
    if num_frames > total:
        raise BadRecordError("too_few_frames", f"cannot sample {num_frames} frames from a {total}-frame video")
    if num_frames == 0:
        return []
    # torch.arange's float stride, as the reference computes it: its truncation picks the frames.
    return torch.arange(0, total, total / num_frames).int().tolist()


def _even_sample(total: int, config: NativeProcessorConfig, source_fps: float | None, fps: float | None,
                 num_frames: int | None) -> list[int]:
    """Qwen3-VL's rule: frames spread evenly from the first to the last, rounded to the nearest."""
    if num_frames is None:
        count = int(total / (source_fps or UNKNOWN_VIDEO_FPS) * fps)
        num_frames = min(max(count, config.min_frames), config.max_frames, total)
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()


# --- results ------------------------------------------------------------------------------------------


@dataclass
class NativeImages:
    """A list of images in the tower's form."""

    pixel_values: torch.Tensor | None  # (P, D) every image's patch rows, in order; None without images
    grid_thw: torch.Tensor  # (N, 3) int64: (1, patch rows, patch columns) per image
    merge_size: int

    @property
    def patches_per_image(self) -> list[int]:
        return self.grid_thw.prod(-1).tolist()

    @property
    def visual_tokens(self) -> list[int]:
        """Visual tokens each image takes in the text: t * h * w / merge_size**2."""
        return (self.grid_thw.prod(-1) // self.merge_size ** 2).tolist()


@dataclass
class NativeVideo:
    """One video in the tower's form, with the times the prompt and the rotary positions need."""

    pixel_values: torch.Tensor  # (P, D) patch rows, temporal group by group
    grid_thw: tuple[int, int, int]  # (temporal groups, patch rows, patch columns)
    merge_size: int
    frame_indices: list[int]
    """Which frames of the source were sampled."""
    group_times: list[float]
    """Seconds at the middle of each temporal group (Qwen3-VL writes `<t seconds>` before it)."""
    seconds_per_group: float
    """Seconds one temporal group spans (Qwen2.5-VL's `second_per_grid_ts`)."""

    @property
    def tokens_per_group(self) -> int:
        """Visual tokens of one temporal group (one frame pair): h * w / merge_size**2."""
        return self.grid_thw[1] * self.grid_thw[2] // self.merge_size ** 2

    @property
    def visual_tokens(self) -> int:
        return self.grid_thw[0] * self.tokens_per_group


def stack_videos(videos: Sequence[NativeVideo]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Videos in order -> (pixel_values_videos (P, D) or None without videos, video_grid_thw (N, 3) int64)."""
    grid = torch.tensor([v.grid_thw for v in videos], dtype=torch.int64).reshape(-1, 3)
    return (torch.cat([v.pixel_values for v in videos]) if videos else None), grid


# --- video sources ------------------------------------------------------------------------------------

VideoSource = str | Path | Sequence[ImageSource | np.ndarray]
"""A video file, a directory of frame images (read in name order), or frames: a list of images
(anything `load_image` reads, or (H, W, C) uint8 arrays) or one (F, H, W, C) uint8 array."""

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ANIMATED_SUFFIXES = (".gif", ".webp", ".png", ".apng")


@dataclass
class FrameSource:
    """A video before decoding: how many frames it has, its frame rate, and how to decode some."""

    total_frames: int
    fps: float | None
    decode: Callable[[list[int]], list[Image.Image]]
    """indices -> RGB frames."""
    name: str


def open_video(src: VideoSource, max_pixels: int = DEFAULT_MAX_PIXELS, fps: float | None = None) -> FrameSource:
    """A video file (PyAV for mp4 / mkv / webm / ...; Pillow for animated GIF / WebP / PNG), a
    directory of frame images or a list of frames; `fps` gives the frame rate of a directory or a
    list (files carry their own). Raises BadRecordError (missing_video, empty_video, not_a_video,
    and load_image's reasons for a bad frame)."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            return _frame_list(frames, max_pixels, fps, name=str(path))
        if not path.is_file():
            raise BadRecordError("missing_video", f"video file {path} does not exist")
        if path.suffix.lower() in ANIMATED_SUFFIXES:
            return _animated_image(path, max_pixels)
        return _video_file(path, max_pixels)
    return _frame_list(list(src), max_pixels, fps, name=f"<{len(src)} frames>")


def _frame_list(frames: list, max_pixels: int, fps: float | None, name: str) -> FrameSource:
    if not frames:
        raise BadRecordError("empty_video", f"video {name} has no frames")

    def decode(indices: list[int]) -> list[Image.Image]:
        return [_frame_image(frames[i], max_pixels) for i in indices]
    return FrameSource(len(frames), fps, decode, name)


def _frame_image(frame, max_pixels: int) -> Image.Image:
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.dtype != np.uint8 or frame.shape[-1] not in (1, 3, 4) or 0 in frame.shape:
            raise BadRecordError("not_an_image", f"a video frame must be a non-empty (H, W, C) uint8 array "
                                 f"with 1, 3 or 4 channels, got {frame.dtype} {frame.shape}")
        frame = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    return load_image(frame, max_pixels)


def _animated_image(path: Path, max_pixels: int) -> FrameSource:
    load_image(path, max_pixels)  # the first frame through the decode checks: truncated, too large, ...
    with Image.open(path) as image:
        total = getattr(image, "n_frames", 1)
        durations = [frame.info.get("duration", 0) / 1000 for frame in ImageSequence.Iterator(image)]  # ms -> s
    mean_duration = sum(durations) / len(durations)

    def decode(indices: list[int]) -> list[Image.Image]:
        with Image.open(path) as image:
            frames = []
            for i in indices:
                image.seek(i)
                frames.append(to_rgb(image.convert("RGBA")))
            return frames
    return FrameSource(total, 1 / mean_duration if mean_duration > 0 else None, decode, str(path))


def _video_file(path: Path, max_pixels: int) -> FrameSource:
    """A video container decoded with PyAV, an optional dependency (`pip install av`)."""
    try:
        import av  # deferred: optional and heavy; only video files need it
    except ImportError:
        raise BadRecordError("not_a_video", f"{path}: decoding video files needs PyAV (pip install av); "
                             "pass a directory of frames or a list of frames instead") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or sum(1 for _ in container.decode(stream))
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, IndexError) as e:
        raise BadRecordError("not_a_video", f"{path} is not a readable video: {e}") from None
    if total == 0:
        raise BadRecordError("empty_video", f"video {path} has no frames")
    if width * height > max_pixels:
        raise BadRecordError("image_too_large", f"{path}: frames of {width}x{height} = {width * height} pixels; "
                             f"the limit is {max_pixels}")

    def decode(indices: list[int]) -> list[Image.Image]:
        wanted, frames = set(indices), {}
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_image()  # RGB
                if len(frames) == len(wanted):
                    break
        if len(frames) < len(wanted):
            raise BadRecordError("truncated_video", f"{path} holds fewer than the {total} frames its header "
                                 f"announces (frame {max(wanted - frames.keys())} is missing)")
        return [frames[i] for i in indices]
    return FrameSource(total, fps, decode, str(path))


# --- the processor ------------------------------------------------------------------------------------


class NativeImageProcessor:
    """Images and videos -> patch rows and grids for a native-resolution tower."""

    def __init__(self, config: NativeProcessorConfig, decode_max_pixels: int = DEFAULT_MAX_PIXELS):
        self.config = config
        self.decode_max_pixels = decode_max_pixels
        """Largest image decoded at all (data/images.py's bomb check); far above max_pixels."""

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        c = self.config
        return fit_to_grid(height, width, c.window, c.min_pixels, c.max_pixels)

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens of an image of this size, before decoding its pixels."""
        h, w = self.image_size(width, height)
        return h * w // self.config.window ** 2

    def load(self, src: ImageSource) -> Image.Image:
        return load_image(src, self.decode_max_pixels)

    def image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One RGB image -> ((P, D) patch rows, (1, h, w)): a one-frame video, so `patchify` repeats
        the frame to fill its temporal group."""
        image = to_rgb(image)
        return frames_to_patches([image], self.image_size(*image.size), self.config)

    def images(self, sources: Sequence[ImageSource]) -> NativeImages:
        """Decode (load_image's checks and reasons) and patchify each image, in order."""
        items = [self.image(self.load(src)) for src in sources]
        grid = torch.tensor([g for _, g in items], dtype=torch.int64).reshape(-1, 3)
        pixels = torch.cat([p for p, _ in items]) if items else None
        return NativeImages(pixels, grid, self.config.merge_size)

    def video(self, src: VideoSource, fps: float | None = None, num_frames: int | None = None,
              source_fps: float | None = None) -> NativeVideo:
        """Sample, decode, resize and patchify one video.

        fps / num_frames: how to sample (at most one; default: the config's video_fps, or every
        frame); source_fps: the frame rate of a directory or list of frames."""
        source = open_video(src, self.decode_max_pixels, source_fps)
        indices = sample_frame_indices(source.total_frames, self.config, source.fps, fps, num_frames)
        frames = source.decode(indices)
        if len({f.size for f in frames}) > 1:
            raise BadRecordError("mixed_frame_sizes", f"video {source.name} has frames of sizes "
                                 f"{sorted({f.size for f in frames})}; all must be equal")
        pixels, grid = frames_to_patches(frames, self.video_size(len(frames), *frames[0].size), self.config)
        times = group_times(indices, source.fps, self.config.temporal_patch_size)
        return NativeVideo(pixels, grid, self.config.merge_size, indices, times,
                           seconds_per_group(len(indices), source.total_frames, source.fps, self.config))

    def video_size(self, num_frames: int, width: int, height: int) -> tuple[int, int]:
        """(height, width) the frames of a num_frames-frame video are resized to."""
        c = self.config
        if c.video_rules == "qwen2_vl":
            return fit_to_grid(height, width, c.window, c.video_min_pixels, video_pixel_budget(num_frames, c))
        # The reference refuses a clip shorter than one temporal group; it is padded to one here.
        num_frames = max(num_frames, c.temporal_patch_size)
        return fit_clip_to_grid(num_frames, height, width, c.window, c.temporal_patch_size,
                                c.video_min_pixels, video_pixel_budget(num_frames, c))


def video_pixel_budget(num_frames: int, config: NativeProcessorConfig) -> int:
    """The max_pixels a num_frames-frame video is sized with: per frame (qwen2_vl) or for the whole
    clip (qwen3_vl). With cap_frame_pixels, long videos get fewer pixels per frame: Qwen2-VL shares
    90% of max_video_tokens among the temporal groups, Qwen3-VL gives each frame at most
    max_video_tokens tokens and an even share of video_max_pixels."""
    c = config
    if not c.cap_frame_pixels:
        return c.video_max_pixels
    floor = int(c.video_min_pixels * CAP_FLOOR_OVER_MIN_PIXELS)
    if c.video_rules == "qwen2_vl":
        video_pixels = int(c.max_video_tokens * c.window * c.window * VIDEO_CONTEXT_SHARE)
        return max(min(c.video_max_pixels, video_pixels * c.temporal_patch_size // num_frames), floor)
    frame_pixels = max(min(c.max_video_tokens * c.window * c.window, c.video_max_pixels // num_frames), floor)
    return frame_pixels * num_frames


def group_times(indices: list[int], source_fps: float | None, temporal_patch_size: int) -> list[float]:
    """Seconds at the middle of each temporal group: the mean of its first and last frame's times."""
    fps = source_fps or UNKNOWN_VIDEO_FPS
    padded = indices + indices[-1:] * (-len(indices) % temporal_patch_size)
    return [(padded[i] / fps + padded[i + temporal_patch_size - 1] / fps) / 2
            for i in range(0, len(padded), temporal_patch_size)]


def seconds_per_group(sampled: int, total: int, source_fps: float | None, config: NativeProcessorConfig) -> float:
    """Seconds of video one temporal group spans: temporal_patch_size / the sampled frame rate."""
    sampled_fps = sampled / total * source_fps if source_fps else UNKNOWN_VIDEO_FPS
    return config.temporal_patch_size / sampled_fps
