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
  chunk's CRC and that the file reaches its IEND chunk, and after the
  compressed pixel data has been inflated as a stream (``_check_png_data``):
  corrupt or short data, a row filter PNG does not define, or a palette
  image without its PLTE chunk is refused.

Checking costs a bounded amount of memory, computed from the header before
anything is decoded (``check_cost``): the API checks every upload this way
(``check_image``) and never holds its pixels. A JPEG is decoded strictly at
1/8 scale: every entropy-coded block is still read, so it finds what a full
decode finds, but a progressive (or multi-scan) JPEG still needs libjpeg's
whole-image coefficient buffer, 128 bytes per 8x8 block of each component.
A PNG is inflated in pieces of ``PNG_CHECK_PIECE_BYTES``. A file whose check
would cost more than the caller's bound is refused (``TooCostlyToDecode``).

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
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import simplejpeg
from PIL import ExifTags, Image, ImageOps, PngImagePlugin

#: How much inflated PNG data is held at once while checking it.
PNG_CHECK_PIECE_BYTES = 1 << 20
#: How much compressed PNG data is handed to zlib at once (zlib keeps what
#: it has not consumed as a copy).
_PNG_INPUT_PIECE_BYTES = 64 * 1024
#: What a check costs whatever the image: zlib's and libjpeg's state, row
#: buffers, Python objects.
CHECK_OVERHEAD_BYTES = 4 << 20
#: The scale a JPEG is checked at: 1/8, libjpeg's smallest.
JPEG_CHECK_SCALE = 8
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


class TooCostlyToDecode(TooManyPixels):
    """Checking the image would need more memory than the configured bound,
    as computed from its header; answered as too many pixels are (413)."""


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


@dataclass(frozen=True)
class CheckedImage:
    """What checking an image says of it: its format and its size as displayed."""

    format: ImageFormat
    width: int
    height: int


def check_image(data: bytes, *, max_pixels: int, max_decode_bytes: int) -> CheckedImage:
    """Sniff, bound and strictly check ``data`` without holding its pixels.

    Raises what ``decode_image`` raises for the same file, and
    TooCostlyToDecode when the check would cost more than
    ``max_decode_bytes`` (``check_cost``, from the header)."""
    image_format = sniff(data)
    with _refused_as_unreadable(image_format):
        if image_format is JPEG:
            layout: _JpegLayout | _PngLayout = _jpeg_layout(data)
        else:
            layout = _png_layout(data)
        # The pixel bound first, as decode_image checks it: the clearer refusal.
        _bound_pixels(layout.width, layout.height, max_pixels)
        _bound_cost(layout.check_cost(), max_decode_bytes)
        with _opened(data, image_format) as image:
            width, height = _bounded_size(image, max_pixels)
            if isinstance(layout, _JpegLayout):
                _check_jpeg(data, image)
            else:
                _check_png_data(data, layout)
                image.info.update(layout.metadata(data))
            orientation = _orientation(image, loaded=False)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return CheckedImage(image_format, width, height)


def check_cost(data: bytes) -> int:
    """The most memory, in bytes, that ``check_image`` needs for ``data``
    beyond ``data`` itself, read from its header; raises UnreadableImage
    for a file whose structure cannot be read."""
    image_format = sniff(data)
    try:
        return (_jpeg_layout(data) if image_format is JPEG else _png_layout(data)).check_cost()
    except ValueError as exc:
        raise UnreadableImage(
            f"file is not a readable {image_format.pil_format} image ({exc})"
        ) from None


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Sniff, bound and fully decode ``data`` into the pixels as displayed.

    Raises UnreadableImage unless it is a JPEG or PNG that decodes cleanly,
    TooManyPixels if its header declares more than ``max_pixels`` pixels.
    The bound is checked from the header before any pixel is decoded, so a
    decompression bomb is refused without being inflated, and the decode
    that follows costs at most ``max_pixels`` pixels' work."""
    image_format = sniff(data)
    with _refused_as_unreadable(image_format):
        png_layout = _png_layout(data) if image_format is PNG else None
        with _opened(data, image_format) as image:
            _bounded_size(image, max_pixels)
            if png_layout is None:
                pixels, orientation = _decode_jpeg(data, image)
            else:
                # The same refusals as check_image's, for the same reasons.
                _check_png_data(data, png_layout)
                pixels, orientation = _decode_png(data)
    return DecodedImage(image_format, _displayed(pixels, orientation))


