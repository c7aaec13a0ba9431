"""The exit statuses of segq's client commands, for shell scripts."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    #: Everything asked for was done (for submit and watch: every image Completed).
    OK = 0
    #: segq refused the request (bad key, unknown job, invalid prompt, conflict).
    REFUSED = 1
    #: The command line itself is wrong (click's own status for usage errors).
    USAGE = 2
    #: The jobs finished, but some images failed or were canceled.
    FAILED_ITEMS = 3
    #: Still running when --timeout ran out (rerun to resume, or `segq jobs watch`).
    TIMED_OUT = 4
    #: segq could not be reached, or stayed unavailable (503) through the retries.
    UNREACHABLE = 5
