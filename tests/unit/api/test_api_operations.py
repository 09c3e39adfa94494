"""Health, readiness, Prometheus metrics, problem+json for framework errors, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from api_factory import SPEC, Factory, auth
from fastapi.testclient import TestClient

from api.dispatch import RecordingDispatcher
from api.main import create_app
from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_ok(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert set(r.json()["checks"]) == {"database", "broker", "storage"}


def test_readyz_503_names_the_failing_check(settings, tmp_path: Path) -> None:  # type: ignore
    not_a_dir = tmp_path / "objects-is-a-file"
    not_a_dir.write_text("x")
    broken = settings.model_copy(update={"storage_url": f"file://{not_a_dir}"})
    app = create_app(broken, dispatcher=RecordingDispatcher())
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"] == "failing: storage"
    checks = r.json()["checks"]
    assert checks["database"]["ok"] and checks["broker"]["ok"]
    assert not checks["storage"]["ok"] and checks["storage"]["detail"]


def test_readyz_503_when_broker_down(settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings, dispatcher=RecordingDispatcher(fail=True))
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and not r.json()["checks"]["broker"]["ok"]


def test_metrics_exposes_job_gauges_and_latency(client: TestClient, factory: Factory) -> None:
    team, key = factory.team("a")
    factory.job(team)
    factory.job(team)
    factory.job(team, status="running")
    client.get("/jobs", headers=auth(key))
    text = client.get("/metrics").text
    assert 'pcd_jobs{status="queued"} 2.0' in text
    assert 'pcd_jobs{status="running"} 1.0' in text
    assert 'pcd_jobs{status="failed"} 0.0' in text
    assert 'pcd_queue_depth{queue="cpu"} 2.0' in text
    assert ('pcd_http_request_duration_seconds_count{method="GET",route="/jobs",status="200"} '
            '1.0') in text


def test_framework_errors_are_problems(client: TestClient, settings) -> None:  # type: ignore
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"].startswith(
        "application/problem+json")
    assert r.json()["instance"] == "/no/such/route"
    r = client.delete("/jobs")
    assert r.status_code == 405 and r.json()["status"] == 405

    app = create_app(settings, dispatcher=RecordingDispatcher())

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret path /etc/x")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and "secret" not in r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ["/jobs", "/jobs/{job_id}", "/jobs/{job_id}/metrics", "/jobs/{job_id}/events",
                 "/jobs/{job_id}/logs", "/jobs/{job_id}/cancel", "/jobs/{job_id}/artifacts",
                 "/jobs/{job_id}/artifacts/{name}", "/uploads", "/uploads/{upload_id}",
                 "/healthz", "/readyz", "/metrics"]:
        assert path in paths, path
    assert "404" in paths["/jobs/{job_id}"]["get"]["responses"]
    assert "Problem" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_importing_and_building_the_app_does_not_load_torch(tmp_path: Path) -> None:
    code = (
        "import sys, api.main\n"
        "from api.dispatch import RecordingDispatcher\n"
        "from jobs.settings import Settings\n"
        f"s = Settings(database_url='sqlite:///{tmp_path}/x.db', "
        f"storage_url='file://{tmp_path}/o', work_dir='{tmp_path}')\n"
        "api.main.create_app(s, dispatcher=RecordingDispatcher())\n"
        "assert 'torch' not in sys.modules, 'torch was loaded'\n"
        "assert 'celery' not in sys.modules, 'celery was loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_startup_migrates_and_registers_the_bootstrap_key(tmp_path: Path) -> None:
    key = "pcd_bootstrap_" + "k" * 32
    settings = Settings(database_url=f"sqlite:///{tmp_path}/fresh.db",
                        storage_url=f"file://{tmp_path}/objects", work_dir=tmp_path,
                        broker_url=f"filesystem://{tmp_path}/broker",
                        migrate_on_start=True, bootstrap_api_key=key)
    with TestClient(create_app(settings, dispatcher=RecordingDispatcher())) as c:
        r = c.post("/jobs", json=SPEC, headers=auth(key))
    assert r.status_code == 201, r.text
