"""Rows -> response schemas. The one place that knows both the columns and the public shape.

Why a module of functions rather than ``model_validate(row)``: the public job nests progress
and error objects that are flat columns on the row, and adds links; keeping the mapping here
keeps routes thin and lets a column rename touch one file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from api.schemas import (
    ArtifactPublic,
    JobError,
    JobPublic,
    JobSummary,
    LogLine,
    MetricPoint,
    Progress,
    Transition,
    UploadPublic,
)
from jobs import service
from jobs.models import Artifact, Job, Upload
from jobs.models import LogLine as LogLineRow
from jobs.models import MetricPoint as MetricPointRow


def _progress(job: Job) -> Progress:
    return Progress(
        phase=job.phase,
        iteration=job.iteration or 0,
        max_iterations=job.max_iterations,
        images_per_s=job.images_per_s,
        eta_s=job.eta_s,
        losses=dict(job.losses or {}),
        heartbeat_at=job.heartbeat_at,
    )


def _summary_fields(job: Job) -> dict[str, Any]:
    error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
    return {
        "id": job.id, "name": job.name, "status": job.status, "phase": job.phase,
        "progress": _progress(job), "queue": job.queue, "error": error,
        "attempts": job.attempts or 0, "created_at": job.created_at,
        "updated_at": job.updated_at, "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def job_summary(job: Job) -> JobSummary:
    return JobSummary(**_summary_fields(job))


def job_public(session: Session, job: Job, *, transitions: bool = True) -> JobPublic:
    """The full job; ``transitions=False`` skips the history (SSE events send it each poll)."""
    history = [Transition.model_validate(t) for t in service.list_transitions(session, job)] \
        if transitions else []
    base = f"/jobs/{job.id}"
    return JobPublic(
        **_summary_fields(job),
        metrics=dict(job.metrics or {}),
        max_attempts=job.max_attempts,
        spec=dict(job.spec or {}),
        spec_hash=job.spec_hash,
        transitions=history,
        links={"self": base, "events": f"{base}/events", "metrics": f"{base}/metrics",
               "logs": f"{base}/logs", "artifacts": f"{base}/artifacts",
               "cancel": f"{base}/cancel"},
    )


def metric_points(rows: Iterable[MetricPointRow]) -> list[MetricPoint]:
    return [MetricPoint.model_validate(r) for r in rows]


def log_lines(rows: Iterable[LogLineRow]) -> list[LogLine]:
    return [LogLine.model_validate(r) for r in rows]


def artifact_public(artifact: Artifact) -> ArtifactPublic:
    return ArtifactPublic(
        name=artifact.name, kind=artifact.kind, size=artifact.size, sha256=artifact.sha256,
        created_at=artifact.created_at,
        url=f"/jobs/{artifact.job_id}/artifacts/{artifact.name}",
    )


def upload_public(upload: Upload) -> UploadPublic:
    return UploadPublic.model_validate({
        "id": upload.id, "uri": f"upload:{upload.id}", "kind": upload.kind,
        "filename": upload.filename, "size": upload.size, "sha256": upload.sha256,
        "created_at": upload.created_at,
    })
