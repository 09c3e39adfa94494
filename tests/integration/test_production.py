"""Production mode under faults: PostgreSQL + Redis + SeaweedFS S3, a uvicorn API and two
Celery worker processes, all real, on loopback (issue 6).

One cluster serves the module (a fresh database ``pcd_it_<random>``, a fresh S3 prefix, a
Redis server of its own on a free port so that restarting it disturbs no one else). The
stories, in order:

- the whole job path: upload, submit, run, download every artifact with its sha256 checked;
- SIGKILL the worker running a job mid-training: the reaper re-queues it from the database
  heartbeat and it resumes from its last S3 checkpoint on the *other* worker;
- restart Redis (``SHUTDOWN NOSAVE``) while two jobs train and a third waits in the queue:
  the trainers resume from S3, the lost message is re-sent by the reaper;
- submit while Redis is down (201, ``/readyz`` says which dependency is down): the job runs
  once Redis is back, from the reaper's re-dispatch;
- SIGTERM a worker mid-training (a node drain): the job is handed back at a fresh checkpoint
  and resumes on the other worker without the reaper, the worker exits by itself;
- restart the API mid-job (training goes on without it);
- cancel during the scoring pass and during training;
- 20 concurrent POSTs with one Idempotency-Key create one job; another body is a 409.

"Nothing lost, nothing run twice" is checked on every story: the job ends where it must, its
status history is exactly the expected one, ``succeeded`` appears once, each artifact exists
once in the API and once in S3 with the sha256 the API lists, and as many attempts started
as were claimed. Child logs are printed when a story fails.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _inputs import job_spec, upload_inputs
from _procs import Cluster, db_row, db_rows, open_cluster, wait_for

from client.api import PcdClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TERMINAL = {"succeeded", "failed", "cancelled"}
EXPECTED_ARTIFACTS = {"student.safetensors", "model.json", "student.torchscript.pt",
                      "student.onnx", "metrics.json"}
ONE_RUN = ["queued", "running", "succeeded"]
LOST_ONCE = ["queued", "running", "queued", "running", "succeeded"]
CANCELLED = ["queued", "running", "cancelling", "cancelled"]


def _unavailable(reason: str) -> None:
    """Fail under CI (a missing service must never go green), skip elsewhere."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"integration service unavailable (CI=true): {reason}", pytrace=False)
    pytest.skip(f"integration service unavailable: {reason}")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, services_env: dict[str, str],
            postgres_url: str, redis_url: str, s3_settings: dict[str, Any]
            ) -> Iterator[Cluster]:
    """API + two workers on a fresh database, a fresh S3 prefix and a Redis of our own.

    ``postgres_url``/``redis_url``/``s3_settings`` are requested so that a missing service
    fails (CI) or skips with its reason before anything starts.
    """
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unavailable("redis-server/redis-cli not on PATH (needed for a private Redis)")
    env = {**services_env, "PCD_DATABASE_URL": postgres_url,
           "PCD_STORAGE_URL": f"s3://{s3_settings['bucket']}"}
    with open_cluster(tmp_path_factory.mktemp("prod"), env) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A synthetic dataset (tar.gz) and a teacher trained for a few steps, both uploaded."""
    return upload_inputs(cluster, tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def client(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[PcdClient]:
    """A client of the cluster; the children's logs are printed if the test fails."""
    failed_before = request.session.testsfailed
    with PcdClient(cluster.url, cluster.api_key, timeout=30) as c:
        yield c
    if request.session.testsfailed > failed_before:
        print(cluster.dump_logs())


# ------------------------------------------------------------------------------ helpers
def poll_job(client: PcdClient, job_id: str) -> dict[str, Any] | None:
    """``GET /jobs/{id}``, or None while the API is unreachable (a restart): keep polling."""
    try:
        return client.get(job_id)
    except httpx.TransportError:
        return None


def wait_job(client: PcdClient, job_id: str, timeout: float = 150,
             statuses: set[str] = TERMINAL) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = poll_job(client, job_id)
        return job if job is not None and job["status"] in statuses else None

    return wait_for(check, timeout, f"job {job_id} to reach {sorted(statuses)}", poll=0.25)


def wait_training(client: PcdClient, job_id: str, min_iteration: int = 1,
                  timeout: float = 120) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = poll_job(client, job_id)
        if job is None:
            return None
        if job["status"] in TERMINAL:
            raise AssertionError(f"job ended before training: {job}")
        progress = job["progress"]
        ok = progress.get("phase") == "training" and progress["iteration"] >= min_iteration
        return job if ok else None

    return wait_for(check, timeout, f"job {job_id} to train past {min_iteration}", poll=0.1)


