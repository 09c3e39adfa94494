"""Recovery from lost workers: re-queue while attempts remain, then fail with worker_lost;
user errors are never retried; heartbeats prove ownership."""

from __future__ import annotations

from datetime import timedelta

from jobs_helpers import make_job
from sqlalchemy.orm import Session

from jobs import service, state
from jobs.models import Job, utcnow


def _running(session: Session, job: Job, worker: str = "w1") -> Job:
    assert state.claim_job(session, job.id, worker)
    session.refresh(job)
    return job


def test_stale_job_is_requeued_then_failed_after_max_attempts(session: Session) -> None:
    team = service.create_team(session, "a")
    job = make_job(session, team, max_attempts=2)
    _running(session, job)
    later = utcnow() + timedelta(seconds=200)
    assert service.find_stale_jobs(session, utcnow() - timedelta(seconds=120)) == []
    assert service.find_stale_jobs(session, later) == [job]
    assert service.requeue_or_fail(session, job) == "requeued"
    assert job.status == "queued" and job.infra_retries == 1 and job.worker_id is None
    _running(session, job, "w2")
    assert job.attempts == 2
    assert service.requeue_or_fail(session, job) == "failed"
    assert (job.status, job.error_code, job.user_error) == ("failed", "worker_lost", False)
    assert service.requeue_or_fail(session, job) is None  # terminal: nothing to do
    assert service.find_stale_jobs(session, later) == []


def test_explicit_max_attempts_overrides_the_row(session: Session) -> None:
    team = service.create_team(session, "a")
    job = _running(session, make_job(session, team, max_attempts=3))
    assert service.requeue_or_fail(session, job, max_attempts=1) == "failed"


def test_cancelling_job_of_a_dead_worker_is_cancelled(session: Session) -> None:
    team = service.create_team(session, "a")
    job = _running(session, make_job(session, team))
    service.request_cancel(session, job)
    assert service.requeue_or_fail(session, job) == "cancelled"
    assert job.status == "cancelled"


def test_user_errors_are_not_retried(session: Session) -> None:
    team = service.create_team(session, "a")
    job = _running(session, make_job(session, team))
    service.fail_job(session, job, "dataset_empty", "no images in train")
    assert (job.status, job.error_code, job.user_error) == ("failed", "dataset_empty", True)
    assert job.attempts == 1 and job.infra_retries == 0
    assert service.find_stale_jobs(session, utcnow() + timedelta(days=1)) == []
    assert service.requeue_or_fail(session, job) is None
    assert state.claim_job(session, job.id, "w2") is False
    other = _running(session, make_job(session, team))
    service.fail_job(session, other, "out_of_memory", "OOM", user_error=True)
    assert other.user_error


def test_heartbeat_requires_ownership(session: Session) -> None:
    team = service.create_team(session, "a")
    job = _running(session, make_job(session, team))
    assert service.heartbeat(session, job.id, "w1")
    assert not service.heartbeat(session, job.id, "w2")
    service.requeue_or_fail(session, job)
    assert not service.heartbeat(session, job.id, "w1")  # re-queued: w1 must stop


def test_requeue_by_a_second_reaper_is_a_no_op(session: Session) -> None:
    team = service.create_team(session, "a")
    job = _running(session, make_job(session, team))
    assert service.requeue_or_fail(session, job) == "requeued"
    assert service.requeue_or_fail(session, job) is None


# --- lost messages: queued jobs no worker claimed ---------------------------------------------


def test_unclaimed_queued_jobs_are_found_after_the_window_only(session: Session) -> None:
    team = service.create_team(session, "a")
    job = make_job(session, team)
    session.commit()
    assert service.find_unclaimed_jobs(session, utcnow() - timedelta(seconds=900)) == []
    assert service.find_unclaimed_jobs(session, utcnow() + timedelta(seconds=1)) == [job]


def test_redispatch_stamp_wins_once_per_window(session: Session) -> None:
    team = service.create_team(session, "a")
    job = make_job(session, team)
    session.commit()
    now = utcnow() + timedelta(seconds=1000)
    cutoff = now - timedelta(seconds=900)
    assert service.mark_redispatched(session, job.id, cutoff, now)
    # a second reaper with the same view of the window loses: updated_at is now ``now``
    assert not service.mark_redispatched(session, job.id, cutoff, now)
    session.commit()
    session.refresh(job)
    assert job.updated_at == now and job.status == "queued"
    assert service.find_unclaimed_jobs(session, cutoff) == []
    later = now + timedelta(seconds=901)
    assert service.find_unclaimed_jobs(session, later - timedelta(seconds=900)) == [job]


def test_running_and_terminal_jobs_are_never_unclaimed(session: Session) -> None:
    team = service.create_team(session, "a")
    running = _running(session, make_job(session, team))
    failed = make_job(session, team)
    service.fail_job(session, failed, "dataset_empty", "no images")
    cancelled = make_job(session, team)
    service.request_cancel(session, cancelled)
    session.commit()
    assert {running.status, failed.status, cancelled.status} == {"running", "failed",
                                                                  "cancelled"}
    far = utcnow() + timedelta(days=30)
    assert service.find_unclaimed_jobs(session, far) == []
    for job in (running, failed, cancelled):
        assert not service.mark_redispatched(session, job.id, far, far)
