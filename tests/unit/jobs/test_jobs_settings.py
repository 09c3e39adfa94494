"""Settings: embedded defaults, PCD_ environment, and prod refusing single-host backends."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs.settings import GiB, Settings, get_settings

PROD_OK = {
    "env": "prod",
    "database_url": "postgresql+psycopg://pcd@db/pcd",
    "broker_url": "redis://redis:6379/0",
    "storage_url": "s3://pcd",
}


def test_embedded_defaults() -> None:
    s = Settings()
    assert s.database_url.startswith("sqlite:///") and s.broker_url.startswith("filesystem://")
    assert s.storage_url.startswith("file://") and s.max_attempts == 3
    assert s.max_upload_bytes == 2 * GiB and s.visibility_timeout_s >= 3600
    assert s.reaper_interval == s.heartbeat_timeout_s / 4


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCD_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("PCD_DATABASE_URL", "sqlite:///x.db")
    get_settings.cache_clear()
    try:
        assert get_settings().max_attempts == 7 and get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


def test_prod_accepts_real_services() -> None:
    assert Settings(**PROD_OK).env == "prod"  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "words"), [
    ("database_url", "sqlite:///./var/pcd.db", "SQLite"),
    ("broker_url", "filesystem://./var/broker", "single-host"),
    ("broker_url", "memory://", "single-host"),
    ("storage_url", "file://./var/objects", "local folder"),
])
def test_prod_refuses_embedded_defaults(field: str, value: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(**{**PROD_OK, field: value})  # type: ignore[arg-type]


def test_prod_with_all_defaults_lists_every_problem() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(env="prod")
    assert all(w in str(info.value) for w in ("database_url", "broker_url", "storage_url"))


def test_heartbeat_timeout_must_cover_missed_beats() -> None:
    with pytest.raises(ValidationError, match="heartbeat_timeout_s"):
        Settings(heartbeat_interval_s=10, heartbeat_timeout_s=15)


def test_redispatch_window(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().redispatch_after_s == 900.0
    monkeypatch.setenv("PCD_REDISPATCH_AFTER_S", "30")
    assert Settings().redispatch_after_s == 30.0
    with pytest.raises(ValidationError, match="redispatch_after_s"):
        Settings(redispatch_after_s=0)
