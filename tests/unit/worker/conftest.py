"""Fixtures of the worker tests: a migrated temporary SQLite database, a ``file://`` store,
a team, and helpers to submit jobs and upload inputs through ``jobs.service``.

The runner is called as the plain function it is (no broker, no Celery); settings are passed
explicitly, so nothing here depends on the process environment.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import make_settings

from jobs import db, service
from jobs.models import Job, Team
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.storage import open_store
from worker.jobrow import sessions_for

NUM_CLASSES = 4
HW = (32, 48)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("worker-template")
    db.upgrade_to_head(make_settings(root))
    return root / "pcd.db"


@dataclass
class World:
    """One isolated service state: settings, store, a team, and how to add jobs to it."""

    root: Path
    settings: Settings
    team_id: str

    @property
    def store(self) -> Any:
        return open_store(self.settings.storage_url)

    def session(self) -> Any:
        return db.session_scope(sessions_for(self.settings))

    def upload(self, path: Path, kind: str) -> str:
        """Put a file in the store as an upload of this team; returns ``upload:<id>``."""
        info = self.store.put_file(f"uploads/{self.team_id}/{path.name}", path)
        with self.session() as s:
            up = service.create_upload(s, _team(s, self.team_id), kind=kind, key=info.key,
                                       size=info.size, sha256=info.sha256, filename=path.name,
                                       uri=info.uri)
            return f"upload:{up.id}"

    def submit(self, spec: dict[str, Any]) -> str:
        with self.session() as s:
            job, _ = service.create_job(
                s, _team(s, self.team_id),
                JobSpec.model_validate(spec, context={"allow_local_paths": True}),
                max_attempts=self.settings.max_attempts)
            return job.id

    def job(self, job_id: str) -> Job:
        with self.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job

    def logs(self, job_id: str) -> str:
        with self.session() as s:
            return "\n".join(line.message for line in service.get_logs(s, s.get(Job, job_id)))

    def update(self, job_id: str, **values: Any) -> None:
        with self.session() as s:
            job = s.get(Job, job_id)
            for k, v in values.items():
                setattr(job, k, v)


def _team(session: Any, team_id: str) -> Team:
    team = session.get(Team, team_id)
    assert team is not None
    return team


@pytest.fixture
def world(tmp_path: Path, migrated_db: Path) -> World:
    shutil.copy(migrated_db, tmp_path / "pcd.db")
    settings = make_settings(tmp_path)
    with db.session_scope(sessions_for(settings)) as s:
        team_id = service.create_team(s, "t").id
    return World(tmp_path, settings, team_id)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pcd_core.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("ds") / "synthetic"
    write_synthetic_dataset(root, num_classes=NUM_CLASSES, n_train=6, n_val=2, size=HW, seed=0)
    return root


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pcd_core.models import build_model, save_weights

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16,
                             head_channels=16), path)
    return path


SpecFactory = Callable[..., dict[str, Any]]


@pytest.fixture
def make_spec() -> SpecFactory:
    def make(dataset_uri: str, teacher_uri: str | None, **train: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": "tiny",
            "dataset": {"uri": dataset_uri, "format": "folder", "num_classes": NUM_CLASSES,
                        "ignore_index": 255, "crop": list(HW), "scale_range": [1.0, 1.0]},
            "student": {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 8},
            "method": {"name": "none"},
            "train": {"iterations": 4, "batch_size": 2, "num_workers": 0, "log_every": 1,
                      "eval_every": 100, "checkpoint_every": 2, **train},
            "resources": {"gpus": 0, "queue": "cpu"},
        }
        if teacher_uri is not None:
            spec["teacher"] = {"arch": "deeplabv3_resnet18", "output_stride": 16,
                               "head_channels": 16, "checkpoint": teacher_uri}
            spec["method"] = {"name": "pcd", "rematch_every": 2, "score_batches": 1}
        return spec

    return make
