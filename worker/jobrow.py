"""The runner's view of one job row: every database write a run makes, each in its own
short transaction.

Why short transactions: a run lasts hours, while SQLite (the embedded default) allows one
writer at a time and PostgreSQL should not hold a transaction open that long either. Every
call here opens a session, does one thing through ``jobs.service`` (which owns the state
machine) and commits. Why one adapter class: the heartbeat process (worker/heartbeat.py),
the progress callbacks and the runner all write the same row, and keeping the ``jobs`` calls
in one place keeps the rest of the worker readable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs import db, service
from jobs.models import Job
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_factories: dict[str, sessionmaker[Session]] = {}


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """Sessions on ``settings.database_url``: the process default when it is that database
    (the normal case), else one cached engine per URL (tests and tools pass settings)."""
    if settings.database_url == get_settings().database_url:
        return db.get_sessionmaker()
    with _lock:
        if settings.database_url not in _factories:
            _factories[settings.database_url] = db.make_sessionmaker(
                db.make_engine(settings.database_url))
        return _factories[settings.database_url]


def dispose_sessions() -> None:
    """Forget every engine (after a fork the pooled connections belong to the parent)."""
    with _lock:
        for factory in _factories.values():
            bind = factory.kw.get("bind")
            if bind is not None:
                bind.dispose(close=False)
        _factories.clear()
    db.dispose_engine()


def process_terminating() -> bool:
    """Whether this process is being terminated by its Celery pool.

    Celery terminates a running task's prefork child with SIGTERM (after a broker connection
    loss with ``acks_late``; at a cold shutdown), and billiard's handler in the child raises
    ``SystemExit`` into whatever Python code runs at that moment. Code in the way may turn it
    into an ordinary exception: ``torch.save`` interrupted mid-write raises ``RuntimeError:
    ... unexpected pos`` from its cleanup. That exception says nothing about the job, so a
    terminating process must not record it (see :meth:`JobRow.fail`).
    """
    try:
        from billiard import common
    except ImportError:  # not under Celery's pool
        return False
    fired = getattr(common, "terminate_handler_fired", None)
    if fired is not None:
        return bool(fired())
    flag = getattr(common, "_should_have_exited", None)  # billiard < 4.3
    return bool(flag and flag[0])


@dataclass(frozen=True)
class JobSnapshot:
    """What the runner needs from the row, read once after the claim."""

    job_id: str
    spec: dict[str, Any]
    attempt: int
    checkpoint_uri: str | None
    checkpoint_iteration: int | None
    team_id: str | None


class JobRow:
    """Writes of one job by the worker that claimed it."""

    def __init__(self, job_id: str, worker_id: str, sessions: sessionmaker[Session]) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.sessions = sessions

    def session(self) -> contextlib.AbstractContextManager[Session]:
        """One short transaction (commit on success, rollback on error)."""
        return db.session_scope(self.sessions)

    def _load(self, session: Session) -> Job:
        job = session.get(Job, self.job_id)
        if job is None:
            raise LookupError(f"job {self.job_id} vanished")
        return job

    def snapshot(self) -> JobSnapshot:
        with self.session() as s:
            job = self._load(s)
            return JobSnapshot(
                job_id=job.id, spec=dict(job.spec or {}), attempt=int(job.attempts or 1),
                checkpoint_uri=job.checkpoint_uri,
                checkpoint_iteration=job.checkpoint_iteration, team_id=job.team_id)

    def log(self, level: str, message: str) -> None:
        try:
            with self.session() as s:
                service.append_log(s, self._load(s), message, level=level)
        except Exception:  # logging must never fail a run
            log.exception("could not append a log line to job %s", self.job_id)

    def progress(self, *, phase: str, iteration: int, max_iterations: int | None = None,
                 losses: Mapping[str, float] | None = None, images_per_s: float | None = None,
                 eta_s: float | None = None) -> None:
        with self.session() as s:
            service.record_progress(
                s, self._load(s), phase=phase, iteration=iteration,
                max_iterations=max_iterations, losses=dict(losses) if losses else None,
                images_per_s=images_per_s, eta_s=eta_s)

    def metrics(self, step: int, series: Mapping[str, float],
                latest: Mapping[str, Any] | None = None) -> None:
        with self.session() as s:
            service.append_metrics(s, self._load(s), step, dict(series),
                                   latest=dict(latest) if latest is not None else None)

    def cancel_requested(self) -> bool:
        with self.session() as s:
            job = self._load(s)
            return bool(job.cancel_requested) or job.status == "cancelling"

    def beat(self) -> bool:
        """Refresh ``heartbeat_at``; False when the job is no longer ours (stop the run)."""
        with self.session() as s:
            return bool(service.heartbeat(s, self.job_id, self.worker_id))

    def checkpoint(self, uri: str, iteration: int) -> None:
        with self.session() as s:
            service.record_checkpoint(s, self._load(s), uri=uri, iteration=iteration)

    def artifact(self, *, name: str, kind: str, key: str, uri: str, size: int,
                 sha256: str) -> None:
        with self.session() as s:
            service.record_artifact(s, self._load(s), name=name, kind=kind, uri=uri, size=size,
                                    sha256=sha256, key=key)

    def release(self, reason: str) -> str | None:
        """Hand the job back to the queue (this worker is draining); returns its queue, or
        None when the job is no longer ours to release (lost, or cancelled meanwhile)."""
        with self.session() as s:
            job = self._load(s)
            if not service.release_job(s, job, self.worker_id, reason):
                return None
            return job.queue

    def finish(self, status: str, message: str | None = None) -> None:
        """``succeeded`` or ``cancelled`` through the state machine."""
        if status != "succeeded":
            self._refuse_if_terminating(status)
        with self.session() as s:
            service.finish_job(s, self._load(s), status, message=message)

    def fail(self, code: str, message: str, *, user_error: bool) -> None:
        """``failed`` with a stable code, unless the process is being terminated: then the
        job is left ``running`` for the reaper (re-queued from its stale heartbeat, as after
        a SIGKILL) and ``SystemExit`` continues the termination the failure interrupted."""
        self._refuse_if_terminating(f"failed ({code})")
        with self.session() as s:
            service.fail_job(s, self._load(s), code, message, user_error=user_error)

    def _refuse_if_terminating(self, outcome: str) -> None:
        if not process_terminating():
            return
        note = (f"worker process terminated by its pool (SIGTERM) while the attempt was "
                f"running: not recording it as {outcome}; the job is left to the reaper")
        log.warning("job %s: %s", self.job_id, note)
        self.log("warning", note)
        raise SystemExit(1)
