"""execute_job as a plain function: tmp SQLite, file:// store, synthetic data, tiny budgets."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import tar_gz

from jobs import service
from jobs.models import Job
from worker import outputs
from worker.reaper import reap_once
from worker.runner import classify, execute_job


@pytest.mark.slow
def test_succeeds_with_artifacts_and_is_idempotent(world, dataset_dir, teacher_file,
                                                   make_spec, tmp_path: Path) -> None:
    ds = world.upload(tar_gz(dataset_dir, tmp_path / "ds.tar.gz"), "dataset")
    teacher = world.upload(teacher_file, "checkpoint")
    job_id = world.submit(make_spec(ds, teacher))

    status = execute_job(job_id, settings=world.settings, worker_id="w1")
    assert status == "succeeded", world.logs(job_id)
    job = world.job(job_id)
    assert (job.status, job.attempts, job.phase) == ("succeeded", 1, "done")
    assert job.iteration == job.max_iterations == 4 and job.checkpoint_iteration == 4
    assert job.eta_s == 0.0
    with world.session() as s:
        arts = {a.name: a for a in service.list_artifacts(s, job)}
    assert {"student.safetensors", "model.json", "student.torchscript.pt", "student.onnx",
            "metrics.json", "samples.png"} <= set(arts)
    assert arts["samples.png"].kind == "samples"
    for art in arts.values():
        blob = world.store.get_file(art.key, tmp_path / "dl" / art.name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == art.sha256 and len(blob) == art.size
    # checkpoints are removed when the job ends; the local scratch directory too
    assert world.store.list(outputs.checkpoints_prefix(job_id)) == []
    assert not (Path(world.settings.work_dir) / "runs" / job_id).exists()

    # a second delivery of a finished job does nothing
    assert execute_job(job_id, settings=world.settings, worker_id="w2") is None
    assert world.job(job_id).attempts == 1


def test_mismatched_teacher_fails_fast_as_user_error(world, make_spec, tmp_path: Path) -> None:
    from pcd_core.models import build_model, save_weights

    wrong = tmp_path / "wrong.safetensors"  # a 32-channel head where the spec says 16
    save_weights(build_model("deeplabv3_resnet18", 4, output_stride=16, head_channels=32), wrong)
    (tmp_path / "data").mkdir()
    job_id = world.submit(make_spec(f"file://{tmp_path / 'data'}", world.upload(wrong,
                                                                                "checkpoint")))
    t0 = time.monotonic()
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "failed"
    assert time.monotonic() - t0 < 30
    job = world.job(job_id)
    assert (job.status, job.error_code, job.user_error) == ("failed", "teacher_mismatch", True)
    assert "head" in (job.error_message or "") or "shape" in (job.error_message or "")
    # a user error is terminal: the reaper never brings it back
    assert reap_once(world.settings, enqueue=lambda *a: pytest.fail("re-dispatched")) == []
    assert world.job(job_id).attempts == 1


def test_unreadable_teacher_and_missing_inputs(world, make_spec, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "data").mkdir()
    bad_teacher = world.submit(make_spec(f"file://{tmp_path / 'data'}",
                                         world.upload(junk, "checkpoint")))
    execute_job(bad_teacher, settings=world.settings, worker_id="w1")
    assert world.job(bad_teacher).error_code == "teacher_unreadable"

    no_data = world.submit(make_spec(f"file://{tmp_path / 'nowhere'}", None))
    execute_job(no_data, settings=world.settings, worker_id="w1")
    assert world.job(no_data).error_code in ("dataset_invalid", "dataset_empty")


def test_empty_dataset_fails_with_dataset_code(world, make_spec, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "images").mkdir(parents=True)
        (empty / split / "labels").mkdir(parents=True)
    job_id = world.submit(make_spec(f"file://{empty}", None))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "failed"
    job = world.job(job_id)
    assert job.error_code in ("dataset_empty", "dataset_invalid") and job.user_error


def test_cancel_flag_ends_cancelled(world, dataset_dir, make_spec) -> None:
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=100_000,
                                    checkpoint_every=100_000))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(
        status=execute_job(job_id, settings=world.settings, worker_id="w1")))
    thread.start()
    deadline = time.monotonic() + 60
    while world.job(job_id).iteration < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    with world.session() as s:
        service.request_cancel(s, s.get(Job, job_id))
    thread.join(timeout=60)
    assert result.get("status") == "cancelled", world.logs(job_id)
    job = world.job(job_id)
    assert job.status == "cancelled" and 2 <= job.iteration < 100_000


def die_after_checkpoint(world: Any, job_id: str, at: int,
                         monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``job_id`` on worker "dead" until the checkpoint of iteration ``at`` is uploaded
    and recorded, then die like a kill: a BaseException, so nothing else is recorded.
    Returns that checkpoint's size in bytes."""
    real_upload = outputs.upload_checkpoint
    sizes: dict[int, int] = {}

    def crash_after(ctx: Any, iteration: int, path: Path) -> None:
        sizes[iteration] = path.stat().st_size
        real_upload(ctx, iteration, path)
        if iteration == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "upload_checkpoint", crash_after)
    with pytest.raises(KeyboardInterrupt):
        execute_job(job_id, settings=world.settings, worker_id="dead")
    monkeypatch.setattr(outputs, "upload_checkpoint", real_upload)
    return sizes[at]


