"""The embedded default end to end, with real processes: uvicorn + one Celery worker over
SQLite, the filesystem broker and a ``file://`` store, all under a temporary directory.

Four stories, in order, on one service: a tiny PCD job succeeds and its artifacts download
sha256-correct; a long job cancelled mid-run ends ``cancelled``; a worker SIGKILLed mid-run is
recovered by the reaper from the database heartbeat (the broker cannot redeliver), and the job
resumes from its checkpoint on a fresh worker (attempt 2, not from iteration 0) and succeeds;
a worker sent SIGTERM (how ``pcd serve`` stops it) hands its job back, and the next worker
resumes it where it stopped.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from client.api import PcdClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
HW = [32, 48]
# How long the drain test waits for its resumed 200-iteration job: a bound on a hang, not a
# speed claim. In a CI run beside two training runs on a 2-core machine (2026-12-07) these
# tiny jobs trained at 0.8-1.4 s an iteration, and the resumed job was still training when
# a 200 s bound ran out; 600 s leaves room for that.
DRAINED_JOB_S = 600
NUM_CLASSES = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Service:
    root: Path
    env: dict[str, str]
    url: str
    key: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", "celery", "-A", "worker.celery_app",
                                 "worker", "-Q", "gpu,cpu", "-P", "solo", "-c", "1",
                                 "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                                 "--loglevel", "INFO"])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def client(self) -> PcdClient:
        return PcdClient(self.url, self.key, timeout=30)

    def logs(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("embedded")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PCD_DATABASE_URL": f"sqlite:///{root / 'pcd.db'}",
        "PCD_BROKER_URL": f"filesystem://{root / 'broker'}",
        "PCD_STORAGE_URL": f"file://{root / 'objects'}",
        "PCD_WORK_DIR": str(root / "work"),
        "PCD_CACHE_DIR": str(root / "cache"),
        "PCD_HEARTBEAT_INTERVAL_S": "1",
        "PCD_HEARTBEAT_TIMEOUT_S": "6",
        "PCD_MAX_ATTEMPTS": "3",
        "OMP_NUM_THREADS": "2",
        # A stalled run in these stories ends with its stacks in the job log (printed when a
        # wait fails) instead of a bare timeout; 120 s is far above a loaded CI's slowest step.
        "PCD_STALL_TIMEOUT_S": "120",
    }
    svc = Service(root, env, f"http://127.0.0.1:{port}")
    subprocess.run([sys.executable, "-c", "from jobs import db; from jobs.settings import "
                    "get_settings; db.upgrade_to_head(get_settings())"],
                   cwd=ROOT, env=env, check=True)
    created = subprocess.run([sys.executable, "-m", "client.cli", "keys", "create", "--team",
                              "e2e"], cwd=ROOT, env=env, check=True, capture_output=True,
                             text=True)
    svc.key = created.stdout.strip().splitlines()[-1]
    svc.start("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                      "--port", str(port)])
    svc.start_worker()
    try:
        wait_for(lambda: _healthy(svc.url), 60, "the API to answer /healthz")
        yield svc
    finally:
        for name in list(svc.procs):
            svc.kill(name, signal.SIGTERM if name == "api" else signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def inputs(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A synthetic dataset (as a tar archive) and an untrained small teacher, uploaded."""
    from pcd_core.data import write_synthetic_dataset
    from pcd_core.models import build_model, save_weights

    tmp = tmp_path_factory.mktemp("inputs")
    write_synthetic_dataset(tmp / "ds", num_classes=NUM_CLASSES, n_train=8, n_val=4,
                            size=tuple(HW), seed=0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp / "ds", arcname="synthetic")
    (tmp / "ds.tar.gz").write_bytes(buf.getvalue())
    teacher = build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16, head_channels=16)
    save_weights(teacher, tmp / "teacher.safetensors")
    with service.client() as c:
        ds = c.upload(tmp / "ds.tar.gz", "dataset")
        ckpt = c.upload(tmp / "teacher.safetensors", "checkpoint")
    return {"dataset": ds["uri"], "teacher": ckpt["uri"]}


def spec(inputs: dict[str, str], name: str, method: str = "pcd", **train: Any
         ) -> dict[str, Any]:
    """A tiny run; ``method="none"`` (plain CE, no teacher) for the stories where only the
    lifecycle matters, which keeps the suite within a few minutes on two CPU cores."""
    d: dict[str, Any] = {
        "name": name,
        "dataset": {"uri": inputs["dataset"], "format": "folder", "num_classes": NUM_CLASSES,
                    "ignore_index": 255, "crop": HW, "scale_range": [1.0, 1.0]},
        "teacher": {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 16,
                    "checkpoint": inputs["teacher"]},
        "student": {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 8},
        "method": {"name": "pcd", "rematch_every": 5, "score_batches": 2},
        "train": {"iterations": 6, "batch_size": 2, "num_workers": 0, "log_every": 1,
                  "eval_every": 1000, "checkpoint_every": 1000, **train},
        "resources": {"gpus": 0, "queue": "cpu"},
    }
    if method == "none":
        d["method"] = {"name": "none"}
        del d["teacher"]
    return d