def log_text(client: PcdClient, job_id: str) -> str:
    return "\n".join(line["message"] for line in client.logs(job_id)["lines"])


def statuses_of(job: dict[str, Any]) -> list[str]:
    return [t["to_status"] for t in job["transitions"]]


def cluster_store(cluster: Cluster) -> Any:
    """The cluster's S3 store, opened as the API and the workers open it."""
    from jobs.storage import open_store

    env = cluster.env
    return open_store(env["PCD_STORAGE_URL"], endpoint_url=env["PCD_S3_ENDPOINT_URL"],
                      access_key=env["AWS_ACCESS_KEY_ID"],
                      secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      region=env["AWS_DEFAULT_REGION"])


def stored_keys(cluster: Cluster, job_id: str) -> list[str]:
    """Object keys under ``jobs/<id>/`` in the cluster's S3 prefix."""
    return sorted(info.key for info in cluster_store(cluster).list(f"jobs/{job_id}/"))


def row(cluster: Cluster, job_id: str, columns: str) -> tuple[Any, ...]:
    """Columns of the job's row, read from PostgreSQL directly."""
    found = db_row(cluster.database_url, f"SELECT {columns} FROM jobs WHERE id = %s", job_id)
    assert found is not None, job_id
    return found


def assert_artifacts_intact(cluster: Cluster, client: PcdClient, job_id: str,
                            dest: Path) -> dict[str, Path]:
    """Download every artifact and check its sha256 three ways: the bytes received, the
    digest the API lists, and the digest stored with the S3 object."""
    store = cluster_store(cluster)
    paths = {}
    for art in client.artifacts(job_id):
        name = art["name"]
        assert re.fullmatch(r"[0-9a-f]{64}", art["sha256"] or ""), art
        path = client.download(job_id, name, dest)  # also checks the listed digest
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        stored = store.stat(f"jobs/{job_id}/artifacts/{name}")
        assert stored is not None, name
        assert got == art["sha256"] == stored.sha256, (name, got, art, stored)
        assert path.stat().st_size == art["size"] == stored.size > 0, (name, art, stored)
        paths[name] = path
    return paths


def assert_ran_once(cluster: Cluster, client: PcdClient, job: dict[str, Any],
                    attempts: int) -> None:
    """Succeeded exactly once, after ``attempts`` claims (each lost attempt re-queued once);
    trained to the end; each artifact stored once; no checkpoints left behind; as many
    attempts started as claimed."""
    job_id = job["id"]
    assert job["status"] == "succeeded", (job, log_text(client, job_id))
    history = statuses_of(job)
    expected = ["queued"] + ["running", "queued"] * (attempts - 1) + ["running", "succeeded"]
    assert history == expected, history
    assert job["attempts"] == attempts, job["attempts"]
    progress = job["progress"]
    assert job["phase"] == "done" and progress["iteration"] == progress["max_iterations"] \
        == job["spec"]["train"]["iterations"], progress
    assert job["error"] is None, job["error"]
    names = [a["name"] for a in client.artifacts(job_id)]
    assert len(names) == len(set(names)) and set(names) >= EXPECTED_ARTIFACTS, names
    keys = stored_keys(cluster, job_id)
    assert not [k for k in keys if "/checkpoints/" in k], keys
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if "/artifacts/" in k) == sorted(names)
    n_started = len(re.findall(r"^attempt \d+ started", log_text(client, job_id), re.M))
    assert n_started == attempts, log_text(client, job_id)


# ------------------------------------------------------------------------------ stories
def test_whole_job_path_with_sha256_downloads(cluster: Cluster, inputs: dict[str, str],
                                              client: PcdClient, tmp_path: Path) -> None:
    job = client.submit(job_spec(inputs, "path"))
    assert job["status"] == "queued"
    done = wait_job(client, job["id"])
    assert_ran_once(cluster, client, done, attempts=1)
    for art in client.artifacts(job["id"]):
        # the API answers 307 to a presigned S3 URL on the S3 endpoint, never the bytes
        raw = httpx.get(f"{cluster.url}/jobs/{job['id']}/artifacts/{art['name']}",
                        headers={"Authorization": f"Bearer {cluster.api_key}"}, timeout=10)
        assert raw.status_code == 307, raw.text
        assert raw.headers["location"].startswith(cluster.env["PCD_S3_ENDPOINT_URL"])
    paths = assert_artifacts_intact(cluster, client, job["id"], tmp_path)
    model = json.loads(paths["model.json"].read_text())
    assert model["num_classes"] == 4 and model["arch"] == "deeplabv3_resnet18", model
    metrics = json.loads(paths["metrics.json"].read_text())
    assert metrics["iterations"] == 6 and 0.0 <= metrics["student"]["miou"] <= 1.0, metrics
    assert client.metrics(job["id"]), "no metric series recorded"


