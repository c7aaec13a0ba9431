"""Absolute links to the API's own routes, for answers that hand out URLs."""

from __future__ import annotations

from urllib.parse import urljoin


def public_link(public_url: str | None, url: str) -> str:
    """An absolute link for ``url``, which local-disk storage makes relative
    to the API's root: joined to the configured public URL, never to the
    request's Host header (a client could name any host there). Without a
    configured URL the link stays relative to the API's root."""
    if public_url is None:
        return url
    return urljoin(public_url + "/", url.lstrip("/")) if url.startswith("/") else url
