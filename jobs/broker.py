"""Where job messages go: the task name, the queues and the broker connection, resolved once.

Two processes talk to the broker and must agree on every detail, or messages are published
where no worker looks: the API publishes ``pcd.run_job`` with plain kombu
(``api.dispatch``; the API may not import Celery), the worker consumes (and the reaper
re-publishes) through its Celery app (``worker.celery_app``). Both take the broker URL,
the filesystem transport's folders, the transport options and the queue declarations from
here. This module uses kombu only (Celery's own transport library), never Celery:
``jobs`` must not import it (tests/unit/test_architecture.py).

The embedded filesystem transport needs three folders under one broker folder (``queue``,
``processed``, ``control``); producers and consumers on the host must use the *same*
absolute paths, so they are resolved here, once, and created when resolved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from kombu import Exchange, Queue

from jobs.settings import Settings

TASK_RUN_JOB: Final = "pcd.run_job"  # the one task: its only argument is the job id
QUEUES: Final[tuple[str, ...]] = ("gpu", "cpu")  # == jobs.spec ResourcesSpec.queue
DEFAULT_QUEUE: Final = "gpu"
FILESYSTEM_SCHEME: Final = "filesystem://"
FILESYSTEM_SUBFOLDERS: Final[tuple[str, ...]] = ("queue", "processed", "control")


def filesystem_broker_folder(broker_url: str, work_dir: str | os.PathLike[str]) -> Path:
    """Folder of the filesystem transport: the URL's path, else ``<work_dir>/broker``.

    ``filesystem://`` alone means ``<work_dir>/broker``; ``filesystem:///abs/dir`` or
    ``filesystem://./rel/dir`` name the folder explicitly (relative to the working directory).
    """
    rest = broker_url[len(FILESYSTEM_SCHEME):]
    if rest:
        return Path(rest).expanduser().resolve()
    return (Path(work_dir).expanduser() / "broker").resolve()


def connection_args(broker_url: str, work_dir: str | os.PathLike[str],
                    visibility_timeout_s: int | None = None) -> tuple[str, dict[str, Any]]:
    """(kombu/Celery broker URL, transport options) for ``broker_url``.

    ``visibility_timeout`` is set when given (Redis redelivers an unacknowledged message after
    it). A ``filesystem://`` URL becomes bare ``filesystem://`` plus absolute folder options,
    and its folders are created: in == out, so producers and consumers share one folder on
    this host; the control folder holds exchange bindings (and remote-control fanout) across
    processes, and kombu's default for it is a *relative* ``control``, which would differ per
    working directory.
    """
    options: dict[str, Any] = {}
    if visibility_timeout_s:
        options["visibility_timeout"] = visibility_timeout_s
    if not broker_url.startswith(FILESYSTEM_SCHEME):
        return broker_url, options
    folder = filesystem_broker_folder(broker_url, work_dir)
    for sub in FILESYSTEM_SUBFOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    options.update(
        data_folder_in=str(folder / "queue"),
        data_folder_out=str(folder / "queue"),
        processed_folder=str(folder / "processed"),
        control_folder=str(folder / "control"),
        store_processed=False,
    )
    return FILESYSTEM_SCHEME, options


def broker_args(settings: Settings) -> tuple[str, dict[str, Any]]:
    """``connection_args`` of the deployment: what the API's publisher, the worker's Celery
    app and the reaper all use (``PCD_BROKER_URL``, ``PCD_WORK_DIR``,
    ``PCD_VISIBILITY_TIMEOUT_S``)."""
    return connection_args(settings.broker_url, settings.work_dir, settings.visibility_timeout_s)


def job_queue(name: str) -> Queue:
    """The declaration of queue ``name``: a direct exchange of the same name, routing key too.

    A Celery ``send_task(..., queue=name)`` against ``job_queues()`` and a kombu publish to
    ``job_queue(name)`` put the message in the same place.
    """
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def job_queues() -> list[Queue]:
    """Every queue the workers may consume (``QUEUES``), declared as ``job_queue`` does."""
    return [job_queue(name) for name in QUEUES]


__all__ = [
    "DEFAULT_QUEUE",
    "FILESYSTEM_SCHEME",
    "FILESYSTEM_SUBFOLDERS",
    "QUEUES",
    "TASK_RUN_JOB",
    "broker_args",
    "connection_args",
    "filesystem_broker_folder",
    "job_queue",
    "job_queues",
]
