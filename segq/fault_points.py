"""Places where a test makes a segq process die on purpose, to show what
happens when a real process dies there. Test-only: a point is armed only by
``SEGQ_TEST_FAULT_POINT``, which production never sets; unarmed, each point
costs one comparison."""

from __future__ import annotations

import os
import signal

#: The API has committed a job and not yet published its items.
API_AFTER_COMMIT = "api-after-commit"
FAULT_POINTS = frozenset({API_AFTER_COMMIT})


def die_if_armed(point: str, armed: str | None) -> None:
    """SIGKILL this process (no cleanup, no answer) if ``point`` is armed."""
    if armed == point:
        os.kill(os.getpid(), signal.SIGKILL)
