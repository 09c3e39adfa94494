"""Celery tasks of the worker. A task only calls a plain function (tests call it directly).

``pcd.run_job`` takes the job's primary key and nothing else: the row is the truth and is
reloaded (and claimed) by :func:`worker.runner.execute_job`. A redelivered or duplicated
message is harmless because the claim is a compare-and-set.
"""

from __future__ import annotations

from jobs.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, app


@app.task(name=TASK_RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> str | None:
    """Run one job to a terminal status (see :func:`worker.runner.execute_job`)."""
    from worker.runner import execute_job  # imports torch: only in the process that runs jobs

    return execute_job(job_id, settings=get_settings())
