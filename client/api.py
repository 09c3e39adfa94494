"""A typed, synchronous httpx client for the PCD service's HTTP API.

Why its own module: the CLI, the benchmarks and users' notebooks all talk to the service the
same way (Bearer key, problem+json errors, SSE progress, sha256-checked downloads), and none
of them should reimplement those details. Responses are returned as the JSON the API sends
(``dict``), because the API's pydantic schemas are the single definition of their shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to stream datasets

JSON = dict[str, Any]
JSONList = list[dict[str, Any]]  # an alias: inside PcdClient, ``list`` names the method


class PcdError(Exception):
    """An HTTP error from the service, carrying its problem+json body (RFC 9457)."""

    def __init__(self, status: int, title: str, detail: str | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.body: dict[str, Any] = dict(body or {})
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))

    @classmethod
    def from_response(cls, response: httpx.Response) -> PcdError:
        """Build from any error response, problem+json or not (a proxy may answer HTML)."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {"detail": body}
        title = str(body.get("title") or response.reason_phrase or "error")
        detail = body.get("detail")
        if not isinstance(detail, str) and detail is not None:
            detail = json.dumps(detail)  # FastAPI's 422 lists errors
        if body.get("errors"):
            fields = "; ".join(_format_field_error(e) for e in body["errors"])
            detail = f"{detail} ({fields})" if detail else fields
        return cls(response.status_code, title, detail, body)


def _format_field_error(err: Any) -> str:
    """``{field, message}`` (our API) or ``{loc, msg}`` (plain FastAPI) -> "a.b: message"."""
    if isinstance(err, dict):
        field = err.get("field")
        if field is None:
            field = ".".join(str(p) for p in err.get("loc", []) if p != "body")
        message = err.get("message", err.get("msg", err))
        return f"{field}: {message}" if field else str(message)
    return str(err)


class ChecksumError(Exception):
    """A downloaded artifact's sha256 differs from the one the service recorded."""


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event; ``data`` is decoded JSON when it parses, else the raw text."""

    event: str
    data: Any
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Parse a text/event-stream (WHATWG rules for the fields we use: event, data, id)."""
    event, event_id = "message", None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield SseEvent(event, payload, event_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (artifacts and datasets can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class PcdClient:
    """Client of one PCD service. Use as a context manager, or call :meth:`close`.

    ``transport`` lets tests route requests into an in-process app (``httpx.MockTransport`` or
    an ASGI transport) without a network.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = (base_url or os.environ.get("PCD_API_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("PCD_API_KEY")
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport, follow_redirects=True)

    def __enter__(self) -> PcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response = self._http.request(method, url, **kw)
        if response.status_code >= 400:
            raise PcdError.from_response(response)
        return response

    def _json(self, method: str, url: str, **kw: Any) -> Any:
        return self._request(method, url, **kw).json()

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, spec: Mapping[str, Any], idempotency_key: str | None = None) -> JSON:
        """Create a job (``POST /jobs``). A retried submit with the same key creates one job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/jobs", json=dict(spec), headers=headers)

    def get(self, job_id: str) -> JSON:
        """The job: status, phase, progress, ETA, latest metrics, error."""
        return self._json("GET", f"/jobs/{job_id}")

    def list(self, status: str | None = None, limit: int = 50,
             cursor: str | None = None) -> JSON:
        """One page of the team's jobs: ``{"items": [...], "next_cursor": ...}``."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", "/jobs", params=params)

    def iter_jobs(self, status: str | None = None, page_size: int = 100) -> Iterator[JSON]:
        """Every job across pages, newest first (follows ``next_cursor``)."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, limit=page_size, cursor=cursor)
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> JSON:
        """Request cancellation; the job passes through ``cancelling`` to ``cancelled``."""
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def logs(self, job_id: str, offset: int = 0) -> JSON:
        """Log lines with ``seq >= offset``: ``{"lines": [{seq, at, level, message}],
        "next_offset": n}``; pass ``next_offset`` back to follow."""
        body = self._json("GET", f"/jobs/{job_id}/logs", params={"since": offset})
        if isinstance(body, list):  # tolerate a bare list
            body = {"lines": body, "next_offset": offset + len(body)}
        return body

    def metrics(self, job_id: str) -> JSONList:
        """The time series: ``[{"step", "name", "value"}, ...]``."""
        body = self._json("GET", f"/jobs/{job_id}/metrics")
        items = body.get("items", []) if isinstance(body, dict) else body
        return [dict(point) for point in items]

    def events(self, job_id: str, *, timeout: float | None = None) -> Iterator[SseEvent]:
        """Live progress as server-sent events until the server closes the stream."""
        read_timeout = httpx.Timeout(10.0, read=timeout)
        with self._http.stream("GET", f"/jobs/{job_id}/events", timeout=read_timeout,
                               headers={"Accept": "text/event-stream"}) as response:
            if response.status_code >= 400:
                response.read()
                raise PcdError.from_response(response)
            yield from parse_sse(response.iter_lines())

    def wait(self, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None) -> JSON:
        """Poll until the job is terminal (for scripts that need no progress display)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.get("status") in TERMINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout_s}s")
            time.sleep(poll_s)

    # -- artifacts --------------------------------------------------------------------------
    def artifacts(self, job_id: str) -> JSONList:
        """The job's artifacts: ``[{"name", "kind", "size", "sha256", ...}]``."""
        body = self._json("GET", f"/jobs/{job_id}/artifacts")
        items = body.get("items", []) if isinstance(body, dict) else body
        return [dict(art) for art in items]

    def download(self, job_id: str, name: str, dest: str | Path,
                 sha256: str | None = None) -> Path:
        """Stream one artifact to ``dest`` (a file or a directory) and verify its sha256.

        The expected digest comes from the artifact list when not given, so a truncated or
        corrupted transfer (or a tampered presigned object) is never silently accepted.
        """
        if sha256 is None:
            match = [a for a in self.artifacts(job_id) if a.get("name") == name]
            if not match:
                raise PcdError(404, "artifact not found", f"{name} of job {job_id}")
            sha256 = match[0].get("sha256")
        dest = Path(dest)
        target = dest / name if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                raise PcdError.from_response(response)
            with partial.open("wb") as fh:
                for block in response.iter_bytes(_CHUNK):
                    digest.update(block)
                    fh.write(block)
        if sha256 and digest.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"{name}: sha256 {digest.hexdigest()} != expected {sha256}")
        partial.replace(target)
        return target

    # -- uploads ----------------------------------------------------------------------------
    def upload(self, path: str | Path, kind: str, *, filename: str | None = None) -> JSON:
        """Upload a teacher checkpoint or a dataset archive; returns ``{"id", "uri", ...}``.

        The file is streamed (httpx reads a file object in chunks), so datasets larger than
        memory upload fine. Use the returned ``uri`` (``upload:<id>``) in a job spec.
        """
        path = Path(path)
        with path.open("rb") as fh:
            return self.upload_stream(fh, kind, filename=filename or path.name)

    def upload_stream(self, fh: BinaryIO, kind: str, *, filename: str) -> JSON:
        """Upload from an open binary file (e.g. a tar written on the fly to a temp file)."""
        files = {"file": (filename, fh, "application/octet-stream")}
        return self._json("POST", "/uploads", data={"kind": kind}, files=files,
                          timeout=httpx.Timeout(30.0, write=None, read=600.0))

    def health(self) -> JSON:
        """``GET /readyz``: the database, the broker and storage are reachable."""
        return self._json("GET", "/readyz")
