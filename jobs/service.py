"""The operations on jobs that API routes and worker tasks call (routes stay thin).

Conventions for every function here:
- It takes an open ``Session`` and never commits: the caller owns the transaction (a route
  commits before it enqueues; the worker wraps each call in ``db.session_scope()``).
- Team scoping is explicit: lookups by a team return None for another team's rows, and the
  API answers 404 for both "missing" and "not yours" (existence is not disclosed).
- Status changes go through ``jobs.state`` (re-exported here: ``transition``,
  ``InvalidTransition``, ``STATUSES``).

This module holds submission, reading and cancelling; ``jobs.accounts`` (teams, API keys)
and ``jobs.runs`` (what workers and the reaper write) are re-exported so callers import one
module: ``from jobs import service``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs import state
from jobs.accounts import (
    authenticate,
    create_api_key,
    create_team,
    ensure_bootstrap_key,
    get_team_by_name,
    hash_key,
    revoke_api_key,
)
from jobs.errors import ERROR_CODES, is_user_error
from jobs.models import (
    Artifact,
    IdempotencyKey,
    Job,
    JobTransition,
    LogLine,
    MetricPoint,
    Team,
    Upload,
    new_id,
    utcnow,
)
from jobs.runs import (
    append_log,
    append_metrics,
    fail_job,
    find_stale_jobs,
    find_unclaimed_jobs,
    finish_job,
    heartbeat,
    mark_redispatched,
    record_artifact,
    record_checkpoint,
    record_progress,
    release_job,
    requeue_or_fail,
)
from jobs.settings import get_settings
from jobs.spec import JobSpec
from jobs.state import STATUSES, InvalidTransition, TransitionConflict, claim_job, transition

UPLOAD_KINDS = ("checkpoint", "dataset")
MAX_PAGE = 200


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` reused with a different body (the API answers 409)."""


# --- submission -----------------------------------------------------------------------------


def create_job(session: Session, team: Team, spec: JobSpec, idempotency_key: str | None = None,
               *, max_attempts: int | None = None) -> tuple[Job, bool]:
    """Create a queued job from ``spec``; returns ``(job, created)``.

    With ``idempotency_key``: the same key with the same body (equal canonical JSON, so
    defaults spelt out or left implicit are the same body) returns the first job and
    ``created=False``; a different body raises ``IdempotencyConflict``. Two concurrent
    requests with one key cannot both create: the second insert fails on the key's primary
    key, and then (after rolling back the session's transaction) the first job is returned.
    ``max_attempts`` defaults to ``Settings.max_attempts`` and is kept on the row (settings
    changed later do not apply; a drain adds one: ``release_job``).
    The caller commits, then enqueues ``job.id`` on ``job.queue``.
    """
    team_id = team.id
    request_hash = spec.spec_hash()
    if idempotency_key:
        existing = _find_key(session, team_id, idempotency_key)
        if existing is not None:
            return _replay(session, existing, request_hash), False
    now = utcnow()
    job = Job(id=new_id(), team_id=team_id, name=spec.name, spec=spec.model_dump(mode="json"),
              spec_hash=request_hash, queue=spec.resources.queue, status=state.QUEUED,
              max_attempts=max_attempts or get_settings().max_attempts, attempts=0,
              infra_retries=0, iteration=0, created_at=now, updated_at=now)
    session.add(job)
    session.flush()  # the rows below refer to it (no ORM relationships order the inserts)
    state.record_created(session, job, "submitted")
    if not idempotency_key:
        session.flush()
        return job, True
    session.add(IdempotencyKey(team_id=team_id, key=idempotency_key, request_hash=request_hash,
                               job_id=job.id, created_at=now))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()  # a concurrent request with this key committed first
        existing = _find_key(session, team_id, idempotency_key)
        if existing is None:
            raise
        return _replay(session, existing, request_hash), False
    return job, True


def _find_key(session: Session, team_id: str, key: str) -> IdempotencyKey | None:
    return session.get(IdempotencyKey, (team_id, key))


def _replay(session: Session, record: IdempotencyKey, request_hash: str) -> Job:
    if record.request_hash != request_hash:
        raise IdempotencyConflict(
            f"Idempotency-Key {record.key!r} was used for a different request body "
            f"(job {record.job_id})")
    job = session.get(Job, record.job_id)
    assert job is not None  # the key row cascades with its job
    return job


# --- reading --------------------------------------------------------------------------------


def get_job(session: Session, team: Team, job_id: str) -> Job | None:
    """The team's job, or None (missing, or another team's)."""
    job = session.get(Job, job_id)
    return job if job is not None and job.team_id == team.id else None


def get_job_by_id(session: Session, job_id: str) -> Job | None:
    """Any team's job: for the worker and for re-reads after a team check was done."""
    return session.get(Job, job_id, populate_existing=True)


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of an opaque cursor; ``ValueError`` when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


def list_jobs(session: Session, team: Team, *, status: str | None = None,
              cursor: str | None = None, limit: int = 50) -> tuple[list[Job], str | None]:
    """One page of the team's jobs, newest first; returns ``(jobs, next_cursor)``.

    Keyset pagination on ``(created_at, id)`` descending: a page is stable while jobs are
    being added (no duplicates, no gaps, unlike offsets). ``next_cursor`` is None on the
    last page. ``ValueError`` for an unknown status or a malformed cursor.
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = select(Job).where(Job.team_id == team.id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created,
                              and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(page[-1])


def list_transitions(session: Session, job: Job) -> list[JobTransition]:
    """The job's status history, oldest first."""
    return list(session.scalars(select(JobTransition).where(JobTransition.job_id == job.id)
                                .order_by(JobTransition.id)))


