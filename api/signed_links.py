"""Pre-signed links to stored objects, signed once per signing window.

Signing an S3 URL costs about half a millisecond of botocore's time, and a
1,000-item job holds 1,000 links or more: signed on every poll, the links
alone cost more than the rest of the answer. Within one window
(SEGQ_URL_SIGNING_WINDOW_SECONDS) a key's link is signed once and reused,
and the expiry an answer states is the window's start plus
SEGQ_URL_EXPIRES_SECONDS: never later than the signature's own, the same
in every answer of the window (so an unchanged job's answer, and its ETag,
stay the same), and at least the lifetime less one window from any answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import LRUCache

from segq.api.public_links import public_link
from segq.clock import now_ms
from segq.storage import ObjectStorage

#: Links kept for the current window: about 300 bytes each, so at most
#: about 6 MB, the links of 20 jobs of 1,000 items.
MAX_KEPT_LINKS = 20_000


@dataclass(frozen=True)
class SigningWindow:
    """One window of SEGQ_URL_SIGNING_WINDOW_SECONDS, numbered from the epoch."""

    number: int
    seconds: int

    @classmethod
    def now(cls, seconds: int) -> SigningWindow:
        return cls(now_ms() // (seconds * 1000), seconds)

    @property
    def start_time(self) -> int:
        """Epoch milliseconds."""
        return self.number * self.seconds * 1000


class SignedLinks:
    """A process's signed links to objects of ``storage``."""

    def __init__(
        self,
        storage: ObjectStorage,
        *,
        public_url: str | None,
        expires_seconds: int,
        window_seconds: int,
    ) -> None:
        self._storage = storage
        self._public_url = public_url
        self._expires_seconds = expires_seconds
        self.window_seconds = window_seconds
        self._lock = threading.Lock()
        self._window_number = -1
        self._kept: LRUCache[str, str] = LRUCache(maxsize=MAX_KEPT_LINKS)

    def window(self) -> SigningWindow:
        return SigningWindow.now(self.window_seconds)

    def expires_time(self, window: SigningWindow) -> int:
        """What answers of ``window`` state as their links' expiry."""
        return window.start_time + self._expires_seconds * 1000

    def link(self, key: str, window: SigningWindow) -> tuple[str, int]:
        """``key``'s pre-signed URL in ``window``, and its stated expiry."""
        with self._lock:
            if window.number > self._window_number:
                # Every link kept belongs to an older window.
                self._kept.clear()
                self._window_number = window.number
            # A request still in the window before is answered, not kept.
            url = self._kept.get(key) if window.number == self._window_number else None
        if url is None:
            # Signed now, at or after the window's start: it expires no
            # sooner than the expiry stated.
            url = public_link(
                self._public_url, self._storage.presigned_get_url(key, self._expires_seconds)
            )
            with self._lock:
                if window.number == self._window_number:
                    self._kept[key] = url
        return url, self.expires_time(window)
