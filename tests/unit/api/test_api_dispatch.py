"""The kombu dispatcher puts a Celery protocol-2 ``pcd.run_job`` message on the job's queue."""

from __future__ import annotations

import json
from pathlib import Path

from kombu import Connection, Exchange, Queue

from api.dispatch import TASK_RUN_JOB, KombuDispatcher


def test_filesystem_broker_receives_a_celery_task_message(tmp_path: Path) -> None:
    dispatcher = KombuDispatcher(f"filesystem://{tmp_path / 'broker'}", tmp_path)
    dispatcher.check()
    dispatcher.enqueue("job-123", "cpu")
    queue = Queue("cpu", Exchange("cpu", type="direct"), routing_key="cpu")
    with Connection(dispatcher.url, transport_options=dispatcher.options) as conn:
        message = conn.SimpleQueue(queue).get(timeout=2)
        assert message.headers["task"] == TASK_RUN_JOB
        assert message.headers["id"] == message.properties["correlation_id"]
        args, kwargs, embed = json.loads(message.body)
        assert (args, kwargs) == (["job-123"], {})
        assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}
        message.ack()
    # the worker's folder layout: <broker>/queue, processed, control
    assert (tmp_path / "broker" / "queue").is_dir()
