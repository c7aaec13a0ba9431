"""Signed tokens (viewer links, upload URLs, multipart upload ids), read in
the one spelling they were written in.

itsdangerous signs the payload's exact bytes, but reads the signature
leniently: its base64 decoding drops characters outside the alphabet
(``!``, ``é``), takes any amount of padding (``=``) and ignores the unused
low bits of the last character, so one token had many spellings that all
passed. Here a token is refused unless it is exactly what signing its
payload writes: one spelling per token, compared in constant time.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

#: What URLSafeSerializer writes (base64url, and the dots that separate the
#: payload from the signature and mark a compressed payload), bounded: no
#: token segq signs comes near it, and a longer one costs a signature check.
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,2048}")


class SignedTokens:
    """Signs payloads (JSON values) under the server's secret and a salt
    that keeps each kind of token apart."""

    def __init__(self, secret_key: str, *, salt: str) -> None:
        self._serializer = URLSafeSerializer(secret_key, salt=salt)

    def dumps(self, payload: Any) -> str:
        return str(self._serializer.dumps(payload))

    def loads(self, token: str) -> Any:
        """The payload of ``token``; BadSignature unless it is ours, unaltered
        and spelt as signing writes it."""
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise BadSignature("a token is base64url text")
        try:
            payload = self._serializer.loads(token)
        except (ValueError, TypeError) as exc:
            raise BadSignature("not a token") from exc
        if not hmac.compare_digest(self.dumps(payload).encode(), token.encode()):
            raise BadSignature("not the token's own spelling")
        return payload
