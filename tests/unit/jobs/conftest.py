"""Fixtures of the ``jobs`` tests: a migrated SQLite file per test.

Why a migrated template copied per test: the schema under test is the one the migrations
create (never ``create_all``), and copying one file is much cheaper than migrating each time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from jobs import db


@pytest.fixture(scope="session")
def jobs_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jobs-template") / "pcd.db"
    db.upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture
def db_url(tmp_path: Path, jobs_template_db: Path) -> Iterator[str]:
    """A migrated SQLite file; with PCD_TEST_JOBS_PG=<url>, a fresh migrated PostgreSQL
    database instead (``PCD_TEST_JOBS_PG=postgresql+psycopg://postgres@127.0.0.1/test``)."""
    pg = os.environ.get("PCD_TEST_JOBS_PG")
    if not pg:
        shutil.copy(jobs_template_db, tmp_path / "pcd.db")
        yield f"sqlite:///{tmp_path / 'pcd.db'}"
        return
    name = f"pcd_unit_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg).set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade_to_head(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sm(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(db_url)
    yield db.make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def session(sm: sessionmaker[Session]) -> Iterator[Session]:
    with sm() as s:
        yield s
