"""A team never sees another team's jobs: every job route answers 404, never 403."""

from __future__ import annotations

import pytest
from api_factory import Factory, auth
from fastapi.testclient import TestClient

JOB_ROUTES = [
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/metrics"),
    ("GET", "/jobs/{id}/events"),
    ("GET", "/jobs/{id}/logs"),
    ("POST", "/jobs/{id}/cancel"),
    ("GET", "/jobs/{id}/artifacts"),
    ("GET", "/jobs/{id}/artifacts/student.onnx"),
]


@pytest.mark.parametrize(("method", "path"), JOB_ROUTES)
def test_other_teams_job_is_404(client: TestClient, factory: Factory, method: str,
                                path: str) -> None:
    owner, owner_key = factory.team("owner")
    _, intruder_key = factory.team("intruder")
    job_id = factory.job(owner, status="running")
    factory.artifact(job_id, "student.onnx", b"onnx-bytes")
    url = path.format(id=job_id)
    r = client.request(method, url, headers=auth(intruder_key))
    assert r.status_code == 404, (url, r.status_code)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert factory.job_status(job_id) == "running"  # the intruder's cancel changed nothing
    # ... and the owner does reach it
    if method == "GET" and not path.endswith("/events"):
        assert client.request(method, url, headers=auth(owner_key)).status_code == 200


@pytest.mark.parametrize(("method", "path"), [*JOB_ROUTES, ("GET", "/jobs"),
                                              ("POST", "/jobs"), ("POST", "/uploads"),
                                              ("GET", "/uploads/x")])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic dXNlcjpwdw=="])
def test_missing_or_invalid_key_is_401(client: TestClient, factory: Factory, method: str,
                                       path: str, header: str | None) -> None:
    owner, _ = factory.team("owner")
    job_id = factory.job(owner)
    headers = {"Authorization": header} if header else {}
    r = client.request(method, path.format(id=job_id), headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"].startswith("application/problem+json")


def test_list_shows_only_own_team(client: TestClient, factory: Factory) -> None:
    a, key_a = factory.team("a")
    b, _ = factory.team("b")
    mine = factory.job(a)
    factory.job(b)
    items = client.get("/jobs", headers=auth(key_a)).json()["items"]
    assert [j["id"] for j in items] == [mine]


def test_other_teams_upload_is_404(client: TestClient, factory: Factory) -> None:
    _, key_a = factory.team("a")
    _, key_b = factory.team("b")
    up = client.post("/uploads", params={"kind": "checkpoint"}, content=b"abc",
                     headers={**auth(key_a), "Content-Type": "application/octet-stream"})
    assert up.status_code == 201
    assert client.get(f"/uploads/{up.json()['id']}", headers=auth(key_b)).status_code == 404
    assert client.get(f"/uploads/{up.json()['id']}", headers=auth(key_a)).status_code == 200
