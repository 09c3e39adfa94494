"""The stall watchdog (worker/watchdog.py): a run that stops showing signs of life is ended
with its stacks in the job log, and the reaper re-queues it like the job of a dead worker.

A firing watchdog ends its process, so every run that may stall runs in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from worker_helpers import tar_gz

from worker.procs import argv_of, child_pids, process_alive
from worker.reaper import reap_once
from worker.runner import execute_job
from worker.watchdog import RunStalled, StallWatchdog

REPO = Path(__file__).resolve().parents[3]
HELPERS = Path(__file__).resolve().parent


def _python(script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, **kwargs)  # type: ignore[call-overload]


def test_signs_of_life_keep_the_run_and_silence_ends_it_with_its_stacks() -> None:
    read_end, write_end = os.pipe()
    run = _python(f"""
        import time
        from worker.watchdog import StallWatchdog

        def stuck_in_a_deadlock():
            time.sleep(60)

        with StallWatchdog(1.0, lambda: {write_end}) as dog:
            start = time.monotonic()
            while time.monotonic() - start < 3.0:  # three timeouts, with a poll every 0.1 s
                time.sleep(0.1)
                dog.should_stop()
            print(f"alive {{time.monotonic() - start:.2f}}", flush=True)
            stuck_in_a_deadlock()
    """, pass_fds=(write_end,))
    os.close(write_end)
    stacks = os.read(read_end, 65536).decode()
    os.close(read_end)
    assert run.returncode == 1, run.stderr  # faulthandler's exit
    assert float(run.stdout.split()[1]) >= 3.0  # re-armed through three timeouts
    assert stacks.startswith("Timeout (0:00:01)!"), stacks
    assert "stuck_in_a_deadlock" in stacks


def test_it_fires_while_the_stuck_thread_holds_the_interpreter_lock() -> None:
    """The reason for faulthandler's C thread: a Python watchdog thread would wait for the
    lock as long as the stuck call holds it (here one big-integer power, many seconds)."""
    run = _python("""
        from worker.watchdog import StallWatchdog

        def stuck_holding_the_interpreter_lock():
            return 3 ** 40_000_000

        with StallWatchdog(1.0):
            stuck_holding_the_interpreter_lock()
            print("finished", flush=True)
    """)
    assert run.returncode == 1 and "finished" not in run.stdout, run.stdout
    assert "stuck_holding_the_interpreter_lock" in run.stderr  # no pipe: stderr


def test_leaving_the_watchdog_disarms_it() -> None:
    run = _python("""
        import time
        from worker.watchdog import StallWatchdog

        with StallWatchdog(0.5) as dog:
            assert dog.armed
        assert not dog.armed
        time.sleep(1.5)
        print("still here", flush=True)
    """)
    assert run.returncode == 0 and "still here" in run.stdout, run.stderr


def test_a_zero_timeout_never_arms() -> None:
    with StallWatchdog(0.0) as dog:
        dog.should_stop()
        dog.on_checkpoint(1, Path("x"))
        assert not dog.armed


def test_signs_of_life_rearm_at_most_once_per_twentieth_of_the_timeout(monkeypatch) -> None:
    import faulthandler

    now = [0.0]
    armed: list[float] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later",
                        lambda *a, **k: armed.append(now[0]))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: None)
    with StallWatchdog(100.0, lambda: 2, clock=lambda: now[0]) as dog:
        for step in range(1, 21):
            now[0] = step * 1.0  # a sign of life every second
            dog.should_stop()
    assert armed == [0.0, 5.0, 10.0, 15.0, 20.0]


def test_a_suspended_watchdog_is_disarmed_and_armed_afresh_after(monkeypatch) -> None:
    import faulthandler

    now = [0.0]
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later",
                        lambda *a, **k: calls.append(("arm", now[0])))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later",
                        lambda: calls.append(("cancel", now[0])))
    with StallWatchdog(100.0, lambda: 2, clock=lambda: now[0]) as dog:
        now[0] = 1.0
        with dog.suspended():
            assert not dog.armed
            now[0] = 500.0  # far past the timeout: nothing is armed to fire
            dog.alive()
            assert not dog.armed
        assert dog.armed
    assert calls == [("arm", 0.0), ("cancel", 1.0), ("arm", 500.0), ("cancel", 500.0)]


def test_every_stage_of_an_attempt_feeds_the_watchdog(world, dataset_dir, make_spec,
                                                      monkeypatch, tmp_path: Path) -> None:
    """Preparing (download, unpacking, the dataset scan) and uploading send signs of life,
    not only training: a big dataset that takes longer than the timeout to fetch or check
    is progress, not a stall."""
    import traceback

    stages: set[str] = set()

    def alive(self: StallWatchdog, *_: object) -> None:
        stages.update(frame.name for frame in traceback.extract_stack())

    monkeypatch.setattr(StallWatchdog, "alive", alive)
    ds = world.upload(tar_gz(dataset_dir, tmp_path / "ds.tar.gz"), "dataset")
    job_id = world.submit(make_spec(ds, None))
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "succeeded"
    for stage in ("_download", "_reporting", "validate_dataset", "upload_artifacts"):
        assert stage in stages, sorted(stages)


@pytest.mark.parametrize("stage", ["preparing", "uploading"])
def test_a_hang_outside_training_is_ended_with_its_stacks_and_requeued(
        world, dataset_dir, make_spec, stage: str) -> None:
    """A dataset fetch from a hung mount, or an artifact upload that never returns, holds
    the worker like a stuck training step: the watchdog covers the whole attempt."""
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=2))
    target = "inputs.resolve_dataset" if stage == "preparing" else "outputs.upload_artifacts"
    run = _python(f"""
        import sys, time
        sys.path.insert(0, {str(HELPERS)!r})
        from pathlib import Path
        from worker_helpers import make_settings
        from worker import inputs, outputs
        from worker.runner import execute_job

        def stuck_on_a_hung_mount(*args, **kwargs):
            time.sleep(60)

        {target} = stuck_on_a_hung_mount
        settings = make_settings(Path({str(world.root)!r}), stall_timeout_s=8.0)
        execute_job({job_id!r}, settings=settings, worker_id="stalls")
    """)
    assert run.returncode == 1, run.stderr[-2000:]
    deadline = time.monotonic() + 20
    while "stall watchdog" not in world.logs(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = world.logs(job_id)
    assert "the stall watchdog ended the run" in logs and "stuck_on_a_hung_mount" in logs, logs
    job = world.job(job_id)
    assert job.status == "running" and job.phase == stage
    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: None)
    assert reaped.outcome == "requeued"


def test_a_stalled_job_is_logged_with_its_stacks_requeued_and_run_again(
        world, dataset_dir, make_spec) -> None:
    """The whole story through the runner: the engine stalls inside the run, the process
    ends, the beater puts the stacks in the job log, the reaper re-queues the job, and the
    next attempt runs it to the end."""
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=4))
    run = _python(f"""
        import sys, time
        sys.path.insert(0, {str(HELPERS)!r})
        from pathlib import Path
        from worker_helpers import make_settings
        from pcd_core import train
        from pcd_core.progress import Progress
        from worker.runner import execute_job

        def stuck_in_the_data_loader():
            time.sleep(60)

        def stalls(spec, out_dir, callbacks=(), **kwargs):
            for cb in callbacks:
                cb.on_progress(Progress("training", 1, 4))
            stuck_in_the_data_loader()

        train.run = stalls
        settings = make_settings(Path({str(world.root)!r}), stall_timeout_s=1.0)
        execute_job({job_id!r}, settings=settings, worker_id="stalls")
    """)
    assert run.returncode == 1, run.stderr[-2000:]
    deadline = time.monotonic() + 20
    while "stall watchdog" not in world.logs(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)  # the beater writes the log once it reads the end of the pipe
    logs = world.logs(job_id)
    assert "the stall watchdog ended the run" in logs, logs
    assert "stuck_in_the_data_loader" in logs
    job = world.job(job_id)
    assert job.status == "running" and job.worker_id == "stalls"

    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    sent: list[tuple[str, str]] = []
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: sent.append((j, q)))
    assert reaped.outcome == "requeued" and sent == [(job_id, "cpu")]
    assert execute_job(job_id, settings=world.settings, worker_id="w2") == "succeeded"
    assert world.job(job_id).attempts == 2


def test_a_stalled_rank_leaves_the_job_to_the_reaper_with_its_stacks(
        world, dataset_dir, make_spec, monkeypatch) -> None:
    """A multi-GPU run's supervisor survives its ranks' stall: it hands their stacks to the
    beater and leaves the row alone, so the job is recovered as a single-process stall is."""
    from worker import multigpu

    spec = make_spec(f"file://{dataset_dir}", None)
    spec["resources"] = {"gpus": 2, "queue": "gpu"}
    job_id = world.submit(spec)

    def stalls(*args: object, **kwargs: object) -> None:
        raise RunStalled("Timeout (0:30:00)!\nThread 0x1 (most recent call first):\n"
                         "  File \"loader.py\", line 9 in wait_for_a_batch_that_never_comes\n")

    monkeypatch.setattr(multigpu, "run_distributed", stalls)
    assert execute_job(job_id, settings=world.settings, worker_id="w1") == "stalled"
    logs = world.logs(job_id)
    assert "the stall watchdog ended the run" in logs and "wait_for_a_batch_that" in logs, logs
    job = world.job(job_id)
    assert job.status == "running" and job.worker_id == "w1"
    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: None)
    assert reaped.outcome == "requeued"


@pytest.mark.slow
def test_a_run_whose_loader_worker_is_stopped_is_ended_and_its_worker_killed(
        world, dataset_dir, make_spec, tmp_path: Path) -> None:
    """A real stall, nothing replaced: the run's DataLoader worker is SIGSTOPped mid-training
    (torch's loader waits for a stopped worker forever: it is alive). The watchdog ends the
    run, the stacks show it waiting on the loader, the stopped worker dies with its run
    (pcd_core.data.loader.die_with_parent), and the reaper re-queues the job."""
    job_id = world.submit(make_spec(f"file://{dataset_dir}", None, iterations=100_000,
                                    num_workers=1, checkpoint_every=2, eval_every=100_000))
    run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HELPERS)!r})
        from pathlib import Path
        from worker_helpers import make_settings
        from worker.runner import execute_job

        # 8 s: one training step of this tiny run took over 3 s on a CI machine that also
        # ran two benchmark processes, and the watchdog ended the run before it stalled
        settings = make_settings(Path({str(world.root)!r}), stall_timeout_s=8.0)
        execute_job({job_id!r}, settings=settings, worker_id="stalls")
    """)], cwd=REPO, stderr=(tmp_path / "run.err").open("w"))  # not a pipe the worker holds
    try:
        deadline = time.monotonic() + 180
        while (world.job(job_id).checkpoint_iteration or 0) < 2:
            assert run.poll() is None and time.monotonic() < deadline, "never checkpointed"
            time.sleep(0.2)
        loaders = [pid for pid in child_pids(run.pid)
                   if "worker.heartbeat" not in argv_of(pid)]
        assert loaders, "the run has no loader worker"
        for pid in loaders:
            os.kill(pid, signal.SIGSTOP)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, (tmp_path / "run.err").read_text()[-2000:]
    deadline = time.monotonic() + 20
    while "stall watchdog" not in world.logs(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = world.logs(job_id)
    assert "the stall watchdog ended the run" in logs and "dataloader.py" in logs, logs
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in loaders) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in loaders), "the stopped worker outlived its run"
    world.update(job_id, heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=60))
    [reaped] = reap_once(world.settings, enqueue=lambda j, q: None)
    assert reaped.outcome == "requeued" and world.job(job_id).checkpoint_iteration >= 2
