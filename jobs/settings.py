"""The one settings object of the service, read from ``PCD_*`` environment variables.

The API, the worker, the reaper and Alembic all build their backends from this class, so a
deployment changes URLs in one place (DESIGN.md, "Embedded default vs production"). Every
default is the embedded one: a single machine with no services (SQLite, kombu's filesystem
transport, a ``file://`` object store, all under ``./var``). ``env=prod`` refuses those
defaults: a production deployment silently writing jobs to a local SQLite file would lose
them with the container.

Paths are relative to the working directory of the process that reads them; run every
process of one embedded deployment from the same directory (``pcd serve`` does).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3

# URL schemes that only work on one host (or in one process): fine for dev, refused in prod.
_EMBEDDED_DB = ("sqlite",)
_EMBEDDED_BROKERS = ("filesystem://", "memory://")
_EMBEDDED_STORAGE = ("file://",)


class Settings(BaseSettings):
    """Configuration shared by API, worker and migrations (env prefix ``PCD_``).

    Example: ``PCD_DATABASE_URL=postgresql+psycopg://pcd@db/pcd PCD_ENV=prod``.
    """

    model_config = SettingsConfigDict(env_prefix="PCD_", extra="ignore", frozen=True)

    env: Literal["dev", "prod"] = Field(
        default="dev", description="prod refuses the embedded single-host backends")

    # Backends, selected by URL scheme.
    database_url: str = Field(
        default="sqlite:///./var/pcd.db",
        description="sqlite:///path or postgresql+psycopg://user:pw@host/db")
    broker_url: str = Field(
        default="filesystem://./var/broker",
        description="Celery broker: filesystem://<folder> (one host) or redis://host:6379/0")
    storage_url: str = Field(
        default="file://./var/objects", description="file://<dir> or s3://bucket[/prefix]")

    # Local folders of the worker.
    cache_dir: Path = Field(default=Path("./var/cache"),
                            description="content-addressed cache of teachers and datasets")
    work_dir: Path = Field(default=Path("./var/work"), description="per-run scratch space")

    # Recovery. A job is re-queued when its heartbeat is older than heartbeat_timeout_s.
    max_attempts: int = Field(default=3, ge=1, description="attempts per job, lost workers")
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    reaper_interval_s: float | None = Field(
        default=None, gt=0, description="seconds between reaper passes; None = timeout / 4")
    # A job still ``queued`` (unclaimed) this long after its last update gets its broker
    # message sent again by the reaper: the message was never published (broker down at
    # POST /jobs: the API still answers 201, the row is committed) or the broker lost it
    # (Redis restarted without persistence). Once per window per job; a duplicate message is
    # harmless (the worker's claim is a compare-and-set). A job that waits in a long backlog
    # behind other jobs is re-sent once per window too: raise this where queues are deep.
    redispatch_after_s: float = Field(
        default=900.0, gt=0,
        description="seconds a queued job may wait unclaimed before the reaper re-sends it")
    # A single-process run that shows no sign of progress (no progress report, evaluation,
    # checkpoint or stop poll) for this long is ended with every thread's stack in its log,
    # and re-queued like the job of a dead worker (worker/watchdog.py). 0 turns it off.
    stall_timeout_s: float = Field(
        default=1800.0, ge=0,
        description="seconds without progress before a run is ended and re-queued; 0 = off")
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="minimum seconds between progress writes of a run")
    # Redis redelivers an unacknowledged message after this: it must exceed any run's
    # checkpoint interval (hours for big jobs), or a running job would be handed out twice.
    visibility_timeout_s: int = Field(default=6 * 3600, ge=60)

    # API.
    max_upload_bytes: int = Field(default=2 * GiB, gt=0, description="POST /uploads limit")
    migrate_on_start: bool = Field(
        default=True, description="run Alembic upgrade head when the API starts")
    # Bare local paths in a job spec (``/data/camvid``) name files on whichever worker runs
    # the job: only meaningful on one machine, so refused unless allowed. ``file:///abs``,
    # ``s3://`` and ``upload:<id>`` are always accepted.
    allow_local_paths: bool = False

    # An API key registered at start (``ensure_bootstrap_key``), so a fresh deployment can
    # be used without shell access to the database. Stored hashed like any other key.
    bootstrap_api_key: SecretStr | None = None
    bootstrap_team: str = "default"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                "heartbeat_timeout_s must be at least twice heartbeat_interval_s, or one late "
                "heartbeat would get a live job re-queued")
        if self.env == "prod":
            unsafe = []
            if self.database_url.split(":", 1)[0].split("+", 1)[0] in _EMBEDDED_DB:
                unsafe.append("database_url is SQLite (use postgresql+psycopg://...)")
            if self.broker_url.startswith(_EMBEDDED_BROKERS):
                unsafe.append("broker_url is a single-host transport (use redis://...)")
            if self.storage_url.startswith(_EMBEDDED_STORAGE):
                unsafe.append("storage_url is a local folder (use s3://bucket)")
            if unsafe:
                raise ValueError("PCD_ENV=prod refuses embedded defaults: " + "; ".join(unsafe))
        return self

    @property
    def reaper_interval(self) -> float:
        """Seconds between reaper passes: a dead job waits at most 1.25 timeouts."""
        return self.reaper_interval_s or max(1.0, self.heartbeat_timeout_s / 4)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once.

    Tests build ``Settings(...)`` directly, or call ``get_settings.cache_clear()`` after
    changing the environment.
    """
    return Settings()


__all__ = ["GiB", "Settings", "get_settings"]
