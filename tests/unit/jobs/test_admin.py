"""``python -m jobs.admin``: the key bootstrap that ``pcd keys create`` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text


def _admin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PCD_DATABASE_URL": f"sqlite:///{tmp_path / 'pcd.db'}"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.admin", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_create_then_revoke_key(tmp_path: Path) -> None:
    created = _admin(tmp_path, "create-key", "--team", "vision")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("pcd_") and len(key) > 32

    engine = create_engine(f"sqlite:///{tmp_path / 'pcd.db'}")
    with engine.connect() as conn:
        teams = conn.execute(text("SELECT name FROM teams")).scalars().all()
        hashes = conn.execute(text("SELECT key_hash FROM api_keys")).scalars().all()
    assert teams == ["vision"]
    assert len(hashes) == 1 and key not in hashes[0]  # only the hash is stored

    assert _admin(tmp_path, "revoke-key", key).returncode == 0
    again = _admin(tmp_path, "revoke-key", key)
    assert again.returncode == 1 and "no such live key" in again.stderr
