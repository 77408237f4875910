"""Images in MARS: the one place that opens image files or bytes, and that fits them to sizes.

``load_image`` decodes fully (truncated or corrupt data fails here, not later in a batch),
refuses decompression bombs before decoding (PIL reads the header's size first; anything over
``max_pixels`` is refused, rather than PIL's warning-then-error at 89M / 179M pixels), and
returns an RGB image. Every failure is an ``ImageError`` whose message names the source, so
callers can skip and count a bad file with one ``except``.

``prepare_image`` fits an image to the nearest of the sizes a model is trained on (resize to
cover, centre crop): stage I's square crop and stage II's aspect-ratio buckets are one rule,
used by training, pre-tokenization and captioning alike.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192: far above any training or evaluation size


class ImageError(ValueError):
    """An image that cannot be used: unreadable, truncated, or too large."""


def load_image(source: bytes | str | Path, what: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes or a file path -> a decoded RGB ``PIL.Image``; ``ImageError`` naming ``what``
    (default: the path) when it cannot be read or has more than ``max_pixels`` pixels."""
    name = what or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        raw = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as error:
        raise ImageError(f"{name}: no such file") from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: over PIL's size limit (a decompression bomb?): {error}") from error
    except (OSError, ValueError) as error:
        raise ImageError(f"{name}: not a readable image ({error})") from error
    with raw:
        width, height = raw.size
        if width * height > max_pixels:
            raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} (a decompression bomb?)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                raw.load()
                return raw.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageError(f"{name}: not a readable image ({type(error).__name__}: {error})") from error


# ------------------------------------------------------------------------------ sizes
def parse_resolution(resolution: str | Sequence[int]) -> tuple[int, int]:
    """``"96x64"`` or ``(96, 64)`` -> (width, height) in pixels."""
    if isinstance(resolution, str):
        parts = resolution.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"resolution {resolution!r} is not WIDTHxHEIGHT in pixels, e.g. 96x64")
        return int(parts[0]), int(parts[1])
    width, height = resolution
    return int(width), int(height)


def nearest_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The resolution whose aspect ratio is nearest (in log ratio) to ``size``'s; ties: the first."""
    ratio = math.log(size[0] / size[1])
    return min(resolutions, key=lambda r: abs(math.log(r[0] / r[1]) - ratio))


def fit_image(image: Image.Image, resolution: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``resolution`` (aspect ratio kept, bicubic), then crop the centre.

    With one square resolution this is stage I's "resize the short side, crop the centre
    square"; with stage II's list of sizes (short side fixed, aspect ratios up to 2) the
    nearest one (``nearest_resolution``) loses the least of the image."""
    width, height = resolution
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def prepare_image(image: Image.Image, resolutions: Sequence[tuple[int, int]]) -> Image.Image:
    """The image as the model sees it: fitted to the nearest of ``resolutions`` (training,
    pre-tokenization and captioning all prepare images here)."""
    return fit_image(image, nearest_resolution(image.size, resolutions))
