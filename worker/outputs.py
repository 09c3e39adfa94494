"""Everything a run puts into object storage: checkpoints while it runs, artifacts at the end.

Why checkpoints go to object storage at once (not only to the local disk): a worker can die
with its disk (spot node, SIGKILL, lost GPU host); the next attempt runs elsewhere and resumes
from what the row points at. The row is updated only after the upload completed, so it never
points at a partial object. Only the latest checkpoint is kept (older ones are deleted after
the new one is recorded) and all of them are removed when the job ends.

Layout: ``jobs/<id>/checkpoints/ckpt-<iteration>.pt`` and ``jobs/<id>/artifacts/<name>``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import storage
from jobs.settings import Settings

if TYPE_CHECKING:
    from worker.runner import RunContext

log = logging.getLogger(__name__)

# DESIGN.md, "Artifacts of a distill job": name -> kind (what the API lists)
ARTIFACTS: dict[str, str] = {
    "student.safetensors": "weights",
    "model.json": "metadata",
    "student.torchscript.pt": "torchscript",
    "student.onnx": "onnx",
    "metrics.json": "metrics",
    "samples.png": "samples",
    "spec.json": "spec",
}


def open_job_store(settings: Settings) -> Any:
    return storage.open_store(str(settings.storage_url))


def checkpoints_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_checkpoint(ctx: RunContext, iteration: int, path: Path) -> None:
    """Upload, record on the row, then drop older checkpoints of this job.

    The log line carries the size and the upload's seconds: a drain's grace period must
    cover one checkpoint write and upload (docs/DEPLOY.md), and this is where an operator
    reads what that costs for their jobs."""
    prefix = checkpoints_prefix(ctx.snap.job_id)
    key = f"{prefix}ckpt-{iteration:09d}.pt"
    started = time.monotonic()
    info = ctx.store.put_file(key, path)
    seconds = time.monotonic() - started
    ctx.row.checkpoint(info.uri, iteration)
    ctx.row.log("info", f"checkpoint at iteration {iteration} uploaded "
                        f"({info.size / 1e6:.1f} MB in {seconds:.2f} s)")
    for obj in ctx.store.list(prefix):
        if obj.key != key:
            ctx.store.delete(obj.key)


def fetch_resume_checkpoint(ctx: RunContext) -> Path | None:
    """The row's last checkpoint, downloaded, when this attempt continues an earlier one.

    A checkpoint the row names but the store no longer holds (removed by hand, or by an
    attempt that finished the job and lost its row before saying so) costs the iterations
    it stood for, not the job: the attempt starts from iteration 0 and says so in the log.
    """
    uri, iteration = ctx.snap.checkpoint_uri, ctx.snap.checkpoint_iteration
    if not uri:
        return None
    dest = ctx.work_dir / "resume.pt"
    try:
        ctx.store.get_file(ctx.store.key_from_uri(uri), dest)
        ctx.watchdog.alive()
    except storage.ObjectNotFound:
        ctx.row.log("warning", f"attempt {ctx.snap.attempt}: the checkpoint at iteration "
                               f"{iteration} ({uri}) is gone; starting from iteration 0")
        return None
    ctx.row.log("info", f"attempt {ctx.snap.attempt}: resuming from checkpoint at iteration "
                        f"{iteration}")
    return dest


def upload_artifacts(ctx: RunContext, out_dir: Path) -> list[str]:
    """Upload the deployable student and its reports; record each with its sha256."""
    uploaded = []
    for name, kind in ARTIFACTS.items():
        path = out_dir / name
        if not path.is_file():
            continue
        key = f"jobs/{ctx.snap.job_id}/artifacts/{name}"
        info = ctx.store.put_file(key, path)  # hashes while it copies
        sha256 = info.sha256 or sha256_of(path)
        ctx.row.artifact(name=name, kind=kind, key=key, uri=info.uri, size=info.size,
                         sha256=sha256)
        ctx.watchdog.alive()
        uploaded.append(name)
    missing = {"student.safetensors", "model.json"} - set(uploaded)
    if missing:
        raise RuntimeError(f"the run produced no {', '.join(sorted(missing))}")
    ctx.row.log("info", f"artifacts uploaded: {', '.join(uploaded)}")
    return uploaded


def cleanup(ctx: RunContext, *, keep_checkpoints: bool) -> None:
    """Remove the local run directory and (at the job's end) its stored checkpoints.

    Called before the row records the job's end, so that a client who sees ``succeeded`` or
    ``cancelled`` sees the final storage too. Skipped for checkpoints once this worker has
    lost the job: they may be what the attempt that now owns it resumes from.
    """
    shutil.rmtree(ctx.work_dir, ignore_errors=True)
    if not keep_checkpoints and not ctx.progress.stop_flag.is_set():
        try:
            ctx.store.delete_prefix(checkpoints_prefix(ctx.snap.job_id))
        except Exception:  # cleanup must not turn a success into a failure
            log.exception("could not delete checkpoints of job %s", ctx.snap.job_id)
