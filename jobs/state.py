"""The job state machine: the only code that changes ``jobs.status``.

Statuses and the allowed transitions (anything else raises ``InvalidTransition``):

    from \\ to   queued   running   succeeded   failed   cancelling   cancelled
    (new)        create
    queued         -       claim        -          a         -            b
    running        c         -          d          e         f            -
    cancelling     -         -          g          e         -            h
    succeeded, failed, cancelled: terminal, no way out.

    create  ``service.create_job`` records ``None -> queued``.
    claim   ``claim_job``: a worker takes the job (compare-and-set; attempts += 1).
    a       fails before any worker ran it (e.g. the dispatcher refuses it).
    b       cancel of a job no worker has claimed: cancelled at once (no worker to ask).
    c       the reaper re-queues a job whose worker stopped heartbeating (a retry).
    d       the run finished and its artifacts are stored.
    e       the run failed (user error, or infrastructure out of retries).
    f       cancel of a running job: the worker sees it and stops cooperatively.
    g       the run finished before it saw the cancel: its result is kept (work is not
            thrown away; the transition message says so).
    h       the worker stopped on the cancel, or the reaper found it dead while cancelling.

Deviation from DESIGN.md's sketch (``queued -> cancelling -> cancelled``): a queued job goes
straight to ``cancelled``, since no worker would ever pick up a ``cancelling`` job to finish
it. Every transition is a compare-and-set ``UPDATE jobs SET status=:to WHERE id=:id AND
status=:from``: two processes racing on one job (two workers claiming it, a worker finishing
while the API cancels) cannot both win; the loser gets ``False`` (``claim_job``) or
``TransitionConflict``. Each successful transition adds a ``JobTransition`` row (from, to, at,
message). Callers commit; nothing here commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import CursorResult, func, literal, update
from sqlalchemy.orm import Session

from jobs.models import Job, JobTransition, UTCDateTime, utcnow

QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLING: Final = "cancelling"
CANCELLED: Final = "cancelled"

STATUSES: Final[tuple[str, ...]] = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL: Final[frozenset[str]] = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE: Final[frozenset[str]] = frozenset({RUNNING, CANCELLING})  # a worker owns the job

ALLOWED: Final[dict[str, frozenset[str]]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({QUEUED, SUCCEEDED, FAILED, CANCELLING}),
    CANCELLING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(Exception):
    """The state machine does not allow ``from_status -> to_status``."""

    def __init__(self, job_id: str, from_status: str, to_status: str, reason: str = "") -> None:
        self.job_id, self.from_status, self.to_status = job_id, from_status, to_status
        super().__init__(reason or f"job {job_id}: {from_status} -> {to_status} is not allowed")


class TransitionConflict(InvalidTransition):
    """The job left ``from_status`` before our compare-and-set ran (another process won)."""


def is_allowed(from_status: str, to_status: str) -> bool:
    return to_status in ALLOWED.get(from_status, frozenset())


def _timestamps(job_started: datetime | None, to: str, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {"status": to, "updated_at": now}
    if to == RUNNING and job_started is None:
        values["started_at"] = now
    if to in TERMINAL:
        values["finished_at"] = now
    if to == QUEUED:  # back in the queue: no owner, no heartbeat until claimed again
        values.update(worker_id=None, heartbeat_at=None)
    return values


def _compare_and_set(session: Session, job_id: str, from_status: str,
                     values: dict[str, Any]) -> bool:
    stmt = (update(Job).where(Job.id == job_id, Job.status == from_status).values(**values)
            .execution_options(synchronize_session=False))
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def _record(session: Session, job_id: str, from_status: str | None, to: str,
            message: str | None, at: datetime) -> None:
    session.add(JobTransition(job_id=job_id, from_status=from_status, to_status=to, at=at,
                              message=message))


def record_created(session: Session, job: Job, message: str | None = None) -> None:
    """The first transition of a new job (``None -> queued``); used by ``create_job``."""
    _record(session, job.id, None, job.status, message, job.created_at or utcnow())


def transition(session: Session, job: Job, to: str, message: str | None = None,
               **values: Any) -> Job:
    """Move ``job`` to ``to``: validate, compare-and-set, stamp times, record history.

    ``values`` are further columns written in the same UPDATE (e.g. ``error_code``), so a
    failed job never shows ``failed`` without its error. Sets ``started_at`` on the first
    ``running``, ``finished_at`` on a terminal status, and clears ``worker_id`` and
    ``heartbeat_at`` on a re-queue. Raises ``InvalidTransition`` when the table forbids the
    move and ``TransitionConflict`` when another process changed the status first (the job
    is then refreshed so the caller sees the current status). Does not commit.
    """
    if to not in ALLOWED:
        raise InvalidTransition(job.id, job.status, to, f"unknown status {to!r}")
    session.flush()  # a job created in this session must exist before the UPDATE
    from_status = job.status
    if not is_allowed(from_status, to):
        raise InvalidTransition(job.id, from_status, to)
    now = utcnow()
    fields = {**_timestamps(job.started_at, to, now), **values}
    if not _compare_and_set(session, job.id, from_status, fields):
        session.refresh(job)
        raise TransitionConflict(
            job.id, from_status, to,
            f"job {job.id} is now {job.status}, no longer {from_status}: not moved to {to}")
    _record(session, job.id, from_status, to, message, now)
    session.refresh(job)  # the UPDATE bypassed the ORM: read the row back
    return job


def claim_job(session: Session, job_id: str, worker_id: str) -> bool:
    """A worker takes a queued job: ``queued -> running`` as one compare-and-set.

    Returns False (and changes nothing) when the job is not ``queued``: claimed by another
    worker, finished, cancelled, or unknown. This makes the Celery task idempotent: a second
    delivery of the same job id does nothing. On success: ``worker_id`` and ``heartbeat_at``
    set, ``attempts`` incremented, ``started_at`` set on the first claim, a transition
    recorded. The progress shown restarts where this attempt will: ``iteration`` becomes the
    checkpoint's (0 without one) and the lost attempt's speed and ETA are cleared, so a
    re-queued job never shows the dead attempt's iteration and then jumps back. The caller
    commits (``session_scope`` does).
    """
    now = utcnow()
    stmt = (update(Job).where(Job.id == job_id, Job.status == QUEUED)
            .values(status=RUNNING, worker_id=worker_id, heartbeat_at=now, updated_at=now,
                    attempts=Job.attempts + 1, phase=None,
                    iteration=func.coalesce(Job.checkpoint_iteration, 0),
                    images_per_s=None, eta_s=None,
                    started_at=_coalesce_started(now))
            .execution_options(synchronize_session=False))
    result = session.execute(stmt)
    assert isinstance(result, CursorResult)
    if result.rowcount != 1:
        return False
    job = session.get(Job, job_id, populate_existing=True)
    n = job.attempts if job is not None else "?"
    _record(session, job_id, QUEUED, RUNNING, f"attempt {n} on worker {worker_id}", now)
    session.flush()
    return True


def _coalesce_started(now: datetime) -> Any:
    """``started_at`` keeps the first claim's time across re-queues."""
    return func.coalesce(Job.started_at, literal(now, UTCDateTime()))


__all__ = [
    "ACTIVE",
    "ALLOWED",
    "CANCELLED",
    "CANCELLING",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "TERMINAL",
    "InvalidTransition",
    "TransitionConflict",
    "claim_job",
    "is_allowed",
    "record_created",
    "transition",
]
