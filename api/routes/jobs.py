"""Job routes: create, list, read, follow (metrics, logs, events) and cancel.

Routes are thin on purpose: ``CurrentTeam``/``TeamJob`` do authentication and team scoping,
``jobs.service`` does the work (idempotency, the state machine, keyset pagination), and
``api.presenters`` shapes the answers. A route only maps HTTP to those calls.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from api.deps import CurrentTeam, DispatcherDep, SessionDep, TeamJob
from api.dispatch import Dispatcher
from api.presenters import job_public, job_summary, log_lines, metric_points
from api.problems import ProblemError, problem_responses
from api.schemas import JobPage, JobPublic, JobStatus, LogPage, MetricSeries
from api.sse import progress_stream
from jobs import service
from jobs.spec import JobSpec

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

_JOB_ERRORS = problem_responses(401, 404)


@router.post(
    "", status_code=201, response_model=JobPublic, summary="Submit a job",
    responses={200: {"model": JobPublic, "description": "replay of an Idempotency-Key"},
               **problem_responses(401, 409, 422)},
)
def create_job(
    spec: JobSpec, response: Response, session: SessionDep, team: CurrentTeam,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Create a job from a spec and enqueue it.

    With ``Idempotency-Key``, a retry with the same body returns the first job (200) and a
    different body under the same key is a 409: a client that lost the response can safely
    retry without starting a second multi-hour run. The message is published only after the
    row is committed, so the worker always finds the job it is given.
    """
    try:
        job, created = service.create_job(session, team, spec, idempotency_key=idempotency_key)
    except service.IdempotencyConflict as exc:
        session.rollback()
        raise ProblemError(409, str(exc) or "Idempotency-Key reused with a different body",
                           type_="idempotency-conflict") from exc
    session.commit()
    if created:
        _enqueue(dispatcher, job.id, spec.resources.queue)
    else:
        response.status_code = 200
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_public(session, job)


def _enqueue(dispatcher: Dispatcher, job_id: str, queue: str) -> None:
    """Publish after commit. A broker failure does not fail the request: the job exists and
    stays ``queued`` in the database (the truth), where the reaper re-dispatches it."""
    try:
        dispatcher.enqueue(job_id, queue)
    except Exception:
        log.exception("could not enqueue job %s on %s; it stays queued", job_id, queue)


@router.get("", response_model=JobPage, summary="List the team's jobs",
            responses=problem_responses(401, 422))
def list_jobs(
    request: Request, response: Response, session: SessionDep, team: CurrentTeam,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    """Newest first, keyset-paginated (stable under concurrent inserts, unlike offsets)."""
    try:
        jobs, next_cursor = service.list_jobs(session, team, status=status, cursor=cursor,
                                              limit=limit)
    except ValueError as exc:  # a malformed or foreign cursor
        raise ProblemError(422, str(exc), type_="validation", extra={"errors": [
            {"field": "cursor", "message": str(exc), "type": "value_error", "in": "query"}]}
        ) from exc
    if next_cursor:
        url = request.url.include_query_params(cursor=next_cursor, limit=limit)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return JobPage(items=[job_summary(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job",
            responses=_JOB_ERRORS)
def get_job(job: TeamJob, session: SessionDep) -> JobPublic:
    """Status, phase, progress and ETA, latest losses and metrics, error and transitions."""
    return job_public(session, job)


@router.get("/{job_id}/metrics", response_model=MetricSeries, summary="Metric time series",
            responses=_JOB_ERRORS)
def get_metrics(
    job: TeamJob, session: SessionDep,
    name: Annotated[list[str] | None, Query(description="only these series (repeatable)")] = None,
    since_step: Annotated[int | None, Query(ge=0, description="only steps >= this")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> MetricSeries:
    """``(step, name, value)`` points ordered by step then name."""
    return MetricSeries(items=metric_points(
        service.get_metrics(session, job, names=name, since_step=since_step, limit=limit)))


@router.get(
    "/{job_id}/logs", response_model=LogPage, summary="The run's log",
    responses={200: {"content": {"text/plain": {}}}, **_JOB_ERRORS},
)
def get_logs(
    job: TeamJob, session: SessionDep,
    since: Annotated[int | None, Query(ge=0, description="first line seq to return")] = None,
    offset: Annotated[int | None, Query(ge=0, description="alias of since")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    accept: Annotated[str | None, Header()] = None,
) -> Any:
    """Lines with ``seq >= since``: JSON ``{lines, next_offset}`` when asked for, else text."""
    start = since if since is not None else (offset or 0)
    lines = log_lines(service.get_logs(session, job, since=start, limit=limit))
    next_offset = lines[-1].seq + 1 if lines else start
    if accept and "application/json" in accept:
        return LogPage(lines=lines, next_offset=next_offset)
    text = "".join(f"{ln.message}\n" for ln in lines)
    return PlainTextResponse(text, headers={"X-Next-Offset": str(next_offset)})


@router.get(
    "/{job_id}/events", summary="Live progress (server-sent events)", response_class=Response,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`progress` events on change, then one `done`"},
               **_JOB_ERRORS},
)
def job_events(job: TeamJob, request: Request) -> StreamingResponse:
    """A ``progress`` event whenever the job changes, heartbeats, and ``done`` at the end."""
    job_id, team_id = job.id, job.team_id
    sessionmaker = request.app.state.sessionmaker

    def load() -> dict[str, Any] | None:
        with sessionmaker() as session:
            current = service.get_job_by_id(session, job_id)
            if current is None or current.team_id != team_id:
                return None
            return job_public(session, current, transitions=False).model_dump(mode="json")

    state = request.app.state
    stream = progress_stream(request, load, poll_s=state.sse_poll_s,
                             heartbeat_s=state.sse_heartbeat_s, max_s=state.sse_max_s)
    # X-Accel-Buffering: nginx would otherwise buffer the stream and deliver it in one lump
    return StreamingResponse(stream, media_type="text/event-stream", headers={
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic,
             summary="Cancel a job", responses=problem_responses(401, 404, 409))
def cancel_job(job: TeamJob, session: SessionDep) -> JobPublic:
    """Queued jobs are cancelled at once; running ones go to ``cancelling`` until the worker
    stops cooperatively. A job already finished answers 409."""
    try:
        service.request_cancel(session, job)
    except service.InvalidTransition as exc:
        session.rollback()
        raise ProblemError(409, f"job {job.id} is {job.status} and cannot be cancelled",
                           type_="job-finished") from exc
    session.commit()
    return job_public(session, job)
