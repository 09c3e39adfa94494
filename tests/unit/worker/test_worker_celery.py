"""The Celery configuration for long GPU jobs, and the task's wiring to the plain function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kombu import Queue
from worker_helpers import make_settings

from worker.celery_app import celery_config

ROOT = Path(__file__).resolve().parents[3]


def test_long_task_settings(tmp_path: Path) -> None:
    conf = celery_config(make_settings(tmp_path, visibility_timeout_s=7200))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_max_tasks_per_child"] == 1
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert conf["task_create_missing_queues"] is False
    assert {q.name for q in conf["task_queues"]} == {"gpu", "cpu"}
    assert all(isinstance(q, Queue) and q.routing_key == q.name for q in conf["task_queues"])
    assert conf["broker_transport_options"]["visibility_timeout"] == 7200
    assert conf["result_backend"] is None


def test_filesystem_broker_folders_match_the_api(tmp_path: Path) -> None:
    from api.dispatch import connection_args

    settings = make_settings(tmp_path)
    conf = celery_config(settings)
    url, options = connection_args(settings.broker_url, settings.work_dir)
    assert conf["broker_url"] == url == "filesystem://"
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        assert conf["broker_transport_options"][key] == options[key]
        assert Path(options[key]).is_dir()
    assert options["data_folder_in"] == options["data_folder_out"]


def test_redis_gets_visibility_timeout_everywhere(tmp_path: Path) -> None:
    conf = celery_config(make_settings(tmp_path, broker_url="redis://localhost:6379/0"))
    assert conf["broker_url"] == "redis://localhost:6379/0"
    assert conf["broker_transport_options"] == {"visibility_timeout": 6 * 3600}
    assert conf["result_backend_transport_options"] == {"visibility_timeout": 6 * 3600}


def run_embedded(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter on embedded settings (SQLite, filesystem broker
    under ``tmp_path``): the worker reads its settings at import, so a subprocess is the only
    clean slate. Returns the JSON object the code printed last."""
    env = {**os.environ, "PCD_BROKER_URL": f"filesystem://{tmp_path / 'broker'}",
           "PCD_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_task_is_registered_and_calls_the_plain_function(tmp_path: Path) -> None:
    """In a subprocess: importing the app reads the process settings from the env."""
    code = (
        "import json, worker.tasks as t, worker.runner as r\n"
        "seen = []\n"
        "r.execute_job = lambda job_id, **kw: seen.append(job_id) or 'succeeded'\n"
        "t.claimable = lambda job_id, settings: True\n"
        "assert t.app.tasks['pcd.run_job'].run is t.run_job.run\n"
        "out = t.run_job.apply(args=['abc']).get()\n"
        "print(json.dumps({'out': out, 'seen': seen,"
        " 'route': t.app.amqp.router.route({}, 'pcd.run_job')['queue'].name}))\n"
    )
    result = run_embedded(code, tmp_path)
    assert result == {"out": "succeeded", "seen": ["abc"], "route": "gpu"}


def test_a_delivery_for_a_job_that_is_not_queued_returns_before_importing_torch(
        tmp_path: Path) -> None:
    """Duplicates (the reaper's re-sends, Redis redeliveries) must be cheap: no torch."""
    code = (
        "import json, sys\n"
        "from jobs import db\n"
        "from jobs.settings import get_settings\n"
        "db.upgrade_to_head(get_settings())\n"
        "import worker.tasks as t\n"
        "out = t.run_job.apply(args=['no-such-job']).get()\n"
        "print(json.dumps({'out': out, 'torch': 'torch' in sys.modules,"
        " 'runner': 'worker.runner' in sys.modules}))\n"
    )
    result = run_embedded(code, tmp_path)
    assert result == {"out": None, "torch": False, "runner": False}
