"""POST/GET /jobs, idempotency, validation (422 names the field), pagination and cancel."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from api_factory import SPEC, Factory, auth
from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"


def test_create_returns_201_location_and_dispatches_after_commit(
        client: TestClient, factory: Factory, dispatcher: Any) -> None:
    _, key = factory.team("a")
    r = client.post("/jobs", json=SPEC, headers=auth(key))
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/jobs/{body['id']}"
    assert body["status"] == "queued" and body["name"] == SPEC["name"]
    assert body["transitions"][0]["to_status"] == "queued"
    assert dispatcher.sent == [(body["id"], "cpu")]
    # the worker reloads by id: the row must already be committed when the message is sent
    assert factory.job_status(body["id"]) == "queued"


def test_idempotency_key_replays_and_conflicts(
        client: TestClient, factory: Factory, dispatcher: Any) -> None:
    _, key = factory.team("a")
    headers = {**auth(key), "Idempotency-Key": "k-1"}
    first = client.post("/jobs", json=SPEC, headers=headers)
    again = client.post("/jobs", json=SPEC, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len(dispatcher.sent) == 1  # a replay never enqueues a second run
    other = copy.deepcopy(SPEC)
    other["train"]["iterations"] = 7
    conflict = client.post("/jobs", json=other, headers=headers)
    assert conflict.status_code == 409
    assert conflict.headers["content-type"].startswith(PROBLEM)
    # keys are per team: another team may use the same key for its own job
    _, key_b = factory.team("b")
    b = client.post("/jobs", json=other, headers={**auth(key_b), "Idempotency-Key": "k-1"})
    assert b.status_code == 201 and b.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda s: s["method"].__setitem__("tau", -1.0), "method.tau"),
    (lambda s: s["student"].__setitem__("arch", "deeplabv3_vgg99"), "student.arch"),
    (lambda s: s["train"].__setitem__("iteratoins", 5), "train.iteratoins"),
    (lambda s: s.pop("student"), "student"),
    (lambda s: s["resources"].__setitem__("gpus", -1), "resources.gpus"),
    (lambda s: s["train"].__setitem__("class_weights", "median"), "train.class_weights"),
])
def test_invalid_spec_is_422_naming_the_field(
        client: TestClient, factory: Factory, mutate: Any, field: str) -> None:
    _, key = factory.team("a")
    spec = copy.deepcopy(SPEC)
    mutate(spec)
    r = client.post("/jobs", json=spec, headers=auth(key))
    assert r.status_code == 422
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == 422 and body["instance"] == "/jobs" and body["type"] and body["title"]
    assert field in [e["field"] for e in body["errors"]], body
    assert field in body["detail"]


def test_malformed_json_is_422_problem(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    r = client.post("/jobs", content=b"{not json", headers={
        **auth(key), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)


def test_get_job_shows_progress_metrics_error_and_transitions(
        client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="running")
    factory.progress(job_id, iteration=50, max_iterations=200, images_per_s=12.5, eta_s=30.0,
                     losses={"ce": 0.7, "pcd": 0.2}, phase="training")
    r = client.get(f"/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "running" and job["phase"] == "training"
    prog = job["progress"]
    assert (prog["iteration"], prog["max_iterations"], prog["eta_s"]) == (50, 200, 30.0)
    assert prog["images_per_s"] == 12.5 and prog["losses"] == {"ce": 0.7, "pcd": 0.2}
    assert [t["to_status"] for t in job["transitions"]] == ["queued", "running"]
    assert job["spec"]["student"]["arch"] == SPEC["student"]["arch"]

    failed = factory.job(team, status="failed", error=("dataset_empty", "no images in train"))
    body = client.get(f"/jobs/{failed}", headers=auth(key)).json()
    assert body["error"] == {"code": "dataset_empty", "message": "no images in train"}


def test_unknown_job_is_404_problem(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    r = client.get("/jobs/does-not-exist", headers=auth(key))
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["instance"] == "/jobs/does-not-exist"


def test_list_paginates_with_keyset_cursor_and_filters_status(
        client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    ids = [factory.job(team) for _ in range(5)]
    running = factory.job(team, status="running")
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = client.get("/jobs", params=params, headers=auth(key))
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor:
            assert 'rel="next"' in r.headers["link"]
        else:
            break
    assert sorted(seen) == sorted([*ids, running]) and len(seen) == len(set(seen))
    assert seen[0] == running  # newest first
    only = client.get("/jobs", params={"status": "running"}, headers=auth(key)).json()
    assert [j["id"] for j in only["items"]] == [running]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1000}, {"status": "bogus"},
                                    {"cursor": "not-a-cursor"}])
def test_list_rejects_bad_query(client: TestClient, factory: Factory,
                                params: dict[str, Any]) -> None:
    _, key = factory.team("a")
    r = client.get("/jobs", params=params, headers=auth(key))
    assert r.status_code == 422
    assert r.json()["errors"][0]["in"] == "query"


def test_cancel_queued_running_and_terminal(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    queued = factory.job(team)
    r = client.post(f"/jobs/{queued}/cancel", headers=auth(key))
    assert r.status_code == 202 and r.json()["status"] in {"cancelling", "cancelled"}
    running = factory.job(team, status="running")
    r = client.post(f"/jobs/{running}/cancel", headers=auth(key))
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    assert r.json()["transitions"][-1]["to_status"] == "cancelling"
    done = factory.job(team, status="succeeded")
    r = client.post(f"/jobs/{done}/cancel", headers=auth(key))
    assert r.status_code == 409 and r.headers["content-type"].startswith(PROBLEM)
    assert factory.job_status(done) == "succeeded"


def test_broker_failure_keeps_the_job_queued(
        client: TestClient, factory: Factory, dispatcher: Any) -> None:
    _, key = factory.team("a")
    dispatcher.fail = True
    r = client.post("/jobs", json=SPEC, headers=auth(key))
    assert r.status_code == 201  # the row is the truth; the reaper re-dispatches it
    assert r.json()["status"] == "queued" and r.headers["Location"] == f"/jobs/{r.json()['id']}"
    assert factory.job_status(r.json()["id"]) == "queued"
    assert dispatcher.sent == []


def test_submission_during_a_broker_outage_is_repaired_by_the_reaper(
        client: TestClient, factory: Factory, dispatcher: Any, settings: Any) -> None:
    """Broker down at POST: 201 ``queued``; once ``redispatch_after_s`` has passed, the
    reaper sends the job's message to the job's queue (with the broker back)."""
    from datetime import datetime, timedelta, timezone

    from worker.reaper import Reaped, reap_once

    _, key = factory.team("a")
    dispatcher.fail = True
    r = client.post("/jobs", json=SPEC, headers=auth(key))
    assert r.status_code == 201 and r.json()["status"] == "queued"
    job_id = r.json()["id"]
    dispatcher.fail = False  # the broker is back
    now = datetime.now(timezone.utc)
    assert reap_once(settings, now=now, enqueue=dispatcher.enqueue) == []
    later = now + timedelta(seconds=settings.redispatch_after_s + 1)
    assert reap_once(settings, now=later, enqueue=dispatcher.enqueue) == [
        Reaped(job_id, "redispatched")]
    assert dispatcher.sent == [(job_id, SPEC["resources"]["queue"])]
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "queued"
