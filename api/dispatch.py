"""Enqueue a job for the workers: a Celery task message published with kombu.

Why kombu and not ``celery.Celery.send_task``: the API must not import Celery (the architecture
test forbids it: the API image stays small and never drags in the worker's world), yet the
worker is a Celery app. A Celery task message is a documented wire format (protocol 2: task
name and id in the headers, ``[args, kwargs, embed]`` as the JSON body), so publishing it with
kombu, Celery's own transport library, is exactly what ``send_task`` would put on the wire.

Why a protocol injected as a dependency: the route enqueues only after the job row is
committed (the worker reloads the row by id and must find it), and unit tests substitute a
recording fake instead of running a broker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kombu import Connection, Exchange, Queue

log = logging.getLogger(__name__)

TASK_RUN_JOB = "pcd.run_job"  # the name the worker registers (worker/celery_app.py)


class Dispatcher(Protocol):
    """Hands a committed job to the broker; the database row stays the truth."""

    def enqueue(self, job_id: str, queue: str) -> None: ...

    def check(self) -> None:
        """Raise if the broker is unreachable (used by /readyz)."""
        ...


def filesystem_folder(broker_url: str, work_dir: str | os.PathLike[str]) -> Path:
    """The filesystem transport's folder, resolved as the worker resolves it.

    Mirrors ``worker.celery_app.filesystem_broker_folder`` (which the API may not import):
    ``filesystem://`` alone means ``<work_dir>/broker``; otherwise the URL names the folder.
    """
    rest = broker_url[len("filesystem://"):]
    if rest:
        return Path(rest).expanduser().resolve()
    return (Path(work_dir).expanduser() / "broker").resolve()


def connection_args(broker_url: str, work_dir: str | os.PathLike[str],
                    visibility_timeout_s: int | None = None) -> tuple[str, dict[str, Any]]:
    """(kombu URL, transport options) matching the worker's configuration."""
    options: dict[str, Any] = {}
    if visibility_timeout_s:
        options["visibility_timeout"] = visibility_timeout_s
    if broker_url.startswith("filesystem://"):
        folder = filesystem_folder(broker_url, work_dir)
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(data_folder_in=str(folder / "queue"),
                       data_folder_out=str(folder / "queue"),
                       processed_folder=str(folder / "processed"),
                       control_folder=str(folder / "control"),
                       store_processed=False)
        return "filesystem://", options
    return broker_url, options


def task_message(task: str, args: list[Any], task_id: str | None = None
                 ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(body, headers, properties) of a Celery protocol-2 task message."""
    task_id = task_id or str(uuid.uuid4())
    headers = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": "{}",
        "origin": f"pcd-api@{socket.gethostname()}", "ignore_result": True,
    }
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([args, {}, embed])
    properties = {"correlation_id": task_id, "reply_to": ""}
    return body, headers, properties


class KombuDispatcher:
    """Publishes ``pcd.run_job(job_id)`` to the job's queue (exchange and key = queue name)."""

    def __init__(self, broker_url: str, work_dir: str | os.PathLike[str] = "./var",
                 visibility_timeout_s: int | None = None, connect_timeout_s: float = 3.0
                 ) -> None:
        self.url, self.options = connection_args(broker_url, work_dir, visibility_timeout_s)
        self.connect_timeout_s = connect_timeout_s

    def _connection(self) -> Connection:
        return Connection(self.url, transport_options=self.options,
                          connect_timeout=self.connect_timeout_s)

    def enqueue(self, job_id: str, queue: str) -> None:
        body, headers, properties = task_message(TASK_RUN_JOB, [job_id])
        exchange = Exchange(queue, type="direct")
        declared = Queue(queue, exchange, routing_key=queue)
        with self._connection() as conn:
            producer = conn.Producer(serializer="json")
            # ``declare`` makes the queue exist before the first worker starts, so the message
            # is not dropped by an exchange with no bindings yet.
            producer.publish(body, exchange=exchange, routing_key=queue, declare=[declared],
                             headers=headers, content_type="application/json",
                             content_encoding="utf-8", retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2},
                             **properties)
        log.info("enqueued job %s on queue %s", job_id, queue)

    def check(self) -> None:
        with self._connection() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.connect_timeout_s)
            if urlparse(self.url).scheme == "filesystem":
                folder = Path(self.options["data_folder_out"])
                if not os.access(folder, os.W_OK):
                    raise OSError(f"broker folder {folder} is not writable")


class RecordingDispatcher:
    """A dispatcher that only remembers what it was asked (tests, and ``PCD_DISPATCH=none``)."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = fail

    def enqueue(self, job_id: str, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((job_id, queue))

    def check(self) -> None:
        if self.fail:
            raise ConnectionError("broker down")
