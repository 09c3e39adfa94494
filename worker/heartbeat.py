"""The heartbeat of a running job, beaten by a small process of its own.

Why a process and not a thread of the run: the reaper re-queues a job whose ``heartbeat_at``
is older than ``heartbeat_timeout_s``, so a beat that comes late costs a live run its job. A
thread shares the run's interpreter lock, and a run holds that lock for seconds at a time in
calls that never release it: loading ``libtorch`` on the first ``import torch`` of a fresh
worker child (0.4 s without a beat on an idle 2-core machine, and the likely cause of the
4 s gap that got a live job re-queued in a loaded CI run while the job was preparing),
arbitrary C extensions, a collection of a large heap. A separate interpreter has its own
lock, so only the operating system can delay it.

Why the beats still stop when the run dies: the beater reads the run's end of a pipe (its
stdin). A run that ends, crashes or is SIGKILLed closes that end, the beater reads EOF and
exits, and the reaper sees the heartbeat go stale as before. It also exits if it is
re-parented (its parent pid changes), in case a forked helper of the run (a DataLoader
worker) still holds the pipe open.

Why a spare: a fresh interpreter needs about a second (more on a loaded machine) before it
can beat, while the claim's own timestamp is already ageing. Each Celery pool child starts
one beater ahead of its job (:func:`prestart`, from ``worker_process_init``); it loads its
imports and then waits for its order, so the job's first beat follows the claim at once.

Why the run writes to the pipe: a process that dies cannot record why. Anything the run
writes after the order line is kept as its last words and, once the pipe closes, appended to
the job log; the stall watchdog (worker/watchdog.py) writes the stack of every thread there
before it ends a run that stopped making progress.

The beater exits with :data:`EXIT_LOST` when a beat finds the job no longer owned by this
worker (re-queued after a partition, cancelled, finished elsewhere); the run's
``should_stop`` then ends the local attempt without touching the row. It is started with
``python -m worker.heartbeat`` and told what to beat in one JSON line on stdin, so the
database URL (which may hold a password) never appears in a process listing.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from jobs import db
from worker.jobrow import JobRow

log = logging.getLogger(__name__)

EXIT_STOPPED = 0  # stdin closed: the run ended or died
EXIT_LOST = 3  # the job is no longer owned by this worker
EXIT_BAD_ORDER = 4  # the first line was not a beat order (a bug, never a job's fault)

# A beater started ahead of the next job, waiting for its order (see :func:`prestart`).
_spare: subprocess.Popen[bytes] | None = None


@dataclass(frozen=True)
class BeatOrder:
    """What one beater beats: the job, its owner, the database, how often."""

    job_id: str
    worker_id: str
    database_url: str
    interval_s: float


class Heartbeat:
    """Starts the beater for one attempt and watches it; a context manager around the run.

    ``lost.is_set()`` is True once the beater found the job gone; the runner passes ``lost``
    to the progress callbacks as their stop flag. A beater that died any other way (killed
    by the OOM killer, say) is started again, at most once per interval: without beats the
    reaper would re-queue a run that is still going well.
    """

    def __init__(self, order: BeatOrder) -> None:
        self.order = order
        self.lost = _OwnershipLost(self)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._started_at = float("-inf")

    def __enter__(self) -> Heartbeat:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the beater's signal to exit
            proc.wait(timeout=self.order.interval_s + 5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def report_fd(self) -> int:
        """The descriptor of the current beater's pipe, for the run's last words (see the
        module docstring); a restarted beater has a new one, so ask again each time."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None, "the heartbeat is not running"
        return proc.stdin.fileno()

    def say_last_words(self, text: str) -> None:
        """Send ``text`` to the beater, which appends it to the job log when the run ends."""
        data = text.encode()[:LAST_WORDS_LIMIT]
        fd = self.report_fd()
        while data:
            data = data[os.write(fd, data):]

    def ownership_lost(self) -> bool:
        """Whether the beater found the job no longer ours (restarts a beater that died;
        one that exited with EXIT_LOST is never replaced, so its code stays the answer)."""
        proc = self._proc
        code = proc.poll() if proc is not None else None
        if code == EXIT_LOST:
            return True
        if proc is not None and code is not None and not self._stopping:
            now = time.monotonic()
            if now - self._started_at >= self.order.interval_s:
                log.warning("the heartbeat of job %s exited with %s; starting it again",
                            self.order.job_id, code)
                self._start()
        return False

    def _start(self) -> None:
        self._started_at = time.monotonic()
        line = json.dumps(asdict(self.order)).encode() + b"\n"
        proc = _take_spare()
        if proc is not None:
            try:
                _send(proc, line)
            except OSError:  # the spare died while it waited: start one now
                proc.kill()
                proc = None
        if proc is None:
            proc = _spawn()
            _send(proc, line)
        self._proc = proc


