"""What a worker (and the reaper) writes about a job it runs (re-exported by ``jobs.service``;
import from there).

Every function takes an open session and does not commit: the worker wraps each call in its
own short ``session_scope()`` (hours-long transactions would block SQLite's single writer).
Status changes go through ``jobs.state``; the rest are plain column writes on the row, made
only while a worker owns the job (status ``running`` or ``cancelling``) so a late write from
a worker that lost the job cannot overwrite a newer attempt's row. The one write on a job
no worker owns is the reaper's re-dispatch stamp (``mark_redispatched``: ``updated_at`` of a
``queued`` job, a compare-and-set).

Non-finite numbers (a diverged loss) are stored as JSON ``null`` in ``losses``/``metrics``
and skipped in the metric series: SQLite and JSON have no NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session

from jobs import state
from jobs.errors import is_user_error
from jobs.models import Artifact, Job, LogLine, MetricPoint, utcnow
from jobs.settings import get_settings

log = logging.getLogger(__name__)

MAX_LOG_CHARS = 100_000  # one entry (a traceback fits); longer messages are truncated
Outcome = Literal["requeued", "failed", "cancelled"]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def record_progress(session: Session, job: Job, *, phase: str | None = None,
                    iteration: int | None = None, max_iterations: int | None = None,
                    losses: Mapping[str, float] | None = None,
                    images_per_s: float | None = None, eta_s: float | None = None) -> bool:
    """Write the given progress fields (None = leave as is). False when the job is not
    active (nothing written)."""
    if job.status not in state.ACTIVE:
        return False
    fields = {"phase": phase, "iteration": iteration, "max_iterations": max_iterations,
              "images_per_s": _finite(images_per_s), "eta_s": _finite(eta_s),
              "losses": _finite(dict(losses)) if losses is not None else None}
    for name, value in fields.items():
        if value is not None:
            setattr(job, name, value)
    session.flush()
    return True


def append_metrics(session: Session, job: Job, step: int, values: Mapping[str, float],
                   *, latest: Mapping[str, Any] | None = None) -> None:
    """Add one point per name at ``step``; ``latest`` (when given) replaces the row's latest
    eval metrics, shown by ``GET /jobs/{id}``. Training series alone leave it unchanged."""
    now = utcnow()
    session.add_all(MetricPoint(job_id=job.id, step=int(step), name=name, value=float(v), at=now)
                    for name, v in values.items() if math.isfinite(float(v)))
    if latest is not None:
        job.metrics = _finite(dict(latest))
    session.flush()


def append_log(session: Session, job: Job | str, message: str, *, level: str = "info") -> int:
    """Append one entry to the job's log; returns its ``seq`` (0, 1, 2, ... per job).

    Appenders of one job (runner, heartbeat process, reaper) are serialised by writing the
    job row first: it takes the row lock (PostgreSQL) or the database lock (SQLite) until
    commit, so ``max(seq) + 1`` cannot be computed twice.
    """
    job_id = job if isinstance(job, str) else job.id
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow())
                    .execution_options(synchronize_session=False))
    last = session.scalar(select(func.max(LogLine.seq)).where(LogLine.job_id == job_id))
    seq = 0 if last is None else last + 1
    if len(message) > MAX_LOG_CHARS:
        message = message[:MAX_LOG_CHARS] + f"... [{len(message) - MAX_LOG_CHARS} chars cut]"
    session.add(LogLine(job_id=job_id, seq=seq, at=utcnow(), level=level, message=message))
    session.flush()
    return seq


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Refresh ``heartbeat_at`` if ``worker_id`` still owns the active job. False means the
    job was re-queued, cancelled or finished without this worker: it must stop the run."""
    stmt = (update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                              Job.status.in_(state.ACTIVE))
            .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def record_checkpoint(session: Session, job: Job, *, uri: str, iteration: int) -> None:
    """The latest resumable checkpoint in object storage; a re-queued attempt resumes there."""
    job.checkpoint_uri, job.checkpoint_iteration = uri, int(iteration)
    session.flush()


def _key_from_uri(job: Job, uri: str) -> str:
    base = get_settings().storage_url.rstrip("/") + "/"
    if uri.startswith(base):
        return uri[len(base):]
    marker = f"jobs/{job.id}/"
    return uri[uri.index(marker):] if marker in uri else uri


def record_artifact(session: Session, job: Job, *, name: str, kind: str, uri: str, size: int,
                    sha256: str, key: str | None = None) -> Artifact:
    """Record (or, for a re-run attempt, replace) the artifact ``name`` of ``job``.

    ``key`` is the object's key in the service store (what downloads use); pass it. When
    omitted it is derived from ``uri`` (relative to ``storage_url``, else from ``jobs/<id>/``).
    """
    row = session.scalars(select(Artifact).where(Artifact.job_id == job.id,
                                                 Artifact.name == name)).one_or_none()
    if row is None:
        row = Artifact(job_id=job.id, name=name)
        session.add(row)
    row.kind, row.uri, row.size, row.sha256 = kind, uri, int(size), sha256
    row.key = key or _key_from_uri(job, uri)
    row.created_at = utcnow()
    session.flush()
    return row


def finish_job(session: Session, job: Job, status: str, *, message: str | None = None) -> Job:
    """End a run: ``succeeded`` (artifacts stored) or ``cancelled`` (stopped on request)."""
    if status not in (state.SUCCEEDED, state.CANCELLED):
        raise ValueError(f"finish_job ends a job as succeeded or cancelled, not {status!r}")
    if status == state.SUCCEEDED and job.status == state.CANCELLING and message is None:
        message = "finished before the cancel took effect: the result is kept"
    extra: dict[str, Any] = {"eta_s": 0.0} if status == state.SUCCEEDED else {}
    return state.transition(session, job, status, message, **extra)


