"""segq.images: what counts as an image, its pixel bound, and the 8-bit RGB
pixels (as displayed) that every engine is given."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
from PIL import Image

from segq.images import (
    JPEG,
    PNG,
    PNG_BIT_DEPTHS,
    TooManyPixels,
    UnreadableImage,
    check_image,
    decode_image,
)
from tests.support.images import (
    cut_short,
    encode,
    flat_png,
    jpeg_bytes,
    jpeg_claiming,
    png_bytes,
    png_chunks,
    png_of_rows,
    scene,
    with_exif_orientation,
)

LIMIT = 4_000_000
#: Enough for any image under LIMIT: the bound itself is tested in test_decode_memory.py.
CHECK_BOUND = 256 << 20


def jpeg(width: int, height: int, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene(width, height)[0]).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def corrupt_entropy_data(data: bytes) -> bytes:
    """Every 7th byte of 200 in the middle of the scan flipped (markers left alone)."""
    corrupt = bytearray(data)
    for index in range(len(data) // 2, len(data) // 2 + 200, 7):
        flipped = corrupt[index] ^ 0x5A
        if 0xFF not in (corrupt[index], flipped):
            corrupt[index] = flipped
    return bytes(corrupt)


def first_idat(data: bytes) -> tuple[int, int]:
    return next((offset, length) for offset, kind, length in png_chunks(data) if kind == b"IDAT")


def png_idat_cut(data: bytes) -> bytes:
    offset, length = first_idat(data)
    return data[: offset + 8 + length // 2]


def png_idat_crc_wrong(data: bytes) -> bytes:
    offset, length = first_idat(data)
    broken = bytearray(data)
    broken[offset + 8 + length] ^= 0xFF  # first byte of the CRC; the data is intact
    return bytes(broken)


def png_idat_corrupt_crc_right(data: bytes) -> bytes:
    offset, length = first_idat(data)
    broken = bytearray(data)
    broken[offset + 8 + length // 2] ^= 0xFF
    crc = zlib.crc32(bytes(broken[offset + 4 : offset + 8 + length]))
    broken[offset + 8 + length : offset + 12 + length] = crc.to_bytes(4, "big")
    return bytes(broken)


def png_without_end(data: bytes) -> bytes:
    return data[:-12]


BROKEN: dict[str, Callable[[], bytes]] = {
    "jpeg-cut-short-end-marker-appended": lambda: cut_short(jpeg_bytes(320, 240)),
    "jpeg-cut-short": lambda: jpeg_bytes(320, 240)[:1500],
    "jpeg-corrupt-entropy-data": lambda: corrupt_entropy_data(jpeg(640, 480, quality=90)),
    "progressive-jpeg-cut-short": lambda: cut_short(jpeg(320, 240, progressive=True), 0.8),
    "png-idat-cut": lambda: png_idat_cut(png_bytes(320, 240)),
    "png-idat-crc-wrong": lambda: png_idat_crc_wrong(png_bytes(320, 240)),
    "png-idat-corrupt-crc-right": lambda: png_idat_corrupt_crc_right(png_bytes(320, 240)),
    "png-without-iend": lambda: png_without_end(png_bytes(320, 240)),
    "jpeg-claiming-3.8-megapixels": lambda: jpeg_claiming(1900, 2000),
}


def png_with_header_changed(data: bytes, offset: int, value: bytes) -> bytes:
    """``data`` with IHDR's payload bytes at ``offset`` replaced, its CRC kept right."""
    changed = bytearray(data)
    changed[16 + offset : 16 + offset + len(value)] = value
    changed[29:33] = zlib.crc32(bytes(changed[12:29])).to_bytes(4, "big")
    return bytes(changed)


def png_with_row_filter(filter_type: int) -> bytes:
    """A 4x2 grey PNG whose second row names ``filter_type``."""
    rows = b"\x00" + b"\x10" * 4 + bytes([filter_type]) + b"\x20" * 4
    data = bytearray(png_of_rows(4, 2, colour_type=0))
    offset, length = first_idat(bytes(data))
    idat = b"IDAT" + zlib.compress(rows)
    chunk = (len(idat) - 4).to_bytes(4, "big") + idat + zlib.crc32(idat).to_bytes(4, "big")
    return bytes(data[:offset]) + chunk + bytes(data[offset + 12 + length :])


