"""An upload's image, as the API reports it: decoded by ``segq.images``.
Its refusals (``segq.images.ImageRefused``) reach the client through
api/error_envelope.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from segq.images import decode_image


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    #: As displayed (EXIF orientation applied), as the worker's masks are.
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Decode every pixel of ``data`` once, now. Raises UnreadableImage or
    TooManyPixels (segq.images) for a file segq does not serve."""
    image = decode_image(data, max_pixels=max_pixels)
    return ImageInfo(
        image.format.mime_type, image.width, image.height, hashlib.sha256(data).hexdigest()
    )
