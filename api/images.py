"""What an uploaded image really is, decided from its bytes alone."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from api.errors import ApiError

_SIGNATURES = {
    b"\xff\xd8\xff": ("JPEG", "image/jpeg"),
    b"\x89PNG\r\n\x1a\n": ("PNG", "image/png"),
}


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Sniff, bound and fully decode ``data``; raise 415 unless it is a real
    JPEG or PNG, 413 if it has more than ``max_pixels`` pixels.

    The pixel bound is checked from the header, before decoding, so a
    decompression bomb is refused without being inflated."""
    kind = next((v for sig, v in _SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        raise ApiError(415, "file is not a JPEG or PNG image")
    pil_format, mime_type = kind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[pil_format]) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ApiError(415, "image has no pixels")
                if width * height > max_pixels:
                    raise ApiError(
                        413,
                        f"image has {width}x{height} pixels, more than the {max_pixels} allowed",
                    )
                # Decode every pixel now: a truncated or corrupt file is the
                # client's to fix, not a worker's to discover.
                image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image is too large to decode") from None
    except Exception:  # Pillow raises many types for broken files
        raise ApiError(415, f"file is not a readable {pil_format} image") from None
    return ImageInfo(mime_type, width, height, hashlib.sha256(data).hexdigest())
