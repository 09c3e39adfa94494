"""The state machine: every disallowed move refused, every allowed one recorded, and the
compare-and-set that keeps two processes from both moving one job."""

from __future__ import annotations

import itertools

import pytest
from jobs_helpers import make_job
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from jobs import service, state
from jobs.models import Job

ALL = state.STATUSES
EXPECTED_ALLOWED = {
    ("queued", "running"), ("queued", "failed"), ("queued", "cancelled"),
    ("running", "queued"), ("running", "succeeded"), ("running", "failed"),
    ("running", "cancelling"),
    ("cancelling", "succeeded"), ("cancelling", "failed"), ("cancelling", "cancelled"),
}


def _job_in(session: Session, status: str) -> Job:
    team = service.create_team(session, f"t-{status}")
    job = make_job(session, team)
    session.execute(update(Job).where(Job.id == job.id).values(status=status))
    session.refresh(job)
    return job


def test_table_is_the_documented_one() -> None:
    allowed = {(a, b) for a, b in itertools.product(ALL, ALL) if state.is_allowed(a, b)}
    assert allowed == EXPECTED_ALLOWED
    assert all(not state.ALLOWED[s] for s in state.TERMINAL)


@pytest.mark.parametrize(("src", "dst"), [
    p for p in itertools.product(ALL, ALL) if p not in EXPECTED_ALLOWED])
def test_disallowed_transition_is_refused(session: Session, src: str, dst: str) -> None:
    job = _job_in(session, src)
    with pytest.raises(state.InvalidTransition):
        state.transition(session, job, dst)
    session.refresh(job)
    assert job.status == src
    assert [t.to_status for t in service.list_transitions(session, job)] == ["queued"]


@pytest.mark.parametrize(("src", "dst"), sorted(EXPECTED_ALLOWED))
def test_allowed_transition_is_recorded(session: Session, src: str, dst: str) -> None:
    job = _job_in(session, src)
    state.transition(session, job, dst, message=f"because {dst}")
    session.commit()
    assert job.status == dst
    last = service.list_transitions(session, job)[-1]
    assert (last.from_status, last.to_status, last.message) == (src, dst, f"because {dst}")
    assert last.at.tzinfo is not None
    assert (job.finished_at is not None) == (dst in state.TERMINAL)


def test_unknown_status_is_refused(session: Session) -> None:
    job = _job_in(session, "queued")
    with pytest.raises(state.InvalidTransition, match="unknown status"):
        state.transition(session, job, "paused")


def test_history_and_timestamps_along_a_run(session: Session) -> None:
    team = service.create_team(session, "a")
    job = make_job(session, team)
    assert state.claim_job(session, job.id, "w1")
    session.refresh(job)
    started = job.started_at
    assert started is not None and job.worker_id == "w1" and job.attempts == 1
    state.transition(session, job, "queued", "worker lost")
    assert job.worker_id is None and job.heartbeat_at is None
    assert state.claim_job(session, job.id, "w2")
    session.refresh(job)
    assert job.started_at == started and job.attempts == 2  # first start is kept
    service.finish_job(session, job, "succeeded")
    session.commit()
    history = [(t.from_status, t.to_status) for t in service.list_transitions(session, job)]
    assert history == [(None, "queued"), ("queued", "running"), ("running", "queued"),
                       ("queued", "running"), ("running", "succeeded")]


def test_a_new_claim_shows_progress_from_its_resume_point(session: Session) -> None:
    """Attempt 2 resumes from the checkpoint: the row must not keep showing the dead
    attempt's iteration, speed and ETA (progress would jump backwards later)."""
    team = service.create_team(session, "a")
    job = make_job(session, team)
    assert state.claim_job(session, job.id, "w1")
    session.refresh(job)
    service.record_progress(session, job, phase="training", iteration=17, images_per_s=3.0,
                            eta_s=40.0)
    service.record_checkpoint(session, job, uri="s3://b/ckpt-10.pt", iteration=10)
    state.transition(session, job, "queued", "worker lost")
    assert state.claim_job(session, job.id, "w2")
    session.refresh(job)
    assert (job.iteration, job.images_per_s, job.eta_s, job.phase) == (10, None, None, None)
    state.transition(session, job, "queued", "worker lost again")
    job.checkpoint_uri, job.checkpoint_iteration = None, None  # e.g. no checkpoint yet
    session.flush()
    assert state.claim_job(session, job.id, "w3")
    session.refresh(job)
    assert job.iteration == 0 and job.attempts == 3


def test_claim_is_compare_and_set(sm: sessionmaker[Session]) -> None:
    with sm() as s:
        team = service.create_team(s, "a")
        job_id = make_job(s, team).id
        s.commit()
    with sm() as s1, sm() as s2:
        assert state.claim_job(s1, job_id, "w1") is True
        s1.commit()
        assert state.claim_job(s2, job_id, "w2") is False  # a second delivery does nothing
        s2.commit()
    with sm() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.worker_id == "w1" and job.attempts == 1
        assert len(service.list_transitions(s, job)) == 2


def test_claim_of_unknown_or_finished_job_is_false(session: Session) -> None:
    assert state.claim_job(session, "nope", "w1") is False
    job = _job_in(session, "succeeded")
    assert state.claim_job(session, job.id, "w1") is False


def test_stale_object_loses_the_race(sm: sessionmaker[Session]) -> None:
    """A process holding an old copy of the row cannot overwrite a newer status."""
    with sm() as s:
        team = service.create_team(s, "a")
        job_id = make_job(s, team).id
        s.commit()
    with sm() as api, sm() as worker:
        seen = api.get(Job, job_id)  # the API read it while queued
        assert seen is not None
        assert state.claim_job(worker, job_id, "w1")
        worker.commit()
        with pytest.raises(state.TransitionConflict):
            state.transition(api, seen, "cancelled")  # queued -> cancelled, but it's running
        assert seen.status == "running"  # refreshed: the caller can decide again
