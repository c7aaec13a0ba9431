"""How a stored object is served, decided once for both kinds of storage:
with the media type it was stored as, never as a page.

The type is what segq checked when it wrote the object (an upload's decoded
format, ``image/png`` for masks, ``application/x-npy`` for logits …),
recorded beside the object: S3 keeps it as the object's ``Content-Type``
and ``Content-Disposition`` (so a pre-signed URL answers with them), local
disk in a sidecar file that ``/objects/`` reads. Nothing is guessed from a
key or sniffed from the bytes when the object is read.

An upload may be a polyglot (a valid PNG with HTML after its IEND chunk, or
in a text chunk): served as the image type it decoded as, with ``nosniff``,
a browser shows an image. Anything a browser would not show as an image is
an attachment, and the policy below forbids scripts and plugins and
sandboxes the document whatever a browser makes of the bytes.
"""

from __future__ import annotations

from segq.images import JPEG, PNG

#: Types a browser renders as an image without running anything: inline.
#: Not SVG, which is a document that can hold scripts.
INLINE_TYPES = frozenset({PNG.mime_type, JPEG.mime_type})
#: An object whose type was not recorded (written before types were).
UNKNOWN_TYPE = "application/octet-stream"
#: An image document needs its own image (img-src 'self') and the inline
#: styles browsers give it; nothing else loads, nothing runs, and ``sandbox``
#: gives the document an opaque origin, away from the API's.
OBJECT_POLICY = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; sandbox"


def content_disposition(content_type: str) -> str:
    """``inline`` for an image a browser shows, ``attachment`` for anything else."""
    return "inline" if content_type in INLINE_TYPES else "attachment"


def object_headers(content_type: str | None) -> dict[str, str]:
    """The headers of a stored object served by segq itself (local disk)."""
    served_type = content_type or UNKNOWN_TYPE
    return {
        "Content-Type": served_type,
        "Content-Disposition": content_disposition(served_type),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": OBJECT_POLICY,
    }