def wait_status(client: PcdClient, job_id: str, statuses: set[str], timeout: float,
                service: Service) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = client.get(job_id)
        return job if job["status"] in statuses else None

    try:
        return wait_for(check, timeout, f"job {job_id} to reach {statuses}", poll=0.3)
    except AssertionError:
        # Where the job stood and every worker's log, the replacements started by a test
        # included: a run still training (slow machine) reads differently from a lost one.
        job = client.get(job_id)
        print(job["status"], job.get("progress"), client.logs(job_id),
              *(service.logs(log.stem) for log in sorted(service.root.glob("worker*.log"))))
        raise


def log_text(client: PcdClient, job_id: str) -> str:
    return "\n".join(line["message"] for line in client.logs(job_id)["lines"])


def test_job_succeeds_and_artifacts_verify(service: Service, inputs: dict[str, str],
                                           tmp_path: Path) -> None:
    with service.client() as c:
        job = c.submit(spec(inputs, "ok"))
        done = wait_status(c, job["id"], {"succeeded", "failed", "cancelled"}, 120, service)
        assert done["status"] == "succeeded", (done, log_text(c, job["id"]))
        assert done["attempts"] == 1
        names = {a["name"] for a in c.artifacts(job["id"])}
        assert {"student.safetensors", "model.json", "student.torchscript.pt", "student.onnx",
                "metrics.json"} <= names
        for name in names:  # download verifies each sha256 against the listing
            assert c.download(job["id"], name, tmp_path).stat().st_size > 0


def test_cancel_mid_run(service: Service, inputs: dict[str, str]) -> None:
    with service.client() as c:
        job = c.submit(spec(inputs, "cancel-me", "none", iterations=100_000))
        wait_for(lambda: (c.get(job["id"])["progress"]["iteration"] or 0) >= 2, 90,
                 "training to start")
        c.cancel(job["id"])
        done = wait_status(c, job["id"], {"cancelled", "failed", "succeeded"}, 60, service)
        assert done["status"] == "cancelled", done


def test_sigkill_worker_is_recovered_and_resumes(service: Service,
                                                 inputs: dict[str, str]) -> None:
    with service.client() as c:
        job = c.submit(spec(inputs, "survivor", "none", iterations=30,
                              checkpoint_every=5))
        wait_for(lambda: "checkpoint at iteration" in log_text(c, job["id"]), 90,
                 "a first checkpoint")
        service.kill("worker")  # SIGKILL: no cleanup, no ack, heartbeat stops
        killed_at = c.get(job["id"])["progress"]["iteration"]
        service.start_worker("worker2")
        done = wait_status(c, job["id"], {"succeeded", "failed", "cancelled"}, 200, service)
        text = log_text(c, job["id"])
        assert done["status"] == "succeeded", (done, text)
        assert done["attempts"] == 2
        resumed = re.search(r"resuming from checkpoint at iteration (\d+)", text)
        assert resumed is not None, text
        assert 0 < int(resumed.group(1)) <= killed_at


@pytest.mark.timeout(DRAINED_JOB_S + 240)  # the module's 300 s would cut the wait short
def test_sigterm_drains_the_solo_worker_and_a_new_one_resumes(service: Service,
                                                              inputs: dict[str, str]) -> None:
    """``pcd serve``'s stop (SIGTERM to the worker alone) on the embedded stack: with the solo
    pool the run is in the worker's main process, which drains it there; the job goes back
    to the queue through the filesystem broker, and the next worker resumes it where it
    stopped, without the reaper."""
    name = next(n for n in ("worker2", "worker") if n in service.procs)
    with service.client() as c:
        job = c.submit(spec(inputs, "drained", "none", iterations=200))  # no periodic checkpoint
        wait_for(lambda: (c.get(job["id"])["progress"]["iteration"] or 0) >= 3, 90,
                 "training to start")
        proc = service.procs.pop(name)
        os.kill(proc.pid, signal.SIGTERM)  # the leader only, as `pcd serve` stops it
        assert proc.wait(timeout=90) == 0, service.logs(name)
        queued = c.get(job["id"])
        text = log_text(c, job["id"])
        assert queued["status"] == "queued", (queued, text)
        released = re.findall(r"^released at iteration (\d+)", text, re.M)
        assert len(released) == 1 and int(released[0]) >= 3, text
        service.start_worker("worker3")
        done = wait_status(c, job["id"], {"succeeded", "failed", "cancelled"}, DRAINED_JOB_S,
                           service)
        text = log_text(c, job["id"])
        assert done["status"] == "succeeded", (done, text)
        assert done["attempts"] == 2 and "reaper:" not in text, text
        resumed = re.findall(r"resuming from checkpoint at iteration (\d+)", text)
        assert resumed == released, (resumed, released)
