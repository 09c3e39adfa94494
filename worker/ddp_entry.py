"""Entry point of one rank of a multi-GPU job, launched by ``torch.distributed.run``.

Why this small bridge instead of the engine's own CLI: the runner needs the run's progress,
evaluations and checkpoints *as they happen* (to write them to the job row and upload the
checkpoints) and a way to ask for a cooperative stop. Ranks run in other processes, so the
bridge is a file: rank 0's callbacks append JSON lines to ``--events`` (the runner tails it),
and ``should_stop`` looks for ``--stop-file`` (the runner creates it on cancel). The engine
broadcasts ``should_stop`` from rank 0, so every rank stops at the same iteration.

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


class JsonlCallback(Callback):
    """Appends one JSON object per hook call to a file, flushed at once (the runner tails it)."""

    def __init__(self, events: Path, stop_file: Path) -> None:
        self._fh = events.open("a", encoding="utf-8")
        self._stop_file = stop_file

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
        return self._stop_file.exists()

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
    args = parser.parse_args(argv)

    from pcd_core import train
    from pcd_core.spec import RunSpec

    spec = RunSpec.model_validate_json(args.spec.read_text())
    rank = int(os.environ.get("RANK", "0"))
    callback = JsonlCallback(args.events, args.stop_file) if rank == 0 else None
    try:
        result = train.run(spec, args.out, callbacks=[callback] if callback else [],
                           resume=args.resume)
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
