"""Artifacts of a job: the list, and downloads streamed from (or redirected to) storage.

Why redirect on S3: a presigned URL lets the client pull a 100 MB ONNX file straight from the
object store instead of through the API process. ``file://`` has no such URL, so the API
streams the object itself, with ``Content-Length`` and the recorded sha256 as ``ETag`` and
``X-Checksum-Sha256`` so a client can verify what it received.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Path
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from api.deps import SessionDep, StoreDep, TeamJob
from api.presenters import artifact_public
from api.problems import not_found, problem_responses
from api.schemas import ArtifactList
from jobs import service

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])

PRESIGN_TTL_S = 600


@router.get("", response_model=ArtifactList, summary="List a job's artifacts",
            responses=problem_responses(401, 404))
def list_artifacts(job: TeamJob, session: SessionDep) -> ArtifactList:
    """Name, kind, size and sha256 of each artifact the job has produced so far."""
    return ArtifactList(items=[artifact_public(a) for a in service.list_artifacts(session, job)])


@router.get(
    "/{name:path}", summary="Download an artifact", response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}},
               304: {"description": "If-None-Match matched the sha256"},
               307: {"description": "redirect to a presigned object-store URL"},
               **problem_responses(401, 404)},
)
async def download_artifact(
    job: TeamJob, session: SessionDep, store: StoreDep,
    name: Annotated[str, Path(description="e.g. student.onnx or checkpoints/last.pt")],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Stream the exact stored bytes, or 307 to a presigned URL when the store has one."""
    artifact = await anyio.to_thread.run_sync(service.get_artifact, session, job, name)
    if artifact is None:
        raise not_found(f"artifact {name} of job {job.id}")
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "X-Checksum-Sha256": artifact.sha256}
    if if_none_match and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    url = await anyio.to_thread.run_sync(store.presigned_url, artifact.key, PRESIGN_TTL_S)
    if url:
        return RedirectResponse(url, status_code=307, headers=headers)
    stream = await anyio.to_thread.run_sync(store.open_stream, artifact.key)
    filename = name.rsplit("/", 1)[-1]
    headers.update({"Content-Length": str(artifact.size),
                    "Content-Disposition": f'attachment; filename="{filename}"'})
    # StreamingResponse iterates a sync iterator in a threadpool: blocking reads are fine
    return StreamingResponse(stream, media_type="application/octet-stream", headers=headers)
