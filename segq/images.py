"""What an image's bytes really hold: sniffed, bounded, fully decoded and
normalised to the 8-bit RGB pixels every engine takes.

The API decides at upload whether a file is an image segq serves; the worker
decodes items given as URLs (and stored files) with the same function, so
both refuse the same files for the same reasons.

Validity is decided by decoding every pixel strictly:

- JPEG pixels come from libjpeg-turbo through ``simplejpeg`` with
  ``strict=True``: libjpeg reports a file cut short (with or without an end
  marker appended), a progressive scan cut short and corrupt entropy data
  only as warnings, which Pillow ignores and fills with grey; strict decoding
  makes each one an error. JPEG has no checksum, so corruption that still
  decodes as valid entropy data cannot be told from a real image.
- PNG pixels come from Pillow, after ``Image.verify`` has checked every
  chunk's CRC and that the file reaches its IEND chunk; loading then reports
  truncated or corrupt compressed data.

Normalisation, deterministic for equal bytes:

- EXIF orientation (including an XMP ``tiff:Orientation``) is applied, so
  the pixels, and the width and height reported for a file, are the image as
  it is displayed;
- 16-bit and 32-bit greyscale (Pillow's ``I;16*``, ``I`` and ``F`` modes) is
  scaled from 0..65535 to 0..255 (value / 257, rounded, clipped);
- pixels with transparency (an alpha channel, or a PNG ``tRNS`` palette or
  colour key) are composited over opaque white with straight alpha,
  ``a * colour + (1 - a) * 255``: transparency shows as the white a page
  usually puts behind it;
- CMYK JPEGs are converted to RGB by Pillow's naive formula (no ICC profile
  is applied); every other mode by Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import simplejpeg
from PIL import ExifTags, Image, ImageOps

#: Pillow modes holding greyscale wider than 8 bits.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255, 255)


class ImageRefused(Exception):
    """The bytes are not an image segq serves; the message says why, for the client."""


class UnreadableImage(ImageRefused):
    """Not a JPEG or PNG, or one that does not decode cleanly."""


class TooManyPixels(ImageRefused):
    """More pixels than the configured limit, as declared by the image's header."""


@dataclass(frozen=True)
class ImageFormat:
    pil_format: str
    mime_type: str


JPEG = ImageFormat("JPEG", "image/jpeg")
PNG = ImageFormat("PNG", "image/png")
_SIGNATURES = ((b"\xff\xd8\xff", JPEG), (b"\x89PNG\r\n\x1a\n", PNG))


@dataclass(frozen=True)
class DecodedImage:
    """An image as displayed. pixels: (H, W, 3) uint8 RGB, rows top to bottom."""

    format: ImageFormat
    pixels: npt.NDArray[np.uint8]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def sniff(data: bytes) -> ImageFormat:
    """The format named by the file's signature; raises UnreadableImage for any other."""
    for signature, image_format in _SIGNATURES:
        if data.startswith(signature):
            return image_format
    raise UnreadableImage("file is not a JPEG or PNG image")


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Sniff, bound and fully decode ``data`` into the pixels as displayed.

    Raises UnreadableImage unless it is a JPEG or PNG that decodes cleanly,
    TooManyPixels if its header declares more than ``max_pixels`` pixels.
    The bound is checked from the header before any pixel is decoded, so a
    decompression bomb is refused without being inflated, and the decode
    that follows costs at most ``max_pixels`` pixels' work."""
    image_format = sniff(data)
    try:
        with _opened(data, image_format) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise UnreadableImage("image has no pixels")
            if width * height > max_pixels:
                raise TooManyPixels(
                    f"image has {width}x{height} pixels, more than the {max_pixels} allowed"
                )
            if image_format is JPEG:
                pixels, orientation = _decode_jpeg(data, image)
            else:
                image.verify()
                pixels, orientation = _decode_png(data)
    except (ImageRefused, MemoryError):
        raise
    except Image.DecompressionBombError:
        # Pillow's own guard only fires far above any sensible limit; the
        # client hears the same as from segq's.
        raise TooManyPixels("image is too large to decode") from None
    except Exception as exc:  # Pillow and simplejpeg raise many types for broken files
        raise UnreadableImage(
            f"file is not a readable {image_format.pil_format} image ({exc})"
        ) from None
    return DecodedImage(image_format, _displayed(pixels, orientation))


def _opened(data: bytes, image_format: ImageFormat) -> Image.Image:
    with warnings.catch_warnings():
        # segq's limit is the one that holds; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=[image_format.pil_format])


def _decode_jpeg(data: bytes, header: Image.Image) -> tuple[npt.NDArray[np.uint8], int]:
    """The pixels of a JPEG whose ``header`` Pillow has read, and its orientation."""
    orientation = _orientation(header)
    if header.mode == "CMYK":
        # libjpeg-turbo hands CMYK over as stored (Adobe files store it
        # inverted); Pillow knows which, so it makes the pixels, once the
        # strict decode has vouched for the data.
        simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
        header.load()
        return _rgb(header), orientation
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    if pixels.shape[:2] != (header.height, header.width):
        raise UnreadableImage("JPEG frames disagree on the image's size")
    return np.asarray(pixels, dtype=np.uint8), orientation


def _decode_png(data: bytes) -> tuple[npt.NDArray[np.uint8], int]:
    """The pixels of a verified PNG, and its orientation."""
    # verify() leaves the file unusable for decoding: open it anew.
    with _opened(data, PNG) as image:
        image.load()
        # Read after loading: a PNG may store its eXIf chunk after the pixels.
        return _rgb(image), _orientation(image)


def _rgb(image: Image.Image) -> npt.NDArray[np.uint8]:
    """(H, W, 3) uint8 RGB of a decoded image, as the module docstring says."""
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(eight_bit[:, :, np.newaxis], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, _WHITE)
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when none."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _displayed(pixels: npt.NDArray[np.uint8], orientation: int) -> npt.NDArray[np.uint8]:
    if orientation == 1:
        return pixels
    image = Image.fromarray(pixels)
    image.getexif()[ExifTags.Base.Orientation] = orientation
    ImageOps.exif_transpose(image, in_place=True)
    return np.asarray(image, dtype=np.uint8)
