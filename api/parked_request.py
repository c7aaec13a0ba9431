"""What a parked request offers the code that wakes it (api/parking.py parks
it): a Protocol without Flask or the server, so the job event stream, which
the services container holds, can name it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class Parked(Protocol):
    """A parked request, as its watch reaches it (from any thread)."""

    def wake(self) -> None:
        """Run the request again."""
        ...

    def push(self, data: bytes, environ: Mapping[str, Any]) -> bool:
        """Send ``data`` now as more of a streamed answer, and change the
        next run's environ as ``environ`` says; False when it cannot be sent
        now (see ParkingChannel.push), and the caller should wake it."""
        ...

    def end(self, data: bytes) -> bool:
        """End a streamed answer with ``data``, without running the app
        again; False when it is not parked now (a run of it is due, which
        answers for itself)."""
        ...
