"""A MkDocs hook: tables written from segq's own code, so the docs cannot
disagree with it. ``<!-- engine-catalogue-table -->`` in a page becomes the
engine catalogue (``segq/engine_catalogue.py``) as a table."""

from __future__ import annotations

from typing import Any

from segq.engine_catalogue import ENGINE_NAMES, MODEL_ENGINES_BY_NAME, engine_family

ENGINE_TABLE_MARK = "<!-- engine-catalogue-table -->"


def engine_table() -> str:
    rows = [
        "| `SEGQ_MODEL` | family | `segq weights download` | checkpoint file | checked by "
        "| built from |",
        "|---|---|---|---|---|---|",
    ]
    for name in ENGINE_NAMES:
        engine = MODEL_ENGINES_BY_NAME.get(name)
        if engine is None:
            rows.append(f"| `{name}` | {engine_family(name)} | none | none | none | none |")
            continue
        checked = "MD5 (Meta's)" if engine.checkpoint.md5 else "your SHA-256, or none"
        rows.append(
            f"| `{name}` | {engine.family} | `{engine.checkpoint_name}` "
            f"| [`{engine.checkpoint.filename}`]({engine.checkpoint.url}) | {checked} "
            f"| `{engine.architecture}` |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(ENGINE_TABLE_MARK, engine_table())
