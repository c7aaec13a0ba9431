"""The text segq accepts in what a client sends: any Unicode that Postgres
can store. Postgres text and JSONB refuse NUL (U+0000), and a lone UTF-16
surrogate (U+D800 to U+DFFF, which JSON spells as an escape such as
``\\ud800``) has no UTF-8 encoding at all; either reaching the database is a
driver error, so both are refused where the text comes in, with a 400
naming the field. Every JSON body and JSON form field is checked whole
(api/json_body.py), whatever its fields are for, as are the query strings,
headers and form fields a route keeps (api/schemas.py's checked_text)."""

from __future__ import annotations

import re
from typing import Any

from segq.api.errors import ApiError

UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")

#: What JSON text must contain for a parsed string to hold an unstorable
#: character: the escape of NUL or of a surrogate (raw, both are invalid
#: JSON or invalid UTF-8, which the parser refuses). Only such bodies are
#: walked; a valid surrogate pair matches too and is walked for nothing.
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def unstorable_reason(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None if it can."""
    found = UNSTORABLE_CHARACTER.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (U+0000)"
    return f"contains a lone surrogate (U+{ord(found.group()):04X}), which is not Unicode text"


def check_stored_text(where: str, text: str) -> str:
    """``text``, if it can be stored; else a 400 naming ``where``."""
    reason = unstorable_reason(text)
    if reason is not None:
        raise ApiError(400, f"{where}: {reason}")
    return text


def check_json_text(source: str, value: Any, root: str = "") -> None:
    """Refuse ``value``, parsed from the JSON text ``source``, if one of its
    strings or keys cannot be stored; the 400 names the first such field as
    api/schemas.py's validation names fields (``items[0].fileUrl``), under
    ``root`` for a value that is itself one field (a form's)."""
    if _UNSTORABLE_ESCAPE.search(source) is None:
        return
    # Iterative: the parser allows nesting as deep as Python's recursion limit.
    stack: list[tuple[str, Any]] = [(root, value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            check_stored_text(where or "body", node)
        elif isinstance(node, dict):
            children: list[tuple[str, Any]] = []
            for key, child in node.items():
                reason = unstorable_reason(key)
                if reason is not None:
                    raise ApiError(400, f"{where or 'body'}: a key {reason}")
                children.append((f"{where}.{key}" if where else key, child))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{where}[{i}]", child) for i, child in enumerate(node)]))
