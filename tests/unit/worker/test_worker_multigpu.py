"""The multi-GPU bridge: the torchrun command line and the event relay (no GPUs needed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pcd_core.progress import Callback, Progress, RunCancelled
from worker import multigpu
from worker.ddp_entry import JsonlCallback
from worker.procs import argv_of, child_pids, process_alive
from worker.watchdog import RunStalled

REPO = Path(__file__).resolve().parents[3]


class Rec(Callback):
    def __init__(self, stop: bool = False) -> None:
        self.events: list[Any] = []
        self.stop = stop

    def on_progress(self, progress: Progress) -> None:
        self.events.append(progress)

    def on_eval(self, iteration: int, metrics: Any) -> None:
        self.events.append(("eval", iteration, metrics))

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self.events.append(("ckpt", iteration, path))

    def should_stop(self) -> bool:
        return self.stop


def test_torchrun_argv(tmp_path: Path) -> None:
    argv = multigpu.torchrun_argv(4, tmp_path / "s.json", tmp_path, tmp_path / "e", tmp_path /
                                  "STOP", tmp_path / "r.pt", python="py")
    assert argv[:5] == ["py", "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=4"]
    assert argv[5:7] == ["-m", "worker.ddp_entry"]
    assert argv[-2:] == ["--resume", str(tmp_path / "r.pt")]
    assert argv[argv.index("--supervisor-pid") + 1] == str(os.getpid())
    assert argv[argv.index("--stall-timeout") + 1] == "0.0"


def test_jsonl_roundtrip_replays_engine_callbacks(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    writer = JsonlCallback(events, tmp_path / "STOP")
    writer.on_progress(Progress("training", 5, 10, {"ce": 0.5}, 12.0, 3.0, 0.01))
    writer.on_eval(5, {"miou": 0.25})
    writer.on_checkpoint(5, tmp_path / "last.pt")
    assert not writer.should_stop()
    (tmp_path / "STOP").touch()
    assert writer.should_stop()
    writer.finish({"event": "done"})
    rec = Rec()
    for line in events.read_text().splitlines():
        record = json.loads(line)
        if record["event"] != "done":
            multigpu.replay(record, [rec])
    assert rec.events[0] == Progress("training", 5, 10, {"ce": 0.5}, 12.0, 3.0, 0.01)
    assert rec.events[1] == ("eval", 5, {"miou": 0.25})
    assert rec.events[2] == ("ckpt", 5, tmp_path / "last.pt")


def _fake_torchrun(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Replace the torchrun command by a Python one-liner that plays the ranks' part."""
    def argv(gpus: int, spec: Path, out: Path, events: Path, stop: Path, resume: Any,
             python: str = sys.executable, **_: Any) -> list[str]:
        return [python, "-c", script, str(events), str(stop)]

    monkeypatch.setattr(multigpu, "torchrun_argv", argv)


def test_run_distributed_relays_and_finishes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torchrun(monkeypatch, (
        "import json,sys\nf=open(sys.argv[1],'a')\n"
        "f.write(json.dumps({'event':'progress','phase':'training','iteration':2,"
        "'max_iterations':2})+'\\n')\n"
        "f.write(json.dumps({'event':'done','result':{}})+'\\n')\n"))
    rec = Rec()
    final = multigpu.run_distributed("{}", tmp_path / "out", 2, [rec], poll_s=0.05)
    assert final["event"] == "done"
    assert rec.events == [Progress("training", 2, 2)]


def test_run_distributed_cancel_via_stop_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torchrun(monkeypatch, (
        "import json,os,sys,time\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
        "open(sys.argv[1],'a').write(json.dumps({'event':'cancelled','iteration':7,"
        "'checkpoint':None})+'\\n')\nsys.exit(3)\n"))
    with pytest.raises(RunCancelled) as info:
        multigpu.run_distributed("{}", tmp_path / "out", 2, [Rec(stop=True)], poll_s=0.05)
    assert info.value.iteration == 7


