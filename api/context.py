"""What a request handler reaches: the services built once per process, and
the database session opened for this one request."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session

from segq.api.service_container import Services
from segq.models import Project


def services() -> Services:
    found: Services = current_app.extensions["segq"]
    return found


def db() -> Session:
    """This request's session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = services().sessions()
    session: Session = g.db
    return session


def close_db(_exc: BaseException | None = None) -> None:
    session: Session | None = g.pop("db", None)
    if session is not None:
        session.close()


def current_project() -> Project:
    project: Project = g.project
    return project
