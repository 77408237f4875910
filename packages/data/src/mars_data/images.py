"""Reading images safely: the one place every MARS app opens an image file or image bytes.

``load_image`` decodes fully (truncated or corrupt data fails here, not later in a batch),
refuses decompression bombs before decoding (PIL reads the header's size first; anything over
``max_pixels`` is refused, rather than PIL's warning-then-error at 89M / 179M pixels), and
returns an RGB image. Every failure is an ``ImageError`` whose message names the source, so
callers can skip and count a bad file with one ``except``.
"""

from __future__ import annotations

import io
import warnings
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
