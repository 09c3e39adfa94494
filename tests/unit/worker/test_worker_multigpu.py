"""The multi-GPU bridge: the torchrun command line and the event relay (no GPUs needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from pcd_core.progress import Callback, Progress, RunCancelled
from worker import multigpu
from worker.ddp_entry import JsonlCallback


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
             python: str = sys.executable) -> list[str]:
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
