"""JobSpec: RunSpec's validation plus resources and service-resolvable input URIs; errors
name the field."""

from __future__ import annotations

from typing import Any

import pytest
from jobs_helpers import SPEC, spec
from pydantic import ValidationError

from jobs.spec import JobSpec, job_spec_json_schema
from pcd_core.spec import RunSpec


def _locs(data: dict[str, Any], **context: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data, context=context or None)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_valid_spec_and_defaults() -> None:
    job = JobSpec.model_validate(SPEC)
    assert isinstance(job, RunSpec)
    assert (job.resources.gpus, job.resources.queue) == (1, "gpu")
    assert "resources" not in job.run_spec().model_dump()


@pytest.mark.parametrize(("section", "change", "loc"), [
    ("method", {"name": "pcd", "tau": 0}, "method.tau"),
    ("method", {"name": "pcd", "rematch_evry": 5}, "method.rematch_evry"),
    ("train", {"iterations": -1}, "train.iterations"),
    ("student", {"arch": "deeplabv3_vit"}, "student.arch"),
    ("resources", {"gpus": -1}, "resources.gpus"),
    ("resources", {"queue": "tpu"}, "resources.queue"),
])
def test_errors_name_the_field(section: str, change: dict[str, Any], loc: str) -> None:
    assert loc in _locs(spec(**{section: change}))


def test_unknown_arch_message_lists_the_choices() -> None:
    with pytest.raises(ValidationError, match="deeplabv3_resnet18"):
        JobSpec.model_validate(spec(student={"arch": "unet_resnet18"}))


def test_unknown_top_level_key_is_refused() -> None:
    assert "colour" in _locs({**SPEC, "colour": "blue"})


@pytest.mark.parametrize("uri", [
    "upload:abc", "upload:0f3e-12_ab", "s3://data/camvid", "s3://my.bucket/a/b.safetensors",
    "file:///srv/data/camvid",
])
def test_accepted_uris(uri: str) -> None:
    job = JobSpec.model_validate(spec(dataset={**SPEC["dataset"], "uri": uri},
                                      teacher={**SPEC["teacher"], "checkpoint": uri}))
    assert job.dataset.uri == uri and job.teacher is not None and job.teacher.checkpoint == uri


@pytest.mark.parametrize("uri", [
    "upload:", "upload:../x", "s3://Bad_Bucket/x", "s3://bucket", "s3://bucket/",
    "file://relative/x", "http://example.com/t.pt", "/data/camvid", "data/camvid",
])
def test_refused_uris_name_the_field(uri: str) -> None:
    assert _locs(spec(dataset={**SPEC["dataset"], "uri": uri})) == ["dataset.uri"]
    assert _locs(spec(teacher={**SPEC["teacher"], "checkpoint": uri})) == ["teacher.checkpoint"]


def test_local_paths_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = spec(dataset={**SPEC["dataset"], "uri": "/data/camvid"})
    assert _locs(data, allow_local_paths=False) == ["dataset.uri"]
    assert JobSpec.model_validate(data, context={"allow_local_paths": True})
    from jobs.settings import get_settings

    monkeypatch.setenv("PCD_ALLOW_LOCAL_PATHS", "true")
    get_settings.cache_clear()
    try:
        assert JobSpec.model_validate(data).dataset.uri == "/data/camvid"
    finally:
        get_settings.cache_clear()


def test_resources_queue_and_gpus() -> None:
    cpu = JobSpec.model_validate(spec(resources={"queue": "cpu"}))
    assert cpu.resources.gpus == 0
    assert _locs(spec(resources={"queue": "cpu", "gpus": 2})) == ["resources"]
    assert _locs(spec(resources={"queue": "gpu", "gpus": 0})) == ["resources"]
    assert JobSpec.model_validate(spec(resources={"gpus": 4})).resources.gpus == 4


def test_teacher_required_for_distillation() -> None:
    data = spec()
    del data["teacher"]
    with pytest.raises(ValidationError, match="needs a teacher"):
        JobSpec.model_validate(data)
    data["method"] = {"name": "none"}
    assert JobSpec.model_validate(data).teacher is None


def test_json_schema_is_publishable() -> None:
    schema = job_spec_json_schema()
    assert {"dataset", "student", "resources"} <= set(schema["properties"])
    assert "ResourcesSpec" in schema["$defs"]
