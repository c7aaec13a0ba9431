"""Synthetic test images with a known object, encoded as real PNG or JPEG."""

from __future__ import annotations

import io
import zlib

import numpy as np
import numpy.typing as npt
from PIL import Image

from segq.images import ADAM7_PASSES, PNG_CHANNELS


def scene(
    width: int = 160, height: int = 120, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """A red ellipse on a textured blue-grey background.

    Returns (image (H, W, 3) uint8 RGB, truth (H, W) bool). The ellipse is
    centred at (0.5 W, 0.5 H) with radii (0.25 W, 0.3 H)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    truth = ((xx - width * 0.5) / (width * 0.25)) ** 2 + (
        (yy - height * 0.5) / (height * 0.3)
    ) ** 2 <= 1
    background = np.array([90, 110, 140]) + rng.normal(0, 10, (height, width, 3))
    foreground = np.array([200, 40, 40]) + rng.normal(0, 10, (height, width, 3))
    pixels = np.where(truth[..., None], foreground, background)
    return np.clip(pixels, 0, 255).astype(np.uint8), truth


def encode(pixels: npt.NDArray[np.uint8], format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def png_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return encode(scene(width, height, seed)[0], "PNG")


def jpeg_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return encode(scene(width, height, seed)[0], "JPEG")


def cognite_sample_body(file_id: int) -> dict[str, object]:
    """Cognite's sample body exactly (CONTRACT.md), on the given file. Its
    point lies outside its box, as in the original."""
    return {
        "items": [{"fileId": file_id}],
        "points": [{"x": 0.8, "y": 0.8, "label": 1}],
        "boundingBox": {"xMin": 0.1, "yMin": 0.2, "xMax": 0.5, "yMax": 0.6},
    }


def scene_prompt_body(file_id: int) -> dict[str, object]:
    """A point on and a box around the object of ``scene``."""
    return {
        "items": [{"fileId": file_id}],
        "points": [{"x": 0.5, "y": 0.5, "label": 1}],
        "boundingBox": {"xMin": 0.2, "yMin": 0.15, "xMax": 0.8, "yMax": 0.85},
    }


def flat_png(width: int, height: int, colour: tuple[int, int, int] = (120, 80, 60)) -> bytes:
    """A valid PNG of one colour: tens of megapixels compress to kilobytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int, mode: str = "RGB", **options: object) -> bytes:
    """A 16x16 JPEG (saved with Pillow's ``options``) whose frame header is
    rewritten to claim width x height pixels: a few hundred bytes that hold
    almost none of the pixels claimed."""
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), 90).save(buffer, "JPEG", **options)
    return with_jpeg_size(buffer.getvalue(), width, height)


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its frame header (baseline, extended or progressive)
    rewritten to claim width x height pixels."""
    changed = bytearray(data)
    # length(2), precision(1), height(2), width(2)
    frame = next(
        index
        for index in range(len(changed) - 1)
        if changed[index] == 0xFF and changed[index + 1] in (0xC0, 0xC1, 0xC2)
    )
    changed[frame + 5 : frame + 7] = height.to_bytes(2, "big")
    changed[frame + 7 : frame + 9] = width.to_bytes(2, "big")
    return bytes(changed)


def cut_short(data: bytes, fraction: float = 0.5) -> bytes:
    """The first ``fraction`` of a JPEG with its end marker appended, as a
    transfer cut short and "repaired" by a careless tool leaves it."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, payload length) of each chunk of a PNG."""
    chunks, offset = [], 8
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        chunks.append((offset, data[offset + 4 : offset + 8], length))
        offset += 12 + length
    return chunks


def with_exif_orientation(pixels: npt.NDArray[np.uint8], orientation: int) -> bytes:
    """A JPEG of ``pixels`` (as stored) tagged with an EXIF orientation."""
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


#: What a hostile upload carries: a page whose script, if it ever ran, says
#: so on the console and in the page's title.
HOSTILE_PAGE = (
    b"<!DOCTYPE html><html><head><title>page</title></head><body>"
    b"<script>console.log('STORED SCRIPT RAN');document.title='STORED SCRIPT RAN';"
    b"window.storedScriptRan=true</script></body></html>"
)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload).to_bytes(4, "big")
    return len(payload).to_bytes(4, "big") + kind + payload + crc


def hostile_uploads(width: int = 48, height: int = 36) -> dict[str, tuple[bytes, str]]:
    """Images segq accepts (they decode cleanly) that also hold a page:
    name -> (bytes, the type they decode as). HTML after a PNG's IEND or a
    JPEG's end marker, and polyglots with the page inside a PNG text chunk
    or a JPEG comment, before any pixel data."""
    png, jpeg = png_bytes(width, height, seed=7), jpeg_bytes(width, height, seed=7)
    end = png.rindex(b"IEND") - 4
    text_chunk = _png_chunk(b"tEXt", b"Comment\x00" + HOSTILE_PAGE)
    comment = b"\xff\xfe" + (len(HOSTILE_PAGE) + 2).to_bytes(2, "big") + HOSTILE_PAGE
    return {
        "png-script-after-iend": (png + HOSTILE_PAGE, "image/png"),
        "png-polyglot": (png[:end] + text_chunk + png[end:] + HOSTILE_PAGE, "image/png"),
        "jpeg-script-after-eoi": (jpeg + HOSTILE_PAGE, "image/jpeg"),
        "jpeg-polyglot": (jpeg[:2] + comment + jpeg[2:] + HOSTILE_PAGE, "image/jpeg"),
    }


def png_of_rows(
    width: int,
    height: int,
    *,
    colour_type: int = 6,
    bit_depth: int = 8,
    interlaced: bool = False,
    palette: bool = True,
    chunks_after_pixels: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A valid PNG written chunk by chunk (Pillow writes no 16-bit colour
    nor Adam7): rows of a repeating pattern, so tens of megapixels of any
    mode take little time and memory to make and compress to kilobytes."""
    channels = PNG_CHANNELS[colour_type]
    passes = ADAM7_PASSES if interlaced else ((0, 0, 1, 1),)
    pattern = np.random.default_rng(0).integers(0, 256, 1 << 10, dtype=np.uint8).tobytes()
    compressor = zlib.compressobj(1)
    compressed = []
    for column, row, column_step, row_step in passes:
        wide = -(-(width - column) // column_step)
        high = -(-(height - row) // row_step)
        if wide <= 0 or high <= 0:
            continue
        row_bytes = -(-wide * channels * bit_depth // 8)
        line = b"\x00" + (pattern * (row_bytes // len(pattern) + 1))[:row_bytes]
        for _ in range(high):
            compressed.append(compressor.compress(line))
    compressed.append(compressor.flush())

    header = (
        width.to_bytes(4, "big")
        + height.to_bytes(4, "big")
        + bytes([bit_depth, colour_type, 0, 0, int(interlaced)])
    )
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", bytes(range(256)) * 3) if colour_type == 3 and palette else b"",
            _png_chunk(b"IDAT", b"".join(compressed)),
            *(_png_chunk(kind, payload) for kind, payload in chunks_after_pixels),
            _png_chunk(b"IEND", b""),
        ]
    )
