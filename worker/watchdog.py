"""End a run that has stopped making progress: a stall watchdog fed by the engine's events.

Why: the heartbeat proves that a run's process is alive, not that it is moving. A DataLoader
worker deadlocked on a lock, a read from a hung network mount, a CUDA call that never
returns: the process lives, beats, and holds its GPU for as long as nobody looks, which for
a job submitted on Friday can be the whole weekend.

How: :func:`faulthandler.dump_traceback_later` (the standard library) keeps a C thread that
needs no interpreter lock, so it fires whatever the stuck thread holds. Every sign of life
re-arms it. From the engine: a progress report, an evaluation, a checkpoint, and each
``should_stop`` poll (the engine polls before every scoring batch and every few training and
evaluation batches, so a long evaluation is not a stall). From the worker, which watches the
whole attempt and not only the training (worker/runner.py): each downloaded chunk of a
teacher or dataset, each unpacked archive member, each checked dataset file, each uploaded
artifact, so a fetch from a hung mount or an upload that never returns ends the same way.
When ``timeout_s`` pass without one, it writes the stack of every thread to the run's
heartbeat pipe and ends the process at once (``os._exit(1)``: nothing else runs, because a
stuck run cannot be trusted to clean up). From there the run is a dead worker like any
other: its beater reads the stacks, puts them in the job log and exits, the heartbeat goes
stale, and the reaper re-queues the job, which resumes from its last checkpoint
(``max_attempts`` bounds the retries; the last one fails ``worker_lost``).

A multi-GPU run's training is watched in each rank (worker/ddp_entry.py), not in the process
that supervises torchrun (whose watchdog is suspended meanwhile): a rank's watchdog writes
its stacks to a file of the run and ends the rank, torchrun ends the others, and the
supervisor raises :class:`RunStalled` with the stacks; the runner hands them to the beater
and leaves the row to the reaper, so both kinds of run recover the same way.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcd_core.progress import Callback, Progress

# Re-arming starts a new C thread; doing it at most this often (a fraction of the timeout)
# keeps the cost out of the training loop, and ends a stall between 95 % and 100 % of
# ``timeout_s`` after the last sign of life.
REARM_FRACTION = 0.05


class RunStalled(Exception):
    """A multi-GPU run whose rank's watchdog fired; ``stacks`` is what it wrote."""

    def __init__(self, stacks: str) -> None:
        super().__init__("a rank made no progress within the stall timeout")
        self.stacks = stacks


class StallWatchdog(Callback):
    """A context manager around the engine's run, and one of its callbacks.

    ``report_fd`` returns the descriptor the stacks go to when the watchdog fires (the
    heartbeat's pipe, read again at each arming because a restarted beater has a new one).
    ``timeout_s`` 0 turns the watchdog off.
    """

    def __init__(self, timeout_s: float, report_fd: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._report_fd = report_fd or sys.stderr.fileno
        self._clock = clock
        self._armed_at: float | None = None

    @property
    def armed(self) -> bool:
        return self._armed_at is not None

    def __enter__(self) -> StallWatchdog:
        if self.timeout_s > 0:
            self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Disarmed for the block, armed afresh after it: for a stretch watched elsewhere
        (a multi-GPU run, whose ranks have watchdogs of their own)."""
        was_armed = self._armed_at is not None
        if was_armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None
        try:
            yield
        finally:
            if was_armed:
                self._arm()

    # -- signs of life -------------------------------------------------------------------
    def alive(self, *_: object) -> None:
        """A sign of life from outside the engine (a downloaded chunk, a checked file, an
        uploaded artifact); takes and ignores any arguments so it fits byte-count hooks."""
        if self._armed_at is None:
            return
        if self._clock() - self._armed_at >= self.timeout_s * REARM_FRACTION:
            self._arm()

    def on_progress(self, progress: Progress) -> None:
        self.alive()

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        self.alive()

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self.alive()

    def should_stop(self) -> bool:
        self.alive()
        return False

    # -- internals ---------------------------------------------------------------------

    def _arm(self) -> None:
        faulthandler.dump_traceback_later(self.timeout_s, repeat=False,
                                          file=self._report_fd(), exit=True)
        self._armed_at = self._clock()
