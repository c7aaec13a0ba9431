"""An upload's image, as the API reports it: decoded by ``segq.images``.
Its refusals (``segq.images.ImageRefused``) reach the client through the
table of api/refusals.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from segq.api.errors import ApiError, FieldPath
from segq.api.refusals import refusal_of
from segq.images import ImageRefused, check_image
from segq.settings import Settings


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    #: As displayed (EXIF orientation applied), as the worker's masks are.
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, settings: Settings, *, field: FieldPath = ()) -> ImageInfo:
    """Check every pixel of ``data`` once, now, within the settings' bounds
    on pixels and on the memory checking takes. Raises UnreadableImage or
    TooManyPixels (segq.images) for a file segq does not serve; with
    ``field``, the request field that carried it, their refusal (ApiError)
    named by that field."""
    try:
        image = check_image(
            data, max_pixels=settings.max_image_pixels, max_decode_bytes=settings.max_decode_bytes
        )
    except ImageRefused as exc:
        if not field:
            raise
        refused = refusal_of(exc)
        raise ApiError.about(field, refused.code, f": {refused.message}") from None
    return ImageInfo(
        image.format.mime_type, image.width, image.height, hashlib.sha256(data).hexdigest()
    )
