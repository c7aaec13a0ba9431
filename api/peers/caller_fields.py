"""The caller's names for the fields of a segq request that a peer route
built from the peer's own body, so that a refusal by segq's checks (the
request schema, the job service) names the field the caller sent:
Moondream's ``spatial_refs[2]``, not ``boundingBox``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from segq.api.errors import ApiError, FieldPath


class CallerFields:
    """Native field path -> the caller's name for it. A refusal of a field
    under a named one (``points[0].x`` under ``points[0]``) takes the
    nearest named field's name; a refusal of a field the route filled in
    itself (no name) is left as segq's."""

    def __init__(self) -> None:
        self._names: dict[FieldPath, str] = {}

    def name(self, field: FieldPath, caller_name: str) -> None:
        self._names[field] = caller_name

    def caller_name(self, field: FieldPath) -> str | None:
        for end in range(len(field), 0, -1):
            name = self._names.get(field[:end])
            if name is not None:
                return name
        return None

    @contextmanager
    def renaming(self) -> Iterator[None]:
        """Refusals raised inside name the caller's fields."""
        try:
            yield
        except ApiError as refused:
            name = None if refused.field is None else self.caller_name(refused.field)
            if name is None:
                raise
            raise refused.renamed(name) from None