def get_metrics(session: Session, job: Job, *, names: Sequence[str] | None = None,
                since_step: int | None = None, limit: int = 10_000) -> list[MetricPoint]:
    """Metric points ordered by step then name, optionally only ``names`` / ``step >= since``."""
    stmt = select(MetricPoint).where(MetricPoint.job_id == job.id)
    if names:
        stmt = stmt.where(MetricPoint.name.in_(list(names)))
    if since_step is not None:
        stmt = stmt.where(MetricPoint.step >= since_step)
    stmt = stmt.order_by(MetricPoint.step, MetricPoint.name, MetricPoint.id).limit(limit)
    return list(session.scalars(stmt))


def get_logs(session: Session, job: Job, *, since: int = 0,
             limit: int = 1000) -> list[LogLine]:
    """Log entries with ``seq >= since`` in order; follow with ``since = last seq + 1``."""
    return list(session.scalars(select(LogLine).where(LogLine.job_id == job.id,
                                                      LogLine.seq >= since)
                                .order_by(LogLine.seq).limit(limit)))


def list_artifacts(session: Session, job: Job) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job.id)
                                .order_by(Artifact.name)))


def get_artifact(session: Session, job: Job, name: str) -> Artifact | None:
    return session.scalars(select(Artifact).where(Artifact.job_id == job.id,
                                                  Artifact.name == name)).one_or_none()


# --- cancelling -----------------------------------------------------------------------------


def request_cancel(session: Session, job: Job, message: str | None = None) -> Job:
    """Ask for a job to stop. ``queued`` -> ``cancelled`` at once; ``running`` ->
    ``cancelling`` with ``cancel_requested`` set (the worker stops at its next check);
    ``cancelling`` stays (idempotent). A finished job raises ``InvalidTransition``.
    If a worker claims the job while we cancel it, the cancel applies to the running job."""
    for _ in range(3):  # each retry follows a status change by another process
        try:
            if job.status == state.CANCELLING:
                return job
            if job.status == state.QUEUED:
                return transition(session, job, state.CANCELLED,
                                  message or "cancelled before it started",
                                  cancel_requested=True)
            return transition(session, job, state.CANCELLING, message or "cancel requested",
                              cancel_requested=True)
        except TransitionConflict:
            continue  # transition() refreshed the job: decide again on its new status
    raise InvalidTransition(job.id, job.status, state.CANCELLED, "job status keeps changing")


# --- uploads --------------------------------------------------------------------------------


def create_upload(session: Session, team: Team, *, kind: str, key: str, size: int,
                  sha256: str, filename: str | None = None, uri: str | None = None,
                  id: str | None = None) -> Upload:
    """Record an object already written to storage at ``key``; a spec names it
    ``upload:<id>``. ``kind`` is ``checkpoint`` or ``dataset``."""
    if kind not in UPLOAD_KINDS:
        raise ValueError(f"upload kind must be one of {UPLOAD_KINDS}, not {kind!r}")
    upload = Upload(id=id or new_id(), team_id=team.id, kind=kind, filename=filename, key=key,
                    uri=uri, size=int(size), sha256=sha256, created_at=utcnow())
    session.add(upload)
    session.flush()
    return upload


def get_upload(session: Session, team: Team, upload_id: str) -> Upload | None:
    """The team's upload, or None (missing, or another team's)."""
    upload = session.get(Upload, upload_id)
    return upload if upload is not None and upload.team_id == team.id else None


# --- operations -----------------------------------------------------------------------------


def status_counts(session: Session) -> dict[str, int]:
    """Jobs per status, every status present (zeros included): the Prometheus gauge."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = int(n)
    return counts


def queued_by_queue(session: Session) -> dict[str, int]:
    """Queued jobs per Celery queue (``gpu``, ``cpu``): the backlog gauge."""
    stmt = (select(Job.queue, func.count()).where(Job.status == state.QUEUED)
            .group_by(Job.queue))
    counts: dict[str, int] = {"gpu": 0, "cpu": 0}
    for queue, n in session.execute(stmt):
        counts[queue] = int(n)
    return counts


__all__ = [
    "ERROR_CODES",
    "MAX_PAGE",
    "STATUSES",
    "UPLOAD_KINDS",
    "IdempotencyConflict",
    "InvalidTransition",
    "TransitionConflict",
    "append_log",
    "append_metrics",
    "authenticate",
    "claim_job",
    "create_api_key",
    "create_job",
    "create_team",
    "create_upload",
    "decode_cursor",
    "encode_cursor",
    "ensure_bootstrap_key",
    "fail_job",
    "find_stale_jobs",
    "find_unclaimed_jobs",
    "finish_job",
    "get_artifact",
    "get_job",
    "get_job_by_id",
    "get_logs",
    "get_metrics",
    "get_team_by_name",
    "get_upload",
    "hash_key",
    "heartbeat",
    "is_user_error",
    "list_artifacts",
    "list_jobs",
    "list_transitions",
    "mark_redispatched",
    "queued_by_queue",
    "record_artifact",
    "record_checkpoint",
    "record_progress",
    "release_job",
    "request_cancel",
    "requeue_or_fail",
    "revoke_api_key",
    "status_counts",
    "transition",
]
