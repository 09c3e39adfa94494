"""Response schemas of the HTTP API: the single definition of every JSON body's shape.

Why separate from the SQLAlchemy models: the row carries internals (key hashes, heartbeats,
Celery ids) that are not part of the contract, and the public shape must not change when a
column is renamed. Request bodies reuse ``jobs.spec.JobSpec`` directly, so a job posted over
HTTP and a CLI run are validated by the same code.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _as_utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; the service stores UTC, so say so on the wire.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Progress(_Public):
    """Where a running job is, as the worker last reported it."""

    phase: str | None = Field(default=None, description="preparing, scoring, training, ...")
    iteration: int = 0
    max_iterations: int | None = None
    images_per_s: float | None = None
    eta_s: float | None = Field(default=None, description="seconds left, estimated")
    losses: dict[str, float | None] = Field(default_factory=dict,
                                          description="latest loss parts")
    heartbeat_at: Timestamp | None = None


class JobError(_Public):
    """Why a job failed: a stable code (see docs/CONTRACTS.md) and a human message."""

    code: str
    message: str | None = None


class Transition(_Public):
    """One status change, as SageMaker records them."""

    from_status: str | None
    to_status: str
    at: Timestamp
    message: str | None = None


class JobSummary(_Public):
    """A job in a list: enough to find it and see how it is doing."""

    id: str
    name: str
    status: JobStatus
    phase: str | None = None
    progress: Progress
    queue: str | None = None
    error: JobError | None = None
    attempts: int = 0
    created_at: Timestamp
    updated_at: Timestamp | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None


class JobPublic(JobSummary):
    """One job in full: progress, latest metrics, error, attempts and its status history."""

    metrics: dict[str, Any] = Field(default_factory=dict, description="latest eval metrics")
    max_attempts: int | None = None
    spec: dict[str, Any]
    spec_hash: str | None = None
    transitions: list[Transition] = Field(default_factory=list)
    links: dict[str, str] = Field(default_factory=dict)


class JobPage(BaseModel):
    """One page of jobs, newest first; pass ``next_cursor`` back to get the next one."""

    items: list[JobSummary]
    next_cursor: str | None = None


class MetricPoint(_Public):
    step: int
    name: str
    value: float
    at: Timestamp | None = None


class MetricSeries(BaseModel):
    """Time series of a job, ordered by step then name."""

    items: list[MetricPoint]


class LogLine(_Public):
    seq: int
    at: Timestamp | None = None
    level: str | None = None
    message: str


class LogPage(BaseModel):
    """Log lines with ``seq >= since``; ask again with ``since=next_offset`` to follow."""

    lines: list[LogLine]
    next_offset: int


class ArtifactPublic(_Public):
    name: str
    kind: str
    size: int
    sha256: str
    created_at: Timestamp | None = None
    url: str = Field(description="download path of this artifact")


class ArtifactList(BaseModel):
    items: list[ArtifactPublic]


class UploadPublic(_Public):
    """An uploaded teacher checkpoint or dataset archive; use ``uri`` in a job spec."""

    id: str
    uri: str = Field(description="upload:<id>")
    kind: Literal["checkpoint", "dataset"]
    filename: str | None = None
    size: int
    sha256: str
    created_at: Timestamp | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class CheckResult(BaseModel):
    ok: bool
    detail: str | None = None
    latency_ms: float | None = None


class Readiness(BaseModel):
    """Per-dependency readiness (200); a failing check answers a 503 problem instead."""

    status: Literal["ready"] = "ready"
    checks: dict[str, CheckResult]
