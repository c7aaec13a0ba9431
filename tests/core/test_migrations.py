"""The migrations and the models describe the same schema, on Postgres and SQLite."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from segq.db import make_engine
from segq.models import Base
from segq.schema_migrations import upgrade_to_head


def assert_no_drift(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == [], f"models and migrations differ: {differences}"


def test_postgres_at_head_matches_the_models(db_engine: Engine) -> None:
    # database_url migrated this database to head through the same code as `segq migrate`.
    assert_no_drift(db_engine)


def test_sqlite_migrates_and_matches_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'segq.db'}")
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second run is a no-op
    assert {"projects", "api_keys", "files", "jobs", "job_items"} <= set(
        inspect(engine).get_table_names()
    )
    assert_no_drift(engine)
    engine.dispose()
