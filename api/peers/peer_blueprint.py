"""The blueprint every peer's routes are declared on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint


class PeerBlueprint(Blueprint):
    """Each route takes its path with or without a trailing slash, answered
    alike, never redirected: a redirect's HTML body is no answer a peer's
    client reads, and urllib (Moondream's client) does not follow one for a
    POST. (A doubled slash, where a client joins a base URL that ends in
    one, is merged before routing: api/request_paths.py.)"""

    def add_url_rule(
        self,
        rule: str,
        endpoint: str | None = None,
        view_func: Callable[..., Any] | None = None,
        provide_automatic_options: bool | None = None,
        **options: Any,
    ) -> None:
        options.setdefault("strict_slashes", False)
        super().add_url_rule(rule, endpoint, view_func, provide_automatic_options, **options)
