"""Prompt coordinates are normalized: x is a fraction of the image's width
and y of its height, each from 0 to 1. One out of that range is most often
a pixel position given by mistake, and every refusal of one (the API's, the
command line's) says so in these words."""

from __future__ import annotations

NORMALIZED_HINT = (
    "coordinates are normalized, from 0 to 1 (x = pixel column / image width, "
    "y = pixel row / image height), not pixels"
)


def is_normalized(value: float) -> bool:
    return 0.0 <= value <= 1.0
