"""The database schema (SQLAlchemy 2, typed ``Mapped`` columns).

The schema is created and changed only by Alembic (``migrations/``); the application never
calls ``create_all``. A unit test checks that the migrations produce exactly these models.

Conventions:
- Ids are 32-char hex uuid4 strings (opaque to clients; no ordering meaning).
- Every timestamp is timezone-aware UTC (``UTCDateTime``), whatever the backend stores.
- The job row is the truth about a job (DESIGN.md): Celery carries only its id. Status
  changes go through ``jobs.state`` only; the other columns through ``jobs.service``.
- A run's log is rows of ``log_lines`` (job_id, seq): cheap to append, and ``GET /logs``
  follows it with ``seq >= since`` without touching object storage.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite drops the zone on storage, so values are
    converted to UTC before binding and read back with ``tzinfo=UTC`` attached."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)  # naive values are taken as UTC
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# Named constraints: Alembic (and SQLite batch mode) can only alter what has a name.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Team(Base):
    """A tenant: API keys, jobs and uploads belong to exactly one team."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A team's API key. Only its sha256 is stored (keys are 256-bit random, so a fast hash
    is enough); ``prefix`` (the first 12 characters) finds the row and identifies the key in
    listings without revealing it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Job(Base):
    """One distillation job: its spec, status, progress and outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),  # list_jobs keyset
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),  # reaper, counts
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(32), default="gpu")

    # Lifecycle (jobs.state owns status/started_at/finished_at/worker_id).
    status: Mapped[str] = mapped_column(String(16), default="queued")
    phase: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    user_error: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far
    # set at submission; each drain (jobs.runs.release_job) adds one, never a failure
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    infra_retries: Mapped[int] = mapped_column(Integer, default=0)  # re-queues by the reaper
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]  # first claim
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]

    # Progress, as the worker last reported it.
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    max_iterations: Mapped[int | None] = mapped_column(Integer)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    losses: Mapped[dict[str, Any] | None] = mapped_column("latest_losses", JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column("latest_metrics", JSON)
    checkpoint_uri: Mapped[str | None] = mapped_column(String(1024))
    checkpoint_iteration: Mapped[int | None] = mapped_column(Integer)


class JobTransition(Base):
    """One status change (from, to, at, message), as SageMaker records them."""

    __tablename__ = "job_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    message: Mapped[str | None] = mapped_column(Text)


class MetricPoint(Base):
    """One point of a time series: (step, name, value), e.g. (2000, "val/miou", 0.61)."""

    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_job_step", "job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class LogLine(Base):
    """One entry of a run's log; ``seq`` counts from 0 per job (a traceback is one entry)."""

    __tablename__ = "log_lines"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    """A file a job produced. ``key`` is its key in the service's object store (what the API
    streams or presigns); ``uri`` the store's full URI of it."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(1024))
    uri: Mapped[str | None] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Upload(Base):
    """A teacher checkpoint or dataset archive posted to ``POST /uploads``; a spec names it
    ``upload:<id>``, resolvable only by jobs of the same team."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "checkpoint" | "dataset"
    filename: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))
    uri: Mapped[str | None] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` a team used, the hash of the body it came with, and the job it
    created. The primary key (team_id, key) makes a concurrent duplicate fail to insert."""

    __tablename__ = "idempotency_keys"

    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


__all__ = [
    "ApiKey",
    "Artifact",
    "Base",
    "IdempotencyKey",
    "Job",
    "JobTransition",
    "LogLine",
    "MetricPoint",
    "Team",
    "UTCDateTime",
    "Upload",
    "new_id",
    "utcnow",
]