BROKEN.update(
    {
        "png-palette-without-plte": lambda: png_of_rows(64, 32, colour_type=3, palette=False),
        "png-row-filter-5": lambda: png_with_row_filter(5),
        "png-one-row-short": lambda: png_with_header_changed(
            png_of_rows(64, 32, colour_type=0), 4, (33).to_bytes(4, "big")
        ),
        "png-interlaced-one-row-short": lambda: png_with_header_changed(
            png_of_rows(64, 32, colour_type=2, interlaced=True), 4, (33).to_bytes(4, "big")
        ),
        "png-bit-depth-colour-type-disagree": lambda: png_with_header_changed(
            png_of_rows(64, 32, colour_type=2), 8, b"\x04"
        ),
    }
)


@pytest.mark.parametrize("make", BROKEN.values(), ids=BROKEN.keys())
def test_broken_files_are_refused(make: Callable[[], bytes]) -> None:
    with pytest.raises(UnreadableImage, match="not a readable"):
        decode_image(make(), max_pixels=LIMIT)


@pytest.mark.parametrize("make", BROKEN.values(), ids=BROKEN.keys())
def test_checking_refuses_what_decoding_refuses(make: Callable[[], bytes]) -> None:
    # The API checks (check_image); the worker decodes (decode_image): the
    # same file is refused by both, for the same reason.
    with pytest.raises(UnreadableImage, match="not a readable") as checked:
        check_image(make(), max_pixels=LIMIT, max_decode_bytes=CHECK_BOUND)
    with pytest.raises(UnreadableImage) as decoded:
        decode_image(make(), max_pixels=LIMIT)
    assert str(checked.value) == str(decoded.value)


def xmp_orientation(orientation: int) -> bytes:
    xmp = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    return b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp.encode()


def exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


GOOD: dict[str, Callable[[], bytes]] = {
    **{
        # Every colour type PNG has, with every bit depth it allows.
        f"png-type-{colour}-{depth}-bit{'-interlaced' * interlaced}": partial(
            png_of_rows, 61, 37, colour_type=colour, bit_depth=depth, interlaced=interlaced
        )
        for colour, depths in PNG_BIT_DEPTHS.items()
        for depth in sorted(depths)
        for interlaced in (False, True)
    },
    "png-exif-orientation-after-pixels": lambda: png_of_rows(
        61, 37, chunks_after_pixels=((b"eXIf", exif_orientation(6)),)
    ),
    "png-xmp-orientation-after-pixels": lambda: png_of_rows(
        61, 37, chunks_after_pixels=((b"iTXt", xmp_orientation(8)),)
    ),
    "jpeg-baseline": lambda: jpeg(61, 37),
    "jpeg-progressive": lambda: jpeg(61, 37, progressive=True),
    "jpeg-444": lambda: jpeg(61, 37, subsampling=0),
    "jpeg-grey": lambda: encode_image(Image.new("L", (61, 37), 90), "JPEG"),
    "jpeg-cmyk": lambda: encode_image(Image.new("CMYK", (61, 37), (0, 255, 255, 0)), "JPEG"),
    "jpeg-exif-orientation": lambda: with_exif_orientation(scene(61, 37)[0], 6),
}


@pytest.mark.parametrize("make", GOOD.values(), ids=GOOD.keys())
def test_checking_accepts_what_decoding_accepts_at_the_size_displayed(
    make: Callable[[], bytes],
) -> None:
    data = make()
    decoded = decode_image(data, max_pixels=LIMIT)
    checked = check_image(data, max_pixels=LIMIT, max_decode_bytes=CHECK_BOUND)
    assert (checked.format, checked.width, checked.height) == (
        decoded.format,
        decoded.width,
        decoded.height,
    )


