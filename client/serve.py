"""``pcd serve``: the embedded default in one command (API + one worker + the reaper).

Why subprocesses rather than threads in this process: the client package must not import
``api``, ``jobs``, ``worker`` or torch (DESIGN.md arrows), Celery wants to own its process
(signals, pool), and separate processes are what production runs too, so the embedded default
exercises the same code paths. This module only supervises: it starts the children in their
own sessions (so a terminal's Ctrl-C reaches only us), restarts a worker that dies (the reaper
then recovers its job from the database heartbeat), and stops everything on Ctrl-C/SIGTERM:
the worker first hands its running job back to the queue (worker/drain.py), so the next
``pcd serve`` resumes it where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GRACE_S = 10.0  # how long children get to exit after SIGTERM before SIGKILL
# The worker gets longer: its running job checkpoints and goes back to the queue first
# (worker/drain.py), so the next `pcd serve` resumes it at once, where it stopped.
DRAIN_GRACE_S = 60.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Child:
    """One supervised process and how to (re)start it."""

    name: str
    argv: list[str]
    restart: bool
    stop_signal: int = signal.SIGTERM
    # The stop signal goes to the child's whole process group, or (``stop_leader_only``) to
    # the child alone: Celery's main process must get SIGTERM (its warm shutdown, which
    # drains the running job) while its pool child must not (billiard would end the task).
    stop_leader_only: bool = False
    grace_s: float = GRACE_S
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(self.argv, env=env, cwd=cwd, start_new_session=True)
        self.started_at = time.monotonic()


def commands(*, host: str, port: int, pool: str, concurrency: int, reaper_interval_s: float,
             with_worker: bool = True, python: str = sys.executable) -> list[Child]:
    """The three children of ``pcd serve`` (the API is not restarted: its failure is fatal)."""
    children = [
        Child("api", [python, "-m", "uvicorn", "api.main:app", "--host", host,
                      "--port", str(port), "--no-access-log"], restart=False),
        Child("reaper", [python, "-m", "worker.reaper", "--interval", str(reaper_interval_s)],
              restart=True),
    ]
    if with_worker:
        children.append(Child("worker", [
            python, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu",
            "--concurrency", str(concurrency), "-P", pool, "-n", "pcd-embedded@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ], restart=True, stop_leader_only=True, grace_s=DRAIN_GRACE_S))
    return children


def run_migrations(env: dict[str, str], cwd: Path, python: str = sys.executable) -> None:
    """Bring the schema to head (Alembic, through ``jobs.db``, creates the schema)."""
    code = ("from jobs import db; from jobs.settings import get_settings; "
            "db.upgrade_to_head(get_settings())")
    subprocess.run([python, "-c", code], env=env, cwd=cwd, check=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_all(children: Sequence[Child], log: Callable[[str], None] = print,
             hurry: Callable[[], bool] = lambda: False) -> None:
    """Send every child its stop signal, wait up to its ``grace_s``, then SIGKILL its group.

    The worker drains: a running job checkpoints and goes back to the queue (the next
    ``pcd serve`` resumes it where it stopped). One it cannot hand back in time stays
    ``running`` with a heartbeat that goes stale, and the next ``pcd serve`` reaps it from
    its last checkpoint. ``hurry()`` true (a second Ctrl-C) ends the wait at once.
    """
    live = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in live:
        assert child.proc is not None
        if child.stop_leader_only:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, child.stop_signal)
        else:
            _signal_group(child.proc, child.stop_signal)
    longest = max((c.grace_s for c in live), default=0.0)
    if longest > GRACE_S:
        log(f"waiting up to {longest:.0f}s for the worker to hand its running job back "
            "(Ctrl-C again to stop at once)")
    start = time.monotonic()
    pending = list(live)
    while pending:
        waited = time.monotonic() - start
        for child in pending:
            assert child.proc is not None
            if child.proc.poll() is None and (hurry() or waited >= child.grace_s):
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
        pending = [c for c in pending if c.proc is not None and c.proc.poll() is None]
        if pending:
            time.sleep(0.1)
    for child in live:  # what a leader left in its group (a pool child, a loader worker)
        assert child.proc is not None
        _signal_group(child.proc, signal.SIGKILL)


def supervise(children: list[Child], env: dict[str, str], cwd: Path,
              log: Callable[[str], None] = print, poll_s: float = 0.5) -> int:
    """Start ``children`` and keep them alive until Ctrl-C/SIGTERM or a fatal child exit."""
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        for child in children:
            child.start(env, cwd)
            log(f"started {child.name} (pid {child.proc.pid if child.proc else '?'})")
        while not stopping:
            time.sleep(poll_s)
            for child in children:
                code = child.proc.poll() if child.proc else None
                if code is None:
                    continue
                if not child.restart:
                    log(f"{child.name} exited with {code}; stopping")
                    stopping, exit_code = True, code or 1
                    break
                # a child that ran for a while has "recovered": reset its backoff
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                log(f"{child.name} exited with {code}; restarting in {delay:.0f}s")
                time.sleep(delay)
                child.restarts += 1
                child.start(env, cwd)
    finally:
        log("stopping...")
        again = False

        def _hurry(signum: int, _frame: object) -> None:
            nonlocal again
            again = True

        for sig in previous:
            signal.signal(sig, _hurry)
        stop_all(children, log=log, hurry=lambda: again)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code
