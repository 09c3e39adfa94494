"""Entry point of one rank of a multi-GPU job, launched by ``torch.distributed.run``.

Why this small bridge instead of the engine's own CLI: the runner needs the run's progress,
evaluations and checkpoints *as they happen* (to write them to the job row and upload the
checkpoints) and a way to ask for a cooperative stop. Ranks run in other processes, so the
bridge is a file: rank 0's callbacks append JSON lines to ``--events`` (the runner tails it),
and ``should_stop`` looks for ``--stop-file`` (the runner creates it on cancel) and for the
runner's process (``--supervisor-pid``). The engine broadcasts ``should_stop`` from rank 0, so
every rank stops at the same iteration. Each rank runs under a stall watchdog
(worker/watchdog.py) that writes its stacks to ``stall-rank<N>.txt`` in ``--out``.

    python -m torch.distributed.run --standalone --nproc_per_node=N -m worker.ddp_entry \
        --spec spec.json --out OUT --events events.jsonl --stop-file STOP [--resume CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pcd_core.progress import Callback, Progress, RunCancelled
from worker.procs import process_alive
from worker.watchdog import StallWatchdog


class JsonlCallback(Callback):
    """Appends one JSON object per hook call to a file, flushed at once (the runner tails it);
    asks the ranks to stop when the stop file appears or the supervising process is gone."""

    def __init__(self, events: Path, stop_file: Path, supervisor_pid: int | None = None) -> None:
        self._fh = events.open("a", encoding="utf-8")
        self._stop_file = stop_file
        self._supervisor_pid = supervisor_pid

    def _write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._fh.flush()

    def on_progress(self, progress: Progress) -> None:
        self._write({"event": "progress", **asdict(progress)})

    def on_eval(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        self._write({"event": "eval", "iteration": iteration, "metrics": dict(metrics)})

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self._write({"event": "checkpoint", "iteration": iteration, "path": str(path)})

    def should_stop(self) -> bool:
        if self._stop_file.exists():
            return True
        return self._supervisor_pid is not None and not process_alive(self._supervisor_pid)

    def finish(self, record: Mapping[str, Any]) -> None:
        self._write(record)
        self._fh.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--supervisor-pid", type=int, default=None,
                        help="stop like on a cancel when this process is gone")
    parser.add_argument("--stall-timeout", type=float, default=0.0,
                        help="seconds without progress before this rank ends (0: off)")
    args = parser.parse_args(argv)

    from pcd_core import train
    from pcd_core.spec import RunSpec

    spec = RunSpec.model_validate_json(args.spec.read_text())
    rank = int(os.environ.get("RANK", "0"))
    callback = (JsonlCallback(args.events, args.stop_file, args.supervisor_pid)
                if rank == 0 else None)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with (args.out / f"stall-rank{rank}.txt").open("w") as report, \
                StallWatchdog(args.stall_timeout, report.fileno) as watchdog:
            result = train.run(spec, args.out, resume=args.resume,
                               callbacks=[watchdog, callback] if callback else [watchdog])
    except RunCancelled as exc:
        if callback:
            callback.finish({"event": "cancelled", "iteration": exc.iteration,
                             "checkpoint": str(exc.checkpoint) if exc.checkpoint else None})
        return 3
    if callback:
        callback.finish({"event": "done", "result": _jsonable(result)})
    return 0


def _jsonable(result: Any) -> Any:
    try:
        return json.loads(json.dumps(asdict(result), default=str))
    except TypeError:
        return str(result)


if __name__ == "__main__":
    raise SystemExit(main())