def fail_job(session: Session, job: Job, code: str, message: str, *,
             user_error: bool = False) -> Job:
    """Fail the job with a stable ``code`` (``jobs.errors``) and a human ``message``.

    ``user_error`` (also implied by a ``spec_``/``teacher_``/``dataset_`` code) marks the
    failure as caused by the inputs; such jobs are never retried.
    """
    user = user_error or is_user_error(code)
    return state.transition(session, job, state.FAILED, f"{code}: {message}",
                            error_code=code, error_message=message, user_error=user)


def find_stale_jobs(session: Session, cutoff: datetime) -> list[Job]:
    """Active jobs whose worker has not heartbeated since ``cutoff`` (now - timeout)."""
    stale = or_(Job.heartbeat_at < cutoff,
                Job.heartbeat_at.is_(None) & (Job.updated_at < cutoff))
    stmt = (select(Job).where(Job.status.in_(state.ACTIVE), stale)
            .order_by(Job.heartbeat_at, Job.id))
    return list(session.scalars(stmt))


def find_unclaimed_jobs(session: Session, cutoff: datetime) -> list[Job]:
    """``queued`` jobs not updated since ``cutoff`` (now - ``redispatch_after_s``): candidates
    for a re-dispatch, oldest first. Their broker message may never have been published
    (broker down at submission) or may have been lost; or they simply wait in a backlog."""
    stmt = (select(Job).where(Job.status == state.QUEUED, Job.updated_at < cutoff)
            .order_by(Job.updated_at, Job.id))
    return list(session.scalars(stmt))


def mark_redispatched(session: Session, job_id: str, cutoff: datetime, now: datetime) -> bool:
    """Take the right to re-send ``job_id``'s message for this window: set ``updated_at`` to
    ``now`` if the job is still ``queued`` and not updated since ``cutoff``.

    A compare-and-set, so of several reapers (``pcd serve`` and every worker) one wins per
    window, and a job claimed meanwhile (``running``) is left alone. Returns True when this
    caller won: it sends the message after commit. A job re-sent is not re-sent again before
    another ``redispatch_after_s``. Does not commit.
    """
    stmt = (update(Job).where(Job.id == job_id, Job.status == state.QUEUED,
                              Job.updated_at < cutoff)
            .values(updated_at=now).execution_options(synchronize_session=False))
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def requeue_or_fail(session: Session, job: Job, *, max_attempts: int | None = None,
                    reason: str | None = None) -> Outcome | None:
    """Recover a job whose worker is gone (called by the reaper on ``find_stale_jobs``).

    - ``cancelling`` -> ``cancelled``: the user wanted it stopped, and it is.
    - ``running`` with ``attempts < max_attempts`` -> ``queued`` (``infra_retries`` + 1); the
      caller re-dispatches it after commit and the next attempt resumes from the checkpoint.
    - ``running`` with no attempts left -> ``failed`` with ``worker_lost``.

    ``max_attempts`` defaults to the row's (set at submission, plus one per drain). Returns
    what happened, or None when the job had already moved (another reaper, or the worker
    itself, was first).
    User errors never reach here: they fail the job directly and are not retried.
    """
    why = reason or f"no heartbeat from worker {job.worker_id} since {job.heartbeat_at}"
    limit = max_attempts if max_attempts is not None else job.max_attempts
    try:
        if job.status == state.CANCELLING:
            state.transition(session, job, state.CANCELLED, f"worker lost while cancelling: {why}")
            return "cancelled"
        if job.status != state.RUNNING:
            return None
        if job.attempts < limit:
            state.transition(session, job, state.QUEUED,
                             f"re-queued (attempt {job.attempts} of {limit} lost): {why}",
                             infra_retries=job.infra_retries + 1, phase=None)
            return "requeued"
        message = f"worker lost on each of {job.attempts} attempts; last: {why}"
        state.transition(session, job, state.FAILED, f"worker_lost: {message}",
                         error_code="worker_lost", error_message=message, user_error=False)
        return "failed"
    except state.InvalidTransition:
        return None


def release_job(session: Session, job: Job, worker_id: str, reason: str) -> bool:
    """Hand a job back to the queue because its worker is shutting down (a drain), not
    because it failed: ``running -> queued``, and ``max_attempts`` one higher, so that drains
    (rolling upgrades, preemptions) never use up the retries meant for lost workers.

    Only the owner may release: False (nothing changed) when ``worker_id`` no longer holds
    the job or it is not ``running`` (a cancel that arrived meanwhile wins). The caller
    re-dispatches after commit; the next attempt resumes from the row's checkpoint.
    """
    if job.status != state.RUNNING or job.worker_id != worker_id:
        return False
    try:
        state.transition(session, job, state.QUEUED, f"released: {reason}",
                         max_attempts=job.max_attempts + 1, phase=None)
    except state.InvalidTransition:
        return False
    return True


__all__ = [
    "append_log",
    "append_metrics",
    "fail_job",
    "find_stale_jobs",
    "find_unclaimed_jobs",
    "finish_job",
    "heartbeat",
    "mark_redispatched",
    "record_artifact",
    "record_checkpoint",
    "record_progress",
    "release_job",
    "requeue_or_fail",
]
