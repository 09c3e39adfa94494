"""Engine callbacks that write a run's progress to the job row.

Why throttled: the engine reports every ``log_every`` iterations, which on a fast GPU is many
times a second; every report is a database write that the API's pollers then read. We write
at most about once per ``min_interval_s`` (phase changes, evaluations and checkpoints always
go through, they are rare and matter), and log lines are buffered and flushed with them.

Progress is not the heartbeat: it stops for minutes at a time (the PCD scoring pass, a long
evaluation, an ONNX export, an upload), so liveness comes from ``worker.heartbeat``, a process
that beats whatever the run is doing. Its ``lost`` flag is this module's ``stop_flag``: the run
stops (through ``should_stop``) once the row says the job is no longer ours.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pcd_core.progress import Callback, Progress

if TYPE_CHECKING:
    from worker.jobrow import JobRow

log = logging.getLogger(__name__)

# The phase a succeeded job shows. DESIGN.md names the phases of a running job (preparing,
# scoring, training, evaluating, exporting, uploading) but none for a finished one.
FINAL_PHASE = "done"


def _best_effort(what: str, fn: Callable[[], Any]) -> Any:
    """Run a bookkeeping write; a database or storage blip is logged, never fatal.

    A multi-hour run must not die because one progress write hit a locked SQLite file or a
    checkpoint upload timed out: the next write or checkpoint supersedes the lost one.
    """
    try:
        return fn()
    except Exception:
        log.warning("%s failed; the run continues", what, exc_info=True)
        return None


class StopFlag(Protocol):
    """Anything with an Event's ``is_set``: a ``threading.Event`` or the heartbeat's ``lost``."""

    def is_set(self) -> bool: ...


class DbProgress(Callback):
    """Writes progress/metrics/log lines to the row; answers ``should_stop`` from the row
    (a cancel), the heartbeat (``stop_flag``: the job was lost) and the worker (``drain``:
    it is shutting down, see worker/drain.py)."""

    def __init__(self, row: JobRow, *, min_interval_s: float = 1.0,
                 on_checkpoint: Callable[[int, Path], None] | None = None,
                 stop_flag: StopFlag | None = None, drain: StopFlag | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.row = row
        self.min_interval_s = min_interval_s
        self.checkpoint_hook = on_checkpoint
        self.stop_flag: StopFlag = stop_flag or threading.Event()
        self.drain: StopFlag = drain or threading.Event()
        self._clock = clock
        self._last_write = -1e9
        self._last_phase: str | None = None
        self._pending: Progress | None = None
        self._last_cancel_check = -1e9
        self._cancel = False
        self.last_iteration = 0
        self.max_iterations: int | None = None

    # -- engine hooks ---------------------------------------------------------------------
    def on_progress(self, progress: Progress) -> None:
        self.last_iteration = progress.iteration
        self.max_iterations = progress.max_iterations
        phase_changed = progress.phase != self._last_phase
        if phase_changed:
            # a held-back training report (the last losses and rates) goes in before the
            # marker of the next phase, which carries none of them
            self.flush()
            self.row.log("info", f"phase {progress.phase} at iteration {progress.iteration}")
        now = self._clock()
        if phase_changed or now - self._last_write >= self.min_interval_s:
            self._write(progress, now)
        else:
            self._pending = progress  # written with the next allowed write (or flush)

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        self.flush()
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        _best_effort("recording eval metrics", lambda: self.row.metrics(
            iteration, {f"eval/{k}": v for k, v in scalars.items()}, latest=dict(metrics)))
        self.row.log("info", f"eval at {iteration}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in scalars.items()))

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self.flush()
        hook = self.checkpoint_hook
        if hook is not None:
            _best_effort(f"saving the checkpoint of iteration {iteration}",
                         lambda: hook(iteration, path))

    def should_stop(self) -> bool:
        if self.stop_flag.is_set() or self.drain.is_set():
            return True
        now = self._clock()
        if not self._cancel and now - self._last_cancel_check >= self.min_interval_s:
            self._last_cancel_check = now
            self._cancel = bool(_best_effort("reading the cancel flag",
                                             self.row.cancel_requested))
        return self._cancel

    def cancel_requested_now(self) -> bool:
        """``should_stop`` without its throttle: one read of the row (a cancel that arrived
        after the engine's last poll must still win over the upload)."""
        if self.stop_flag.is_set() or self._cancel:
            return True
        self._last_cancel_check = self._clock()
        self._cancel = bool(_best_effort("reading the cancel flag", self.row.cancel_requested))
        return self._cancel

    def set_phase(self, phase: str) -> None:
        """Worker-side phases the engine does not report (``uploading``)."""
        self.flush()
        self.row.progress(phase=phase, iteration=self.last_iteration)
        self.row.log("info", f"phase {phase}")
        self._last_phase = phase

    def finish(self, phase: str = FINAL_PHASE) -> None:
        """The last progress write of a successful run: ``phase`` (``done``), the final
        iteration out of the total and no time left. Written before the row turns
        ``succeeded`` (progress is only recorded on active jobs)."""
        self.flush()
        done = self.max_iterations if self.max_iterations is not None else self.last_iteration
        self.last_iteration = max(self.last_iteration, done)
        iteration, total = self.last_iteration, self.max_iterations
        _best_effort("recording the final progress", lambda: self.row.progress(
            phase=phase, iteration=iteration, max_iterations=total, eta_s=0.0))
        self.row.log("info", f"phase {phase}")
        self._last_phase = phase

    def flush(self) -> None:
        if self._pending is not None:
            self._write(self._pending, self._clock())

    # -- internals --------------------------------------------------------------------------
    def _write(self, p: Progress, now: float) -> None:
        self._pending = None
        self._last_write = now
        self._last_phase = p.phase
        _best_effort("recording progress", lambda: self._write_row(p))

    def _write_row(self, p: Progress) -> None:
        if p.phase != "training":
            # Phase markers carry no rates (their zeros would overwrite the last real ones).
            self.row.progress(phase=p.phase, iteration=p.iteration,
                              max_iterations=p.max_iterations)
            return
        self.row.progress(phase=p.phase, iteration=p.iteration, max_iterations=p.max_iterations,
                          losses=dict(p.losses) if p.losses else None,
                          images_per_s=p.images_per_s or None, eta_s=p.eta_s)
        if p.losses:
            series = {f"loss/{k}": float(v) for k, v in p.losses.items()}
            series["images_per_s"] = float(p.images_per_s)
            if p.lr is not None:
                series["lr"] = float(p.lr)
            self.row.metrics(p.iteration, series)
