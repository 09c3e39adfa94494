"""Shared test data of the ``jobs`` tests."""

from __future__ import annotations

import copy
from typing import Any

from sqlalchemy.orm import Session

from jobs import service
from jobs.models import Job, Team
from jobs.spec import JobSpec

SPEC: dict[str, Any] = {
    "name": "camvid-r18",
    "dataset": {"uri": "upload:abc", "format": "folder", "num_classes": 11,
                "ignore_index": 11, "crop": [64, 64]},
    "teacher": {"arch": "deeplabv3_resnet50", "checkpoint": "s3://models/t.safetensors"},
    "student": {"arch": "deeplabv3_resnet18"},
    "method": {"name": "pcd", "tau": 4.0, "weight": 3.0},
    "train": {"iterations": 20, "batch_size": 2},
}


def spec(**changes: Any) -> dict[str, Any]:
    """A deep copy of SPEC with top-level sections replaced."""
    data = copy.deepcopy(SPEC)
    data.update(changes)
    return data


def make_job(session: Session, team: Team, *, max_attempts: int = 3, **changes: Any) -> Job:
    job, created = service.create_job(session, team, JobSpec.model_validate(spec(**changes)),
                                      max_attempts=max_attempts)
    assert created
    return job
