"""Shared helpers of the worker tests (a uniquely named module: ``conftest`` is not importable
by name when several test folders have one)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from jobs.settings import Settings


def make_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{root / 'pcd.db'}",
        "storage_url": f"file://{root / 'objects'}",
        "broker_url": f"filesystem://{root / 'broker'}",
        "work_dir": root / "work",
        "cache_dir": root / "cache",
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 5.0,
        "progress_interval_s": 0.0,
        "max_attempts": 3,
        "migrate_on_start": False,
    }
    values.update(overrides)
    return Settings(**values)


def tar_gz(src: Path, dest: Path) -> Path:
    """``src`` as ``dest``, a gzipped tar holding the directory under its own name."""
    with tarfile.open(dest, mode="w:gz") as tar:
        tar.add(src, arcname=src.name)
    return dest
