"""The bodies of the peers' error answers, as each peer's client reads them
(for /openapi.json: each peer's section documents its own shape)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LivepeerErrorDetail(BaseModel):
    msg: str


class LivepeerFieldError(BaseModel):
    """FastAPI's shape for a form field that is missing or of the wrong type (422)."""

    loc: list[str | int]
    msg: str
    type: str


class LivepeerError(BaseModel):
    """Livepeer's AI runner: ``{"detail": {"msg": …}}``, or FastAPI's list for a 422."""

    detail: LivepeerErrorDetail | list[LivepeerFieldError]


class ReplicateProblem(BaseModel):
    """An RFC 7807 problem document (application/problem+json), which
    Replicate's client raises as ReplicateError."""

    type: str = Field(description='"about:blank"')
    title: str = Field(description="the status's phrase")
    status: int
    detail: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request's field at fault, where one is")
    code: str | None = Field(description="invalid_api_key, rate_limit_exceeded or null")


class OpenAIError(BaseModel):
    """OpenAI's envelope, which its client raises as an APIStatusError."""

    error: OpenAIErrorDetail
