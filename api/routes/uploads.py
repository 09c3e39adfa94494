"""Uploads of teacher checkpoints and dataset archives, streamed into object storage.

Two body forms, one code path: a raw ``application/octet-stream`` body with ``?kind=&filename=``
(curl ``--data-binary``, the cheapest to stream) and ``multipart/form-data`` with a ``file``
part and a ``kind`` field (what browsers and ``client.PcdClient.upload`` send). Either way the
bytes go straight to storage with the limit and the sha256 applied in passing.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response

from api.deps import CurrentTeam, SessionDep, SettingsDep, StoreDep
from api.presenters import upload_public
from api.problems import ProblemError, not_found, problem_responses
from api.schemas import UploadPublic
from api.streaming import BadMultipart, Meter, MultipartFile, UploadTooLarge, pull_from_loop
from jobs import service
from jobs.storage import ObjectTooLarge

router = APIRouter(prefix="/uploads", tags=["uploads"])

UploadKind = Literal["checkpoint", "dataset"]


def _too_large(limit: int) -> ProblemError:
    return ProblemError(413, f"upload exceeds the limit of {limit} bytes", type_="too-large",
                        extra={"limit_bytes": limit})


@router.post(
    "", status_code=201, response_model=UploadPublic, summary="Upload a checkpoint or dataset",
    responses=problem_responses(400, 401, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"},
            "kind": {"type": "string", "enum": ["checkpoint", "dataset"]}}}},
    }}},
)
async def create_upload(
    request: Request, response: Response, session: SessionDep, team: CurrentTeam,
    settings: SettingsDep, store: StoreDep,
    kind: Annotated[UploadKind | None, Query(description="checkpoint or dataset")] = None,
    filename: Annotated[str | None, Query(max_length=255)] = None,
) -> UploadPublic:
    """Stream the body to storage; answer its id, ``upload:<id>`` URI, size and sha256."""
    limit = int(settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise _too_large(limit)  # refuse before reading a byte
    content_type = request.headers.get("content-type", "application/octet-stream")
    multipart = content_type.lower().startswith("multipart/form-data")
    try:
        form = MultipartFile(content_type) if multipart else None
    except BadMultipart as exc:
        raise ProblemError(400, str(exc), type_="bad-upload") from exc
    if form is None and kind is None:
        raise _kind_required()  # a raw body names its kind in the query: check before reading
    # End the auth read's transaction: no DB connection is held while a large body streams.
    await anyio.to_thread.run_sync(session.commit)
    upload_id = uuid.uuid4().hex
    key = f"uploads/{team.id}/{upload_id}"
    meter = Meter(limit)

    def store_body() -> object:
        chunks = pull_from_loop(request.stream())
        if form is not None:
            chunks = form.file_chunks(chunks)
        return store.put_stream(key, meter.wrap(chunks), max_bytes=limit)

    try:
        info = await anyio.to_thread.run_sync(store_body)
    except (UploadTooLarge, ObjectTooLarge) as exc:
        raise _too_large(limit) from exc
    except BadMultipart as exc:
        raise ProblemError(400, str(exc), type_="bad-upload") from exc
    if form is not None:
        kind = kind or form.fields.get("kind")  # type: ignore[assignment]
        filename = filename or form.filename
    if kind not in ("checkpoint", "dataset"):
        await anyio.to_thread.run_sync(_discard, store, key)
        raise _kind_required()

    def record() -> UploadPublic:
        upload = service.create_upload(session, team, id=upload_id, kind=kind,
                                       filename=filename, key=key, size=meter.size,
                                       sha256=meter.sha256, uri=getattr(info, "uri", None))
        session.commit()
        return upload_public(upload)

    body = await anyio.to_thread.run_sync(record)
    response.headers["Location"] = f"/uploads/{body.id}"
    return body


def _kind_required() -> ProblemError:
    message = "kind is required: 'checkpoint' or 'dataset'"
    return ProblemError(422, message, title="Invalid request", type_="validation", extra={
        "errors": [{"field": "kind", "message": message, "type": "enum", "in": "query"}]})


def _discard(store: Any, key: str) -> None:
    """Best effort: remove an object stored for a request that was then refused."""
    delete = getattr(store, "delete", None)
    if callable(delete):
        with contextlib.suppress(Exception):
            delete(key)


# multipart framing adds boundaries and part headers around the file bytes
_MULTIPART_SLACK = 64 * 1024


@router.get("/{upload_id}", response_model=UploadPublic, summary="Describe an upload",
            responses=problem_responses(401, 404))
def get_upload(upload_id: str, session: SessionDep, team: CurrentTeam) -> UploadPublic:
    """An upload of the caller's team (404 for another team's, as for jobs)."""
    upload = service.get_upload(session, team, upload_id)
    if upload is None:
        raise not_found(f"upload {upload_id}")
    return upload_public(upload)
