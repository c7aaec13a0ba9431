"""One spelling of each request path: runs of slashes are one slash.

A client that joins a base URL ending in a slash with a path that starts
with one (Moondream's ``endpoint=".../v1/"`` gives ``/v1//segment``) means
the single-slash path. Werkzeug would answer it with a redirect, which no
peer's client follows for a POST (urllib does not), so the path is merged
before routing instead, for every route alike."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REPEATED_SLASHES = re.compile(r"/{2,}")


class MergedSlashes:
    """WSGI middleware: PATH_INFO with each run of slashes made one."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = REPEATED_SLASHES.sub("/", path)
        return self.app(environ, start_response)
