"""VLM Run's documented segmentation through OpenAI's Python client:
``client.chat.completions.create(...)`` against segq's OpenAI-compatible
base path (``/v1/openai``), answered as a chat completion whose message
content is ``{"segmentations": [{"label", "mask_url"}, ...]}``, one entry
per instance, best first.

segq runs no language model: the user's text is read by a small fixed
grammar (api/peers/request_phrases.py) into SAM 3's text prompt, and the
image comes from the message's ``image_url`` part. The job is a segq job
of the key's project, run to its end within the request as Moondream's
route runs one. Errors are OpenAI's envelope, which the client raises as
its ``APIStatusError`` subclasses."""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal

from flask import Response, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segq.api.context import services
from segq.api.errors import ApiError
from segq.api.json_body import max_job_body_bytes, read_json_object
from segq.api.openapi import documented
from segq.api.peers.caller_fields import CallerFields
from segq.api.peers.peer_blueprint import PeerBlueprint
from segq.api.peers.request_phrases import PhraseNotUnderstood, requested_phrase
from segq.api.peers.synchronous_jobs import (
    PeerWait,
    finished_or_parked,
    parked_answer,
    project_for_key,
    resumed_peer_wait,
    start_peer_job,
)
from segq.api.public_links import public_link
from segq.api.refusals import Envelope, register_refusals
from segq.api.schemas import SegmentRequest, parse
from segq.engine_catalogue import Capability, concept_unsupported_message, lacks
from segq.models import Project

log = logging.getLogger(__name__)

#: The client's ``base_url``: VLM Run's is ``https://agent.vlm.run/v1/openai``.
OPENAI_PREFIX = "/v1/openai"
openai_chat = PeerBlueprint("openai_chat", __name__, url_prefix=OPENAI_PREFIX)
#: The route, as it names the calls made to it (api/peers/synchronous_jobs.py).
ROUTE = "openai/chat/completions"

AUTH_HEADER = "Authorization: Bearer"
MAX_TEXT_LENGTH = 2000
MAX_MESSAGES = 32
MAX_PARTS = 16
#: The answer's one array, and what each entry may carry.
SEGMENTATIONS = "segmentations"
ENTRY_FIELDS = ("label", "mask_url", "score")
#: Every answer has these; ``score`` only where the schema asks for it.
REQUIRED_ENTRY_FIELDS = ("label", "mask_url")
SUPPORTED_SHAPE = (
    f'{{"{SEGMENTATIONS}": [{{"label": string, "mask_url": string, "score": number (optional)}}]}}'
)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT_LENGTH)]


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, description="a data: URL or an http(s) URL")]
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, unused")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_LENGTH)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS)]
    )
    name: Annotated[str, Field(max_length=64)] | None = None


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``json_schema`` member: ``{"name", "schema", "strict"}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(max_length=64)] | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``{"type": "json_schema", "json_schema": {"schema": …}}``, or
    VLM Run's ``{"type": "json_schema", "schema": …}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema", "json_object", "text"]
    json_schema: JsonSchemaFormat | None = None
    json_schema_inline: dict[str, Any] | None = Field(None, alias="schema")


class ChatCompletionRequest(BaseModel):
    """What OpenAI's client sends for ``chat.completions.create``; sampling
    options are accepted and unused (segq's answer is not sampled)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "segq-sam3",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Segment all the cars in this image"},
                                {
                                    "type": "image_url",
                                    "image_url": {"url": "https://example.com/cars.jpg"},
                                },
                            ],
                        }
                    ],
                    "response_format": {"type": "json_object"},
                }
            ]
        },
    )

    model: Annotated[str, Field(min_length=1, max_length=200, description="any name; echoed")]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    response_format: ResponseFormat | None = None
    stream: Literal[False] | None = Field(None, description="segq does not stream")
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


class Segmentation(BaseModel):
    label: str = Field(description="the phrase segmented, in the singular")
    mask_url: str = Field(description="a pre-signed URL of the instance's mask PNG")
    score: float | None = Field(None, description="only where the schema asks for it")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str = Field(description='JSON: {"segmentations": [...]}, one per instance')
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"]
    logprobs: None = None


class Usage(BaseModel):
    """segq reads no tokens: every count is 0."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<segq job id>")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


# Errors: OpenAI's envelope for everything this blueprint answers.