def test_sigkill_worker_mid_training_resumes_on_the_other(
        cluster: Cluster, inputs: dict[str, str], client: PcdClient, tmp_path: Path) -> None:
    job = client.submit(job_spec(inputs, "survivor", iterations=40, checkpoint_every=10))
    wait_for(lambda: row(cluster, job["id"], "checkpoint_iteration")[0], 120,
             "a first S3 checkpoint")
    worker_id, = row(cluster, job["id"], "worker_id")
    victim = cluster.owner_of(int(str(worker_id).split(":")[1]))
    assert victim in ("w1", "w2"), (worker_id, list(cluster.procs))
    survivor = "w2" if victim == "w1" else "w1"
    cluster.signal(victim, signal.SIGKILL)  # the whole node: parent and child, no cleanup
    try:
        # What the dead attempt left: the row points at a complete checkpoint in S3, the only one.
        killed_at, ckpt_it, ckpt_uri, status = row(
            cluster, job["id"], "iteration, checkpoint_iteration, checkpoint_uri, status")
        assert status == "running" and 0 < ckpt_it <= killed_at < 40, (status, ckpt_it, killed_at)
        key = f"jobs/{job['id']}/checkpoints/ckpt-{ckpt_it:09d}.pt"
        assert str(ckpt_uri).endswith(key), (ckpt_uri, key)
        ckpts = [k for k in stored_keys(cluster, job["id"]) if "/checkpoints/" in k]
        # older ones were deleted; a newer one may have been uploaded but not yet recorded
        assert ckpts and ckpts[0] == key, (key, ckpts)  # sorted: zero-padded iterations

        done = wait_job(client, job["id"], timeout=150)
        assert_ran_once(cluster, client, done, attempts=2)
        text = log_text(client, job["id"])
        assert re.search(r"^reaper: requeued: no heartbeat from worker " + re.escape(worker_id),
                         text, re.M), text
        resumed = re.findall(r"attempt (\d+): resuming from checkpoint at iteration (\d+)", text)
        assert resumed == [("2", str(ckpt_it))], (resumed, ckpt_it)  # from the row's checkpoint
        claims = [m for (m,) in db_rows(cluster.database_url,
                                        "SELECT message FROM job_transitions WHERE job_id = %s "
                                        "AND to_status = 'running' ORDER BY id", job["id"])]
        assert len(claims) == 2 and worker_id in claims[0] and worker_id not in claims[1], claims
        assert cluster.procs[survivor].poll() is None
        # the resumed run trained the remaining iterations, not the whole budget again
        metrics = json.loads(assert_artifacts_intact(cluster, client, job["id"], tmp_path)
                             ["metrics.json"].read_text())
        assert metrics["iterations"] == 40, metrics["iterations"]
    finally:  # back to two workers for the next stories, also when an assertion failed
        cluster.start_worker(victim)
        cluster.wait_worker_ready(victim)


