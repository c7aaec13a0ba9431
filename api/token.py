"""/api/v1/token/inspect: who a key is, in Cognite's shape. Cognite's SDK
asks it after a 401 to say which projects the credentials do reach."""

from __future__ import annotations

from flask import Blueprint, Response, request

from segq.api.answers import json_answer
from segq.api.context import db, services
from segq.api.errors import ApiError
from segq.api.openapi import documented
from segq.api.schemas import ProjectScope, TokenInspection

token = Blueprint("token", __name__, url_prefix="/api/v1/token")

#: What any key may do in its project: segq has no finer grants.
KEY_CAPABILITIES = ("filesAcl", "visionModelAcl")


@token.get("/inspect")
@documented(
    "The key's subject, project and capabilities",
    {200: ("the key", TokenInspection)},
    errors=(401,),
)
def inspect_token() -> Response:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    project = (
        services().projects_by_key.project(db(), key.strip())
        if scheme.lower() == "bearer" and key.strip()
        else None
    )
    if project is None:
        raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    scope = {"projectScope": {"projects": [project.name]}}
    return json_answer(
        TokenInspection(
            subject=f"segq-api-key:{project.name}",
            projects=[ProjectScope(projectUrlName=project.name, groups=[])],
            capabilities=[
                {name: {"actions": ["READ", "WRITE"], "scope": {"all": {}}}, **scope}
                for name in KEY_CAPABILITIES
            ],
        )
    )
