"""Artifacts (list, streamed download, presigned redirect) and uploads (limit, sha256)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from api_factory import UPLOAD_LIMIT, Factory, auth
from fastapi.testclient import TestClient


def test_artifact_list_and_download_streams_exact_bytes(
        client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="succeeded")
    blob = os.urandom(300_000)  # several chunks
    factory.artifact(job_id, "student.safetensors", blob, kind="weights")
    items = client.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()["items"]
    digest = hashlib.sha256(blob).hexdigest()
    assert [(a["name"], a["kind"], a["size"], a["sha256"]) for a in items] == [
        ("student.safetensors", "weights", len(blob), digest)]
    r = client.get(items[0]["url"], headers=auth(key))
    assert r.status_code == 200 and r.content == blob
    assert r.headers["content-length"] == str(len(blob))
    assert r.headers["x-checksum-sha256"] == digest and r.headers["etag"] == f'"{digest}"'
    cached = client.get(items[0]["url"], headers={**auth(key), "If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304 and cached.content == b""


def test_missing_artifact_is_404(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="succeeded")
    r = client.get(f"/jobs/{job_id}/artifacts/nope.onnx", headers=auth(key))
    assert r.status_code == 404 and r.json()["detail"].startswith("artifact nope.onnx")


def test_presigned_store_redirects(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    job_id = factory.job(team, status="succeeded")
    factory.artifact(job_id, "student.onnx", b"onnx")
    store = client.app.state.store  # type: ignore[attr-defined]
    original = store.presigned_url
    store.presigned_url = lambda key, *a, **k: f"https://s3.example/{key}?sig=1"
    try:
        r = client.get(f"/jobs/{job_id}/artifacts/student.onnx", headers=auth(key),
                       follow_redirects=False)
    finally:
        store.presigned_url = original
    assert r.status_code == 307 and r.headers["location"].startswith("https://s3.example/")


def _upload(client: TestClient, key: str, body: bytes | Iterator[bytes], **params: str):
    return client.post("/uploads", params={"kind": "checkpoint", **params}, content=body,
                       headers={**auth(key), "Content-Type": "application/octet-stream"})


def test_raw_upload_records_size_and_sha256(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    blob = os.urandom(40_000)
    r = _upload(client, key, blob, filename="teacher.safetensors")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["size"] == len(blob) and body["sha256"] == hashlib.sha256(blob).hexdigest()
    assert body["uri"] == f"upload:{body['id']}" and body["kind"] == "checkpoint"
    assert body["filename"] == "teacher.safetensors"
    assert r.headers["location"] == f"/uploads/{body['id']}"
    got = client.get(f"/uploads/{body['id']}", headers=auth(key)).json()
    assert got == body


def test_multipart_upload_like_the_client(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    blob = os.urandom(20_000)
    r = client.post("/uploads", data={"kind": "dataset"}, headers=auth(key),
                    files={"file": ("camvid.tar", blob, "application/octet-stream")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["filename"], body["size"]) == ("dataset", "camvid.tar", len(blob))
    assert body["sha256"] == hashlib.sha256(blob).hexdigest()


def test_upload_over_limit_is_413(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    declared = _upload(client, key, b"x" * (UPLOAD_LIMIT + 1))
    assert declared.status_code == 413
    assert declared.headers["content-type"].startswith("application/problem+json")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for _ in range(UPLOAD_LIMIT // 4096 + 2):
            yield b"y" * 4096

    streamed = _upload(client, key, chunked())
    assert streamed.status_code == 413


def test_upload_needs_a_kind(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    r = client.post("/uploads", content=b"abc", headers={
        **auth(key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "kind"
    r = client.post("/uploads", params={"kind": "weights"}, content=b"abc", headers={
        **auth(key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 422


def test_unknown_upload_is_404(client: TestClient, factory: Factory) -> None:
    _, key = factory.team("a")
    assert client.get("/uploads/nope", headers=auth(key)).status_code == 404
