"""Request bodies sent with ``Content-Encoding: gzip`` or ``deflate``.

Cognite's Python SDK gzips every JSON body it sends. The body is inflated
as it is read, so every size bound of the routes (JSON bodies, uploads)
counts inflated bytes: a gzip bomb meets the same 413 as a large plain body,
and is never inflated past that bound. Any other encoding is a 415.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

from werkzeug.exceptions import BadRequest

from segq.api.errors import ApiError

#: zlib's wbits for each accepted coding: gzip's header and trailer; HTTP's
#: deflate is the zlib format (RFC 9110), with raw deflate as some clients send it.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS
_READ_SIZE = 64 * 1024


class InflatingStream(io.RawIOBase):
    """A readable stream of ``compressed``'s inflated bytes. Each read inflates
    at most what it returns (``max_length``), so memory follows the reader's
    bound, not the compression ratio."""

    def __init__(self, compressed: Any, coding: str) -> None:
        self._compressed = compressed
        self._coding = coding
        self._inflater: Any = None
        self._pending = b""  # compressed bytes not yet given to the inflater
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._done:
            data = self._inflate(len(view))
            if data:
                view[: len(data)] = data
                return len(data)
        return 0

    def _inflate(self, limit: int) -> bytes:
        if not self._pending and (self._inflater is None or not self._inflater.unconsumed_tail):
            self._pending = self._compressed.read(_READ_SIZE)
            if not self._pending:
                if self._inflater is None or not self._inflater.eof:
                    raise BadRequest(f"the {self._coding} body ends before its end marker")
                self._done = True
                return b""
        if self._inflater is None:
            self._inflater = zlib.decompressobj(self._wbits(self._pending))
        if self._inflater.eof:
            raise BadRequest(f"the {self._coding} body has bytes after its end")
        source = self._inflater.unconsumed_tail + self._pending
        self._pending = b""
        try:
            data: bytes = self._inflater.decompress(source, limit)
        except zlib.error:
            raise BadRequest(f"the body is not valid {self._coding} data") from None
        if self._inflater.eof:
            if self._inflater.unused_data.strip(b"\0") or self._compressed.read(1):
                raise BadRequest(f"the {self._coding} body has bytes after its end")
            self._done = not data
        return data

    def _wbits(self, first: bytes) -> int:
        if self._coding == "gzip":
            return _GZIP_WBITS
        # A zlib stream starts with a header whose 16-bit value is a multiple of 31.
        if len(first) >= 2 and first[0] & 0x0F == 8 and int.from_bytes(first[:2]) % 31 == 0:
            return _ZLIB_WBITS
        return _RAW_DEFLATE_WBITS


def inflate_request_body(environ: dict[str, Any]) -> None:
    """Replace an encoded body in the WSGI ``environ`` by its inflated bytes,
    read up to the end of the stream (the inflated length is not known in
    advance); a 415 for an encoding segq does not read."""
    header = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if header in ("", "identity"):
        return
    coding = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}.get(header)
    if coding is None:
        raise ApiError(415, "Content-Encoding must be gzip, deflate or identity")
    environ["wsgi.input"] = io.BufferedReader(
        InflatingStream(_compressed_input(environ), coding), buffer_size=_READ_SIZE
    )
    environ.pop("CONTENT_LENGTH", None)
    environ.pop("HTTP_CONTENT_ENCODING", None)
    environ["wsgi.input_terminated"] = True


def _compressed_input(environ: dict[str, Any]) -> Any:
    """The raw body, bounded by its declared length when it has one."""
    from werkzeug.wsgi import get_input_stream

    return get_input_stream(environ, safe_fallback=False)