def openai_error(
    status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> Response:
    kind, code = "invalid_request_error", None
    if status == 401:
        code = "invalid_api_key"
    elif status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    response = jsonify({"error": {"message": message, "type": kind, "param": param, "code": code}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


class _Refusal(ApiError):
    """An ApiError that names the request's field, as OpenAI's ``param``."""

    def __init__(self, code: int, message: str, param: str) -> None:
        super().__init__(code, message)
        self.param = param


# Every refusal of segq's table (api/refusals.py), in OpenAI's envelope, with
# the table's status: OpenAI's API documents every status the table gives.
OPENAI_ENVELOPE = Envelope(
    "openai",
    lambda refused: openai_error(
        refused.code, refused.message, refused.headers, getattr(refused, "param", None)
    ),
)
register_refusals(openai_chat, OPENAI_ENVELOPE)


@openai_chat.post("/chat/completions")
@documented(
    "Segment what the user's text names in its image (VLM Run's usage of OpenAI's client)",
    {200: ("a chat completion; its message's content is the segmentations as JSON", None)},
    errors=(400, 401, 413, 415, 422, 429, 503, 504),
    json_body=ChatCompletionRequest,
)
def create_chat_completion() -> Response:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    project = project_for_key(key if scheme.lower() == "bearer" else "", AUTH_HEADER)
    # Parked like every peer's synchronous call (api/route_waits.py); a
    # resumed run reads no body and answers from the job.
    peer_wait = resumed_peer_wait() or _start_call(project)
    finished = finished_or_parked(project, peer_wait)
    if finished is None:
        return parked_answer()
    options = peer_wait.answer_options
    phrase: str = options["phrase"]
    settings = services().settings
    storage = services().storage
    entries = []
    for segment in finished.segments:
        url = public_link(
            settings.public_url,
            storage.presigned_get_url(segment["maskKey"], settings.url_expires_seconds),
        )
        entry = {"label": phrase, "mask_url": url, "score": segment["score"]}
        entries.append({name: entry[name] for name in options["fields"]})
    content = json.dumps({SEGMENTATIONS: entries}, separators=(",", ":"))
    answer = ChatCompletion(
        id=f"chatcmpl-{finished.job_id}",
        object="chat.completion",
        created=int(time.time()),
        model=options["model"],
        choices=[
            Choice(
                index=0,
                message=AssistantMessage(role="assistant", content=content),
                finish_reason="stop",
            )
        ],
        usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
    )
    return jsonify(answer.model_dump())


def _start_call(project: Project) -> PeerWait:
    """Read and check the body, and start (or find) the call's job."""
    raw = read_json_object(max_bytes=max_job_body_bytes(services().settings.max_upload_bytes))
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = _field_name(first["loc"]) or "body"
        raise _Refusal(400, f"{where}: {first['msg']}", where) from None
    fields_of_answer = _answer_fields(body.response_format)
    text, (image_url, image_field) = _user_text_and_image(body.messages)
    if lacks(services().settings.model, Capability.TEXT_PROMPTS):
        raise ApiError(422, concept_unsupported_message(services().settings.model))
    try:
        phrase = requested_phrase(text)
    except PhraseNotUnderstood as exc:
        raise _Refusal(422, str(exc), "messages") from None
    fields = CallerFields()
    fields.name(("items", 0), image_field)
    item = {"imageData" if image_url[:5].lower() == "data:" else "fileUrl": image_url}
    with fields.renaming():
        segment_request = parse(
            SegmentRequest, {"items": [item], "text": phrase, "outputs": ["mask"]}
        )
        return start_peer_job(
            project,
            ROUTE,
            segment_request,
            {"phrase": phrase, "fields": fields_of_answer, "model": body.model},
        )


def _field_name(location: tuple[int | str, ...]) -> str:
    name = ""
    for part in location:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[tagged-union[TextPart,ImagePart]]"):
            continue  # pydantic's name of a union's member, not a field
        else:
            name += f".{part}" if name else part
    return name


def _user_text_and_image(messages: list[ChatMessage]) -> tuple[str, tuple[str, str]]:
    """The last user message's text (its text parts joined) and its one
    image: (URL, the caller's name for it). Other roles' messages are
    context a language model would read; segq reads none."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        raise _Refusal(422, "messages: give a user message with the text and the image", "messages")
    content = messages[last].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    texts = [part.text for part in parts if isinstance(part, TextPart)]
    images = [
        (part.image_url.url, f"messages[{last}].content[{index}].image_url.url")
        for index, part in enumerate(parts)
        if isinstance(part, ImagePart)
    ]
    if len(images) != 1:
        raise _Refusal(
            422,
            f"messages[{last}].content: give exactly one image_url part "
            f"(a data: URL or an http(s) URL); it has {len(images)}",
            f"messages[{last}].content",
        )
    url, field = images[0]
    if not url.lower().startswith(("data:", "http://", "https://")):
        raise _Refusal(400, f"{field} must be a data: URL or an http(s) URL", field)
    text = " ".join(part for part in texts if part.strip())
    if not text:
        raise _Refusal(
            422, f"messages[{last}].content: give a text part naming what to segment", "messages"
        )
    return text, images[0]


def _answer_fields(response_format: ResponseFormat | None) -> tuple[str, ...]:
    """The fields of each entry of the answer: those ``response_format``'s
    schema asks for, which must be segq's label and mask URL (and
    optionally the score); 422 for any other schema."""
    if response_format is None or response_format.type != "json_schema":
        return REQUIRED_ENTRY_FIELDS
    schema = (
        response_format.json_schema.json_schema
        if response_format.json_schema is not None
        else response_format.json_schema_inline
    )
    if schema is None:
        raise _Refusal(
            422,
            'response_format: a json_schema format needs its schema ("json_schema": '
            '{"schema": …}, or "schema": …)',
            "response_format",
        )
    root = _resolved(schema, schema)
    array = _resolved(schema, root.get("properties", {}).get(SEGMENTATIONS))
    entry = _resolved(schema, array.get("items")) if array.get("type") == "array" else {}
    asked = set(entry.get("properties", {}))
    unknown = (set(root.get("properties", {})) - {SEGMENTATIONS}) | (asked - set(ENTRY_FIELDS))
    if (
        root.get("type") != "object"
        or not set(REQUIRED_ENTRY_FIELDS) <= asked
        or unknown
        or not set(root.get("required", ())) <= {SEGMENTATIONS}
    ):
        extra = f" (segq cannot fill {', '.join(sorted(unknown))})" if unknown else ""
        raise _Refusal(
            422,
            f"response_format: segq answers {SUPPORTED_SHAPE}; give a schema of that shape{extra}",
            "response_format",
        )
    return tuple(name for name in ENTRY_FIELDS if name in asked)


def _resolved(root: dict[str, Any], node: Any) -> dict[str, Any]:
    """``node`` with a local ``$ref`` (``#/$defs/…``, ``#/definitions/…``)
    followed, as pydantic's model_json_schema writes them; {} for anything
    that is not a schema object."""
    for _ in range(8):  # a chain of references, never a loop
        if not isinstance(node, dict):
            return {}
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return node
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        node = target
    return {}
