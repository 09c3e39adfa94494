"""Turn one job row into one pcd_core run: :func:`execute_job`, a plain function.

The Celery task only calls this (so tests call it without a broker). The order of events:

1. Claim the row (compare-and-set ``queued -> running``). A second delivery of a job that is
   running elsewhere or already finished fails the claim and does nothing: idempotent.
2. Prepare: fetch the dataset and teacher into the cache, then validate them (teacher weights
   against the arch, the dataset's files) so a bad input fails in seconds as a *user* error,
   never retried.
3. Train with callbacks that write progress to the row (throttled), upload checkpoints
   and stop cooperatively on cancel: the engine polls during the scoring pass, training,
   evaluations and between export formats, and the runner checks once more (unthrottled)
   before uploading, so a cancel that arrives before the upload never ends ``succeeded``.
   A re-run (attempt > 1) resumes from the row's checkpoint.
4. Upload the artifacts with their sha256, set the final phase (``done``), then finish the
   row. Every failure ends in a stable error code (docs/CONTRACTS.md); unexpected ones are
   ``internal`` with the traceback in the job log.

A stall watchdog (worker/watchdog.py) is armed from step 2 to the end of step 4: an attempt
that shows no sign of life (a downloaded chunk, a checked file, a training step, an uploaded
artifact) for ``stall_timeout_s`` is ended with its stacks in the log and re-queued.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import db, state
from jobs.settings import Settings, get_settings
from jobs.spec import JobSpec
from pcd_core.progress import RunCancelled
from worker import inputs, outputs, reaper
from worker.drain import DrainRequested
from worker.heartbeat import BeatOrder, Heartbeat
from worker.jobrow import JobRow, JobSnapshot, sessions_for
from worker.progress import DbProgress
from worker.watchdog import RunStalled, StallWatchdog

log = logging.getLogger(__name__)


class JobFailure(Exception):
    """A run that must end ``failed`` with a stable code (``user_error``: never retried)."""

    def __init__(self, code: str, message: str, *, user_error: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.user_error = user_error


def default_worker_id() -> str:
    """host:pid:random, unique per process so a restarted worker is a different owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class RunContext:
    """Everything one attempt of one job uses."""

    settings: Settings
    row: JobRow
    snap: JobSnapshot
    spec: JobSpec
    store: Any
    work_dir: Path
    progress: DbProgress
    heartbeat: Heartbeat
    watchdog: StallWatchdog  # armed by _run for the whole attempt, fed by every stage


def execute_job(job_id: str, *, settings: Settings | None = None,
                worker_id: str | None = None) -> str | None:
    """Run job ``job_id`` to a terminal status; returns it, or None when not claimed."""
    settings = settings or get_settings()
    worker_id = worker_id or default_worker_id()
    sessions = sessions_for(settings)
    with db.session_scope(sessions) as session:
        claimed = state.claim_job(session, job_id, worker_id)
    if not claimed:
        log.info("job %s not claimed (running elsewhere, finished or unknown): skipping", job_id)
        return None
    row = JobRow(job_id, worker_id, sessions)
    snap = row.snapshot()
    row.log("info", f"attempt {snap.attempt} started on worker {worker_id}")
    order = BeatOrder(job_id, worker_id, settings.database_url, settings.heartbeat_interval_s)
    with Heartbeat(order) as beat:
        try:
            ctx = _context(settings, row, snap, beat)
            return _run(ctx)
        except Exception as exc:  # every path ends with the row in a terminal status
            return _fail(row, exc, lost=beat.lost.is_set())


def _context(settings: Settings, row: JobRow, snap: JobSnapshot, beat: Heartbeat) -> RunContext:
    try:
        # The API applied the deployment's input policy at submission; re-checking it here
        # against this worker's settings could only refuse a job the user was promised.
        spec = JobSpec.model_validate(snap.spec, context={"allow_local_paths": True})
    except ValueError as exc:  # the API validated it; a stored spec from an older version
        raise JobFailure("spec_invalid", str(exc), user_error=True) from exc
    work = Path(settings.work_dir).expanduser().resolve() / "runs" / snap.job_id
    work.mkdir(parents=True, exist_ok=True)
    store = outputs.open_job_store(settings)
    progress = DbProgress(row, min_interval_s=settings.progress_interval_s, stop_flag=beat.lost,
                          drain=DrainRequested(settings))
    watchdog = StallWatchdog(settings.stall_timeout_s, beat.report_fd)
    ctx = RunContext(settings, row, snap, spec, store, work, progress, beat, watchdog)
    progress.checkpoint_hook = lambda it, path: outputs.upload_checkpoint(ctx, it, path)
    return ctx


