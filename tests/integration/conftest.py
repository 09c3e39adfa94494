"""Real services for integration tests: PostgreSQL, Redis and SeaweedFS (S3).

``scripts/services.sh up`` starts whatever is not already running (idempotent, well under a
second when all is up) and prints the connection settings, which the session fixtures
parse and hand out. Set ``PCD_SERVICES=external`` to skip the script and use the
``PCD_*``/``AWS_*`` variables already in the environment (e.g. CI service containers).

A missing service is a test FAILURE when ``CI=true`` (CI must not go green by skipping)
and a skip with the reason otherwise (a laptop without PostgreSQL can still run the rest).
Every test collected under tests/integration/ is marked ``integration``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES_SH = ROOT / "scripts" / "services.sh"
_ENV_NAMES = ("PCD_DATABASE_URL", "PCD_BROKER_URL", "PCD_STORAGE_URL", "PCD_S3_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere (see the module docstring)."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"integration service unavailable (CI=true): {reason}", pytrace=False)
    pytest.skip(f"integration service unavailable: {reason}")


def _parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export "):].partition("=")
            env[name.strip()] = value.strip()
    return env


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """Connection settings of the running services (``PCD_*``, ``AWS_*``)."""
    if os.environ.get("PCD_SERVICES", "").lower() == "external":
        env = {k: os.environ[k] for k in _ENV_NAMES if k in os.environ}
        missing = [k for k in _ENV_NAMES if k not in env]
        if missing:
            unavailable(f"PCD_SERVICES=external but {', '.join(missing)} unset")
        return env
    try:
        proc = subprocess.run(["bash", str(SERVICES_SH), "up"], capture_output=True,
                              text=True, timeout=180, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"scripts/services.sh up did not finish: {exc}")
    if proc.returncode != 0:
        unavailable(f"scripts/services.sh up exited {proc.returncode}: "
                    f"{proc.stderr.strip()[-1500:]}")
    return _parse_exports(proc.stdout)


@pytest.fixture(scope="session")
def postgres_url(services_env: dict[str, str]) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) of a reachable database."""
    url = services_env["PCD_DATABASE_URL"]
    try:
        import psycopg

        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        unavailable(f"PostgreSQL at {url}: {exc}")
    return url


@pytest.fixture(scope="session")
def redis_url(services_env: dict[str, str]) -> str:
    """A ``redis://`` URL of a Redis answering PING."""
    url = services_env["PCD_BROKER_URL"]
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except Exception as exc:
        unavailable(f"Redis at {url}: {exc}")
    return url


@pytest.fixture(scope="session")
def s3_settings(services_env: dict[str, str]) -> dict[str, Any]:
    """``open_store`` keyword arguments plus ``url`` and ``bucket`` of a reachable bucket."""
    url = services_env["PCD_STORAGE_URL"]
    opts: dict[str, Any] = {
        "endpoint_url": services_env.get("PCD_S3_ENDPOINT_URL"),
        "access_key": services_env.get("AWS_ACCESS_KEY_ID"),
        "secret_key": services_env.get("AWS_SECRET_ACCESS_KEY"),
        "region": services_env.get("AWS_DEFAULT_REGION"),
    }
    try:
        from jobs.storage import open_store

        store = open_store(url, **opts, retry_s=10)  # a down server: fail soon, not in 2 min
        store.stat("probe/readiness")  # raises when the endpoint or the bucket is missing
    except Exception as exc:
        unavailable(f"S3 at {opts['endpoint_url']} ({url}): {exc}")
    return {"url": url, "bucket": url[len("s3://"):].split("/")[0], **opts}


@pytest.fixture(scope="session")
def s3_client(s3_settings: dict[str, Any]) -> Any:
    """One boto3 client for the session (creating one costs ~0.3 s of CPU)."""
    from jobs.storage.s3 import S3Store

    opts = {k: v for k, v in s3_settings.items() if k not in ("url", "bucket")}
    return S3Store(s3_settings["bucket"], **opts).client


@pytest.fixture
def s3_prefix_url(s3_settings: dict[str, Any], s3_client: Any) -> Iterator[str]:
    """An ``s3://bucket/it-<random>`` URL of its own, emptied afterwards."""
    url = f"s3://{s3_settings['bucket']}/it-{uuid.uuid4().hex[:12]}"
    yield url
    from jobs.storage.s3 import S3Store

    store = S3Store(s3_settings["bucket"], url.split("/", 3)[3], client=s3_client)
    for info in store.list():
        store.delete(info.key)
