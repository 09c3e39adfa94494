"""Progress callbacks (throttling, cancel polling), on a fake row (the heartbeat is in
test_worker_heartbeat.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcd_core.progress import Progress
from worker.progress import DbProgress


class FakeRow:
    job_id = "j1"

    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []
        self.cancel = False
        self.cancel_checks = 0
        self.owned = True
        self.beats = 0

    def log(self, level: str, message: str) -> None:
        self.writes.append(("log", message))

    def progress(self, **fields: Any) -> None:
        self.writes.append(("progress", fields))

    def metrics(self, step: int, series: dict[str, float], latest: Any = None) -> None:
        self.writes.append(("metrics", (step, series, latest)))

    def cancel_requested(self) -> bool:
        self.cancel_checks += 1
        return self.cancel

    def beat(self) -> bool:
        self.beats += 1
        return self.owned


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _progress_writes(row: FakeRow) -> list[dict[str, Any]]:
    return [w[1] for w in row.writes if w[0] == "progress"]


def test_progress_is_throttled_but_phase_changes_pass() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    cb.on_progress(Progress("training", 0, 100))
    for it in range(1, 50):  # 49 reports within the same second: held back
        clock.t = it * 0.01
        cb.on_progress(Progress("training", it, 100, {"ce": 1.0}, 10.0, 5.0, 0.1))
    assert [w["iteration"] for w in _progress_writes(row)] == [0]
    clock.t = 1.5
    cb.on_progress(Progress("training", 50, 100, {"ce": 0.5}, 10.0, 5.0, 0.1))
    cb.on_progress(Progress("evaluating", 50, 100))  # phase change: written at once
    assert [w["iteration"] for w in _progress_writes(row)] == [0, 50, 50]
    # the held-back report is flushed before an eval is recorded
    clock.t = 1.6
    cb.on_progress(Progress("evaluating", 51, 100))
    cb.on_eval(51, {"miou": 0.5, "per_class_iou": [0.5, 0.5]})
    assert _progress_writes(row)[-1]["iteration"] == 51
    step, series, latest = next(w[1] for w in row.writes if w[0] == "metrics" and w[1][2])
    assert step == 51 and series == {"eval/miou": 0.5} and latest["per_class_iou"] == [0.5, 0.5]


def test_loss_series_are_recorded_with_training_writes() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=0.0, clock=clock)  # type: ignore[arg-type]
    cb.on_progress(Progress("training", 10, 100, {"ce": 0.5, "pcd": 0.25}, 8.0, 1.0, 0.01))
    [(step, series, _)] = [w[1] for w in row.writes if w[0] == "metrics"]
    assert step == 10
    assert series == {"loss/ce": 0.5, "loss/pcd": 0.25, "images_per_s": 8.0, "lr": 0.01}


def test_should_stop_polls_the_row_at_most_once_per_interval() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    assert not cb.should_stop()
    row.cancel = True
    assert not cb.should_stop()  # within the interval: not asked again
    assert row.cancel_checks == 1
    clock.t = 2.0
    assert cb.should_stop() and cb.should_stop()
    assert row.cancel_checks == 2


def test_checkpoint_hook_runs_after_flush(tmp_path: Path) -> None:
    row, seen = FakeRow(), []
    cb = DbProgress(row, on_checkpoint=lambda it, p: seen.append((it, p)))  # type: ignore[arg-type]
    cb.on_checkpoint(10, tmp_path / "last.pt")
    assert seen == [(10, tmp_path / "last.pt")]


def test_bookkeeping_failures_never_kill_the_run(tmp_path: Path) -> None:
    class FlakyRow(FakeRow):
        def progress(self, **fields: Any) -> None:
            raise OSError("database is locked")

        def cancel_requested(self) -> bool:
            raise OSError("database is locked")

    def failing_upload(iteration: int, path: Path) -> None:
        raise TimeoutError("S3 timed out")

    cb = DbProgress(FlakyRow(), on_checkpoint=failing_upload)  # type: ignore[arg-type]
    cb.on_progress(Progress("training", 1, 10, {"ce": 1.0}))
    cb.on_checkpoint(1, tmp_path / "last.pt")
    assert cb.should_stop() is False


def test_phase_change_flushes_the_held_back_training_report_first() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=10.0, clock=clock)  # type: ignore[arg-type]
    cb.on_progress(Progress("training", 0, 4))
    clock.t = 1.0  # within the interval: held back
    cb.on_progress(Progress("training", 4, 4, {"ce": 0.5}, 9.0, 0.0, 0.01))
    cb.on_progress(Progress("exporting", 4, 4))
    writes = _progress_writes(row)
    assert [(w["phase"], w["iteration"]) for w in writes] == [
        ("training", 0), ("training", 4), ("exporting", 4)]
    assert writes[1]["losses"] == {"ce": 0.5} and writes[1]["images_per_s"] == 9.0


def test_finish_writes_the_final_phase_and_progress() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=10.0, clock=clock)  # type: ignore[arg-type]
    cb.on_progress(Progress("training", 0, 4))
    clock.t = 1.0
    cb.on_progress(Progress("training", 4, 4, {"ce": 0.5}, 9.0, 0.0, 0.01))  # held back
    cb.finish()
    writes = _progress_writes(row)
    assert writes[-2]["iteration"] == 4 and writes[-2]["losses"] == {"ce": 0.5}  # flushed
    assert writes[-1] == {"phase": "done", "iteration": 4, "max_iterations": 4, "eta_s": 0.0}
    assert ("log", "phase done") in row.writes


def test_cancel_requested_now_ignores_the_throttle() -> None:
    row, clock = FakeRow(), Clock()
    cb = DbProgress(row, min_interval_s=100.0, clock=clock)  # type: ignore[arg-type]
    assert not cb.should_stop()
    row.cancel = True
    assert not cb.should_stop()  # throttled: the row is not read again
    assert cb.cancel_requested_now() and cb.should_stop()
    assert row.cancel_checks == 2
