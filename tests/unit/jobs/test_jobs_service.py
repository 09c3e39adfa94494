"""Submission, idempotency, API keys, pagination, team isolation and what workers write."""

from __future__ import annotations

import pytest
from jobs_helpers import SPEC, make_job, spec
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs import service, state
from jobs.models import ApiKey, Job, Team
from jobs.spec import JobSpec


def test_create_job_is_queued_with_history(session: Session) -> None:
    team = service.create_team(session, "a")
    job, created = service.create_job(session, team, JobSpec.model_validate(SPEC),
                                      max_attempts=5)
    session.commit()
    assert created and job.status == "queued" and job.queue == "gpu" and job.max_attempts == 5
    assert job.spec["student"]["arch"] == "deeplabv3_resnet18"
    assert job.spec_hash == JobSpec.model_validate(SPEC).spec_hash()
    assert [t.to_status for t in service.list_transitions(session, job)] == ["queued"]


def test_idempotency_same_body_same_job_different_body_conflict(session: Session) -> None:
    team = service.create_team(session, "a")
    first, created = service.create_job(session, team, JobSpec.model_validate(SPEC), "key-1")
    session.commit()
    # the same body, with a default spelt out, is the same request
    same = spec(resources={"gpus": 1, "queue": "gpu"})
    again, created_again = service.create_job(session, team, JobSpec.model_validate(same), "key-1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(service.IdempotencyConflict):
        service.create_job(session, team, JobSpec.model_validate(spec(name="other")), "key-1")
    other_team = service.create_team(session, "b")  # keys are per team
    theirs, created_b = service.create_job(session, other_team, JobSpec.model_validate(SPEC),
                                           "key-1")
    assert created_b and theirs.id != first.id
    assert session.scalar(select(Job.id).where(Job.team_id == team.id)) == first.id


def test_idempotency_race_returns_the_winner(sm: sessionmaker[Session],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests with one key both pass the lookup; the loser's insert fails on the
    key's primary key and it answers the winner's job instead of a second one."""
    with sm() as s:
        team_id = service.create_team(s, "a").id
        s.commit()
    with sm() as s1:
        winner, _ = service.create_job(s1, s1.get(Team, team_id), JobSpec.model_validate(SPEC),
                                       "k")
        s1.commit()
    real = service._find_key
    calls: list[int] = []

    def first_lookup_misses(session: Session, tid: str, key: str) -> object:
        calls.append(1)
        return None if len(calls) == 1 else real(session, tid, key)

    monkeypatch.setattr(service, "_find_key", first_lookup_misses)
    with sm() as s2:
        job, created = service.create_job(s2, s2.get(Team, team_id),
                                          JobSpec.model_validate(SPEC), "k")
        assert (created, job.id) == (False, winner.id) and len(calls) == 2
        s2.commit()
        assert len(s2.scalars(select(Job)).all()) == 1


def test_api_key_hashing_and_auth(session: Session) -> None:
    team = service.create_team(session, "a")
    key = service.create_api_key(session, team, name="ci")
    session.commit()
    row = session.scalars(select(ApiKey)).one()
    assert key.startswith("pcd_") and len(key) > 40
    assert key not in (row.key_hash, row.prefix) and row.key_hash == service.hash_key(key)
    assert row.prefix == key[:12]
    assert service.authenticate(session, key) is team
    assert service.authenticate(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert service.authenticate(session, "") is None
    assert service.revoke_api_key(session, key)
    assert service.authenticate(session, key) is None


def test_api_key_for_team_name_creates_the_team(session: Session) -> None:
    key = service.create_api_key(session, "ml-platform")
    team = service.authenticate(session, key)
    assert team is not None and team.name == "ml-platform"
    assert service.authenticate(session, service.create_api_key(session, "ml-platform")) is team


def test_bootstrap_key_is_idempotent(session: Session) -> None:
    from jobs.settings import Settings

    settings = Settings(bootstrap_api_key="pcd_" + "x" * 40, bootstrap_team="ops")
    team = service.ensure_bootstrap_key(session, settings)
    assert team is not None and team.name == "ops"
    assert service.ensure_bootstrap_key(session, settings) is team
    assert service.authenticate(session, "pcd_" + "x" * 40) is team
    assert service.ensure_bootstrap_key(session, Settings()) is None


def test_cursor_pagination_returns_every_job_once_in_order(session: Session) -> None:
    team = service.create_team(session, "a")
    other = service.create_team(session, "b")
    ids = [make_job(session, team).id for _ in range(25)]
    make_job(session, other)
    session.commit()
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = service.list_jobs(session, team, cursor=cursor, limit=10)
        seen += page
        pages += 1
        if cursor is None:
            break
    assert pages == 3 and [len(p) for p in (seen[:10], seen[10:20], seen[20:])] == [10, 10, 5]
    assert sorted(j.id for j in seen) == sorted(ids) and len({j.id for j in seen}) == 25
    keys = [(j.created_at, j.id) for j in seen]
    assert keys == sorted(keys, reverse=True)  # newest first


def test_list_filters_by_status_and_rejects_bad_input(session: Session) -> None:
    team = service.create_team(session, "a")
    jobs = [make_job(session, team) for _ in range(3)]
    service.request_cancel(session, jobs[0])
    cancelled, _ = service.list_jobs(session, team, status="cancelled")
    assert [j.id for j in cancelled] == [jobs[0].id]
    with pytest.raises(ValueError):
        service.list_jobs(session, team, status="paused")
    with pytest.raises(ValueError):
        service.list_jobs(session, team, cursor="not-a-cursor!")


def test_team_isolation(session: Session) -> None:
    a, b = service.create_team(session, "a"), service.create_team(session, "b")
    job = make_job(session, a)
    upload = service.create_upload(session, a, kind="checkpoint", key="uploads/x", size=3,
                                   sha256="0" * 64, filename="t.safetensors")
    assert service.get_job(session, a, job.id) is job
    assert service.get_job(session, b, job.id) is None
    assert service.get_job(session, a, "missing") is None
    assert service.list_jobs(session, b) == ([], None)
    assert service.get_upload(session, a, upload.id) is upload
    assert service.get_upload(session, b, upload.id) is None
    with pytest.raises(ValueError):
        service.create_upload(session, a, kind="weights", key="k", size=1, sha256="0" * 64)


def test_cancel_queued_running_and_finished(session: Session) -> None:
    team = service.create_team(session, "a")
    queued, running, done = (make_job(session, team) for _ in range(3))
    service.request_cancel(session, queued)
    assert queued.status == "cancelled" and queued.finished_at is not None
    assert state.claim_job(session, running.id, "w1")
    session.refresh(running)
    service.request_cancel(session, running)
    assert running.status == "cancelling" and running.cancel_requested
    service.request_cancel(session, running)  # idempotent
    service.finish_job(session, running, "cancelled", message="stopped at 10")
    state.claim_job(session, done.id, "w2")
    session.refresh(done)
    service.finish_job(session, done, "succeeded")
    with pytest.raises(service.InvalidTransition):
        service.request_cancel(session, done)


def test_worker_writes(session: Session) -> None:
    team = service.create_team(session, "a")
    job = make_job(session, team)
    assert not service.record_progress(session, job, iteration=1)  # not running: ignored
    assert state.claim_job(session, job.id, "w1")
    session.refresh(job)
    assert service.record_progress(session, job, phase="training", iteration=10,
                                   max_iterations=20, losses={"ce": 0.5, "pcd": float("nan")},
                                   images_per_s=3.0, eta_s=12.0)
    service.append_metrics(session, job, 10, {"train/loss": 0.5, "bad": float("inf")})
    service.append_metrics(session, job, 20, {"val/miou": 0.4}, latest={"miou": 0.4})
    assert [service.append_log(session, job, m) for m in ("a", "b", "c")] == [0, 1, 2]
    service.record_checkpoint(session, job, uri="file:///o/jobs/x/ckpt.pt", iteration=10)
    service.record_artifact(session, job, name="student.onnx", kind="model",
                            uri="s3://b/jobs/1/a/student.onnx", size=5, sha256="a" * 64,
                            key="jobs/1/a/student.onnx")
    service.record_artifact(session, job, name="student.onnx", kind="model",
                            uri=f"s3://b/jobs/{job.id}/artifacts/student.onnx", size=6,
                            sha256="b" * 64)  # a retry replaces it; key derived from the uri
    session.commit()
    assert job.losses == {"ce": 0.5, "pcd": None} and job.metrics == {"miou": 0.4}
    assert [(p.step, p.name) for p in service.get_metrics(session, job)] == [
        (10, "train/loss"), (20, "val/miou")]
    assert [p.name for p in service.get_metrics(session, job, names=["val/miou"])] == ["val/miou"]
    assert [ln.message for ln in service.get_logs(session, job, since=1)] == ["b", "c"]
    (artifact,) = service.list_artifacts(session, job)
    assert (artifact.size, artifact.key) == (6, f"jobs/{job.id}/artifacts/student.onnx")
    assert service.get_artifact(session, job, "student.onnx") is artifact
    assert service.get_artifact(session, job, "nope") is None
    assert job.checkpoint_iteration == 10


def test_status_counts(session: Session) -> None:
    team = service.create_team(session, "a")
    jobs = [make_job(session, team) for _ in range(3)]
    make_job(session, team, resources={"queue": "cpu"})
    service.request_cancel(session, jobs[0])
    counts = service.status_counts(session)
    assert counts["queued"] == 3 and counts["cancelled"] == 1 and set(counts) == set(state.STATUSES)
    assert service.queued_by_queue(session) == {"gpu": 2, "cpu": 1}
