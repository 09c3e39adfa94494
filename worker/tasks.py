"""Celery tasks of the worker. A task only calls a plain function (tests call it directly).

``pcd.run_job`` takes the job's primary key and nothing else: the row is the truth and is
reloaded (and claimed) by :func:`worker.runner.execute_job`. A redelivered or duplicated
message is harmless because the claim is a compare-and-set.

Duplicates are expected (the reaper re-sends the message of a job left ``queued`` for
``redispatch_after_s``; Redis redelivers after its visibility timeout), so a delivery first
reads the job's status and returns at once, before importing torch, when the job is not
``queued``: with ``worker_max_tasks_per_child=1`` every delivery costs a pool child, and a
skipped one should not also cost a second of CPU and a few hundred MB of imports. The read is
only a shortcut; the claim in ``execute_job`` still decides.
"""

from __future__ import annotations

import logging

from celery.exceptions import Reject
from sqlalchemy import select

from jobs import db, state
from jobs.models import Job
from jobs.settings import Settings, get_settings
from worker.celery_app import TASK_RUN_JOB, app
from worker.drain import draining
from worker.jobrow import sessions_for

log = logging.getLogger(__name__)


def claimable(job_id: str, settings: Settings) -> bool:
    """Whether ``job_id`` is ``queued`` right now (a cheap read; the claim decides)."""
    with db.session_scope(sessions_for(settings)) as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status == state.QUEUED


@app.task(name=TASK_RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> str | None:
    """Run one job to a terminal status (see :func:`worker.runner.execute_job`); None when
    the job is not ``queued`` (running elsewhere, finished, cancelled, unknown)."""
    settings = get_settings()
    if draining(settings):
        # This worker is shutting down and may still take a message (its own re-send of the
        # job it just released, with the solo pool): put it back for another worker.
        log.info("job %s: this worker is draining; returning the message", job_id)
        raise Reject("worker draining", requeue=True)
    if not claimable(job_id, settings):
        log.info("job %s is not queued (a duplicate or late message): skipping", job_id)
        return None
    from worker.runner import execute_job  # imports torch: only in the process that runs jobs

    return execute_job(job_id, settings=settings)
