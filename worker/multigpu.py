"""Run a job on several GPUs of one node: ``torch.distributed.run`` as a subprocess.

Why a subprocess: DDP wants one process per GPU, and the Celery task's process must stay the
supervisor (heartbeat, cancel checks, uploads). The ranks run :mod:`worker.ddp_entry`, whose
rank 0 appends progress/eval/checkpoint events to a JSON-lines file; this module tails that
file and replays each event on the runner's callbacks, so the database sees a multi-GPU job
exactly as it sees a single-process one. Cancellation creates a stop file the ranks poll;
if they do not stop within a grace period the process group is terminated. torchrun runs in
a session of its own (a Ctrl-C or a signal to the worker's group must not reach the ranks
half-way through a checkpoint), so the ranks also poll for this process: if it dies, they
stop as on a cancel rather than train on, unwatched, on GPUs the next attempt needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcd_core.progress import Callback, Progress, RunCancelled
from worker.procs import argv_of, child_pids, processes_in_group
from worker.watchdog import RunStalled

STOP_GRACE_S = 120.0  # a cooperative stop writes a checkpoint first; give it time
STALL_REPORTS = "stall-rank*.txt"  # where each rank's watchdog writes (worker/ddp_entry.py)


class DistributedRunError(RuntimeError):
    """torchrun exited non-zero; ``tail`` holds the end of its output for the job log."""

    def __init__(self, returncode: int, tail: str) -> None:
        super().__init__(f"torch.distributed.run exited with {returncode}")
        self.returncode = returncode
        self.tail = tail


def torchrun_argv(gpus: int, spec_file: Path, out_dir: Path, events: Path, stop_file: Path,
                  resume: Path | None, python: str = sys.executable, *,
                  stall_timeout_s: float = 0.0) -> list[str]:
    """The command line (a function, so tests can check it without launching anything); the
    ranks watch this process, their supervisor."""
    argv = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "worker.ddp_entry", "--spec", str(spec_file), "--out", str(out_dir),
            "--events", str(events), "--stop-file", str(stop_file),
            "--supervisor-pid", str(os.getpid()),
            "--stall-timeout", str(stall_timeout_s)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    return argv


def replay(record: dict[str, Any], callbacks: Sequence[Callback]) -> None:
    """Deliver one event line to the callbacks, as the engine would have in-process."""
    kind = record.pop("event", None)
    if kind == "progress":
        progress = Progress(**{k: v for k, v in record.items()
                               if k in Progress.__dataclass_fields__})
        for cb in callbacks:
            cb.on_progress(progress)
    elif kind == "eval":
        for cb in callbacks:
            cb.on_eval(int(record["iteration"]), record["metrics"])
    elif kind == "checkpoint":
        for cb in callbacks:
            cb.on_checkpoint(int(record["iteration"]), Path(record["path"]))


def run_distributed(spec_json: str, out_dir: Path, gpus: int, callbacks: Sequence[Callback],
                    resume: Path | None = None, poll_s: float = 0.5,
                    stall_timeout_s: float = 0.0) -> dict[str, Any]:
    """Train under torchrun; returns the engine's final record. Raises like ``train.run``,
    and :class:`~worker.watchdog.RunStalled` when a rank's stall watchdog ended the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file, events, stop_file = out_dir / "spec.json", out_dir / "events.jsonl", \
        out_dir / "STOP"
    spec_file.write_text(spec_json)
    events.write_text("")
    stop_file.unlink(missing_ok=True)
    log_file = out_dir / "torchrun.log"
    for stale in out_dir.glob(STALL_REPORTS):  # an earlier run in this folder
        stale.unlink()
    argv = torchrun_argv(gpus, spec_file, out_dir, events, stop_file, resume,
                         stall_timeout_s=stall_timeout_s)
    final: dict[str, Any] = {}
    stop_requested_at: float | None = None
    ranks: set[int] = set()  # torchrun's children, each the leader of a session of its own
    with log_file.open("wb") as log, events.open("r", encoding="utf-8") as tail:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ})
        try:
            buffer = ""
            while True:
                ranks.update(child_pids(proc.pid))
                buffer += tail.read()
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    if line.strip():
                        record = json.loads(line)
                        if record.get("event") in ("done", "cancelled"):
                            final = record
                        else:
                            replay(record, callbacks)
                if proc.poll() is not None and not tail.read(1):
                    break
                if stop_requested_at is None and any(cb.should_stop() for cb in callbacks):
                    stop_file.touch()
                    stop_requested_at = time.monotonic()
                elif stop_requested_at and time.monotonic() - stop_requested_at > STOP_GRACE_S:
                    _kill_group(proc)
                time.sleep(poll_s)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            _end_stragglers(proc, ranks, str(out_dir))
    if final.get("event") == "cancelled" or (stop_requested_at and proc.returncode != 0):
        ckpt = final.get("checkpoint")
        raise RunCancelled(int(final.get("iteration", 0)), Path(ckpt) if ckpt else None)
    if proc.returncode != 0:
        stacks = "\n".join(text for path in sorted(out_dir.glob(STALL_REPORTS))
                           if (text := path.read_text(errors="replace").strip()))
        if stacks:
            raise RunStalled(stacks)
        raise DistributedRunError(proc.returncode, _tail(log_file))
    return final


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _end_stragglers(proc: subprocess.Popen[bytes], ranks: set[int], marker: str) -> None:
    """SIGKILL whatever is left of the run once torchrun has exited.

    torchrun starts each rank in a session (so a process group) of its own, and when one rank
    fails it signals only the groups of the ranks still running. A rank that has already
    exited (its stall watchdog ends it with ``os._exit``) leaves its group behind, DataLoader
    workers included; one that is stopped or stuck lives on with nothing to reap it (a CI run
    saw rank 1's SIGSTOPped loader worker outlive the run). So this signals torchrun's own
    group and each rank's, and within a rank's group only processes whose command line names
    the run (``marker``, its out folder), since a group id frees up with its last member and
    may by now belong to someone else. Nothing of a finished run may keep its GPUs."""
    if proc.poll() is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        for pid in processes_in_group(rank):
            if marker in " ".join(argv_of(pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _tail(path: Path, limit: int = 4000) -> str:
    data = path.read_bytes()[-limit:]
    return data.decode("utf-8", errors="replace")
