"""An upload's image, as the API reports it: decoded by ``segq.images``,
refusals turned into the API's errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from api.errors import ApiError
from segq.images import TooManyPixels, UnreadableImage, decode_image


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    #: As displayed (EXIF orientation applied), as the worker's masks are.
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Decode every pixel of ``data`` once, now: a truncated or corrupt file
    is the client's to fix (415), not a worker's to discover; more than
    ``max_pixels`` pixels is 413."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except UnreadableImage as exc:
        raise ApiError(415, str(exc)) from None
    except TooManyPixels as exc:
        raise ApiError(413, str(exc)) from None
    return ImageInfo(
        image.format.mime_type, image.width, image.height, hashlib.sha256(data).hexdigest()
    )
