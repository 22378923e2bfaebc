"""data/native_images.py: images and video for native-resolution towers, equal to transformers.

Images are compared with transformers' PIL-backend processor (Qwen2VLImageProcessorPil, the one
Qwen2-VL, Qwen2.5-VL and Qwen3-VL use). Its video processors need torchvision, which this
environment lacks, so video is compared with the reference's own pieces run one by one: its frame
sampling, its size rules and its patch layout (loaded from transformers' source files), on frames
resized with PIL and normalised by the PIL image processor.
"""

import importlib.util
import io
import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_fit
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from vlmkit.data.native_images import (
    FAMILIES, NativeImageProcessor, NativeProcessorConfig, fit_clip_to_grid, fit_to_grid, group_times, patchify,
    processor_config_from_dir, sample_frame_indices, stack_videos, with_sizing,
)
from vlmkit.errors import BadRecordError, ConfigError

# Each family with max_pixels lowered so that "above max_pixels" needs no large image (speed).
SMALL_MAX = 96 * 28 * 28
FAMILY_CONFIGS = {
    "qwen2_vl": replace(FAMILIES["qwen2_vl"], max_pixels=SMALL_MAX, video_max_pixels=SMALL_MAX // 2),
    "qwen2_5_vl": replace(FAMILIES["qwen2_5_vl"], max_pixels=SMALL_MAX, video_max_pixels=SMALL_MAX // 2),
    "qwen3_vl": replace(FAMILIES["qwen3_vl"], min_pixels=64 * 64, max_pixels=SMALL_MAX, video_min_pixels=32 * 32,
                        video_max_pixels=8 * SMALL_MAX),
}
# (width, height): below min_pixels, small, wide, tall, above max_pixels, a prime-sided odd shape
SIZES = [(9, 7), (60, 40), (500, 90), (70, 400), (900, 700), (331, 197)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_image_processor(config: NativeProcessorConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=config.patch_size, merge_size=config.merge_size, temporal_patch_size=config.temporal_patch_size,
        image_mean=list(config.mean), image_std=list(config.std), min_pixels=config.min_pixels,
        max_pixels=config.max_pixels)


# --- images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_images_equal_the_reference_processor(family):
    config = FAMILY_CONFIGS[family]
    images = [random_image(w, h) for w, h in SIZES]
    expected = reference_image_processor(config)(images=images)
    got = NativeImageProcessor(config).images(images)
    assert got.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(got.pixel_values, torch.from_numpy(np.asarray(expected["pixel_values"])))  # bit for bit
    assert got.pixel_values.shape[1] == config.patch_dim


def test_the_published_settings_equal_the_reference_on_a_real_sized_image():
    image = random_image(1000, 750)
    for family in ("qwen2_5_vl", "qwen3_vl"):
        config = FAMILIES[family]
        expected = reference_image_processor(config)(images=[image])
        got = NativeImageProcessor(config).images([image])
        assert got.grid_thw.tolist() == expected["image_grid_thw"].tolist()
        assert torch.equal(got.pixel_values, torch.from_numpy(np.asarray(expected["pixel_values"])))


def test_modes_and_files_become_the_same_rgb_pixels(tmp_path):
    config = FAMILY_CONFIGS["qwen2_vl"]
    rgba = random_image(120, 80).convert("RGBA")
    rgba.putalpha(128)
    gray = random_image(120, 80).convert("L")
    path = tmp_path / "a.png"
    rgba.save(path)
    expected = reference_image_processor(config)(images=[rgba, gray])
    got = NativeImageProcessor(config).images([path, gray])
    assert torch.equal(got.pixel_values, torch.from_numpy(np.asarray(expected["pixel_values"])))


def test_resized_sides_equal_the_reference_rule():
    for family, config in FAMILY_CONFIGS.items():
        for height in (1, 5, 27, 28, 29, 57, 333, 1000, 4099):
            for width in (3, 28, 100, 641, 2000):
                if max(height, width) / min(height, width) > 200:
                    continue
                assert fit_to_grid(height, width, config.window, config.min_pixels, config.max_pixels) == \
                    reference_fit(height, width, config.window, config.min_pixels, config.max_pixels), family


def test_visual_tokens_are_known_before_decoding_and_follow_the_grid():
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen3_vl"])
    images = processor.images([random_image(w, h) for w, h in SIZES])
    tokens = [t * h * w // 4 for t, h, w in images.grid_thw.tolist()]
    assert images.visual_tokens == tokens
    assert [processor.image_tokens(w, h) for w, h in SIZES] == tokens
    assert images.patches_per_image == [4 * n for n in tokens]
    assert images.grid_thw[:, 0].tolist() == [1] * len(SIZES)


def test_a_larger_min_pixels_scales_small_images_up_as_the_reference_does():
    config = with_sizing(FAMILIES["qwen2_5_vl"], {"min_pixels": 84 * 84})
    assert (config.min_pixels, config.max_pixels, config.patch_size) == (84 * 84, FAMILIES["qwen2_5_vl"].max_pixels, 14)
    image = random_image(48, 64)  # 16 px cells of a 4 x 3 scene: 2 x 2 tokens under the family's 56 x 56
    assert NativeImageProcessor(FAMILIES["qwen2_5_vl"]).images([image]).grid_thw.tolist() == [[1, 4, 4]]
    pixels, grid = NativeImageProcessor(config).image(image)
    assert grid == (1, 8, 6)
    expected = reference_image_processor(config)(images=[image], return_tensors="pt")
    torch.testing.assert_close(pixels, expected["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("settings, needle", [
    ({"patch_size": 16}, "patch_size cannot be changed"),
    ({"mean": [0.5, 0.5, 0.5]}, "mean cannot be changed"),
    ({"min_pixel": 1000}, "min_pixel cannot be changed"),
    ({"min_pixels": 100}, "need 784"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels=5000, max_pixels=4000"),
    ({"video_min_pixels": 10}, "video_min_pixels"),
    ({"min_pixels": "many"}, "model.processor.min_pixels"),
])
def test_sizing_settings_refuse_what_they_cannot_change(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        with_sizing(FAMILIES["qwen2_5_vl"], settings)


def test_no_images_give_no_pixels():
    empty = NativeImageProcessor(FAMILY_CONFIGS["qwen2_vl"]).images([])
    assert empty.pixel_values is None and empty.grid_thw.shape == (0, 3) and empty.visual_tokens == []


def test_bad_images_get_a_reason(tmp_path):
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen2_vl"])
    good = io.BytesIO()
    random_image(40, 40).save(good, format="PNG")
    for data, reason in [(b"", "empty_image"), (b"not an image", "not_an_image"),
                         (good.getvalue()[:60], "truncated_image")]:
        with pytest.raises(BadRecordError) as e:
            processor.images([data])
        assert e.value.reason == reason
    with pytest.raises(BadRecordError, match="extreme_aspect_ratio"):
        processor.images([random_image(1000, 4)])


# --- video: layout, sampling, sizes ---------------------------------------------------------------------


def load_reference_module(relative_path: str, stub_torchvision: bool = False) -> types.ModuleType:
    """A transformers module loaded from its source file, bypassing the placeholder transformers
    exports when torchvision is missing; with stub_torchvision, an empty torchvision stands in for
    the import only (the functions used here never call it)."""
    name = "vlmkit_test_reference." + relative_path.replace("/", "_").removesuffix(".py")
    stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional"] if stub_torchvision else []
    added = [s for s in stubs if s not in sys.modules]
    for stub in added:
        sys.modules[stub] = types.ModuleType(stub)
    package = "transformers." + ".".join(relative_path.split("/")[:-1])
    spec = importlib.util.spec_from_file_location(f"{package}._vlmkit_reference_{name.rsplit('.', 1)[-1]}",
                                                  f"{transformers.__path__[0]}/{relative_path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the docstring helpers look the class's module up
    try:
        spec.loader.exec_module(module)
    finally:
        for stub in added:
            del sys.modules[stub]
    return module


@pytest.fixture(scope="module")
def reference_video():
    """{rules: (video processor module, an instance of its video processor)}."""
    qwen2 = load_reference_module("models/qwen2_vl/video_processing_qwen2_vl.py", stub_torchvision=True)
    qwen3 = load_reference_module("models/qwen3_vl/video_processing_qwen3_vl.py")
    return {"qwen2_vl": (qwen2, qwen2.Qwen2VLVideoProcessor), "qwen3_vl": (qwen3, qwen3.Qwen3VLVideoProcessor)}


def reference_processor(reference_video, config: NativeProcessorConfig, sample: bool):
    module, cls = reference_video[config.video_rules]
    return module, cls(patch_size=config.patch_size, merge_size=config.merge_size, image_mean=list(config.mean),
                       image_std=list(config.std), temporal_patch_size=config.temporal_patch_size,
                       size={"shortest_edge": config.video_min_pixels, "longest_edge": config.video_max_pixels},
                       fps=config.video_fps, do_sample_frames=sample, min_frames=config.min_frames,
                       max_frames=config.max_frames)


def reference_video_output(reference_video, config, frames, source_fps=None, sample=True, **sampling):
    """What the reference video processor gives, run step by step: sample, size, resize (PIL),
    rescale + normalise (the PIL image processor's), patchify."""
    module, processor = reference_processor(reference_video, config, sample)
    metadata = VideoMetadata(total_num_frames=len(frames), fps=source_fps, frames_indices=list(range(len(frames))))
    indices = processor.sample_frames(metadata, **sampling) if sample else np.arange(len(frames))
    indices = [int(i) for i in indices]
    width, height = frames[0].size
    if config.video_rules == "qwen2_vl":
        size = module.smart_resize(height, width, factor=config.window, min_pixels=config.video_min_pixels,
                                   max_pixels=config.video_max_pixels)
    else:
        size = module.smart_resize(len(indices), height, width, temporal_factor=config.temporal_patch_size,
                                   factor=config.window, min_pixels=config.video_min_pixels,
                                   max_pixels=config.video_max_pixels)
    pil = reference_image_processor(config)
    resized = [np.asarray(frames[i].resize(size[::-1], Image.Resampling.BICUBIC)).transpose(2, 0, 1) for i in indices]
    normalised = [pil.normalize(pil.rescale(f, config.rescale_factor), list(config.mean), list(config.std))
                  for f in resized]
    patches, t, h, w = processor.patchify(torch.from_numpy(np.stack(normalised))[None], config.patch_size,
                                          config.merge_size, config.temporal_patch_size)
    return patches[0], (t, h, w), indices


def random_frames(count: int, width: int = 90, height: int = 60) -> list[Image.Image]:
    return [random_image(width, height, seed=100 + i) for i in range(count)]


# (Qwen3-VL's reference refuses a one-frame clip: see the next test.)
@pytest.mark.parametrize("family, count", [("qwen2_5_vl", n) for n in (1, 2, 3, 4, 7)] +
                         [("qwen3_vl", n) for n in (2, 3, 4, 7)])
def test_every_frame_of_a_video_equals_the_reference(reference_video, family, count):
    """Odd counts repeat the last frame; the frame size follows each family's budget rule."""
    config = replace(FAMILY_CONFIGS[family], video_fps=None)  # keep every frame
    frames = random_frames(count)
    patches, grid, indices = reference_video_output(reference_video, config, frames, sample=False)
    video = NativeImageProcessor(config).video(frames)
    assert video.frame_indices == indices == list(range(count))
    assert video.grid_thw == grid and grid[0] == (count + 1) // 2
    assert torch.equal(video.pixel_values, patches)
    assert video.visual_tokens == grid[0] * grid[1] * grid[2] // 4
    pixels, grids = stack_videos([video, video])
    assert torch.equal(pixels, torch.cat([patches, patches])) and grids.tolist() == [list(grid)] * 2


def test_a_one_frame_qwen3_video_is_sized_as_one_whole_group():
    """The reference refuses it; here it is the frame twice, as an image is."""
    processor = NativeImageProcessor(replace(FAMILY_CONFIGS["qwen3_vl"], video_fps=None))
    frame = random_image(90, 60)
    one, two = processor.video([frame]), processor.video([frame, frame])
    assert one.grid_thw == two.grid_thw and torch.equal(one.pixel_values, two.pixel_values)


@pytest.mark.parametrize("family, total, source_fps, sampling", [
    ("qwen2_vl", 11, 4.0, {"num_frames": 5}),   # rounded to 6, stride 11/6
    ("qwen2_vl", 30, 10.0, {"fps": 2.0}),       # 6 frames
    ("qwen2_vl", 9, 3.0, {"fps": 1.0}),         # below min_frames: 4
    ("qwen3_vl", 10, 4.0, {}),                  # the default 2 fps: 5 frames, odd
    ("qwen3_vl", 40, 8.0, {"fps": 1.0}),        # 5 frames
    ("qwen3_vl", 6, None, {}),                  # unknown rate: 24 assumed, min_frames 4
    ("qwen3_vl", 9, 2.0, {"num_frames": 3}),
])
def test_sampled_videos_equal_the_reference(reference_video, family, total, source_fps, sampling):
    config = FAMILY_CONFIGS[family]
    frames = random_frames(total, 70, 50)
    patches, grid, indices = reference_video_output(reference_video, config, frames, source_fps, **sampling)
    video = NativeImageProcessor(config).video(frames, source_fps=source_fps, **sampling)
    assert video.frame_indices == indices
    assert video.grid_thw == grid
    assert torch.equal(video.pixel_values, patches)


def test_sampling_rules_equal_the_reference_over_many_lengths(reference_video):
    for family in ("qwen2_vl", "qwen3_vl"):
        config = FAMILY_CONFIGS[family]
        _, processor = reference_processor(reference_video, config, sample=True)
        for total in (4, 5, 17, 64, 299, 1000):
            for sampling in ({"fps": 1.0}, {"fps": 2.5}, {"num_frames": 4}):
                metadata = VideoMetadata(total_num_frames=total, fps=24.0)
                expected = [int(i) for i in processor.sample_frames(metadata, **sampling)]
                assert sample_frame_indices(total, config, 24.0, **sampling) == expected, (family, total, sampling)


def test_clip_sizes_equal_the_reference_rule(reference_video):
    module, _ = reference_video["qwen3_vl"]
    config = FAMILY_CONFIGS["qwen3_vl"]
    for frames in (2, 3, 8, 61):
        for height, width in ((10, 10), (20, 700), (480, 640), (1080, 1920), (33, 31)):
            got = fit_clip_to_grid(frames, height, width, config.window, 2, config.video_min_pixels,
                                   config.video_max_pixels)
            assert got == module.smart_resize(frames, height, width, 2, config.window, config.video_min_pixels,
                                              config.video_max_pixels)


@pytest.mark.parametrize("cap", [False, True])
def test_video_sizes_equal_the_reference_resize(reference_video, monkeypatch, cap):
    """The reference's `resize` with its torchvision call replaced by one returning the size it asks for."""
    monkeypatch.setattr(TorchvisionBackend, "resize", lambda self, image, size, resample=None: (size.height, size.width))
    for family, max_video_tokens in (("qwen2_5_vl", 200), ("qwen3_vl", 64)):
        config = replace(FAMILY_CONFIGS[family], cap_frame_pixels=cap, max_video_tokens=max_video_tokens)
        _, reference = reference_processor(reference_video, config, sample=False)
        size = SizeDict(shortest_edge=config.video_min_pixels, longest_edge=config.video_max_pixels)
        for frames in (2, 3, 8, 40):
            for height, width in ((60, 90), (480, 640), (1080, 1920), (20, 700)):
                videos = torch.zeros(()).expand(1, frames, 3, height, width)
                expected = reference.resize(videos, size, None, factor=config.window, temporal_factor=2,
                                            cap_pixels_per_frame=cap, max_video_tokens=max_video_tokens)
                got = NativeImageProcessor(config).video_size(frames, width, height)
                assert got == expected, (family, frames, height, width)


def test_times_equal_the_reference():
    for indices, fps in (([0, 3, 6, 9], 4.0), ([0, 5, 10], 30.0), ([2], None)):
        expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps or 24, 2)
        assert group_times(indices, fps, 2) == expected
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen2_5_vl"])
    video = processor.video(random_frames(12, 56, 56), source_fps=6.0, fps=2.0)
    metadata = VideoMetadata(total_num_frames=12, fps=6.0, frames_indices=video.frame_indices)
    assert video.seconds_per_group == pytest.approx(2 / metadata.sampled_fps, abs=0)  # Qwen2.5-VL's second_per_grid_ts
    assert processor.video(random_frames(2, 56, 56)).seconds_per_group == 2 / 24


def test_patch_rows_follow_the_documented_layout():
    """Row (group, window row, window col, row in window, col in window); value (channel, frame, y, x)."""
    p, m, tp, c, frames, height, width = 2, 2, 2, 3, 3, 8, 12
    pixels = torch.arange(frames * c * height * width, dtype=torch.float32).view(frames, c, height, width)
    rows, (t, h, w) = patchify(pixels, p, m, tp)
    assert (t, h, w) == (2, 4, 6) and rows.shape == (t * h * w, c * tp * p * p)
    row = 0
    for group in range(t):
        for window_row in range(h // m):
            for window_col in range(w // m):
                for i in range(m):
                    for j in range(m):
                        y0, x0 = (window_row * m + i) * p, (window_col * m + j) * p
                        frame_ids = [min(group * tp + k, frames - 1) for k in range(tp)]  # the last frame repeated
                        expected = torch.stack([pixels[f, :, y0:y0 + p, x0:x0 + p] for f in frame_ids], dim=1)
                        assert torch.equal(rows[row], expected.flatten()), row
                        row += 1


# --- video sources and bad videos -----------------------------------------------------------------------


def test_directories_arrays_and_lists_are_the_same_video(tmp_path):
    frames = random_frames(5, 64, 40)
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{i:03d}.png")
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen2_vl"])
    from_list = processor.video(frames)
    assert torch.equal(processor.video(tmp_path).pixel_values, from_list.pixel_values)
    assert torch.equal(processor.video([np.asarray(f) for f in frames]).pixel_values, from_list.pixel_values)
    assert torch.equal(processor.video(np.stack([np.asarray(f) for f in frames])).pixel_values, from_list.pixel_values)


def test_an_animated_gif_is_a_video_with_its_frame_rate(tmp_path):
    frames = [Image.new("RGB", (64, 48), (40 * i, 255 - 30 * i, 100)) for i in range(6)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen3_vl"])
    video = processor.video(path, fps=2.0)
    assert video.frame_indices == sample_frame_indices(6, processor.config, 4.0, fps=2.0)  # 250 ms -> 4 fps
    decoded = [Image.open(path) for _ in range(6)]
    for i, image in enumerate(decoded):
        image.seek(i)
    same = processor.video([image.convert("RGB") for image in decoded], source_fps=4.0, fps=2.0)
    assert torch.equal(video.pixel_values, same.pixel_values) and video.group_times == same.group_times


def test_a_video_file_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 12 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen3_vl"])
    video = processor.video(path)  # the default 2 fps over 2 s at 8 fps: 4 frames
    assert video.frame_indices == sample_frame_indices(16, processor.config, 8.0) == [0, 5, 10, 15]
    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    same = processor.video([decoded[i] for i in video.frame_indices], num_frames=4)
    assert torch.equal(video.pixel_values, same.pixel_values)
    assert video.group_times == group_times([0, 5, 10, 15], 8.0, 2)


def test_bad_videos_get_a_reason(tmp_path):
    processor = NativeImageProcessor(FAMILY_CONFIGS["qwen2_vl"])

    def reason(src, **kwargs) -> str:
        with pytest.raises(BadRecordError) as e:
            processor.video(src, **kwargs)
        return e.value.reason

    (tmp_path / "empty").mkdir()
    (tmp_path / "text.mp4").write_text("not a video")
    assert reason([]) == "empty_video"
    assert reason(tmp_path / "empty") == "empty_video"
    assert reason(tmp_path / "missing.mp4") == "missing_video"
    assert reason([np.zeros((0, 4, 3), np.uint8)]) == "not_an_image"
    assert reason([random_image(40, 40), b"garbage"]) == "not_an_image"
    assert reason([random_image(40, 40), random_image(50, 40)]) == "mixed_frame_sizes"
    assert reason(random_frames(3), num_frames=8) == "too_few_frames"
    assert reason(random_frames(4), fps=2.0) == "unknown_frame_rate"  # frames carry no rate to sample by
    if importlib.util.find_spec("av") is not None:
        assert reason(tmp_path / "text.mp4") == "not_a_video"


# --- settings from a checkpoint -------------------------------------------------------------------------


def test_settings_are_read_from_an_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 401408, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    config = processor_config_from_dir(tmp_path)
    assert (config.min_pixels, config.max_pixels, config.video_max_pixels) == (3136, 401408, 401408)
    assert config.video_rules == "qwen2_vl" and config.video_fps is None and not config.cap_frame_pixels
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 2, "do_sample_frames": True}))
    config = processor_config_from_dir(tmp_path)
    assert config == FAMILIES["qwen3_vl"]
    with pytest.raises(ValueError, match="model_type"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
        processor_config_from_dir(tmp_path)
