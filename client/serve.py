"""``pcd serve``: the embedded default in one command (API + one worker + the reaper).

Why subprocesses rather than threads in this process: the client package must not import
``api``, ``jobs``, ``worker`` or torch (DESIGN.md arrows), Celery wants to own its process
(signals, pool), and separate processes are what production runs too, so the embedded default
exercises the same code paths. This module only supervises: it starts the children in their
own sessions (so a terminal's Ctrl-C reaches only us), restarts a worker that dies (the reaper
then recovers its job from the database heartbeat), and stops everything on Ctrl-C/SIGTERM.
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
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Child:
    """One supervised process and how to (re)start it."""

    name: str
    argv: list[str]
    restart: bool
    # Celery's SIGTERM is a warm shutdown that would wait hours for a running job; SIGQUIT is
    # its cold shutdown. Everything else takes SIGTERM.
    stop_signal: int = signal.SIGTERM
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
        ], restart=True, stop_signal=signal.SIGQUIT))
    return children


def run_migrations(env: dict[str, str], cwd: Path, python: str = sys.executable) -> None:
    """Bring the schema to head (Alembic, through ``jobs.db``, creates the schema)."""
    code = ("from jobs import db; from jobs.settings import get_settings; "
            "db.upgrade_to_head(get_settings())")
    subprocess.run([python, "-c", code], env=env, cwd=cwd, check=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_all(children: Sequence[Child], grace_s: float = GRACE_S) -> None:
    """Signal every child's process group to stop, then SIGKILL what is left after ``grace_s``.

    A job that was running stays ``running`` in the database with a heartbeat that goes
    stale; the next ``pcd serve`` reaps it and it resumes from its last checkpoint.
    """
    live = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in live:
        assert child.proc is not None
        _signal_group(child.proc, child.stop_signal)
    deadline = time.monotonic() + grace_s
    for child in live:
        proc = child.proc
        assert proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


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
        stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code
