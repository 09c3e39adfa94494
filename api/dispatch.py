"""Enqueue a job for the workers: a Celery task message published with kombu.

Why kombu and not ``celery.Celery.send_task``: the API must not import Celery (the architecture
test forbids it: the API image stays small and never drags in the worker's world), yet the
worker is a Celery app. A Celery task message is a documented wire format (protocol 2: task
name and id in the headers, ``[args, kwargs, embed]`` as the JSON body), so publishing it with
kombu, Celery's own transport library, is exactly what ``send_task`` would put on the wire.

Why a protocol injected as a dependency: the route enqueues only after the job row is
committed (the worker reloads the row by id and must find it), and unit tests substitute a
recording fake instead of running a broker.

Where the broker is and how queues are declared comes from ``jobs.broker``, which the
worker's Celery app uses too, so both sides resolve the same URL, folders and queues.

When the broker is down at submission (``enqueue`` raises): ``POST /jobs`` has already
committed the row, logs the failure and still answers 201 with ``"status": "queued"``
(``api.routes.jobs._enqueue``). The job is not lost: a job left ``queued`` for longer than
``PCD_REDISPATCH_AFTER_S`` (default 900 s) without a worker claiming it gets its message
sent again by the reaper (``worker.reaper.reap_once``), as does one whose message the broker
dropped. A duplicate is harmless: the worker's claim is a compare-and-set.
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

from kombu import Connection

from jobs import broker
from jobs.broker import TASK_RUN_JOB

log = logging.getLogger(__name__)

__all__ = ["TASK_RUN_JOB", "Dispatcher", "KombuDispatcher", "RecordingDispatcher",
           "connection_args", "filesystem_folder", "task_message"]


class Dispatcher(Protocol):
    """Hands a committed job to the broker; the database row stays the truth."""

    def enqueue(self, job_id: str, queue: str) -> None: ...

    def check(self) -> None:
        """Raise if the broker is unreachable (used by /readyz)."""
        ...


def filesystem_folder(broker_url: str, work_dir: str | os.PathLike[str]) -> Path:
    """The filesystem transport's folder (``jobs.broker.filesystem_broker_folder``, which the
    worker uses too): ``filesystem://`` alone means ``<work_dir>/broker``."""
    return broker.filesystem_broker_folder(broker_url, work_dir)


def connection_args(broker_url: str, work_dir: str | os.PathLike[str],
                    visibility_timeout_s: int | None = None) -> tuple[str, dict[str, Any]]:
    """(kombu URL, transport options) matching the worker's (``jobs.broker.connection_args``)."""
    return broker.connection_args(broker_url, work_dir, visibility_timeout_s)


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
        declared = broker.job_queue(queue)  # as the worker declares it (jobs.broker)
        exchange = declared.exchange
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
