"""Fixtures of the API tests: a temporary SQLite database and ``file://`` store per test.

Why a migrated template database copied per test: Alembic takes a noticeable fraction of a
second per run, and the suite must stay fast; copying one migrated file keeps every test on a
fresh, real schema (the one migrations create, never ``create_all``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_factory import UPLOAD_LIMIT, Factory
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.dispatch import RecordingDispatcher
from api.main import create_app
from jobs import db
from jobs.settings import Settings


def make_settings(root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{root / 'pcd.db'}",
        "storage_url": f"file://{root / 'objects'}",
        "broker_url": f"filesystem://{root / 'broker'}",
        "work_dir": str(root),
        "max_upload_bytes": UPLOAD_LIMIT,
        "migrate_on_start": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template")
    db.upgrade_to_head(make_settings(root))
    return root / "pcd.db"


@pytest.fixture
def settings(tmp_path: Path, migrated_db: Path) -> Settings:
    shutil.copy(migrated_db, tmp_path / "pcd.db")
    return make_settings(tmp_path)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture
def app(settings: Settings, dispatcher: RecordingDispatcher) -> FastAPI:
    app = create_app(settings, dispatcher=dispatcher)
    app.state.sse_poll_s = 0.02  # tests watch state changes within milliseconds
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def factory(app: FastAPI) -> Factory:
    return Factory(app.state.sessionmaker, app.state.store)
