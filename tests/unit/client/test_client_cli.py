"""The ``pcd`` CLI against the in-memory API (typer's CliRunner, no server process)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from client import cli
from client.watch import describe

runner = CliRunner()


@pytest.fixture(autouse=True)
def _route_cli_to_fake(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", make_client)


def test_submit_with_overrides(service, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: r18\nstudent: {arch: deeplabv3_resnet18}\ntrain: {iterations: 9}\n")
    result = runner.invoke(cli.app, ["submit", str(spec), "--set", "train.iterations=200",
                                     "--set", "method.tau=2.5"])
    assert result.exit_code == 0, result.output
    assert "job1" in result.output
    sent = json.loads(service.requests[-1].content)
    assert sent["train"]["iterations"] == 200 and sent["method"]["tau"] == 2.5


def test_submit_invalid_spec_exits_1_with_field(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    result = runner.invoke(cli.app, ["submit", str(spec)])
    assert result.exit_code == 1
    assert "student" in result.output


def test_submit_watch_follows_sse_to_the_end(service, make_client, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("student: {arch: deeplabv3_resnet18}\n")
    original = service._create

    def create_and_finish(request: httpx.Request) -> httpx.Response:
        response = original(request)
        job = service.jobs["job1"]
        job["events"] = [{"data": {"status": "running", "progress": {
            "iteration": 5, "max_iterations": 10, "losses": {"ce": 0.5}}}}]
        return response

    monkeypatch.setattr(service, "_create", create_and_finish)

    def finish_on_events(request: httpx.Request) -> httpx.Response:
        response = service.handler(request)
        if request.url.path.endswith("/events"):
            service.jobs["job1"]["status"] = "succeeded"
        return response

    monkeypatch.setattr(cli, "_client", lambda: make_client(finish_on_events))
    result = runner.invoke(cli.app, ["submit", str(spec), "--watch"])
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.output


def test_status_list_logs_cancel(service) -> None:
    service.add_job("job7", status="running", logs=["hello", "world"],
                    progress={"iteration": 3, "max_iterations": 10, "phase": "training"})
    out = runner.invoke(cli.app, ["status", "job7"]).output
    assert "running" in out and "3/10" in out
    assert "job7" in runner.invoke(cli.app, ["list"]).output
    assert runner.invoke(cli.app, ["logs", "job7"]).output.split() == ["hello", "world"]
    assert "cancelling" in runner.invoke(cli.app, ["cancel", "job7"]).output
    missing = runner.invoke(cli.app, ["status", "nope"])
    assert missing.exit_code == 1 and "404" in missing.output


def test_fetch_verifies_every_artifact(service, tmp_path: Path) -> None:
    service.add_job("job1", status="succeeded")
    for name in ("student.safetensors", "model.json"):
        service.blobs[f"job1/{name}"] = name.encode() * 10
    result = runner.invoke(cli.app, ["fetch", "job1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    got = tmp_path / "out" / "model.json"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == \
        hashlib.sha256(b"model.json" * 10).hexdigest()
    service.corrupt = True
    bad = runner.invoke(cli.app, ["fetch", "job1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "sha256" in bad.output


def test_upload_directory_is_tarred(service, make_client, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "ds" / "train" / "images"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(b"png")
    seen: list[bytes] = []
    original = service.handler

    def capture(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/uploads":
            seen.append(request.read())
        return original(request)

    monkeypatch.setattr(cli, "_client", lambda: make_client(capture))
    result = runner.invoke(cli.app, ["upload", str(tmp_path / "ds"), "--kind", "dataset"])
    assert result.exit_code == 0, result.output
    assert "upload:u1" in result.output
    assert b'filename="ds.tar"' in seen[0]
    body = seen[0]
    start = body.index(b"\r\n\r\n", body.index(b'filename="ds.tar"')) + 4
    tar_path = tmp_path / "sent.tar"
    tar_path.write_bytes(body[start:body.rindex(b"\r\n--")])
    with tarfile.open(tar_path, mode="r:") as tar:
        assert "./train/images/a.png" in tar.getnames()


def test_describe_reads_flat_and_nested_progress() -> None:
    d = describe({"status": "running", "phase": "training", "progress": {
        "iteration": 4, "max_iterations": 8, "eta_s": 3725, "images_per_s": 12.5,
        "losses": {"ce": 0.25}}, "metrics": {"miou": 0.5}})
    assert d["iteration"] == 4 and d["eta"] == "1:02:05" and d["ips"] == "12.5 img/s"
    assert d["losses"] == "ce=0.250" and d["miou"] == "mIoU 0.500"
    assert describe({"iteration": 2, "max_iterations": 0})["max_iterations"] is None


def test_cli_import_stays_http_only() -> None:
    code = ("import sys, client.cli; bad = {'api', 'jobs', 'worker', 'torch', 'celery', "
            "'sqlalchemy', 'pcd_core'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quiet_submit_and_upload_print_only_the_id(service, tmp_path: Path) -> None:
    """``-q`` output is what scripts capture: ``JOB=$(pcd submit -q spec.yaml)``."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: r18\nstudent: {arch: deeplabv3_resnet18}\n")
    submitted = runner.invoke(cli.app, ["submit", "-q", str(spec)])
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout == "job1\n"
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"weights")
    uploaded = runner.invoke(cli.app, ["upload", "-q", str(weights), "--kind", "checkpoint"])
    assert uploaded.exit_code == 0, uploaded.output
    assert uploaded.stdout == "upload:u1\n"
