"""A MkDocs hook: tables written from segq's own code, so the docs cannot
disagree with it. ``<!-- engine-catalogue-table -->`` in a page becomes the
engine catalogue (``segq/engine_catalogue.py``) as a table."""

from __future__ import annotations

from typing import Any

from segq.engine_catalogue import ENGINE_NAMES, ENGINES_BY_NAME, Capability

ENGINE_TABLE_MARK = "<!-- engine-catalogue-table -->"

#: The capabilities shown, in the table's words.
_SHOWN = (
    (Capability.TEXT_PROMPTS, "text"),
    (Capability.MASK_INPUT, "maskInput"),
    (Capability.LOGITS, "logits"),
    (Capability.EVERYTHING, "everything"),
    (Capability.IMAGE_BATCHING, "image batches"),
)


def engine_table() -> str:
    rows = [
        "| `SEGQ_MODEL` | family | beyond points and boxes | `segq weights download` "
        "| weights | checked by | built from |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ENGINE_NAMES:
        entry = ENGINES_BY_NAME[name]
        can = ", ".join(words for capability, words in _SHOWN if entry.can(capability)) or "none"
        weights = entry.weights
        if weights is None:
            rows.append(f"| `{name}` | {entry.family} | {can} | none | none | none | none |")
            continue
        official = weights.official
        if official is None:
            fetched, file, checked = "none", f"`{weights.local_name}` ({weights.layout})", "none"
        else:
            fetched = f"`{weights.name}`"
            file = f"[`{official.filename}`]({official.url})"
            checked = "MD5 (Meta's)" if official.md5 else "your SHA-256, or none"
        rows.append(
            f"| `{name}` | {entry.family} | {can} | {fetched} | {file} | {checked} "
            f"| `{entry.architecture or 'its weights'}` |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(ENGINE_TABLE_MARK, engine_table())
