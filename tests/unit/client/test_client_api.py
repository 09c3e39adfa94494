"""PcdClient against an in-memory API: auth, errors, SSE, checksums, streamed uploads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from client.api import ChecksumError, PcdClient, PcdError, parse_sse


def test_submit_sends_bearer_and_idempotency_key(client: PcdClient, service) -> None:
    spec = {"name": "r18", "student": {"arch": "deeplabv3_resnet18"}}
    first = client.submit(spec, idempotency_key="abc")
    second = client.submit(spec, idempotency_key="abc")
    assert first["id"] == second["id"] and len(service.jobs) == 1
    assert service.requests[0].headers["authorization"] == "Bearer pcd_test_key"
    assert service.requests[0].headers["idempotency-key"] == "abc"


def test_problem_json_becomes_pcd_error_with_field_names(client: PcdClient) -> None:
    with pytest.raises(PcdError) as info:
        client.submit({"name": "no student"})
    assert info.value.status == 422
    assert "student: Field required" in str(info.value)


def test_missing_key_is_401(service) -> None:
    with PcdClient("http://pcd.test", "", transport=httpx.MockTransport(service.handler)) as c, \
            pytest.raises(PcdError) as info:
        c.get("job1")
    assert info.value.status == 401 and info.value.title == "unauthorized"


def test_get_list_cancel_logs_metrics(client: PcdClient, service) -> None:
    service.add_job("job1", status="running", logs=["a", "b", "c"])
    assert client.get("job1")["status"] == "running"
    assert [j["id"] for j in client.iter_jobs()] == ["job1"]
    assert client.list(status="succeeded")["items"] == []
    assert client.cancel("job1")["status"] == "cancelling"
    assert client.logs("job1", offset=1) == {"lines": ["b", "c"], "next_offset": 3}
    assert client.metrics("job1") == [{"step": 1, "name": "loss/ce", "value": 1.5}]
    with pytest.raises(PcdError) as info:
        client.get("nope")
    assert info.value.status == 404


def test_events_parse_sse_stream(client: PcdClient, service) -> None:
    service.add_job("job1", events=[
        {"event": "progress", "data": {"progress": {"iteration": 3}}},
        {"event": "status", "data": {"status": "succeeded"}},
    ])
    events = list(client.events("job1"))
    assert [e.event for e in events] == ["progress", "status"]
    assert events[0].data == {"progress": {"iteration": 3}} and events[1].id == "1"


def test_parse_sse_multiline_data_and_plain_text() -> None:
    lines = ["event: log", "data: line one", "data: line two", "", "data: {\"a\": 1}", ""]
    events = list(parse_sse(iter(lines)))
    assert events[0].event == "log" and events[0].data == "line one\nline two"
    assert events[1].event == "message" and events[1].data == {"a": 1}


def test_download_verifies_sha256(client: PcdClient, service, tmp_path: Path) -> None:
    service.add_job("job1", status="succeeded")
    payload = b"weights" * 1000
    service.blobs["job1/student.safetensors"] = payload
    [art] = client.artifacts("job1")
    assert art["sha256"] == hashlib.sha256(payload).hexdigest()
    path = client.download("job1", "student.safetensors", tmp_path)
    assert path.read_bytes() == payload

    service.corrupt = True
    with pytest.raises(ChecksumError):
        client.download("job1", "student.safetensors", tmp_path / "again.bin")
    assert not (tmp_path / "again.bin").exists()
    assert not list(tmp_path.glob("*.part"))


def test_upload_streams_multipart(client: PcdClient, service, tmp_path: Path) -> None:
    archive = tmp_path / "data.tar"
    archive.write_bytes(b"\0" * 300_000)
    result = client.upload(archive, "dataset")
    assert result["uri"] == "upload:u1"
    assert service.uploads[0]["content_type"].startswith("multipart/form-data")
    assert service.uploads[0]["size"] > 300_000