def _run(ctx: RunContext) -> str:
    # One watchdog for the whole attempt: a fetch from a hung mount, a stuck data loader and
    # an upload that never returns all hold the GPU alike (worker/watchdog.py).
    with ctx.watchdog:
        return _attempt(ctx)


def _attempt(ctx: RunContext) -> str:
    ctx.progress.set_phase("preparing")
    run_spec = inputs.prepare(ctx.spec, ctx)  # fetch + validate; raises JobFailure early
    resume = outputs.fetch_resume_checkpoint(ctx)
    out_dir = ctx.work_dir / f"attempt-{ctx.snap.attempt}"
    gpus = ctx.spec.resources.gpus
    try:
        if gpus > 1:
            from worker.multigpu import run_distributed

            with ctx.watchdog.suspended():  # each rank watches itself (worker/ddp_entry.py)
                run_distributed(run_spec.model_dump_json(), out_dir, gpus, [ctx.progress],
                                resume=resume, stall_timeout_s=ctx.settings.stall_timeout_s)
        else:
            from pcd_core import train

            # gpus=0 (the cpu queue) must not grab a GPU that happens to be on the host
            device = "cpu" if gpus == 0 else None
            train.run(run_spec, out_dir, callbacks=[ctx.watchdog, ctx.progress],
                      resume=resume, device=device)
    except RunCancelled as exc:
        return _cancelled(ctx, f"cancelled at iteration {exc.iteration}", exc.iteration)
    except RunStalled as exc:
        # Recovered like a single-process stall: the beater records the ranks' stacks when
        # this attempt ends, and the reaper re-queues the job once its heartbeat is stale.
        ctx.heartbeat.say_last_words(exc.stacks)
        outputs.cleanup(ctx, keep_checkpoints=True)
        log.warning("job %s: a rank stalled; leaving the job to the reaper", ctx.snap.job_id)
        return "stalled"
    except Exception as exc:
        if is_out_of_memory(exc):  # with the spec, so the message names the current values
            raise classify(exc, run_spec) from exc
        raise
    if ctx.progress.cancel_requested_now():  # came in after the engine's last poll
        return _cancelled(ctx, "cancelled after the run finished, before its upload")
    ctx.progress.set_phase("uploading")
    outputs.upload_artifacts(ctx, out_dir)
    ctx.progress.finish()  # phase ``done``, iteration = max_iterations, no ETA left
    outputs.cleanup(ctx, keep_checkpoints=False)  # before the status: see cleanup
    ctx.row.finish("succeeded")
    ctx.row.log("info", "succeeded")
    return "succeeded"


def _cancelled(ctx: RunContext, message: str, iteration: int | None = None) -> str:
    """End a stopped run: ``cancelled`` (nothing uploaded); ``lost`` when the stop came
    from losing the job to another worker (then the row is not ours to touch); ``released``
    when this worker is draining and nobody asked for a cancel."""
    if ctx.progress.stop_flag.is_set():
        ctx.row.log("warning", "run stopped: job no longer owned by this worker")
        return "lost"
    if ctx.progress.drain.is_set() and not ctx.progress.cancel_requested_now():
        return _released(ctx, ctx.progress.last_iteration if iteration is None else iteration)
    ctx.row.log("info", message)
    outputs.cleanup(ctx, keep_checkpoints=False)
    ctx.row.finish("cancelled", message=message)
    return "cancelled"


