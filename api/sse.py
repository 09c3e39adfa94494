"""Server-sent events: the wire format and a DB-polling progress stream.

Why polling the database rather than a pub/sub channel: the row is the truth (DESIGN.md) and
the worker already writes progress there, so a 1 s poll costs one indexed read per watcher and
needs no extra infrastructure in the embedded default. The poll runs in a worker thread with
its own short-lived session (SQLAlchemy sessions are not async-safe and must not be held open
for the life of a stream), and the stream ends with a ``done`` event on a terminal status.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.requests import Request

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def format_event(event: str, data: Any, event_id: str | int | None = None) -> str:
    """One SSE frame. JSON data is written on a single line so no ``data:`` splitting is needed."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'), default=str)}")
    return "\n".join(lines) + "\n\n"


def comment(text: str = "keep-alive") -> str:
    """A comment frame: ignored by clients, keeps proxies from closing an idle stream."""
    return f": {text}\n\n"


async def progress_stream(
    request: Request,
    load: Callable[[], dict[str, Any] | None],
    *,
    poll_s: float = 1.0,
    heartbeat_s: float = 15.0,
    max_s: float | None = None,
) -> AsyncIterator[str]:
    """Yield ``progress`` whenever ``load()`` returns something new, then ``done`` when terminal.

    ``load`` is a blocking function (it opens its own DB session) returning the job's public
    JSON, or ``None`` if the job vanished. It runs in a thread so the event loop stays free.
    ``max_s`` bounds a stream's life; clients reconnect (the first event is the current state).
    """
    yield comment("stream opened")
    started = last_sent = time.monotonic()
    previous: str | None = None
    seq = 0
    while True:
        job = await anyio.to_thread.run_sync(load)
        if job is None:
            yield format_event("error", {"detail": "job not found"})
            return
        snapshot = json.dumps(job, sort_keys=True, default=str)
        if snapshot != previous:
            previous = snapshot
            seq += 1
            last_sent = time.monotonic()
            yield format_event("progress", job, seq)
        if job.get("status") in TERMINAL:
            yield format_event("done", job, seq + 1)
            return
        now = time.monotonic()
        if now - last_sent >= heartbeat_s:
            last_sent = now
            yield comment()
        if max_s is not None and now - started >= max_s:
            return
        if await request.is_disconnected():
            return
        await anyio.sleep(poll_s)
