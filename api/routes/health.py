"""Liveness, readiness and Prometheus metrics.

Why liveness checks nothing: a restart cannot fix a down database, so ``/healthz`` only says
the process serves requests, while ``/readyz`` checks each dependency (database, broker,
storage) and answers 503 with the per-check status so an operator sees which one is down.
These routes need no API key: probes and scrapers carry none, and they disclose no job data.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import DispatcherDep, SessionDep, StoreDep
from api.problems import PROBLEM_JSON, Problem, problem_response
from api.schemas import CheckResult, Health, Readiness
from jobs.storage import ObjectStore

router = APIRouter(tags=["operations"])

READY_PROBE_KEY = "_health/readyz"
NOT_READY = "urn:pcd:problem:not-ready"


class NotReady(Problem):
    """The 503 body: a problem whose ``checks`` say which dependency is down."""

    checks: dict[str, CheckResult]


def _run_check(fn: Callable[[], object]) -> CheckResult:
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # any failure means "not ready"; the message says which
        return CheckResult(ok=False, detail=f"{type(exc).__name__}: {exc}"[:500],
                           latency_ms=round((time.perf_counter() - start) * 1000, 2))
    return CheckResult(ok=True, latency_ms=round((time.perf_counter() - start) * 1000, 2))


def _storage_probe(store: ObjectStore) -> None:
    """Write then stat a tiny object: a read-only or vanished root must fail readiness too
    (``stat`` alone answers "absent" for a ``file://`` root that does not exist)."""
    store.put_stream(READY_PROBE_KEY, [b"ok"], max_bytes=16)
    if store.stat(READY_PROBE_KEY) is None:
        raise OSError("probe object written but not found")


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process serves requests."""
    return Health()


@router.get(
    "/readyz", response_model=Readiness, summary="Readiness (db, broker, storage)",
    responses={503: {"model": NotReady, "description": "a dependency is down",
                     "content": {PROBLEM_JSON: {}}}},
)
def readyz(request: Request, session: SessionDep, store: StoreDep,
           dispatcher: DispatcherDep) -> JSONResponse:
    """Check the database (``SELECT 1``), the broker (connect) and storage (write a probe)."""
    checks = {
        "database": _run_check(lambda: session.execute(text("SELECT 1")).scalar_one()),
        "broker": _run_check(dispatcher.check),
        "storage": _run_check(lambda: _storage_probe(store)),
    }
    failed = [name for name, c in checks.items() if not c.ok]
    as_json = {name: c.model_dump(mode="json") for name, c in checks.items()}
    if failed:  # an error like any other: problem+json, with the checks as an extension
        return problem_response(request, 503, title="Service not ready",
                                detail=f"failing: {', '.join(failed)}", type_=NOT_READY,
                                extra={"checks": as_json})
    return JSONResponse(Readiness(status="ready", checks=checks).model_dump(mode="json"))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Request latency by route template, jobs by status and queue depth (read at scrape)."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
