"""Request dependencies, exported as ``Annotated`` types so routes declare only what they need.

Why here and not in routes: authentication and "load this job or 404" are the API's permission
model. Written once as dependencies (``CurrentTeam``, ``TeamJob``), no route can forget them or
copy them subtly wrong. A job of another team answers 404, never 403: its existence is not
disclosed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.dispatch import Dispatcher
from api.problems import ProblemError, not_found
from jobs import service
from jobs.models import Job, Team
from jobs.settings import Settings
from jobs.storage import ObjectStore

_bearer = HTTPBearer(auto_error=False, description="API key of a team: `Bearer pcd_...`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) at its end."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_current_team(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Team:
    """The team owning the Bearer key; 401 (with ``WWW-Authenticate``) when missing or wrong."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           type_="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    team = service.authenticate(session, credentials.credentials)
    if team is None:
        raise ProblemError(
            401, "invalid or revoked API key", type_="unauthorized",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return team


CurrentTeam = Annotated[Team, Depends(get_current_team)]


def get_team_job(
    job_id: Annotated[str, Path(description="job id", max_length=64)],
    session: SessionDep,
    team: CurrentTeam,
) -> Job:
    """The caller's job, or 404 whether it does not exist or belongs to another team."""
    job = service.get_job(session, team, job_id)
    if job is None:
        raise not_found(f"job {job_id}")
    return job


TeamJob = Annotated[Job, Depends(get_team_job)]