def test_pillow_alone_accepts_what_segq_refuses() -> None:
    # Why the strict decoders are there: Pillow fills a cut-short JPEG with
    # grey and ignores a PNG's CRCs and missing end.
    for name in (
        "jpeg-cut-short-end-marker-appended",
        "jpeg-corrupt-entropy-data",
        "progressive-jpeg-cut-short",
        "png-idat-crc-wrong",
        "png-without-iend",
    ):
        with Image.open(io.BytesIO(BROKEN[name]())) as image:
            image.load()


def test_good_files_decode_to_their_pixels() -> None:
    pixels = scene(320, 240)[0]
    from_png = decode_image(encode(pixels, "PNG"), max_pixels=LIMIT)
    assert from_png.format is PNG
    assert np.array_equal(from_png.pixels, pixels)
    data = encode(pixels, "JPEG")
    from_jpeg = decode_image(data, max_pixels=LIMIT)
    assert from_jpeg.format is JPEG
    # The same libjpeg-turbo decode as Pillow's, strict or not.
    assert np.array_equal(from_jpeg.pixels, np.asarray(Image.open(io.BytesIO(data))))


def test_the_pixel_bound_is_checked_from_the_header_before_decoding() -> None:
    assert decode_image(flat_png(2000, 2000), max_pixels=LIMIT).height == 2000
    with pytest.raises(TooManyPixels, match=r"2001x2000 pixels, more than the 4000000 allowed"):
        decode_image(flat_png(2001, 2000), max_pixels=LIMIT)
    # Cut short, so decoding would fail: the bound answers first. Below
    # Pillow's own bomb guard, so segq's check is the one that speaks.
    with pytest.raises(TooManyPixels):
        decode_image(jpeg_claiming(3000, 3000), max_pixels=LIMIT)


def test_wide_grey_is_scaled_to_8_bits() -> None:
    grey = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    pixels = decode_image(encode_image(image), max_pixels=LIMIT).pixels
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 100, 255, 0]  # 128 / 257 rounds to 0
    assert (pixels == pixels[:, :, :1]).all()


def test_transparency_is_composited_over_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    pixels = decode_image(encode_image(Image.fromarray(rgba, "RGBA")), max_pixels=LIMIT).pixels
    assert pixels[0].tolist() == [[10, 20, 30], [255, 255, 255], [127, 127, 127]]

    grey_alpha = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    pixels = decode_image(encode_image(grey_alpha), max_pixels=LIMIT).pixels
    assert pixels[0].tolist() == [[40, 40, 40], [255, 255, 255]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([200, 0, 0, 0, 0, 200])
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    pixels = decode_image(encode_image(palette), max_pixels=LIMIT).pixels
    assert pixels[0].tolist() == [[200, 0, 0], [255, 255, 255]]


def test_cmyk_and_grey_jpegs_become_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in print
    pixels = decode_image(encode_image(cmyk, "JPEG"), max_pixels=LIMIT).pixels
    assert pixels.shape == (8, 16, 3)
    assert (np.abs(pixels.astype(int) - [255, 0, 0]) <= 3).all()

    grey = Image.new("L", (16, 8), 90)
    pixels = decode_image(encode_image(grey, "JPEG"), max_pixels=LIMIT).pixels
    assert pixels.shape == (8, 16, 3)
    assert (np.abs(pixels.astype(int) - 90) <= 1).all()


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(1, (0, 0)), (3, (-1, -1)), (6, (0, -1)), (8, (-1, 0))],
    ids=["as-stored", "rotated-180", "rotated-90-cw", "rotated-90-ccw"],
)
def test_exif_orientation_gives_the_image_as_displayed(
    orientation: int, corner: tuple[int, int]
) -> None:
    stored = np.full((120, 200, 3), 100, dtype=np.uint8)
    stored[:30, :30] = (250, 0, 0)  # a red block in the stored top-left corner
    image = decode_image(with_exif_orientation(stored, orientation), max_pixels=LIMIT)

    expected_size = (120, 200) if orientation in (1, 3) else (200, 120)
    assert (image.height, image.width) == expected_size
    row = 10 if corner[0] == 0 else image.height - 10
    column = 10 if corner[1] == 0 else image.width - 10
    assert image.pixels[row, column, 0] > 200 and image.pixels[row, column, 1] < 50


def encode_image(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()