def test_run_distributed_failure_carries_log_tail(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torchrun(monkeypatch, "import sys; print('rank 1 exploded'); sys.exit(1)")
    with pytest.raises(multigpu.DistributedRunError) as info:
        multigpu.run_distributed("{}", tmp_path / "out", 2, [Rec()], poll_s=0.05)
    assert "rank 1 exploded" in info.value.tail


def test_a_rank_stall_report_raises_run_stalled(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What torchrun leaves when a rank's watchdog fired: a non-zero exit and that rank's
    stacks in its report file (the others' files empty)."""
    _fake_torchrun(monkeypatch, (
        "import pathlib,sys\nout=pathlib.Path(sys.argv[1]).parent\n"
        "(out/'stall-rank0.txt').write_text('')\n"
        "(out/'stall-rank1.txt').write_text('Timeout (0:30:00)!\\n  File x, in read_batch\\n')\n"
        "sys.exit(1)\n"))
    with pytest.raises(RunStalled) as info:
        multigpu.run_distributed("{}", tmp_path / "out", 2, [Rec()], poll_s=0.05)
    assert info.value.stacks.startswith("Timeout (0:30:00)!") and "read_batch" in info.value.stacks


def test_a_stall_report_left_by_an_earlier_run_does_not_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stall-rank0.txt").write_text("Timeout (0:30:00)!\n")
    _fake_torchrun(monkeypatch, "import sys; print('rank 0 exploded'); sys.exit(1)")
    with pytest.raises(multigpu.DistributedRunError):
        multigpu.run_distributed("{}", tmp_path / "out", 2, [Rec()], poll_s=0.05)


def test_a_rank_watchdog_writes_its_report_and_ends_the_rank(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from pcd_core import train
        from worker import ddp_entry

        def stuck_reading_a_batch(*args, **kwargs):
            time.sleep(60)

        train.run = stuck_reading_a_batch
        ddp_entry.main(["--spec", "unused", "--out", {str(tmp_path)!r},
                        "--events", {str(tmp_path / "events.jsonl")!r},
                        "--stop-file", {str(tmp_path / "STOP")!r}, "--stall-timeout", "1"])
    """).replace('"--spec", "unused"', '"--spec", ' + repr(str(tmp_path / "spec.json")))
    from pcd_core.spec import RunSpec

    sys.path.insert(0, str(REPO / "tests" / "unit" / "pcd_core"))
    from train_helpers import spec_dict

    (tmp_path / "spec.json").write_text(
        RunSpec.model_validate(spec_dict(tmp_path / "data")).model_dump_json())
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    report = (tmp_path / "stall-rank0.txt").read_text()
    assert report.startswith("Timeout (0:00:01)!") and "stuck_reading_a_batch" in report


def test_process_alive_sees_the_living_the_dead_and_the_unreaped() -> None:
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not waited for: a zombie
    assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)


@pytest.mark.slow
def test_a_rank_gone_before_torchrun_leaves_no_stopped_loader_behind(tmp_path: Path) -> None:
    """The order a CI run hit: rank 1 ends itself (its watchdog's ``os._exit``) before torchrun
    signals the ranks, so torchrun never signals rank 1's session, where rank 1's SIGSTOPped
    loader worker lives on. A stand-in torchrun starts a rank in a session of its own, as
    torchrun does; the rank forks a "loader", which is stopped; the rank dies, then the stand-in
    exits. What the supervisor does after torchrun has exited must end the loader."""
    marker = str(tmp_path / "run")
    rank = textwrap.dedent("""
        import os, sys, time
        loader = os.fork()
        if loader == 0:
            time.sleep(600)
            os._exit(0)
        print(loader, flush=True)
        sys.stdin.readline()  # the stand-in's go-ahead to die
        os._exit(1)
    """)
    standin = textwrap.dedent(f"""
        import subprocess, sys
        rank = subprocess.Popen([sys.executable, "-c", {rank!r}, {marker!r}],
                                start_new_session=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        print(rank.stdout.readline().strip(), flush=True)
        sys.stdin.readline()
        rank.stdin.write("die\\n"); rank.stdin.flush(); rank.wait()
    """)
    torchrun = subprocess.Popen([sys.executable, "-c", standin, marker], start_new_session=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert torchrun.stdout is not None and torchrun.stdin is not None
    loader = int(torchrun.stdout.readline())
    ranks = set(child_pids(torchrun.pid))
    assert len(ranks) == 1 and os.getpgid(loader) == next(iter(ranks))
    os.kill(loader, signal.SIGSTOP)
    try:
        torchrun.stdin.write("go\n")
        torchrun.stdin.flush()
        assert torchrun.wait(timeout=30) == 0
        assert process_alive(loader), "the stand-in should leave the stopped loader behind"
        multigpu._end_stragglers(torchrun, ranks, marker)
        deadline = time.monotonic() + 10
        while process_alive(loader) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(loader), "the stopped loader outlived the run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(loader, signal.SIGKILL)


def test_stragglers_spare_a_group_whose_processes_do_not_name_the_run(tmp_path: Path) -> None:
    """A rank's group id can belong to someone else by the time the run ends; only processes
    whose command line names the run are ended."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                start_new_session=True)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        multigpu._end_stragglers(done, {stranger.pid}, str(tmp_path / "run"))
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_ranks_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """The real torchrun, two CPU ranks on Gloo: SIGKILL the process that supervises them
    (as a dead Celery pool child would be) and the ranks stop as on a cancel, instead of
    training on, unwatched, in their own session."""
    sys.path.insert(0, str(REPO / "tests" / "unit" / "pcd_core"))
    from train_helpers import spec_dict, write_dataset

    from pcd_core.spec import RunSpec

    data = write_dataset(tmp_path / "data")
    spec = spec_dict(data, iterations=100_000, log_every=1, checkpoint_every=100_000,
                     eval_every=100_000, deterministic=False)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from worker import multigpu
        spec = {RunSpec.model_validate(spec).model_dump_json()!r}
        multigpu.run_distributed(spec, Path({str(out)!r}), 2, [], poll_s=0.1)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and '"phase": "training"' not in _text(events):
        time.sleep(0.2)
    assert '"phase": "training"' in _text(events), "the ranks never started training"
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"event": "cancelled"' not in _text(events):
        time.sleep(0.2)
    last = json.loads(_text(events).splitlines()[-1])
    assert last["event"] == "cancelled", last
    ranks = _processes_mentioning(str(out))
    deadline = time.monotonic() + 60
    while ranks and time.monotonic() < deadline:
        time.sleep(0.2)
        ranks = _processes_mentioning(str(out))
    assert not ranks, f"still running: {ranks}"


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _processes_mentioning(needle: str) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and needle in " ".join(argv_of(int(entry.name)))
            and process_alive(int(entry.name))]


@pytest.mark.slow
def test_a_rank_that_stalls_ends_the_run_with_its_stacks(tmp_path: Path) -> None:
    """The real torchrun, two CPU ranks on Gloo, each reading batches through one DataLoader
    worker: SIGSTOP rank 1's loader worker. Rank 1 waits for it forever and rank 0 waits for
    rank 1 in the gradient all-reduce; the ranks' stall watchdogs end them, torchrun ends, and
    the supervisor raises RunStalled with the stacks. Nothing of the run is left behind."""
    sys.path.insert(0, str(REPO / "tests" / "unit" / "pcd_core"))
    from train_helpers import spec_dict, write_dataset

    from pcd_core.spec import RunSpec

    data = write_dataset(tmp_path / "data")
    spec = spec_dict(data, iterations=100_000, log_every=1, checkpoint_every=100_000,
                     eval_every=100_000, deterministic=False, num_workers=1)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from worker import multigpu
        from worker.watchdog import RunStalled
        spec = {RunSpec.model_validate(spec).model_dump_json()!r}
        try:
            multigpu.run_distributed(spec, Path({str(out)!r}), 2, [], poll_s=0.1,
                                     stall_timeout_s=8.0)
        except RunStalled as exc:
            print("RunStalled", exc.stacks, flush=True)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, text=True)
    try:
        events = out / "events.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and '"phase": "training"' not in _text(events):
            time.sleep(0.2)
        assert '"phase": "training"' in _text(events), "the ranks never started training"
        ranks = [pid for pid in _processes_mentioning(str(out))
                 if "worker.ddp_entry" in argv_of(pid) and child_pids(pid)]
        rank1 = [pid for pid in ranks if _rank_of(pid) == "1"]
        assert len(rank1) == 1, (ranks, [_rank_of(p) for p in ranks])
        loaders = child_pids(rank1[0])
        assert loaders, "rank 1 has no loader worker"
        for pid in loaders:
            os.kill(pid, signal.SIGSTOP)
        stdout, _ = supervisor.communicate(timeout=120)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert stdout.startswith("RunStalled Timeout (0:00:08)!"), stdout[-3000:]
    assert "dataloader.py" in stdout, stdout[-3000:]  # where rank 1 waited
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(out)), "processes of the run outlived it"


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RANK=")]
    return found[0] if found else None