@pytest.mark.slow
def test_lost_worker_is_requeued_and_resumes_from_checkpoint(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=6))
    size = die_after_checkpoint(world, job_id, 4, monkeypatch)
    assert world.job(job_id).status == "running"
    # the upload's line says what a drain's grace period must cover: size and seconds
    uploaded = re.search(r"checkpoint at iteration 4 uploaded \(([\d.]+) MB in ([\d.]+) s\)",
                         world.logs(job_id))
    assert uploaded, world.logs(job_id)
    assert float(uploaded.group(1)) == round(size / 1e6, 1) and size > 0

    # heartbeat fresh: the reaper leaves it alone; stale: re-queued and re-dispatched
    sent: list[tuple[str, str]] = []
    assert reap_once(world.settings, enqueue=lambda j, q: sent.append((j, q))) == []
    from datetime import datetime, timedelta, timezone

    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: sent.append((j, q)))
    assert reaped.outcome == "requeued" and sent == [(job_id, "cpu")]

    status = execute_job(job_id, settings=world.settings, worker_id="w2")
    assert status == "succeeded", world.logs(job_id)
    job = world.job(job_id)
    assert job.attempts == 2 and job.infra_retries == 1
    assert "resuming from checkpoint at iteration 4" in world.logs(job_id)


def test_reaper_fails_out_of_attempts_and_cancels_cancelling(world, make_spec,
                                                             tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    old = datetime.now(timezone.utc) - timedelta(seconds=60)
    spent = world.submit(make_spec(f"file://{tmp_path}", None))
    cancelling = world.submit(make_spec(f"file://{tmp_path}", None))
    with world.session() as s:
        for job_id in (spent, cancelling):
            assert service.claim_job(s, job_id, "gone")
    world.update(spent, attempts=3, heartbeat_at=old)
    with world.session() as s:
        service.request_cancel(s, s.get(Job, cancelling))
    world.update(cancelling, heartbeat_at=old)
    outcomes = {r.job_id: r.outcome for r in reap_once(world.settings, enqueue=lambda *a: None)}
    assert outcomes == {spent: "failed", cancelling: "cancelled"}
    assert world.job(spent).error_code == "worker_lost"
    assert world.job(cancelling).status == "cancelled"


def _oom_errors() -> list[BaseException]:
    import torch

    from worker.multigpu import DistributedRunError

    return [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                     "memory: you tried to allocate 9000000000 bytes"),
        DistributedRunError(1, "rank 1: torch.OutOfMemoryError: CUDA out of memory."),
    ]


@pytest.mark.parametrize("index", range(6))
def test_out_of_memory_has_its_own_code_and_names_the_knobs(index: int) -> None:
    exc = _oom_errors()[index]
    failure = classify(exc)
    assert (failure.code, failure.user_error) == ("out_of_memory", False)
    for knob in ("train.batch_size", "dataset.crop", "train.amp"):
        assert knob in failure.message


def test_out_of_memory_message_shows_the_spec_values() -> None:
    import torch

    from pcd_core.spec import RunSpec

    spec = RunSpec.model_validate({
        "dataset": {"uri": "/d", "num_classes": 4, "crop": [360, 480]},
        "student": {"arch": "deeplabv3_resnet18"}, "method": {"name": "none"},
        "train": {"batch_size": 8, "amp": True}})
    failure = classify(torch.cuda.OutOfMemoryError("CUDA out of memory.\nmore lines"), spec)
    assert failure.code == "out_of_memory"
    assert "train.batch_size (now 8)" in failure.message
    assert "dataset.crop (now [360, 480])" in failure.message
    assert "enable train.amp" not in failure.message  # it already is
    assert "more lines" not in failure.message


@pytest.mark.parametrize(("exc", "code", "user"), [
    (RuntimeError("CUDA error: device-side assert triggered"), "internal", False),
    (RuntimeError("memory of the past"), "internal", False),
    (ValueError("boom"), "internal", False),
])
def test_classify(exc: Exception, code: str, user: bool) -> None:
    failure = classify(exc)
    assert (failure.code, failure.user_error) == (code, user)


