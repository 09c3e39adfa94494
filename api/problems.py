"""RFC 9457 problem details: the one shape of every error the API returns.

Why one module: clients (``client.api.PcdError``) parse a single format, so every path that can
fail (our own ``ProblemError``, Starlette's ``HTTPException`` for unknown routes and wrong
methods, FastAPI's request validation, and any unexpected exception) ends here and is rendered
as ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail`` and
``instance``. Validation errors also carry ``errors: [{field, message, type, in}]`` where
``field`` is the dotted path inside the request body (``method.tau``), so a 422 names the field.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "urn:pcd:problem:"


class FieldError(BaseModel):
    """One invalid input: where it is and what is wrong with it."""

    field: str = Field(description="Dotted path, e.g. 'method.tau' ('' = the whole body)")
    message: str
    type: str = Field(description="pydantic's error type, e.g. 'greater_than'")
    location: str = Field(default="body", alias="in", description="body, query, path, header")

    model_config = {"populate_by_name": True}


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(default="about:blank", description="URI identifying the problem type")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(default=None, description="the request path")
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem (routes and dependencies alike)."""

    def __init__(self, status: int, detail: str | None = None, *, title: str | None = None,
                 type_: str | None = None, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.type = f"{_TYPE_BASE}{type_}" if type_ else "about:blank"
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(f"{status} {self.title}: {detail}")


def not_found(what: str) -> ProblemError:
    """404 with a uniform message; used for missing and for other teams' resources alike."""
    return ProblemError(404, f"{what} not found", type_="not-found")


def problem_response(request: Request, status: int, *, title: str | None = None,
                     detail: str | None = None, type_: str = "about:blank",
                     headers: Mapping[str, str] | None = None,
                     extra: Mapping[str, Any] | None = None) -> JSONResponse:
    """Render a problem as a response with the problem+json media type."""
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=dict(headers or {}),
                        media_type=PROBLEM_JSON)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def field_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic/FastAPI errors -> ``[{field, message, type, in}]`` with the body prefix dropped.

    FastAPI locates body errors as ``("body", "method", "tau")``; clients think in spec paths
    (``method.tau``), so the leading location is split off into ``in``.
    """
    out: list[dict[str, str]] = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())]
        where = loc[0] if loc and loc[0] in {"body", "query", "path", "header", "cookie"} else ""
        path = loc[1:] if where else loc
        out.append({"field": ".".join(path), "message": str(err.get("msg", "invalid")),
                    "type": str(err.get("type", "value_error")), "in": where or "body"})
    return out


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, title=exc.title, detail=exc.detail,
                            type_=exc.type, headers=exc.headers, extra=exc.extra)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem_response(request, exc.status_code, detail=detail,
                            headers=getattr(exc, "headers", None) or {})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    summary = "; ".join(
        f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors
    )
    return problem_response(request, 422, title="Invalid request", detail=summary,
                            type_=f"{_TYPE_BASE}validation", extra={"errors": errors})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client (it may hold paths or secrets).
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, detail="internal error; see the server log",
                            type_=f"{_TYPE_BASE}internal")


def register_problem_handlers(app: FastAPI) -> None:
    """Install the handlers so that no error leaves the app in another shape."""
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the problem+json errors of a route."""
    return {
        status: {"model": Problem, "description": _phrase(status),
                 "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for status in statuses
    }
