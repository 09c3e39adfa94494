"""The reaper's second duty: re-send the message of a ``queued`` job no worker claimed
(broker down at submission, or a message the broker lost), once per window, never for a job
that a worker owns or that has ended."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kombu import Connection
from worker_helpers import make_settings

from jobs import broker, service
from jobs.models import Job
from worker.reaper import Reaped, reap_once

WINDOW = 900.0  # the default redispatch_after_s


def _never(job_id: str, queue: str) -> None:
    pytest.fail(f"re-dispatched {job_id} on {queue}")


def test_stale_queued_job_is_resent_once_per_window(world, make_spec, tmp_path: Path) -> None:
    assert world.settings.redispatch_after_s == WINDOW
    job_id = world.submit(make_spec(f"file://{tmp_path}", None))  # committed, never sent
    t0 = datetime.now(timezone.utc)
    sent: list[tuple[str, str]] = []

    def record(j: str, q: str) -> None:
        sent.append((j, q))

    assert reap_once(world.settings, now=t0 + timedelta(seconds=WINDOW - 5),
                     enqueue=record) == []  # not before the window
    t1 = t0 + timedelta(seconds=WINDOW + 1)
    assert reap_once(world.settings, now=t1, enqueue=record) == [Reaped(job_id, "redispatched")]
    assert sent == [(job_id, "cpu")]
    # the same window, a second reaper or a later pass: nothing more
    assert reap_once(world.settings, now=t1, enqueue=record) == []
    assert reap_once(world.settings, now=t1 + timedelta(seconds=WINDOW - 5),
                     enqueue=record) == []
    assert sent == [(job_id, "cpu")]
    # still unclaimed a window later: sent once more
    t2 = t1 + timedelta(seconds=WINDOW + 1)
    assert reap_once(world.settings, now=t2, enqueue=record) == [Reaped(job_id, "redispatched")]
    assert sent == [(job_id, "cpu")] * 2
    job = world.job(job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    # once a worker claims it, no more copies
    with world.session() as s:
        assert service.claim_job(s, job_id, "w1")
    quiet = world.settings.model_copy(update={"heartbeat_timeout_s": 1e9})
    assert reap_once(quiet, now=t2 + timedelta(days=1), enqueue=_never) == []


def test_running_and_terminal_jobs_are_never_resent(world, make_spec, tmp_path: Path) -> None:
    spec = make_spec(f"file://{tmp_path}", None)
    ids = {name: world.submit(spec) for name in
           ("running", "cancelling", "succeeded", "failed", "cancelled")}
    with world.session() as s:
        for name in ("running", "cancelling", "succeeded"):
            assert service.claim_job(s, ids[name], "w1")
        service.request_cancel(s, s.get(Job, ids["cancelling"]))
        service.finish_job(s, s.get(Job, ids["succeeded"]), "succeeded")
        service.fail_job(s, s.get(Job, ids["failed"]), "dataset_empty", "no images")
        service.request_cancel(s, s.get(Job, ids["cancelled"]))
    old = datetime.now(timezone.utc) - timedelta(days=2)
    for name, job_id in ids.items():
        world.update(job_id, updated_at=old)
        assert world.job(job_id).status == name
    # live heartbeats (a huge timeout): only the lost-message duty could act, and must not
    quiet = world.settings.model_copy(update={"heartbeat_timeout_s": 1e9})
    assert reap_once(quiet, enqueue=_never) == []
    assert {world.job(j).status for j in ids.values()} == set(ids)


def test_a_job_requeued_by_the_pass_is_dispatched_once(world, make_spec,
                                                       tmp_path: Path) -> None:
    job_id = world.submit(make_spec(f"file://{tmp_path}", None))
    with world.session() as s:
        assert service.claim_job(s, job_id, "dead")
    sent: list[tuple[str, str]] = []
    later = datetime.now(timezone.utc) + timedelta(seconds=WINDOW * 3)
    done = reap_once(world.settings, now=later, enqueue=lambda j, q: sent.append((j, q)))
    assert done == [Reaped(job_id, "requeued")] and sent == [(job_id, "cpu")]


def test_a_failed_resend_is_not_counted_and_is_retried_next_window(
        world, make_spec, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job_id = world.submit(make_spec(f"file://{tmp_path}", None))
    t1 = datetime.now(timezone.utc) + timedelta(seconds=WINDOW + 1)

    def down(j: str, q: str) -> None:
        raise ConnectionError("broker down")

    assert reap_once(world.settings, now=t1, enqueue=down) == []
    assert f"could not re-dispatch queued job {job_id}" in caplog.text
    sent: list[tuple[str, str]] = []
    t2 = t1 + timedelta(seconds=WINDOW + 1)
    assert reap_once(world.settings, now=t2, enqueue=lambda j, q: sent.append((j, q))) == [
        Reaped(job_id, "redispatched")]
    assert sent == [(job_id, "cpu")]
    assert f"job {job_id} re-dispatched on queue cpu" in caplog.text


def test_reaper_message_lands_where_the_api_publishes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper's Celery ``send_task`` and the API's kombu publish: same queue, same task."""
    from kombu.transport import filesystem, virtual

    from api.dispatch import KombuDispatcher
    from worker.reaper import celery_enqueue

    # kombu's filesystem transport remembers queue bindings per *process*, not per folder: a
    # binding made by an earlier test in another broker folder would skip writing this one's.
    monkeypatch.setattr(filesystem.Transport, "global_state", virtual.BrokerState())
    settings = make_settings(tmp_path)
    KombuDispatcher(settings.broker_url, settings.work_dir,
                    settings.visibility_timeout_s).enqueue("first", "cpu")
    celery_enqueue(settings)("again", "cpu")
    url, options = broker.broker_args(settings)
    seen = []
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue(broker.job_queue("cpu"))
        for _ in range(2):
            message = queue.get(timeout=5)
            args, kwargs, _embed = json.loads(message.body)
            seen.append((message.headers["task"], args, kwargs))
            message.ack()
        queue.close()
    assert seen == [(broker.TASK_RUN_JOB, ["first"], {}), (broker.TASK_RUN_JOB, ["again"], {})]
