"""Hand running jobs back when their worker is asked to stop: a node drain, a spot
preemption, a rolling upgrade of the worker image.

Why: Celery's answer to SIGTERM (a warm shutdown) is to wait for the running task, which for
a training job means hours; the orchestrator's grace period ends long before, SIGKILLs the
worker, and the job loses everything since its last checkpoint plus a heartbeat timeout
before the reaper notices. Instead, the worker's main process marks itself draining
(:func:`request_drain`, from Celery's ``worker_shutting_down`` signal on a warm shutdown)
and the run sees it at its next stop poll (every few iterations, through
:class:`DrainRequested`): it checkpoints, uploads the checkpoint, hands the job back to the
queue without charging it an attempt (``jobs.service.release_job``) and re-sends its
message, so another worker resumes it from exactly where it stopped. Then the task returns
and the warm shutdown completes.

Why a file: the run lives in a prefork pool child (or, with ``-P solo``, in the main process
itself), and a marker named after the main process's pid in the worker's own ``work_dir`` is
something either can check without a channel between them. A worker clears its marker when
it starts, so a pid reused after a restart does not inherit an old drain.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from jobs.settings import Settings


def marker(settings: Settings, pid: int) -> Path:
    """The file that says the worker whose main process is ``pid`` is draining."""
    return Path(settings.work_dir).expanduser().resolve() / "drain" / str(pid)


def request_drain(settings: Settings, pid: int | None = None) -> None:
    """Mark this worker (its main process: ``pid``, by default the caller) draining."""
    path = marker(settings, pid or os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def clear_drain(settings: Settings, pid: int | None = None) -> None:
    """Forget a drain of ``pid`` (a worker that starts is not draining)."""
    with contextlib.suppress(FileNotFoundError):
        marker(settings, pid or os.getpid()).unlink()


def draining(settings: Settings) -> bool:
    """Whether the worker running this process is draining: the marker of the parent (a
    prefork pool child's main process) or of this process (the solo pool) exists."""
    return any(marker(settings, pid).exists() for pid in (os.getppid(), os.getpid()))


class DrainRequested:
    """``is_set()`` once the worker running this process is draining (:func:`draining`,
    asked at most once per ``min_interval_s``: it is polled every few iterations); once set
    it stays set."""

    def __init__(self, settings: Settings, *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._checked_at = float("-inf")
        self._set = False

    def is_set(self) -> bool:
        if not self._set and self._clock() - self._checked_at >= self._min_interval_s:
            self._checked_at = self._clock()
            self._set = draining(self._settings)
        return self._set