def prestart() -> None:
    """Start a beater that loads its imports and waits for the next job's order.

    Called in each Celery pool child as it starts (never in the parent: the spare is this
    process's child and must be the job's). A spare that is never used reads EOF when its
    process exits, and exits too.
    """
    global _spare
    if _spare is None or _spare.poll() is not None:
        _spare = _spawn()


def _take_spare() -> subprocess.Popen[bytes] | None:
    global _spare
    proc, _spare = _spare, None
    return proc if proc is not None and proc.poll() is None else None


def _spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker.heartbeat"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def _send(proc: subprocess.Popen[bytes], line: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line)
    proc.stdin.flush()


class _OwnershipLost:
    """The ``is_set()`` face of :meth:`Heartbeat.ownership_lost` (an Event-like stop flag)."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self._heartbeat = heartbeat

    def is_set(self) -> bool:
        return self._heartbeat.ownership_lost()


def beat_until_told(order: BeatOrder, stdin_fd: int) -> int:
    """The beater's loop: beat now, then every ``interval_s`` until EOF on ``stdin_fd``.

    Returns the exit code. A beat that fails (the database restarting, a locked SQLite
    file) is logged and retried at the next interval: the timeout allows several misses.
    Bytes that arrive on ``stdin_fd`` are the run's last words: recorded when it ends.
    """
    row = JobRow(order.job_id, order.worker_id,
                 db.make_sessionmaker(db.make_engine(order.database_url)))
    parent = os.getppid()
    last_words = bytearray()
    next_beat = time.monotonic()
    while True:
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + order.interval_s
            try:
                if not row.beat():
                    log.warning("job %s is no longer owned by worker %s", order.job_id,
                                order.worker_id)
                    return EXIT_LOST
            except Exception:
                log.exception("a heartbeat of job %s failed; the next one retries",
                              order.job_id)
        wait = max(0.0, next_beat - time.monotonic())
        readable, _, _ = select.select([stdin_fd], [], [], wait)
        ended = False
        if readable:
            chunk = os.read(stdin_fd, 65536)
            ended = not chunk
            _keep(last_words, chunk)
        if not ended and os.getppid() != parent:
            # a forked helper of the run may hold the pipe open: take what is there
            ended = True
            while select.select([stdin_fd], [], [], 0)[0] and _keep(last_words,
                                                                   os.read(stdin_fd, 65536)):
                pass
        if ended:
            if last_words:
                _record_last_words(row, bytes(last_words))
            return EXIT_STOPPED


LAST_WORDS_LIMIT = 64 * 1024  # a dump of every thread's stack is a few KB


def _keep(buffer: bytearray, chunk: bytes) -> bool:
    """Append ``chunk`` up to the limit; False when it was empty (EOF)."""
    room = LAST_WORDS_LIMIT - len(buffer)
    if room > 0:
        buffer += chunk[:room]
    return bool(chunk)


def _record_last_words(row: JobRow, data: bytes) -> None:
    text = data.decode("utf-8", errors="replace").rstrip()
    if text.startswith("Timeout ("):  # faulthandler's header: the stall watchdog fired
        what = ("the stall watchdog ended the run: no sign of progress within the stall "
                "timeout (PCD_STALL_TIMEOUT_S). The job is re-queued once its heartbeat is "
                "stale and resumes from its last checkpoint. Where each thread was")
    else:
        what = "the run's process ended; its last words"
    log.error("job %s: %s:\n%s", row.job_id, what, text)
    row.log("error", f"{what}:\n{text}")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s heartbeat[%(process)d] %(levelname)s %(message)s")
    # A Ctrl-C in a terminal reaches the whole process group; the run decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin_fd = sys.stdin.fileno()
    line = _read_line(stdin_fd)
    if not line:  # a spare whose process ended without a job for it
        return EXIT_STOPPED
    try:
        order = BeatOrder(**json.loads(line))
    except (ValueError, TypeError) as exc:
        log.error("the heartbeat got no beat order: %s", exc)
        return EXIT_BAD_ORDER
    return beat_until_told(order, stdin_fd)


def _read_line(fd: int) -> str:
    """One line from ``fd`` without Python's buffering (the rest of the pipe is polled raw)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


if __name__ == "__main__":
    sys.exit(main())
