"""The reaper: recover jobs whose worker died, from the database heartbeat alone.

Why not rely on the broker: the embedded filesystem transport deletes a message as soon as a
worker reads it, so a SIGKILLed worker's job is gone from the broker for good; Redis would
redeliver only after its visibility timeout (hours, by design for long GPU jobs). The row's
``heartbeat_at`` is the one signal that works everywhere.

A pass finds ``running``/``cancelling`` jobs whose heartbeat is older than
``heartbeat_timeout_s`` and hands each to ``jobs.service.requeue_or_fail``: a cancelling job
becomes ``cancelled``; a running one is re-queued (and re-dispatched, resuming from its last
checkpoint) while ``attempts < max_attempts``, else it fails with ``worker_lost``. Several
reapers may run at once (``pcd serve`` and every worker): the state change is a
compare-and-set, so only one of them re-dispatches a given job.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from jobs import db, service
from jobs.settings import Settings, get_settings
from worker.jobrow import sessions_for

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, queue)


@dataclass(frozen=True)
class Reaped:
    job_id: str
    outcome: str  # "requeued" | "failed" | "cancelled"


def celery_enqueue(settings: Settings) -> Enqueue:
    """Re-dispatch through the worker's own Celery app (the queue is declared there)."""
    from worker.celery_app import TASK_RUN_JOB, make_app

    app = make_app(settings)

    def enqueue(job_id: str, queue: str) -> None:
        app.send_task(TASK_RUN_JOB, args=[job_id], queue=queue)

    return enqueue


def reap_once(settings: Settings, now: datetime | None = None,
              enqueue: Enqueue | None = None) -> list[Reaped]:
    """One pass; returns what it did. Dispatches only after the state change committed."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
    done: list[Reaped] = []
    to_dispatch: list[tuple[str, str]] = []
    with db.session_scope(sessions_for(settings)) as session:
        for job in service.find_stale_jobs(session, cutoff):
            last_beat, worker = job.heartbeat_at, job.worker_id  # a re-queue clears both
            # max_attempts is the row's, fixed at submission (settings may have changed since)
            outcome = service.requeue_or_fail(session, job)
            if outcome is None:
                continue  # another reaper (or the worker itself) got there first
            done.append(Reaped(job.id, str(outcome)))
            service.append_log(session, job, f"reaper: {outcome}: no heartbeat from worker "
                               f"{worker} since {last_beat}", level="warning")
            if outcome == "requeued":
                to_dispatch.append((job.id, job.queue or "gpu"))
    if to_dispatch:
        enqueue = enqueue or celery_enqueue(settings)
        for job_id, queue in to_dispatch:
            try:
                enqueue(job_id, queue)
            except Exception:  # the row is queued; the next serve/API dispatch can retry
                log.exception("could not re-dispatch job %s", job_id)
    for r in done:
        log.warning("reaper: job %s %s (no heartbeat for %ss)", r.job_id, r.outcome,
                    settings.heartbeat_timeout_s)
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
