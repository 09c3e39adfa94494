"""The job spec: the body of ``POST /jobs``.

``JobSpec`` is ``pcd_core.spec.RunSpec`` (the same class a CLI run uses, imported, never
copied) plus the service-only ``resources``, and with the input locations restricted to what
a *service* can resolve on whichever worker runs the job:

    upload:<id>            a file posted to ``POST /uploads`` by the same team
    s3://bucket/key        an object (or, for a dataset, a prefix) in S3-compatible storage
    file:///abs/path       a path on the worker host (a shared filesystem, or one machine)

A bare path (``/data/camvid``, ``data/camvid``) is refused unless the service allows it
(``Settings.allow_local_paths``): relative to what, on which host, is ambiguous in a service.
The check reads the validation context ``{"allow_local_paths": bool}`` when given (tests,
tools), else the process settings (``jobs.settings.get_settings()``), so the FastAPI body
parser, which passes no context, applies the deployment's policy.

Errors name the field: an invalid ``method.tau`` is reported at ``("method", "tau")``, a bad
URI at ``("dataset", "uri")``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pcd_core.spec import DatasetSpec, ModelSpec, RunSpec

_UPLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# S3 bucket names: 3-63 of lowercase letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _allow_local(info: ValidationInfo) -> bool:
    context = info.context if isinstance(info.context, dict) else None
    if context is not None and "allow_local_paths" in context:
        return bool(context["allow_local_paths"])
    from jobs.settings import get_settings  # lazy: parsing a spec must not need settings

    return get_settings().allow_local_paths


def check_input_uri(uri: str, *, allow_local_paths: bool) -> str:
    """Validate the location of a dataset or checkpoint; return it unchanged or raise
    ``ValueError`` saying which forms are accepted."""
    if uri.startswith("upload:"):
        if not _UPLOAD_ID.match(uri[len("upload:"):]):
            raise ValueError(f"{uri!r} is not a valid upload reference (upload:<id>)")
        return uri
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not _BUCKET.match(bucket) or not key.strip("/"):
            raise ValueError(f"{uri!r} is not s3://bucket/key")
        return uri
    if uri.startswith("file://"):
        if not uri[len("file://"):].startswith("/"):
            raise ValueError(f"{uri!r}: file:// URIs must be absolute (file:///path)")
        return uri
    if "://" in uri:
        raise ValueError(f"unsupported scheme in {uri!r}: use upload:<id>, s3:// or file:///")
    if not allow_local_paths:
        raise ValueError(
            f"bare local path {uri!r} is not accepted by this service: upload it "
            "(POST /uploads, then upload:<id>), or use s3://bucket/key or file:///abs/path")
    return uri


class JobDatasetSpec(DatasetSpec):
    """``DatasetSpec`` whose ``uri`` must be resolvable by the service."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str, info: ValidationInfo) -> str:
        return check_input_uri(v, allow_local_paths=_allow_local(info))


class JobModelSpec(ModelSpec):
    """``ModelSpec`` whose ``checkpoint`` (when given) must be resolvable by the service."""

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        return check_input_uri(v, allow_local_paths=_allow_local(info))


class ResourcesSpec(BaseModel):
    """What the job needs from the fleet: the Celery queue it is routed to and its GPUs.

    ``queue="cpu"`` jobs use no GPU: ``gpus`` defaults to 0 there and must stay 0.
    ``queue="gpu"`` jobs need ``gpus >= 1`` (more than one runs DDP on one node).
    """

    model_config = ConfigDict(extra="forbid")  # as every RunSpec part: typos are errors

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs on one node (gpu queue)")
    queue: Literal["gpu", "cpu"] = "gpu"

    @model_validator(mode="before")
    @classmethod
    def _cpu_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("queue") == "cpu" and "gpus" not in data:
            return {**data, "gpus": 0}
        return data

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        if self.queue == "gpu" and self.gpus < 1:
            raise ValueError("a job on the gpu queue needs gpus >= 1 (use queue 'cpu')")
        if self.queue == "cpu" and self.gpus != 0:
            raise ValueError("a job on the cpu queue uses no GPU: gpus must be 0")
        return self


class JobSpec(RunSpec):
    """A run as submitted to the service (see the module docstring for the URI rules)."""

    dataset: JobDatasetSpec
    teacher: JobModelSpec | None = None
    student: JobModelSpec
    resources: ResourcesSpec = ResourcesSpec()

    def run_spec(self) -> RunSpec:
        """The ``RunSpec`` part (what ``pcd_core.train.run`` takes), without ``resources``."""
        return RunSpec.model_validate(self.model_dump(exclude={"resources"}))


def job_spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``POST /jobs`` bodies, for publishing (docs, clients)."""
    return JobSpec.model_json_schema()


__all__ = [
    "JobDatasetSpec",
    "JobModelSpec",
    "JobSpec",
    "ResourcesSpec",
    "check_input_uri",
    "job_spec_json_schema",
]
