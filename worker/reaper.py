"""The reaper: recover jobs whose worker died, and jobs whose broker message was lost,
from the database alone.

Why not rely on the broker: the embedded filesystem transport deletes a message as soon as a
worker reads it, so a SIGKILLed worker's job is gone from the broker for good; Redis would
redeliver only after its visibility timeout (hours, by design for long GPU jobs). The row's
``heartbeat_at`` is the one signal that works everywhere.

A pass does two things:

1. Lost workers. It finds ``running``/``cancelling`` jobs whose heartbeat is older than
   ``heartbeat_timeout_s`` and hands each to ``jobs.service.requeue_or_fail``: a cancelling
   job becomes ``cancelled``; a running one is re-queued (and re-dispatched, resuming from its
   last checkpoint) while ``attempts < max_attempts``, else it fails with ``worker_lost``.
2. Lost messages. It finds ``queued`` jobs not updated for ``redispatch_after_s`` (no worker
   claimed them) and sends their ``pcd.run_job`` message again, on the job's queue, as the
   first dispatch did. That repairs a submission made while the broker was down (the API
   commits the row, answers 201 ``queued`` and logs the failed publish), a message the broker
   lost (Redis restarted without persistence), and a re-dispatch of step 1 that failed. Each
   re-send first stamps ``updated_at`` (``jobs.service.mark_redispatched``, a compare-and-set
   on ``status='queued' AND updated_at < cutoff``) and commits, so a job is re-sent at most
   once per window, whichever of several reapers gets there first.

Why duplicate messages are harmless: the worker's claim is a compare-and-set. The task
(``worker.tasks.run_job``) calls ``worker.runner.execute_job``, whose first step is
``jobs.state.claim_job``: ``UPDATE jobs SET status='running', ... WHERE id=:id AND
status='queued'``, committed before anything else runs; a delivery that does not win it
(job already running elsewhere, finished, cancelled) returns None without touching the row.
So if the original message was merely slow (the job waits in a backlog behind other jobs),
the copy costs a worker one skipped delivery, no second run. A job waiting longer than
``redispatch_after_s`` in a deep backlog does collect one copy per window: raise the setting
where queues are hours deep.

Several reapers may run at once (``pcd serve`` and every worker): every state change and
stamp is a compare-and-set, so only one of them dispatches a given job. Messages are sent
only after the change committed (the worker must find the row as the reaper left it).
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from jobs import db, service
from jobs.broker import DEFAULT_QUEUE
from jobs.settings import Settings, get_settings
from worker.jobrow import sessions_for

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue)


@dataclass(frozen=True)
class Reaped:
    job_id: str
    outcome: str  # "requeued" | "failed" | "cancelled" | "redispatched"


def celery_enqueue(settings: Settings) -> Enqueue:
    """Re-dispatch through the worker's own Celery app (the queue is declared there).

    ``send_task(pcd.run_job, [job_id], queue=q)`` against the queues of ``jobs.broker``
    publishes to exchange ``q`` with routing key ``q``: where the API's first dispatch
    (``api.dispatch.KombuDispatcher``) puts it.
    """
    from worker.celery_app import TASK_RUN_JOB, make_app

    app = make_app(settings)

    def enqueue(job_id: str, queue: str) -> None:
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)

    return enqueue


def _recover_lost_workers(settings: Settings, now: datetime
                          ) -> tuple[list[Reaped], list[tuple[str, str]]]:
    """Step 1, committed: (what happened, (job, queue) to dispatch)."""
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
    done: list[Reaped] = []
    to_dispatch: list[tuple[str, str]] = []
    with db.session_scope(sessions_for(settings)) as session:
        for job in service.find_stale_jobs(session, cutoff):
            last_beat, worker = job.heartbeat_at, job.worker_id  # a re-queue clears both
            # max_attempts is the row's (set at submission, plus one per drain), not settings
            outcome = service.requeue_or_fail(session, job)
            if outcome is None:
                continue  # another reaper (or the worker itself) got there first
            done.append(Reaped(job.id, str(outcome)))
            service.append_log(session, job, f"reaper: {outcome}: no heartbeat from worker "
                               f"{worker} since {last_beat}", level="warning")
            if outcome == "requeued":
                to_dispatch.append((job.id, job.queue or DEFAULT_QUEUE))
    return done, to_dispatch


def _claim_lost_messages(settings: Settings, now: datetime, skip: set[str]
                         ) -> list[tuple[str, str, datetime]]:
    """Step 2, committed: (job, queue, unclaimed since) whose message this reaper re-sends."""
    cutoff = now - timedelta(seconds=settings.redispatch_after_s)
    to_resend: list[tuple[str, str, datetime]] = []
    with db.session_scope(sessions_for(settings)) as session:
        for job in service.find_unclaimed_jobs(session, cutoff):
            if job.id in skip:  # re-queued by step 1 of this very pass: dispatched already
                continue
            since = job.updated_at
            if service.mark_redispatched(session, job.id, cutoff, now):
                to_resend.append((job.id, job.queue or DEFAULT_QUEUE, since))
    return to_resend


def reap_once(settings: Settings, now: datetime | None = None,
              enqueue: Enqueue | None = None) -> list[Reaped]:
    """One pass; returns what it did. Dispatches only after the state change committed.

    Outcomes: ``requeued``/``failed``/``cancelled`` for jobs of lost workers (a ``requeued``
    job is listed even if its dispatch failed: the next window re-sends it), and
    ``redispatched`` for each queued job whose message was sent again (listed only when the
    send succeeded).
    """
    now = now or datetime.now(timezone.utc)
    done, to_dispatch = _recover_lost_workers(settings, now)
    try:
        to_resend = _claim_lost_messages(settings, now, {job_id for job_id, _ in to_dispatch})
    except Exception:  # still dispatch what step 1 re-queued (committed already)
        log.exception("reaper: looking for queued jobs to re-dispatch failed")
        to_resend = []
    for r in done:
        log.warning("reaper: job %s %s (no heartbeat for %ss)", r.job_id, r.outcome,
                    settings.heartbeat_timeout_s)
    if not (to_dispatch or to_resend):
        return done
    enqueue = enqueue or celery_enqueue(settings)
    for job_id, queue in to_dispatch:
        try:
            enqueue(job_id, queue)
        except Exception:  # the row is queued: a pass after redispatch_after_s re-sends it
            log.exception("could not re-dispatch job %s", job_id)
    for job_id, queue, since in to_resend:
        try:
            enqueue(job_id, queue)
        except Exception:  # stamped but not sent: the next window tries again
            log.exception("could not re-dispatch queued job %s", job_id)
            continue
        done.append(Reaped(job_id, "redispatched"))
        log.warning("reaper: job %s re-dispatched on queue %s: queued and unclaimed since %s "
                    "(redispatch_after_s=%ss)", job_id, queue, since, settings.redispatch_after_s)
    return done


def run_forever(settings: Settings, stop: threading.Event, interval_s: float | None = None,
                enqueue: Enqueue | None = None) -> None:
    """Reap every ``interval_s`` until ``stop`` is set; a failing pass is logged, not fatal."""
    interval = interval_s or settings.reaper_interval
    while not stop.is_set():
        try:
            reap_once(settings, enqueue=enqueue)
        except Exception:
            log.exception("reaper pass failed")
        stop.wait(interval)


_thread: threading.Thread | None = None


def start_reaper_thread(settings: Settings) -> threading.Thread:
    """Start one daemon reaper thread per process (idempotent)."""
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=run_forever, args=(settings, threading.Event()),
                                   name="pcd-reaper", daemon=True)
        _thread.start()
    return _thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-queue or fail jobs of dead workers.")
    parser.add_argument("--interval", type=float, default=None, help="seconds between passes")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(message)s")
    settings = get_settings()
    if args.once:
        for r in reap_once(settings):
            print(f"{r.job_id} {r.outcome}")
        return 0
    stop = threading.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_forever(settings, stop, args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