def _bounded_size(image: Image.Image, max_pixels: int) -> tuple[int, int]:
    width, height = image.size
    _bound_pixels(width, height, max_pixels)
    return width, height


def _bound_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise UnreadableImage("image has no pixels")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"image has {width}x{height} pixels, more than the {max_pixels} allowed"
        )


def _bound_cost(cost: int, max_decode_bytes: int) -> None:
    if cost > max_decode_bytes:
        raise TooCostlyToDecode(
            f"checking this image would need {cost / 2**20:.1f} MiB of memory, more than "
            f"the {max_decode_bytes / 2**20:.1f} MiB allowed"
        )


#: EXIF orientations that turn the image a quarter: width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: Start-of-frame markers (every SOFn but DHT, JPG and DAC) and the progressive ones.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
#: Markers without a length: TEM, RSTn, SOI.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
#: A JCOEF block: 64 16-bit coefficients.
_JPEG_BLOCK_BYTES = 64 * 2


@dataclass(frozen=True)
class _JpegLayout:
    """What a JPEG's markers up to its first scan say of its decoding."""

    width: int
    height: int
    #: (horizontal, vertical) sampling factors of each component.
    sampling: tuple[tuple[int, int], ...]
    #: libjpeg keeps every coefficient of the image: progressive, or a first
    #: scan without every component.
    buffered: bool
    #: Bytes of the segments before the first scan, which Pillow reads and keeps.
    header_bytes: int

    def coefficient_bytes(self) -> int:
        if not self.buffered:
            return 0
        most_h = max(h for h, _ in self.sampling)
        most_v = max(v for _, v in self.sampling)
        mcus_wide = -(-self.width // (8 * most_h))
        mcus_high = -(-self.height // (8 * most_v))
        blocks = sum(mcus_wide * h * mcus_high * v for h, v in self.sampling)
        return blocks * _JPEG_BLOCK_BYTES

    def check_cost(self) -> int:
        scaled = -(-self.width // JPEG_CHECK_SCALE) * -(-self.height // JPEG_CHECK_SCALE)
        # The scaled output (at most 4 channels), Pillow's copies of the header segments.
        return self.coefficient_bytes() + 4 * scaled + 3 * self.header_bytes + CHECK_OVERHEAD_BYTES


def _jpeg_layout(data: bytes) -> _JpegLayout:
    position = 2
    frame: tuple[int, int, tuple[tuple[int, int], ...], bool] | None = None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError("JPEG markers are malformed")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            raise ValueError("a JPEG segment is cut short")
        if marker in _JPEG_FRAME_MARKERS:
            if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
                raise ValueError("JPEG frame header is cut short")
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            sampling = tuple(
                (segment[7 + 3 * index] >> 4, segment[7 + 3 * index] & 15)
                for index in range(segment[5])
            )
            if not sampling or any(h < 1 or v < 1 for h, v in sampling):
                raise ValueError("JPEG frame header has no valid components")
            frame = (width, height, sampling, marker in _JPEG_PROGRESSIVE_MARKERS)
        elif marker == 0xDA:
            if frame is None or not segment:
                raise ValueError("JPEG scan comes before its frame")
            width, height, sampling, progressive = frame
            return _JpegLayout(
                width,
                height,
                sampling,
                buffered=progressive or segment[0] < len(sampling),
                header_bytes=position,
            )
        position += 2 + length
    raise ValueError("JPEG has no scan")


def _check_jpeg(data: bytes, header: Image.Image) -> None:
    """Strictly decode every block of a JPEG, at 1/8 scale: the entropy
    data, where libjpeg finds damage, is read whole whatever the scale."""
    colorspace = "CMYK" if header.mode == "CMYK" else "RGB"
    # simplejpeg scales only to meet a minimum size: asking for one pixel
    # gets libjpeg's smallest scale, 1/8.
    pixels = simplejpeg.decode_jpeg(
        data, colorspace=colorspace, strict=True, min_height=1, min_width=1
    )
    expected = (-(-header.height // JPEG_CHECK_SCALE), -(-header.width // JPEG_CHECK_SCALE))
    if pixels.shape[:2] != expected:
        raise UnreadableImage("JPEG frames disagree on the image's size")


#: Channels of each PNG colour type, and the bit depths it allows.
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
#: Adam7's passes: (first column, first row, column step, row step).
ADAM7_PASSES = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
#: Chunks whose contents Pillow reads into the image's info.
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf"})
#: Of those, what check_image reads when they follow the pixels (orientation).
_PNG_ORIENTATION_CHUNKS = frozenset({b"iTXt", b"eXIf"})


@dataclass(frozen=True)
class _PngLayout:
    """A PNG's chunks, each one's CRC checked, up to IEND."""

    width: int
    height: int
    bits_per_pixel: int
    interlaced: bool
    #: (offset of the data, length) of each IDAT chunk, in order.
    data_chunks: tuple[tuple[int, int], ...]
    #: (type, offset of the data, length) of text and EXIF chunks after the pixels.
    trailing_metadata: tuple[tuple[bytes, int, int], ...]
    text_bytes: int
    compressed_text_chunks: int

    def rows(self) -> list[tuple[int, int]]:
        """(bytes per row with its filter byte, rows) of each pass, in order."""
        passes = ADAM7_PASSES if self.interlaced else ((0, 0, 1, 1),)
        found = []
        for column, row, column_step, row_step in passes:
            wide = -(-(self.width - column) // column_step)
            high = -(-(self.height - row) // row_step)
            if wide > 0 and high > 0:
                found.append((1 + -(-wide * self.bits_per_pixel // 8), high))
        return found

    def check_cost(self) -> int:
        # The inflated piece, zlib's copy of the input it has not consumed,
        # and what Pillow makes of the text chunks (bytes, str, and for a
        # compressed chunk up to MAX_TEXT_CHUNK inflated).
        return (
            2 * PNG_CHECK_PIECE_BYTES
            + _PNG_INPUT_PIECE_BYTES
            + 3 * self.text_bytes
            + 3 * PngImagePlugin.MAX_TEXT_CHUNK * self.compressed_text_chunks
            + CHECK_OVERHEAD_BYTES
        )

    def metadata(self, data: bytes) -> dict[str, object]:
        """What Pillow reads from the orientation chunks after the pixels,
        when it loads the image: read here without loading it."""
        source = io.BytesIO(data)
        stream = PngImagePlugin.PngStream(source)
        for kind, offset, length in self.trailing_metadata:
            source.seek(offset)
            stream.call(kind, offset, length)
        return {str(key): value for key, value in stream.im_info.items()}


def _png_layout(data: bytes) -> _PngLayout:
    view = memoryview(data)
    position = 8
    header: tuple[int, int, int, bool] | None = None
    palette = False
    data_chunks: list[tuple[int, int]] = []
    trailing: list[tuple[bytes, int, int]] = []
    text_bytes = compressed_text = 0
    while True:
        if position + 12 > len(data):
            raise ValueError("PNG ends before its IEND chunk")
        length = int.from_bytes(view[position : position + 4], "big")
        kind = bytes(view[position + 4 : position + 8])
        end = position + 12 + length
        if length > 2**31 - 1 or end > len(data):
            raise ValueError(f"PNG chunk {kind!r} is cut short")
        if zlib.crc32(view[position + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            raise ValueError(f"PNG chunk {kind!r} has a wrong CRC")
        start = position + 8
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ValueError("PNG does not start with its IHDR chunk")
            width = int.from_bytes(view[start : start + 4], "big")
            height = int.from_bytes(view[start + 4 : start + 8], "big")
            depth, colour, compression, filtering, interlace = view[start + 8 : start + 13]
            if (
                depth not in PNG_BIT_DEPTHS.get(colour, ())
                or compression != 0
                or filtering != 0
                or interlace not in (0, 1)
            ):
                raise ValueError("PNG header is not valid")
            header = (width, height, depth * PNG_CHANNELS[colour], interlace == 1)
            palette_needed = colour == 3
        elif kind == b"PLTE":
            palette = True
        elif kind == b"IDAT":
            if data_chunks and data_chunks[-1][0] + data_chunks[-1][1] + 12 != start:
                raise ValueError("PNG pixel data is not in consecutive IDAT chunks")
            if palette_needed and not palette:
                raise ValueError("palette PNG has no PLTE chunk before its pixels")
            data_chunks.append((start, length))
        elif kind == b"IEND":
            break
        if kind in _PNG_TEXT_CHUNKS:
            text_bytes += length
            compressed_text += kind in (b"zTXt", b"iTXt")
            if data_chunks and kind in _PNG_ORIENTATION_CHUNKS:
                trailing.append((kind, start, length))
        position = end
    if not data_chunks:
        raise ValueError("PNG has no pixel data")
    assert header is not None
    width, height, bits_per_pixel, interlaced = header
    return _PngLayout(
        width,
        height,
        bits_per_pixel,
        interlaced,
        tuple(data_chunks),
        tuple(trailing),
        text_bytes,
        compressed_text,
    )


def _check_png_data(data: bytes, layout: _PngLayout) -> None:
    """Inflate the pixel data as a stream, in bounded pieces: it must hold
    every row, each starting with a filter type PNG defines (0 to 4).
    Unfiltering cannot fail, so this finds what decoding would."""
    rows = layout.rows()
    needed = sum(row_bytes * count for row_bytes, count in rows)
    # Where each pass starts in the inflated data: a row's filter byte is
    # at (its pass's start + k * row bytes).
    passes: list[tuple[int, int, int]] = []
    offset = 0
    for row_bytes, count in rows:
        passes.append((offset, row_bytes, offset + row_bytes * count))
        offset += row_bytes * count
    inflater = zlib.decompressobj()
    view = memoryview(data)
    produced = 0

    def take(piece: bytes) -> None:
        nonlocal produced
        piece_start, piece_end = produced, produced + len(piece)
        inflated = np.frombuffer(piece, dtype=np.uint8)
        for pass_start, row_bytes, pass_end in passes:
            low, high = max(pass_start, piece_start), min(pass_end, piece_end)
            if low >= high:
                continue
            first_row = pass_start + -(-(low - pass_start) // row_bytes) * row_bytes
            if (
                first_row < high
                and inflated[first_row - piece_start : high - piece_start : row_bytes].max() > 4
            ):
                raise ValueError("PNG row has an unknown filter type")
        produced = piece_end

    for chunk_start, chunk_length in layout.data_chunks:
        for piece_start in range(chunk_start, chunk_start + chunk_length, _PNG_INPUT_PIECE_BYTES):
            pending: bytes | memoryview = view[
                piece_start : min(piece_start + _PNG_INPUT_PIECE_BYTES, chunk_start + chunk_length)
            ]
            while pending and produced < needed and not inflater.eof:
                take(inflater.decompress(pending, min(PNG_CHECK_PIECE_BYTES, needed - produced)))
                pending = inflater.unconsumed_tail
            if produced >= needed or inflater.eof:
                break
        if produced >= needed or inflater.eof:
            break
    while produced < needed and not inflater.eof:
        piece = inflater.decompress(b"", min(PNG_CHECK_PIECE_BYTES, needed - produced))
        if not piece:
            break
        take(piece)
    if produced < needed:
        raise ValueError("PNG pixel data is cut short")


@contextmanager
def _refused_as_unreadable(image_format: ImageFormat) -> Iterator[None]:
    """Pillow's and simplejpeg's many exceptions for a broken file, as
    UnreadableImage; segq's own refusals pass as they are."""
    try:
        yield
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


def _orientation(image: Image.Image, *, loaded: bool = True) -> int:
    """The EXIF (or XMP) orientation, 1 when none. Of an image not
    ``loaded``, from what its info holds: Pillow's PNG reader would decode
    the pixels to look for EXIF after them."""
    exif = image.getexif() if loaded else Image.Image.getexif(image)
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _displayed(pixels: npt.NDArray[np.uint8], orientation: int) -> npt.NDArray[np.uint8]:
    if orientation == 1:
        return pixels
    image = Image.fromarray(pixels)
    image.getexif()[ExifTags.Base.Orientation] = orientation
    ImageOps.exif_transpose(image, in_place=True)
    return np.asarray(image, dtype=np.uint8)
