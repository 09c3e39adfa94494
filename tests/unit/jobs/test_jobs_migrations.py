"""The schema comes from Alembic only: migrating creates every table, and the migrated
database matches the models exactly (an empty autogenerate diff), on SQLite and PostgreSQL.

PostgreSQL: a throwaway database ``pcd_unit_<random>`` on PCD_TEST_PG_URL (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Skipped when unreachable, except
under CI=true, where a missing PostgreSQL is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from jobs import db
from jobs.models import Base

PG_URL = os.environ.get("PCD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = {"teams", "api_keys", "jobs", "job_transitions", "metric_points", "log_lines",
          "artifacts", "uploads", "idempotency_keys"}


def _check_schema(url: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert context.get_current_revision() is not None
            diff = compare_metadata(context, Base.metadata)
            assert diff == [], f"models and migrations differ: {diff}"
    finally:
        engine.dispose()


def _roundtrip(url: str) -> None:
    db.upgrade_to_head(url)
    db.upgrade_to_head(url)  # idempotent: every process may call it at start
    _check_schema(url)
    command.downgrade(db.alembic_config(url), "base")
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert not TABLES & set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    db.upgrade_to_head(url)
    _check_schema(url)


def test_sqlite_migrations(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'sub' / 'pcd.db'}")


@pytest.fixture
def pg_database() -> Iterator[str]:
    admin_url = make_url(PG_URL)
    name = f"pcd_unit_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # unreachable, or no rights
        admin.dispose()
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL is required under CI but unusable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgresql_migrations(pg_database: str) -> None:
    _roundtrip(pg_database)


def test_application_never_creates_the_schema() -> None:
    root = Path(__file__).resolve().parents[3]
    offenders = [str(p.relative_to(root)) for pkg in ("jobs", "api", "worker")
                 for p in (root / pkg).rglob("*.py") if "create_all(" in p.read_text()]
    assert offenders == []
