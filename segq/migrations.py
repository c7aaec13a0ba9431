"""Applying the Alembic migrations from code (segq migrate, tests).

Alembic's scripts live in the repository's top-level migrations/; a built
wheel carries them inside this package as segq/migration_scripts/
(pyproject.toml maps the folder there), so both a checkout and an installed
wheel can migrate."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

_PACKAGE_DIR = Path(__file__).resolve().parent
_INSTALLED_SCRIPTS = _PACKAGE_DIR / "migration_scripts"
MIGRATIONS_DIR = (
    _INSTALLED_SCRIPTS if _INSTALLED_SCRIPTS.is_dir() else _PACKAGE_DIR.parent / "migrations"
)


def alembic_config(engine: Engine) -> Config:
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["configure_logger"] = False
    config.attributes["engine"] = engine
    return config


def upgrade_to_head(engine: Engine) -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