def test_sigterm_drains_the_worker_and_the_job_resumes_where_it_stopped(
        cluster: Cluster, inputs: dict[str, str], client: PcdClient, tmp_path: Path) -> None:
    """A node drain: SIGTERM to the worker's main process only (what an orchestrator sends).
    The run checkpoints at once, the job goes back to the queue without waiting for the
    reaper and without being charged an attempt, the worker exits by itself, and the other
    worker resumes from the drain's checkpoint: no work lost."""
    job = client.submit(job_spec(inputs, "drained", iterations=40))  # no periodic checkpoint
    wait_training(client, job["id"], min_iteration=5)
    worker_id, = row(cluster, job["id"], "worker_id")
    victim = cluster.owner_of(int(str(worker_id).split(":")[1]))
    assert victim in ("w1", "w2"), (worker_id, list(cluster.procs))
    proc = cluster.procs.pop(victim)
    os.kill(proc.pid, signal.SIGTERM)  # Celery's warm shutdown
    try:
        assert proc.wait(timeout=90) == 0, "the drained worker did not exit by itself"
        done = wait_job(client, job["id"], timeout=150)
        assert_ran_once(cluster, client, done, attempts=2)
        text = log_text(client, job["id"])
        released = re.findall(r"^released at iteration (\d+)", text, re.M)
        resumed = re.findall(r"attempt 2: resuming from checkpoint at iteration (\d+)", text)
        assert len(released) == 1 and resumed == released and int(released[0]) >= 5, text
        assert "reaper:" not in text, text  # handed back, not recovered from a stale heartbeat
        assert "could not be re-sent" not in text, text
        for name in ("w1", "w2", "api"):  # the worker's own message, not the reaper's re-send
            assert f"job {job['id']} re-dispatched" not in cluster.log_text(name), name
        max_attempts, infra_retries = row(cluster, job["id"], "max_attempts, infra_retries")
        assert max_attempts == int(cluster.env["PCD_MAX_ATTEMPTS"]) + 1 and infra_retries == 0
        metrics = json.loads(assert_artifacts_intact(cluster, client, job["id"], tmp_path)
                             ["metrics.json"].read_text())
        assert metrics["iterations"] == 40, metrics["iterations"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.start_worker(victim)
        cluster.wait_worker_ready(victim)


def test_redis_restart_mid_job(cluster: Cluster, inputs: dict[str, str],
                               client: PcdClient) -> None:
    """Both workers train when Redis restarts without persistence, and a third job waits in
    Redis: its message is lost with the restart. Nothing may be lost or run twice."""
    trainers = [client.submit(job_spec(inputs, f"broker-blip-{i}", iterations=30,
                                       checkpoint_every=5)) for i in range(2)]
    for job in trainers:  # each has a checkpoint in S3 to resume from
        wait_for(lambda job=job: row(cluster, job["id"], "checkpoint_iteration")[0], 120,
                 f"a first checkpoint of {job['name']}")
    waiting = client.submit(job_spec(inputs, "broker-blip-queued"))
    time.sleep(0.5)
    assert client.get(waiting["id"])["status"] == "queued"  # both workers are busy
    cluster.redis.restart(down_s=2.0)  # SHUTDOWN NOSAVE: queues and unacked messages gone
    after = client.submit(job_spec(inputs, "after-blip"))  # the API publishes to the new Redis
    for job in trainers:
        done = wait_job(client, job["id"], timeout=180)
        print("redis restart:", [(x["to_status"], x["message"]) for x in done["transitions"]])
        # A trainer either survives the blip (attempt 1) or, when Celery cancels it on the
        # connection loss, is re-queued by the reaper and resumes from its S3 checkpoint.
        assert done["attempts"] in (1, 2), statuses_of(done)
        assert_ran_once(cluster, client, done, attempts=done["attempts"])
        resumed = re.findall(r"resuming from checkpoint at iteration (\d+)",
                             log_text(client, job["id"]))
        assert len(resumed) == done["attempts"] - 1, resumed
        assert all(5 <= int(it) < 30 for it in resumed), resumed
    for job in (waiting, after):
        assert_ran_once(cluster, client, wait_job(client, job["id"], timeout=120), attempts=1)
    for name in ("w1", "w2"):  # both workers reconnected and consume again
        assert cluster.procs[name].poll() is None, cluster.log_tail(name)


def test_job_submitted_while_redis_is_down_runs_when_it_is_back(
        cluster: Cluster, inputs: dict[str, str], client: PcdClient) -> None:
    """The API commits the row and answers 201 even when it cannot publish; ``/readyz``
    names the broker; the reaper re-sends the message of a job left ``queued`` (after
    ``PCD_REDISPATCH_AFTER_S``, 5 s here) once Redis is back."""
    cluster.redis.shutdown()
    try:
        ready = httpx.get(f"{cluster.url}/readyz", timeout=30)
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert not checks["broker"]["ok"] and checks["database"]["ok"], checks
        t0 = time.monotonic()
        job = client.submit(job_spec(inputs, "broker-down"))  # 201: the row is the truth
        assert job["status"] == "queued"
        assert time.monotonic() - t0 < 20, "POST /jobs hung on the broker"
    finally:
        cluster.redis.start()
    done = wait_job(client, job["id"], timeout=90)
    assert_ran_once(cluster, client, done, attempts=1)
    assert any(f"job {job['id']} re-dispatched" in cluster.log_text(w) for w in ("w1", "w2"))
    assert httpx.get(f"{cluster.url}/readyz", timeout=30).status_code == 200


def test_api_restart_mid_job(cluster: Cluster, inputs: dict[str, str],
                             client: PcdClient) -> None:
    job = client.submit(job_spec(inputs, "api-blip", iterations=40))
    wait_training(client, job["id"], min_iteration=2)
    cluster.signal("api", signal.SIGTERM)
    assert poll_job(client, job["id"]) is None  # the API is really gone
    before, = row(cluster, job["id"], "iteration")
    wait_for(lambda: row(cluster, job["id"], "iteration")[0] > before, 60,
             "training to go on without the API")
    cluster.start_api()
    done = wait_job(client, job["id"])  # the same client resumes polling
    assert_ran_once(cluster, client, done, attempts=1)


def test_cancel_during_scoring(cluster: Cluster, inputs: dict[str, str],
                               client: PcdClient) -> None:
    job = client.submit(job_spec(inputs, "cancel-scoring", iterations=10_000,
                                 method={"score_batches": 400}))
    wait_for(lambda: (poll_job(client, job["id"]) or {}).get("phase") == "scoring", 120,
             "the scoring pass", poll=0.1)
    client.cancel(job["id"])
    done = wait_job(client, job["id"], timeout=120)
    _assert_cancelled(cluster, client, done)
    assert done["progress"]["iteration"] == 0, done["progress"]  # never reached training
    assert "cancelled at iteration 0" in log_text(client, job["id"])


def test_cancel_during_training(cluster: Cluster, inputs: dict[str, str],
                                client: PcdClient) -> None:
    job = client.submit(job_spec(inputs, "cancel-training", iterations=10_000,
                                 checkpoint_every=5))
    wait_training(client, job["id"], min_iteration=6)
    assert row(cluster, job["id"], "checkpoint_iteration")[0] >= 5  # a checkpoint to clean up
    client.cancel(job["id"])
    done = wait_job(client, job["id"], timeout=60)
    _assert_cancelled(cluster, client, done)
    stopped = re.findall(r"cancelled at iteration (\d+)", log_text(client, job["id"]))
    assert len(stopped) == 1 and 6 <= int(stopped[0]) < 10_000, stopped


def _assert_cancelled(cluster: Cluster, client: PcdClient, job: dict[str, Any]) -> None:
    assert job["status"] == "cancelled", (job, log_text(client, job["id"]))
    assert statuses_of(job) == CANCELLED, statuses_of(job)
    assert job["attempts"] == 1 and job["error"] is None, job
    assert client.artifacts(job["id"]) == []
    assert stored_keys(cluster, job["id"]) == []  # no artifacts, checkpoints cleaned up


def test_concurrent_posts_with_one_idempotency_key(cluster: Cluster, inputs: dict[str, str],
                                                   client: PcdClient) -> None:
    spec = job_spec(inputs, "idem", iterations=10_000)
    key = f"idem-{uuid.uuid4().hex}"
    barrier = threading.Barrier(20)
    headers = {"Authorization": f"Bearer {cluster.api_key}", "Idempotency-Key": key}

    def post(_: int) -> tuple[int, str]:
        with httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as http:
            barrier.wait(timeout=30)
            r = http.post("/jobs", json=spec)
            return r.status_code, r.json().get("id", r.text)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))
    codes = sorted(code for code, _ in answers)
    ids = {job_id for _, job_id in answers}
    assert codes == [200] * 19 + [201], answers
    assert len(ids) == 1, answers
    (n,) = db_row(cluster.database_url, "SELECT count(*) FROM jobs WHERE name = 'idem'") or (0,)
    assert n == 1
    # the same key with another body is refused, and creates nothing
    other = httpx.post(f"{cluster.url}/jobs", headers=headers, timeout=30,
                       json={**spec, "name": "idem-other"})
    assert other.status_code == 409, other.text
    (n,) = db_row(cluster.database_url,
                  "SELECT count(*) FROM jobs WHERE name LIKE 'idem%%'") or (0,)
    assert n == 1
    job_id = ids.pop()
    client.cancel(job_id)  # do not leave a long job running on the workers
    assert wait_job(client, job_id, timeout=60)["status"] == "cancelled"
