"""A tiny in-memory stand-in of the service's HTTP API, behind ``httpx.MockTransport``.

The client's unit tests check the client's own behaviour (headers, problem+json errors, SSE
parsing, sha256 verification, streaming uploads) without a server process; the real API is
exercised end to end by ``tests/integration/test_embedded_e2e.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from client.api import PcdClient

KEY = "pcd_test_key"


@dataclass
class FakeService:
    """Routes of DESIGN.md's API surface, just enough for the client."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    idempotency: dict[str, str] = field(default_factory=dict)
    corrupt: bool = False
    requests: list[httpx.Request] = field(default_factory=list)

    def add_job(self, job_id: str, **fields: Any) -> dict[str, Any]:
        job = {"id": job_id, "name": "j", "status": "queued", "phase": None,
               "progress": {"iteration": 0, "max_iterations": 10}, **fields}
        self.jobs[job_id] = job
        return job

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _problem(401, "unauthorized", "missing or invalid API key")
        parts = request.url.path.strip("/").split("/")
        method = request.method
        if parts == ["jobs"] and method == "POST":
            return self._create(request)
        if parts == ["jobs"] and method == "GET":
            items = list(self.jobs.values())
            status = request.url.params.get("status")
            items = [j for j in items if status is None or j["status"] == status]
            return httpx.Response(200, json={"items": items, "next_cursor": None})
        if parts == ["uploads"] and method == "POST":
            body = request.read()
            self.uploads.append({"content_type": request.headers["content-type"], "size":
                                 len(body)})
            return httpx.Response(201, json={"id": "u1", "uri": "upload:u1", "size": len(body)})
        if len(parts) >= 2 and parts[0] == "jobs":
            job = self.jobs.get(parts[1])
            if job is None:
                return _problem(404, "not found", f"job {parts[1]} not found")
            return self._job_route(job, parts[2:], request)
        return _problem(404, "not found")

    def _create(self, request: httpx.Request) -> httpx.Response:
        spec = json.loads(request.content)
        if "student" not in spec:
            return httpx.Response(422, json={"title": "invalid spec", "errors": [
                {"loc": ["body", "student"], "msg": "Field required"}]},
                headers={"content-type": "application/problem+json"})
        key = request.headers.get("idempotency-key")
        if key and key in self.idempotency:
            return httpx.Response(200, json=self.jobs[self.idempotency[key]])
        job = self.add_job(f"job{len(self.jobs) + 1}", name=spec.get("name", "run"))
        if key:
            self.idempotency[key] = job["id"]
        return httpx.Response(201, json=job, headers={"location": f"/jobs/{job['id']}"})

    def _job_route(self, job: dict[str, Any], rest: list[str],
                   request: httpx.Request) -> httpx.Response:
        if not rest:
            return httpx.Response(200, json=job)
        if rest == ["cancel"]:
            job["status"] = "cancelling"
            return httpx.Response(202, json=job)
        if rest == ["logs"]:
            lines = job.get("logs", [])
            offset = int(request.url.params.get("since", 0))
            return httpx.Response(200, json={"lines": lines[offset:], "next_offset": len(lines)})
        if rest == ["metrics"]:
            return httpx.Response(200, json={"items": [{"step": 1, "name": "loss/ce",
                                                        "value": 1.5}]})
        if rest == ["events"]:
            return httpx.Response(200, content=_sse(job.get("events", [])),
                                  headers={"content-type": "text/event-stream"})
        if rest == ["artifacts"]:
            items = [{"name": n, "kind": "model", "size": len(b),
                      "sha256": hashlib.sha256(b).hexdigest()}
                     for (jid, n), b in _blob_items(self.blobs) if jid == job["id"]]
            return httpx.Response(200, json={"items": items})
        if len(rest) == 2 and rest[0] == "artifacts":
            blob = self.blobs.get(f"{job['id']}/{rest[1]}")
            if blob is None:
                return _problem(404, "artifact not found")
            return httpx.Response(200, content=blob + (b"x" if self.corrupt else b""))
        return _problem(404, "not found")


def _blob_items(blobs: dict[str, bytes]) -> Iterator[tuple[tuple[str, str], bytes]]:
    for key, blob in blobs.items():
        jid, _, name = key.partition("/")
        yield (jid, name), blob


def _problem(status: int, title: str, detail: str | None = None) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def _sse(events: list[dict[str, Any]]) -> bytes:
    chunks = [": keep-alive\n\n"]
    for i, ev in enumerate(events):
        chunks.append(f"id: {i}\nevent: {ev.get('event', 'progress')}\n"
                      f"data: {json.dumps(ev['data'])}\n\n")
    return "".join(chunks).encode()


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def make_client(service: FakeService) -> Callable[..., PcdClient]:
    """A factory of clients bound to the fake (optionally through a wrapping handler)."""

    def make(handler: Callable[[httpx.Request], httpx.Response] | None = None,
             key: str = KEY) -> PcdClient:
        return PcdClient("http://pcd.test", key,
                         transport=httpx.MockTransport(handler or service.handler))

    return make


@pytest.fixture
def client(service: FakeService) -> Iterator[PcdClient]:
    with PcdClient("http://pcd.test", KEY, transport=httpx.MockTransport(service.handler)) as c:
        yield c
