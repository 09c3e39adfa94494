"""Test data for the API tests: teams with keys, jobs in any status, progress, files.

Why through ``jobs.service`` and ``jobs.state`` and not raw SQL: the fixtures then obey the
same state machine and invariants as the worker, so a test cannot build a job that the
service could never produce.
"""

from __future__ import annotations

from typing import Any

from jobs import service
from jobs.db import session_scope
from jobs.spec import JobSpec

UPLOAD_LIMIT = 64 * 1024

SPEC: dict[str, Any] = {
    "name": "camvid-r18",
    "dataset": {"uri": "upload:abc", "format": "folder", "num_classes": 11,
                "ignore_index": 11, "crop": [64, 64]},
    "teacher": {"arch": "deeplabv3_resnet50", "checkpoint": "upload:t1"},
    "student": {"arch": "deeplabv3_resnet18"},
    "method": {"name": "pcd", "tau": 4.0, "weight": 3.0},
    "train": {"iterations": 20, "batch_size": 2, "eval_every": 10, "checkpoint_every": 10},
    "resources": {"gpus": 0, "queue": "cpu"},
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Factory:
    """Creates rows through ``jobs.service``, one committed session per call."""

    def __init__(self, sessionmaker: Any, store: Any) -> None:
        self.sessionmaker = sessionmaker
        self.store = store

    def team(self, name: str) -> tuple[Any, str]:
        """A team and a fresh API key: (team, plaintext key)."""
        with session_scope(self.sessionmaker) as s:
            team = service.create_team(s, name)
            return team, service.create_api_key(s, team)

    def job(self, team: Any, *, status: str = "queued",
            error: tuple[str, str] | None = None, spec: dict[str, Any] | None = None) -> str:
        """A job walked through the state machine to ``status``."""
        with session_scope(self.sessionmaker) as s:
            job, _ = service.create_job(s, team, JobSpec.model_validate(
                spec or SPEC, context={"allow_local_paths": False}))
            for step in _PATH[status]:
                if step == "running":
                    assert service.claim_job(s, job.id, "test-worker")
                    s.refresh(job)
                elif step == "failed" and error:
                    service.fail_job(s, job, *error)
                else:
                    service.transition(s, job, step)
            return job.id

    def _job(self, s: Any, job_id: str) -> Any:
        job = service.get_job_by_id(s, job_id)
        assert job is not None
        return job

    def job_status(self, job_id: str) -> str:
        with session_scope(self.sessionmaker) as s:
            return str(self._job(s, job_id).status)

    def set_status(self, job_id: str, status: str) -> None:
        with session_scope(self.sessionmaker) as s:
            service.transition(s, self._job(s, job_id), status)

    def progress(self, job_id: str, **fields: Any) -> None:
        with session_scope(self.sessionmaker) as s:
            assert service.record_progress(s, self._job(s, job_id), **fields)

    def metrics(self, job_id: str, points: list[tuple[int, str, float]]) -> None:
        with session_scope(self.sessionmaker) as s:
            job = self._job(s, job_id)
            for step, name, value in points:
                service.append_metrics(s, job, step, {name: value})

    def logs(self, job_id: str, lines: list[str]) -> None:
        with session_scope(self.sessionmaker) as s:
            for line in lines:
                service.append_log(s, job_id, line)

    def artifact(self, job_id: str, name: str, data: bytes, kind: str = "model") -> None:
        key = f"jobs/{job_id}/artifacts/{name}"
        chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        info = self.store.put_stream(key, iter(chunks))
        with session_scope(self.sessionmaker) as s:
            service.record_artifact(s, self._job(s, job_id), name=name, kind=kind,
                                    uri=info.uri, size=info.size, sha256=info.sha256, key=key)


_PATH: dict[str, list[str]] = {
    "queued": [], "running": ["running"], "cancelling": ["running", "cancelling"],
    "succeeded": ["running", "succeeded"], "failed": ["running", "failed"],
    "cancelled": ["cancelled"],
}

