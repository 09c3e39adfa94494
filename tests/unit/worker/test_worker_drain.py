"""A draining worker (worker/drain.py) hands its job back at a fresh checkpoint, and the next
attempt resumes exactly there; runs through the real runner on a SQLite row and a file
store. The re-sent message is recorded here, not published: kombu's virtual transports keep
their exchange bindings in process-wide state, so a publish to one test's filesystem broker
would break the next test's broker in this process. The production story
(tests/integration/test_production.py) sends it through Redis."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from jobs import service
from jobs.models import Job
from worker import reaper
from worker.drain import DrainRequested, clear_drain, marker, request_drain
from worker.reaper import reap_once
from worker.runner import execute_job


def _drain_when(world, job_id: str, iteration: int) -> threading.Thread:
    """Mark this process's worker draining once the row shows ``iteration``."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while (world.job(job_id).iteration or 0) < iteration and time.monotonic() < deadline:
            time.sleep(0.05)
        request_drain(world.settings)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_marker_is_seen_and_cleared(world) -> None:
    flag = DrainRequested(world.settings, min_interval_s=0.0)
    assert not flag.is_set()
    request_drain(world.settings)
    assert marker(world.settings, os.getpid()).exists()
    assert flag.is_set()
    clear_drain(world.settings)
    assert DrainRequested(world.settings, min_interval_s=0.0).is_set() is False


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The messages the runner re-sends, as (job, queue)."""
    messages: list[tuple[str, str]] = []
    monkeypatch.setattr(reaper, "celery_enqueue",
                        lambda settings: lambda job_id, queue: messages.append((job_id, queue)))
    return messages


@pytest.mark.parametrize("gpus", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_draining_worker_releases_the_job_and_the_next_attempt_resumes_there(
        world, dataset_dir, make_spec, sent, monkeypatch: pytest.MonkeyPatch,
        gpus: int) -> None:
    """gpus=2 is the real torchrun with two CPU ranks on Gloo: the drain reaches the ranks
    through the stop file, and rank 0's checkpoint is relayed and uploaded before the
    supervisor hands the job back."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    queue = "gpu" if gpus else "cpu"
    spec = make_spec(f"file://{dataset_dir}", None, iterations=120, checkpoint_every=120)
    spec["resources"] = {"gpus": gpus, "queue": queue}
    job_id = world.submit(spec)
    watcher = _drain_when(world, job_id, 5)
    try:
        assert execute_job(job_id, settings=world.settings, worker_id="draining") == "released"
    finally:
        watcher.join(timeout=5)
        clear_drain(world.settings)
    job = world.job(job_id)
    logs = world.logs(job_id)
    assert job.status == "queued" and job.worker_id is None, logs
    assert job.max_attempts == world.settings.max_attempts + 1  # the drain is not charged
    released_at = job.checkpoint_iteration
    assert released_at is not None and 5 <= released_at < 120, logs
    assert f"released at iteration {released_at}" in logs
    assert sent == [(job_id, queue)] and "could not be re-sent" not in logs

    assert execute_job(job_id, settings=world.settings, worker_id="w2") == "succeeded"
    job = world.job(job_id)
    assert job.attempts == 2 and job.infra_retries == 0
    assert f"resuming from checkpoint at iteration {released_at}" in world.logs(job_id)


def test_a_message_that_cannot_be_sent_leaves_the_job_queued_for_the_reaper(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    def broker_down(settings: object) -> object:
        def enqueue(job_id: str, queue: str) -> None:
            raise ConnectionError("broker down")
        return enqueue

    monkeypatch.setattr(reaper, "celery_enqueue", broker_down)
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=120,
                                    checkpoint_every=120))
    request_drain(world.settings)  # draining before the run starts: it stops at once
    try:
        assert execute_job(job_id, settings=world.settings, worker_id="w1") == "released"
    finally:
        clear_drain(world.settings)
    logs = world.logs(job_id)
    assert world.job(job_id).status == "queued", logs
    assert "could not be re-sent (ConnectionError: broker down)" in logs
    # the reaper's lost-message pass picks it up once it has waited redispatch_after_s
    later = datetime.now(timezone.utc) + timedelta(seconds=world.settings.redispatch_after_s + 1)
    resent: list[tuple[str, str]] = []
    outcomes = reap_once(world.settings, now=later, enqueue=lambda j, q: resent.append((j, q)))
    assert [r.outcome for r in outcomes] == ["redispatched"] and resent == [(job_id, "cpu")]


def test_a_cancel_wins_over_a_drain(world, dataset_dir, make_spec, sent) -> None:
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=120,
                                    checkpoint_every=120))

    def cancel_then_drain() -> None:
        deadline = time.monotonic() + 120
        while (world.job(job_id).iteration or 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        with world.session() as s:
            service.request_cancel(s, s.get(Job, job_id))
        request_drain(world.settings)

    thread = threading.Thread(target=cancel_then_drain, daemon=True)
    thread.start()
    try:
        assert execute_job(job_id, settings=world.settings, worker_id="w1") == "cancelled"
    finally:
        thread.join(timeout=5)
        clear_drain(world.settings)
    assert world.job(job_id).status == "cancelled"
