"""Projects and their API keys."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.clock import now_ms
from core.models import ApiKey, Project

API_KEY_PREFIX = "segq_"
PROJECT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ProjectError(ValueError):
    pass


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_project(session: Session, name: str) -> tuple[Project, str]:
    """Create a project and its first key. The key is returned once and only
    its hash is stored."""
    if not PROJECT_NAME_PATTERN.fullmatch(name):
        raise ProjectError(
            "project names are 1-63 characters: lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise ProjectError(f"project {name!r} exists already")
    project = Project(name=name, created_time=now_ms())
    session.add(project)
    session.flush()
    return project, add_api_key(session, project)


def add_api_key(session: Session, project: Project) -> str:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            project_id=project.id,
            key_hash=hash_api_key(key),
            key_prefix=key[: len(API_KEY_PREFIX) + 4],
            created_time=now_ms(),
        )
    )
    return key


def project_for_key(session: Session, key: str) -> Project | None:
    """The project a live key belongs to, or None for an unknown or revoked key."""
    return session.scalar(
        select(Project)
        .join(ApiKey, ApiKey.project_id == Project.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_time.is_(None))
    )
