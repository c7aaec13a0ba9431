"""Projects and their API keys."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from segq.clock import now_ms
from segq.models import ApiKey, Project
from segq.webhook_signing import new_secret

API_KEY_PREFIX = "segq_"
PROJECT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: After a rotation the previous webhook secret signs deliveries beside the
#: new one for this long, so receivers can switch secrets without a gap.
SECRET_ROTATION_GRACE_MS = 24 * 3600 * 1000


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


def ensure_webhook_secret(session: Session, project_id: int) -> Project:
    """The project, with its webhook secret made if it had none. Race-free:
    of two first uses at once, one secret wins and both see it."""
    project = session.get(Project, project_id)
    if project is None:
        raise ProjectError(f"project {project_id} does not exist")
    if project.webhook_secret is None:
        session.execute(
            update(Project)
            .where(Project.id == project_id, Project.webhook_secret.is_(None))
            .values(webhook_secret=new_secret())
        )
        session.refresh(project)
    return project


def rotate_webhook_secret(session: Session, project_id: int, now: int) -> Project:
    """Replace the project's webhook secret; the old one keeps signing for
    SECRET_ROTATION_GRACE_MS."""
    project = session.scalar(select(Project).where(Project.id == project_id).with_for_update())
    if project is None:
        raise ProjectError(f"project {project_id} does not exist")
    project.webhook_previous_secret = project.webhook_secret
    project.webhook_secret = new_secret()
    project.webhook_secret_rotated_time = now
    return project


def signing_secrets(project: Project, now: int) -> list[str]:
    """The secrets a delivery is signed with now: the current one, and the
    previous one while its grace period lasts."""
    assert project.webhook_secret is not None
    in_use = [project.webhook_secret]
    rotated = project.webhook_secret_rotated_time
    if (
        project.webhook_previous_secret is not None
        and rotated is not None
        and now < rotated + SECRET_ROTATION_GRACE_MS
    ):
        in_use.append(project.webhook_previous_secret)
    return in_use
