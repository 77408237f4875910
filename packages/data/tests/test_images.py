"""mars_data.images.load_image: decoded RGB images, one clear error for anything else."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mars_data.images import ImageError, load_image, nearest_resolution, parse_resolution, prepare_image


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 64).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_loads_bytes_and_paths_as_rgb(tmp_path):
    assert load_image(png(5, 3, "L")).mode == "RGB"
    (tmp_path / "a.png").write_bytes(png(4, 4))
    assert load_image(tmp_path / "a.png").size == (4, 4)


@pytest.mark.parametrize(
    "data, message",
    [(b"not an image", "not a readable image"), (png(64, 64)[:2000], "not a readable image")],
)
def test_broken_data_is_one_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data, what="shard-0.tar/key")


def test_bombs_are_refused_before_decoding():
    # a 5,000 x 5,000 PNG of one colour compresses to a few kB; it is refused from its header
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(buffer.getvalue(), max_pixels=10_000_000)


def test_pil_limit_is_an_image_error_too():
    buffer = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buffer, format="PNG")  # over PIL's own 179M-pixel error
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(buffer.getvalue(), max_pixels=10**9)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_resolutions_parse_and_the_nearest_aspect_ratio_wins():
    assert parse_resolution("96x64") == (96, 64) and parse_resolution((64, 96)) == (64, 96)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_resolution("96 by 64")
    sizes = [(256, 256), (384, 256), (256, 384), (512, 256), (256, 512)]
    assert nearest_resolution((640, 480), sizes) == (384, 256)
    assert nearest_resolution((1000, 300), sizes) == (512, 256)  # ratio 3.3: cropped to 2
    assert nearest_resolution((300, 300), sizes) == (256, 256)


def test_prepare_covers_then_crops_the_centre():
    image = Image.new("RGB", (90, 30), "white")
    image.paste((255, 0, 0), (30, 0, 60, 30))  # a red centre third
    out = prepare_image(image, [(16, 16)])
    assert out.size == (16, 16)
    assert out.getpixel((8, 8)) == (255, 0, 0)  # the centre square is the red third
    assert prepare_image(image, [(16, 16), (32, 16)]).size == (32, 16)
