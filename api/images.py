"""An upload's image, as the API reports it: decoded by ``segq.images``.
Its refusals (``segq.images.ImageRefused``) reach the client through
api/error_envelope.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from segq.images import check_image
from segq.settings import Settings


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    #: As displayed (EXIF orientation applied), as the worker's masks are.
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, settings: Settings) -> ImageInfo:
    """Check every pixel of ``data`` once, now, within the settings' bounds
    on pixels and on the memory checking takes. Raises UnreadableImage or
    TooManyPixels (segq.images) for a file segq does not serve."""
    image = check_image(
        data, max_pixels=settings.max_image_pixels, max_decode_bytes=settings.max_decode_bytes
    )
    return ImageInfo(
        image.format.mime_type, image.width, image.height, hashlib.sha256(data).hexdigest()
    )
