"""data/images.py: safe decoding (bad files -> reasons), RGB conversion, EXIF rotation, InternVL tiling."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.images import ImageProcessor, load_image, tile_grid
from vlmkit.data.types import ImageRef
from vlmkit.errors import BadRecordError


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid small PNG whose header claims width x height pixels (a decompression-bomb header)."""
    raw = png_bytes(Image.new("RGB", (8, 8)))
    ihdr = struct.pack(">II", width, height) + raw[24:29]  # IHDR data: size, then depth, colour, ...
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def reason_of(src) -> str:
    with pytest.raises(BadRecordError) as e:
        load_image(src)
    return e.value.reason


def test_bad_files_get_their_reason(tmp_path):
    good = png_bytes(Image.new("RGB", (64, 48), (10, 20, 30)))
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    assert reason_of(tmp_path / "trunc.png") == "truncated_image"
    assert reason_of(tmp_path / "empty.png") == "empty_image"
    assert reason_of(tmp_path / "text.png") == "not_an_image"
    assert reason_of(tmp_path / "nope.png") == "missing_image"
    assert reason_of(ImageRef(data=b"")) == "empty_image"


def test_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())  # a few hundred bytes that claim 1e10 pixels
    assert reason_of(path) == "image_too_large"
    assert reason_of(bomb_png(9000, 9000)) == "image_too_large"  # above our limit, below Pillow's error
    with pytest.raises(BadRecordError, match="limit is 100"):
        load_image(png_bytes(Image.new("RGB", (20, 20))), max_pixels=100)


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0))[0] in (126, 127)
    for image in (Image.new("L", (4, 4), 7), Image.new("P", (4, 4)), Image.new("CMYK", (4, 4)),
                  Image.new("1", (4, 4)), Image.new("LA", (4, 4))):
        out = load_image(png_bytes(image) if image.mode != "CMYK" else image)
        assert out.mode == "RGB" and out.size == (4, 4)
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))  # 16-bit grayscale
    out = load_image(png_bytes(wide))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_tile_grid_follows_internvl():
    assert tile_grid(448, 448, 448, 6) == (1, 1)
    assert tile_grid(896, 448, 448, 6) == (2, 1)
    assert tile_grid(448, 1344, 448, 6) == (1, 3)
    # Ties on the aspect ratio go to the bigger grid only when the image has the pixels.
    assert tile_grid(100, 100, 448, 9) == (1, 1)
    assert tile_grid(2000, 2000, 448, 9) == (3, 3)
    assert tile_grid(1000, 10, 448, 4) == (4, 1)


def test_processor_shapes_and_token_counts():
    torch.manual_seed(0)
    proc = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_tiles=6)
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    out = proc(wide)
    assert out.shape == (3, 3, 32, 32)  # 2x1 grid + thumbnail
    assert proc.num_tiles(128, 64) == 3
    assert torch.allclose(out[:, 0], torch.ones(3, 32, 32))  # red channel: (1 - .5) / .5
    assert torch.allclose(out[:, 1], -torch.ones(3, 32, 32))
    single = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    assert single(wide).shape == (1, 3, 32, 32) and single.num_tiles(128, 64) == 1
    no_thumb = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, max_tiles=6, use_thumbnail=False)
    assert no_thumb(wide).shape[0] == 2
