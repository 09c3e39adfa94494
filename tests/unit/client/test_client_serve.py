"""How ``pcd serve`` stops its children (client/serve.py ``stop_all``), on real processes.

The worker must get SIGTERM alone (Celery's warm shutdown drains its running job; its pool
child must not be signalled), be given its grace period, and lose what is left of its
process group afterwards; a child that does not stop in time, or a second Ctrl-C, gets
SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from client.serve import Child, stop_all

# A leader that starts a helper in its own process group (as Celery starts its pool child);
# each writes what it received to a file. The leader takes ``delay`` seconds to stop.
HELPER = """
import os, signal, sys, time
def note(signum, frame):
    open(os.path.join(sys.argv[1], "helper"), "a").write(f"got {signum}\\n")
signal.signal(signal.SIGTERM, note)
open(os.path.join(sys.argv[1], "helper.pid"), "w").write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""
LEADER = """
import os, signal, subprocess, sys, time
folder, delay, helper_code = sys.argv[1], float(sys.argv[2]), sys.argv[3]
helper = subprocess.Popen([sys.executable, "-c", helper_code, folder])
def stop(signum, frame):
    open(os.path.join(folder, "leader"), "a").write(f"got {signum}\\n")
    time.sleep(delay)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(folder, "ready"), "w").write("")
while True:
    time.sleep(0.1)
"""


def _start(tmp_path: Path, delay: float, **kwargs: object) -> Child:
    child = Child("worker", [sys.executable, "-c", LEADER, str(tmp_path), str(delay), HELPER],
                  restart=False, **kwargs)  # type: ignore[arg-type]
    child.start(dict(os.environ), tmp_path)
    deadline = time.monotonic() + 30
    while not ((tmp_path / "ready").exists() and (tmp_path / "helper.pid").exists()):
        assert time.monotonic() < deadline, "the stand-in worker never started"
        time.sleep(0.05)
    return child


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_the_worker_alone_gets_sigterm_its_grace_and_then_its_group_is_cleared(
        tmp_path: Path) -> None:
    child = _start(tmp_path, delay=1.0, stop_leader_only=True, grace_s=30.0)
    helper = int((tmp_path / "helper.pid").read_text())
    start = time.monotonic()
    stop_all([child], log=lambda _: None)
    assert child.proc is not None and child.proc.returncode == 0  # it stopped by itself
    assert time.monotonic() - start >= 1.0  # after its own one-second stop
    assert (tmp_path / "leader").read_text().strip() == "got 15"
    assert not (tmp_path / "helper").exists(), "the helper was sent SIGTERM too"
    deadline = time.monotonic() + 10
    while not _gone(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(helper), "the helper outlived its leader"


def test_a_child_past_its_grace_is_killed(tmp_path: Path) -> None:
    child = _start(tmp_path, delay=60.0, stop_leader_only=True, grace_s=1.0)
    stop_all([child], log=lambda _: None)
    assert child.proc is not None and child.proc.returncode == -9


def test_a_second_ctrl_c_ends_the_wait(tmp_path: Path) -> None:
    child = _start(tmp_path, delay=60.0, stop_leader_only=True, grace_s=60.0)
    start = time.monotonic()
    stop_all([child], log=lambda _: None, hurry=lambda: time.monotonic() - start > 0.5)
    assert child.proc is not None and child.proc.returncode == -9
    assert time.monotonic() - start < 30
