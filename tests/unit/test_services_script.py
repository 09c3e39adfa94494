"""scripts/services.sh finds a SeaweedFS that serves a deleted data directory.

Such a server (its checkout deleted and cloned again at the same path) still answers, but
large objects come back truncated; `up` must stop it. A stand-in process shaped like one
(same command line, 400 open .dat files in its -dir) is enough: the check reads /proc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PORT = "59997"  # nothing listens there: only the command line is matched

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def _stale_pids() -> list[int]:
    run = subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "stale-weed"],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PCD_S3_PORT": PORT})
    assert run.returncode == 0, run.stderr
    return [int(pid) for pid in run.stdout.split()]


def test_a_server_whose_volume_files_were_deleted_is_found(tmp_path: Path) -> None:
    data = tmp_path / "seaweedfs"
    data.mkdir()
    holder = ("import os, sys, time\n"
              "files = [open(os.path.join(sys.argv[1], f'{i}.dat'), 'w') for i in range(400)]\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(data), "weed", "server",
                             f"-dir={data}", "-s3", f"-s3.port={PORT}"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert proc.pid not in _stale_pids()  # its files are there: not stale
        shutil.rmtree(data)
        data.mkdir()  # a fresh clone at the same path: the directory exists again
        assert proc.pid in _stale_pids()
    finally:
        proc.kill()
        proc.wait()