def _released(ctx: RunContext, at: int) -> str:
    """Hand the job back (worker/drain.py) after a stop at iteration ``at``: its checkpoint is
    uploaded and on the row, so the next attempt, on whichever worker takes the re-sent
    message, resumes there."""
    outputs.cleanup(ctx, keep_checkpoints=True)
    queue = ctx.row.release(f"worker {ctx.row.worker_id} is shutting down (iteration {at})")
    if queue is None:  # cancelled or lost meanwhile: whoever changed the row decides
        return "lost"
    ctx.row.log("info", f"released at iteration {at}: this worker is shutting down; the "
                        "job goes back to the queue and resumes from its last checkpoint")
    try:
        reaper.celery_enqueue(ctx.settings)(ctx.snap.job_id, queue)
    except Exception as exc:  # queued and unclaimed: the reaper re-sends it after a while
        log.exception("job %s released but not re-dispatched", ctx.snap.job_id)
        ctx.row.log("warning", f"the job's message could not be re-sent ({type(exc).__name__}: "
                               f"{exc}); the reaper re-sends it after PCD_REDISPATCH_AFTER_S")
    return "released"


OOM_MARKERS = ("out of memory", "outofmemoryerror", "cublas_status_alloc_failed",
               "cudnn_status_alloc_failed", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (also ``torch.OutOfMemoryError``), a RuntimeError
    about memory (CUDA/MPS/cuBLAS/cuDNN allocation, the CPU allocator), or a multi-GPU run
    whose ranks died of one (the marker is in the torchrun output)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if type(exc).__name__ == "DistributedRunError":
        tail = str(getattr(exc, "tail", "")).lower()
        return any(marker in tail for marker in OOM_MARKERS)
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


def out_of_memory_message(exc: BaseException, spec: Any = None) -> str:
    """What ran out, and the knobs to turn (with the spec's current values when known)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if type(exc).__name__ == "DistributedRunError":
        first = f"{first} (a rank ran out of memory)"
    train, dataset = getattr(spec, "train", None), getattr(spec, "dataset", None)
    batch = f"train.batch_size (now {train.batch_size})" if train else "train.batch_size"
    crop = f"dataset.crop (now {list(dataset.crop)})" if dataset else "dataset.crop"
    evalb = (f"train.eval_batch_size (now {train.eval_batch_size})" if train
             else "train.eval_batch_size")
    amp = ("" if train is not None and train.amp
           else ", or enable train.amp (half-precision activations)")
    return (f"the run ran out of memory: {first}. Lower {batch} or {crop}{amp}; if it "
            f"happened while evaluating, lower {evalb} or dataset.resize. Not retried: the "
            "same spec on the same hardware would run out again.")


def classify(exc: BaseException, spec: Any = None) -> JobFailure:
    """Map any exception to a stable error code (docs/CONTRACTS.md). ``spec`` (the run's,
    when known) lets the ``out_of_memory`` message name the current batch size and crop."""
    if isinstance(exc, JobFailure):
        return exc
    name = type(exc).__name__
    if is_out_of_memory(exc):
        # Its own code, not a user error (the spec is valid; this GPU is too small for it).
        # Like every failure the worker records, it is final: never retried automatically.
        return JobFailure("out_of_memory", out_of_memory_message(exc, spec), user_error=False)
    if name == "WeightsError":
        reason = getattr(exc, "reason", "unreadable")
        return JobFailure(f"teacher_{reason}", str(exc), user_error=True)
    if name == "DatasetError":
        return JobFailure(inputs.dataset_code(exc), str(exc), user_error=True)
    if name == "TeacherMissingError":
        return JobFailure("spec_invalid", str(exc), user_error=True)
    if name in ("ExportParityError", "ParityError"):
        return JobFailure("export_parity", str(exc), user_error=False)
    if name in ("StorageError", "ObjectNotFound", "ChecksumMismatch"):
        return JobFailure("storage_error", str(exc), user_error=False)
    return JobFailure("internal", f"{name}: {exc}", user_error=False)


def _fail(row: JobRow, exc: Exception, *, lost: bool) -> str:
    failure = classify(exc)
    if failure.code == "internal" or not failure.user_error:
        row.log("error", "".join(traceback.format_exception(exc)).rstrip())
    else:
        row.log("error", failure.message)
    if lost:
        log.warning("job %s failed after losing ownership; leaving the row alone", row.job_id)
        return "lost"
    try:
        row.fail(failure.code, failure.message, user_error=failure.user_error)
    except state.InvalidTransition:
        log.warning("job %s could not be failed (already terminal)", row.job_id)
    log.warning("job %s failed: %s", row.job_id, failure)
    return "failed"

