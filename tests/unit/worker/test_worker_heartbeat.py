"""The heartbeat process (worker/heartbeat.py) on a real SQLite job row.

A SQLite trigger records every beat, so the tests see each ``heartbeat_at`` written, not only
the last one. The first test is the reason the beater is a process: a run that holds the
interpreter lock for seconds must not stop its job's heartbeat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from jobs import service
from worker import heartbeat
from worker.heartbeat import EXIT_LOST, EXIT_STOPPED, BeatOrder, Heartbeat
from worker.progress import DbProgress

INTERVAL_S = 0.2
WORKER = "w-test"

BEAT_LOG = """
CREATE TABLE beat_log (at TEXT NOT NULL);
CREATE TRIGGER log_beat AFTER UPDATE OF heartbeat_at ON jobs
WHEN NEW.heartbeat_at IS NOT NULL
BEGIN INSERT INTO beat_log (at) VALUES (NEW.heartbeat_at); END;
"""


@pytest.fixture
def claimed(world, make_spec, tmp_path: Path) -> Iterator[tuple[str, Callable[[], list[datetime]]]]:
    """A job claimed by ``WORKER``, and a function returning the times of its beats."""
    job_id = world.submit(make_spec(f"file://{tmp_path}", None))
    with world.session() as s:
        for statement in BEAT_LOG.split(";\n"):
            if statement.strip():
                s.execute(text(statement))
        assert service.claim_job(s, job_id, WORKER)

    def beats() -> list[datetime]:
        with world.session() as s:
            rows = s.execute(text("SELECT at FROM beat_log")).scalars().all()
        return [_utc(datetime.fromisoformat(at)) for at in rows]

    yield job_id, beats


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _order(world, job_id: str) -> BeatOrder:
    return BeatOrder(job_id, WORKER, world.settings.database_url, INTERVAL_S)


def _wait(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _hold_the_interpreter_lock(seconds: float) -> None:
    """One C call that keeps the GIL for about ``seconds`` (a big-integer power; CPython
    never releases the lock inside one arithmetic operation)."""
    probe = 400_000
    start = time.perf_counter()
    _ = 3 ** probe
    per_probe = max(time.perf_counter() - start, 1e-4)
    exponent = int(probe * (seconds / per_probe) ** (1 / 1.6))  # Karatsuba: ~n^1.58
    _ = 3 ** exponent


def test_beats_go_on_while_the_run_holds_the_interpreter_lock(world, claimed) -> None:
    job_id, beats = claimed
    with Heartbeat(_order(world, job_id)) as hb:
        assert _wait(lambda: len(beats()) >= 2), "the beater never beat"
        held_from = datetime.now(timezone.utc)
        _hold_the_interpreter_lock(3.0)
        held_to = datetime.now(timezone.utc)
        assert not hb.lost.is_set()
    held_s = (held_to - held_from).total_seconds()
    assert held_s > 1.0, f"the lock was held only {held_s:.2f}s; the test proves nothing"
    inside = [t for t in beats() if held_from < t < held_to]
    # at one beat per 0.2 s, a thread would have written none of these
    assert len(inside) >= 2, (held_s, inside)


def test_a_beat_that_finds_the_job_gone_stops_the_run(world, claimed) -> None:
    job_id, beats = claimed
    with Heartbeat(_order(world, job_id)) as hb:
        assert _wait(lambda: len(beats()) >= 1)
        world.update(job_id, worker_id="another-worker")  # the reaper gave it away
        assert _wait(hb.lost.is_set)
        assert DbProgress(object(), stop_flag=hb.lost).should_stop()  # type: ignore[arg-type]
        proc = hb._proc
        assert proc is not None and proc.returncode == EXIT_LOST


def test_leaving_the_run_stops_the_beats(world, claimed) -> None:
    job_id, beats = claimed
    with Heartbeat(_order(world, job_id)) as hb:
        assert _wait(lambda: len(beats()) >= 1)
    assert hb._proc is not None and hb._proc.returncode == EXIT_STOPPED
    count = len(beats())
    time.sleep(4 * INTERVAL_S)
    assert len(beats()) == count
    assert not hb.lost.is_set()


def test_a_beater_that_was_killed_is_started_again(world, claimed) -> None:
    job_id, beats = claimed
    with Heartbeat(_order(world, job_id)) as hb:
        assert hb._proc is not None
        first = hb._proc.pid
        assert _wait(lambda: len(beats()) >= 1)
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: hb._proc is not None and hb._proc.poll() is not None)
        time.sleep(INTERVAL_S)  # restarts are at most one per interval
        assert not hb.lost.is_set()  # the check that notices the death starts a new one
        assert hb._proc.pid != first
        count = len(beats())
        assert _wait(lambda: len(beats()) > count), "the new beater never beat"


def test_the_beats_stop_when_the_run_is_killed(world, claimed, tmp_path: Path) -> None:
    """A SIGKILLed run closes its end of the pipe; its beater must exit, or the reaper would
    never see the job's heartbeat go stale."""
    job_id, beats = claimed
    script = textwrap.dedent(f"""
        import os, signal, time
        from worker.heartbeat import BeatOrder, Heartbeat
        hb = Heartbeat(BeatOrder({job_id!r}, {WORKER!r}, {world.settings.database_url!r},
                                 {INTERVAL_S}))
        hb.__enter__()
        print(hb._proc.pid, flush=True)
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == -signal.SIGKILL, run.stderr
    beater = int(run.stdout.split()[0])
    assert _wait(lambda: not _alive(beater)), "the beater outlived its run"
    count = len(beats())
    assert count >= 1
    time.sleep(4 * INTERVAL_S)
    assert len(beats()) == count


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next((line.split()[1] for line in status.splitlines()
                  if line.startswith("State:")), "?")
    return state not in ("Z", "X")


def test_a_prestarted_beater_serves_the_next_job(world, claimed) -> None:
    job_id, beats = claimed
    heartbeat.prestart()
    spare = heartbeat._spare
    assert spare is not None
    with Heartbeat(_order(world, job_id)) as hb:
        assert hb._proc is spare and heartbeat._spare is None
        assert _wait(lambda: len(beats()) >= 1)
    assert spare.returncode == EXIT_STOPPED


def test_an_unused_spare_exits_with_its_process() -> None:
    script = ("from worker import heartbeat\n"
              "heartbeat.prestart()\n"
              "print(heartbeat._spare.pid, flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr
    spare = int(run.stdout.split()[0])
    assert _wait(lambda: not _alive(spare)), "the spare outlived its process"
