"""JSON answers, serialized through their response models (api/schemas.py)."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from pydantic import BaseModel


def json_answer(model: BaseModel) -> Response:
    """``model`` as the answer's body. Fields the handler never set stay out
    (an optional part the job lacks is absent, not null), as the contract
    shows them."""
    return jsonify(model.model_dump(mode="json", by_alias=True, exclude_unset=True))


def json_document(model: type[BaseModel], document: dict[str, Any]) -> Response:
    """A document rendered elsewhere (segq.job_document, shared with webhook
    events) checked against ``model`` on its way out: a key its schema does
    not know, or a value of the wrong type, is an error here rather than an
    undocumented answer."""
    return json_answer(model.model_validate(document))