def test_out_of_memory_in_the_run_fails_the_job_without_retry(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import pcd_core.train

    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(pcd_core.train, "run", oom)
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "failed"
    job = world.job(job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "out_of_memory", 1)
    assert "train.batch_size (now 2)" in (job.error_message or "")
    assert reap_once(world.settings, enqueue=lambda *a: pytest.fail("re-dispatched")) == []
    with world.session() as s:
        assert service.list_artifacts(s, job) == []


def test_cancel_during_the_scoring_pass_ends_cancelled_before_training(
        world, dataset_dir, teacher_file, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import inputs

    real_prepare = inputs.prepare

    def prepare_then_cancel(spec: Any, ctx: Any) -> Any:
        run_spec = real_prepare(spec, ctx)
        with world.session() as s:  # the user cancels while the job is being prepared
            service.request_cancel(s, s.get(Job, ctx.snap.job_id))
        return run_spec

    monkeypatch.setattr(inputs, "prepare", prepare_then_cancel)
    teacher = world.upload(teacher_file, "checkpoint")
    job_id = world.submit(make_spec(f"file://{dataset_dir}", teacher, iterations=1000))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "cancelled"
    job = world.job(job_id)
    assert (job.status, job.iteration, job.phase) == ("cancelled", 0, "scoring")
    assert "cancelled at iteration 0" in world.logs(job_id)
    with world.session() as s:
        assert service.list_artifacts(s, job) == []


def test_cancel_after_the_run_but_before_upload_wins(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    import pcd_core.train

    def run_then_cancel(spec: Any, out_dir: Path, **kwargs: Any) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("student.safetensors", "model.json", "samples.png"):
            (out_dir / name).write_bytes(b"x")
        with world.session() as s:  # arrives after the engine's last poll
            service.request_cancel(s, s.get(Job, job_id))

    monkeypatch.setattr(pcd_core.train, "run", run_then_cancel)
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "cancelled"
    job = world.job(job_id)
    assert job.status == "cancelled"
    with world.session() as s:
        assert service.list_artifacts(s, job) == []


def test_checkpoints_are_gone_before_the_row_says_succeeded(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that polls until ``succeeded`` and then lists the store must find no
    checkpoints: they are deleted before the final status is written, not after."""
    from worker.jobrow import JobRow

    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=4,
                                    checkpoint_every=2))
    prefix = outputs.checkpoints_prefix(job_id)
    seen_at_finish: list[list[str]] = []
    real_finish = JobRow.finish

    def finish_and_look(self: JobRow, status: str, message: str | None = None) -> None:
        seen_at_finish.append([o.key for o in world.store.list(prefix)])
        real_finish(self, status, message)

    seen_at_upload: list[str] = []
    real_upload = outputs.upload_checkpoint

    def upload_and_look(ctx: Any, iteration: int, path: Path) -> None:
        real_upload(ctx, iteration, path)
        seen_at_upload.extend(o.key for o in world.store.list(prefix))

    monkeypatch.setattr(JobRow, "finish", finish_and_look)
    monkeypatch.setattr(outputs, "upload_checkpoint", upload_and_look)
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "succeeded"
    assert seen_at_upload, "the run uploaded no checkpoint: the check below would be vacuous"
    assert seen_at_finish == [[]]
    assert world.store.list(prefix) == []


@pytest.mark.slow
def test_a_checkpoint_gone_from_the_store_restarts_the_attempt_from_zero(
        world, dataset_dir, make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime, timedelta, timezone

    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=6))
    die_after_checkpoint(world, job_id, 4, monkeypatch)
    job = world.job(job_id)
    assert job.checkpoint_iteration == 4 and job.checkpoint_uri
    assert world.store.delete_prefix(outputs.checkpoints_prefix(job_id)) == 1

    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    [reaped] = reap_once(world.settings, enqueue=lambda *a: None)
    assert reaped.outcome == "requeued"
    assert execute_job(job_id, settings=world.settings, worker_id="w2") == "succeeded", \
        world.logs(job_id)
    logs = world.logs(job_id)
    assert "the checkpoint at iteration 4" in logs and "starting from iteration 0" in logs
    assert "resuming from checkpoint" not in logs
    assert world.job(job_id).iteration == 6


def test_cleanup_keeps_checkpoints_of_a_job_this_worker_lost(world, tmp_path: Path) -> None:
    """After losing the job to another worker, its checkpoints are the new owner's resume
    point: only the local directory goes."""
    from types import SimpleNamespace

    prefix = outputs.checkpoints_prefix("job-x")
    blob = tmp_path / "ckpt.pt"
    blob.write_bytes(b"weights")
    world.store.put_file(f"{prefix}ckpt-000000002.pt", blob)
    for lost, left in ((True, 1), (False, 0)):
        work = tmp_path / f"work-{lost}"
        work.mkdir()
        ctx = SimpleNamespace(work_dir=work, store=world.store, snap=SimpleNamespace(
            job_id="job-x"), progress=SimpleNamespace(stop_flag=threading.Event()))
        if lost:
            ctx.progress.stop_flag.set()
        outputs.cleanup(ctx, keep_checkpoints=False)  # type: ignore[arg-type]
        assert not work.exists() and len(world.store.list(prefix)) == left
