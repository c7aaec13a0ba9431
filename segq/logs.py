"""How segq's processes log: plain text for a person at a terminal (the
default), or one JSON object a line for a log collector
(``SEGQ_LOG_FORMAT=json``), through the standard ``logging`` module and
python-json-logger's formatter.

What a line is about (request id, project, job, item, attempt) is set once
where the work starts, a request or an item, with ``log_context``; a filter
adds it to every line logged inside, so no log call has to name it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

#: The fields a context may carry, in the order text lines show them.
CONTEXT_FIELDS = ("request_id", "project", "job_id", "item_id", "attempt")

_context: ContextVar[dict[str, Any] | None] = ContextVar("segq_log_context", default=None)


def bind_context(**fields: Any) -> Token[dict[str, Any] | None]:
    """Add ``fields`` (None values left out) to this thread's or task's log
    context until ``reset_context`` is given the token."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not log context fields: {sorted(unknown)}")
    current = _context.get() or {}
    return _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})


def reset_context(token: Token[dict[str, Any] | None]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = bind_context(**fields)
    try:
        yield
    finally:
        reset_context(token)


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (a field the call gave
    itself, with ``extra=``, wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class ContextTextFormatter(logging.Formatter):
    """The plain-text line, with the context's fields and a duration, if
    any, appended as ``name=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        shown = [
            f"{name}={getattr(record, name)}"
            for name in (*CONTEXT_FIELDS, "duration_ms")
            if getattr(record, name, None) is not None
        ]
        return f"{line} [{' '.join(shown)}]" if shown else line


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure_logging(
    log_format: str | None, *, level: int | str | None = None, stream: IO[str] | None = None
) -> None:
    """Send the root logger's lines to ``stream`` (stderr) in ``log_format``
    ("json" or "text"; None is text), replacing the handlers there were.
    ``level`` None keeps the root logger's level."""
    # The process's real stderr: Celery replaces sys.stderr with a proxy
    # that logs what is written to it, which would loop back here.
    handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(
            ContextTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if level is not None:
        root.setLevel(level)
