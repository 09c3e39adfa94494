"""The Celery application of the PCD worker, configured from the shared settings.

Why these settings (DESIGN.md, "Celery settings for long GPU tasks"):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job's message is acknowledged only
  when the task returns, so a worker that dies mid-job does not silently swallow it. Recovery
  does **not** rely on that redelivery, though (the filesystem transport deletes a message as
  soon as it is read; Redis redelivers only after its visibility timeout): the reaper works
  from the database heartbeat, and the task is idempotent, so a late redelivery is harmless.
- ``worker_prefetch_multiplier=1``: a GPU worker reserves one job at a time; prefetching a
  second one would park it behind a multi-hour run while another GPU idles.
- ``visibility_timeout``: longer than any checkpoint interval (``settings.visibility_timeout_s``),
  so Redis does not hand a running job to a second worker every hour.
- ``worker_max_tasks_per_child=1`` (prefork pool): each job runs in a fresh child that exits
  afterwards, returning all GPU and host memory (CUDA caches, fragmented allocator, leaked
  dataloader workers) to the system. The fork costs milliseconds against hour-long jobs. The
  parent process never imports torch, so the fork is CUDA-safe. (The ``solo`` pool ignores it.)
- ``worker_cancel_long_running_tasks_on_connection_loss=True``: after a broker connection loss
  the unacknowledged message will be redelivered anyway; cancelling the local copy avoids two
  copies training at once. The job resumes from its last checkpoint via the reaper.
- Queues are declared (``gpu``, ``cpu``) and ``task_create_missing_queues=False``: a typo in a
  queue name fails loudly instead of creating a queue no worker consumes.
- No result backend: the database row is the truth; Celery carries only the job id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery, signals

from jobs import broker
from jobs.broker import DEFAULT_QUEUE, QUEUES, TASK_RUN_JOB
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = ["QUEUES", "TASK_RUN_JOB", "allow_child_processes", "app", "celery_config",
           "filesystem_broker_folder", "make_app"]


def filesystem_broker_folder(broker_url: str, settings: Settings) -> Path:
    """Folder of the filesystem transport (``jobs.broker.filesystem_broker_folder``)."""
    return broker.filesystem_broker_folder(broker_url, settings.work_dir)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a pure function, so tests can inspect it).

    The broker URL, transport options (filesystem folders, visibility timeout) and queue
    declarations come from ``jobs.broker``, which the API's kombu publisher uses too.
    """
    broker_url, transport_options = broker.broker_args(settings)
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "result_backend": None,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
        "task_queues": broker.job_queues(),
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": False,
        "task_routes": {TASK_RUN_JOB: {"queue": DEFAULT_QUEUE}},
        # Jobs last hours: no time limits here; cancellation is the user's lever.
        "task_time_limit": None,
        "task_soft_time_limit": None,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """Build the worker's Celery app (tasks are registered by importing ``worker.tasks``)."""
    settings = settings or get_settings()
    app = Celery("pcd")
    app.conf.update(celery_config(settings))
    app.conf.include = ["worker.tasks"]
    return app


app = make_app()


@signals.worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Each worker also reaps: recovery must not depend on ``pcd serve`` being up."""
    from worker.reaper import start_reaper_thread

    start_reaper_thread(get_settings())


@signals.worker_init.connect
def _not_draining(**_: Any) -> None:
    """A worker that starts is not draining (its pid may be a dead worker's)."""
    from worker.drain import clear_drain

    clear_drain(get_settings())


@signals.worker_shutting_down.connect
def _drain_on_warm_shutdown(how: str | None = None, **_: Any) -> None:
    """SIGTERM (Celery's warm shutdown): running jobs checkpoint and go back to the queue
    instead of holding the shutdown for hours (worker/drain.py). A cold shutdown (SIGQUIT)
    ends them at once; the reaper recovers them from their stale heartbeat."""
    if how == "Warm":
        from worker.drain import request_drain

        request_drain(get_settings())


@signals.worker_process_init.connect
def _fresh_db_in_child(**_: Any) -> None:
    """A forked child must not share the parent's pooled DB connections (SQLite/psycopg)."""
    from worker.jobrow import dispose_sessions

    dispose_sessions()
    allow_child_processes()


@signals.worker_process_init.connect
def _spare_heartbeat_in_child(**_: Any) -> None:
    """The child's job gets a beater that is already running (see worker.heartbeat)."""
    from worker.heartbeat import prestart

    prestart()


def allow_child_processes() -> None:
    """Let a prefork pool child start processes of its own (DataLoader workers, torchrun).

    Celery marks its pool children daemonic, and ``multiprocessing`` refuses children to a
    daemon ("daemonic processes are not allowed to have children"), so a job with
    ``train.num_workers > 0`` would fail at its first batch. The flag exists so that daemons
    are killed with their parent; a job's loader workers are already tied to it (each one
    exits when its parent dies, and ``worker_max_tasks_per_child=1`` retires the child after
    the job). Clearing it in the child only is the usual remedy with Celery's prefork pool.
    """
    import multiprocessing

    proc = multiprocessing.current_process()
    if proc.daemon:
        proc._config["daemon"] = False  # type: ignore[attr-defined]
