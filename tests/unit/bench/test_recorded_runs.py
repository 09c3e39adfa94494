"""bench/_runs.py: recorded runs, the committed per-run scores a session may reuse.

A record may only stand in for a run measured on the same CPU model (CPU training is
bit-for-bit reproducible per model, not across models), and every use must say where it
came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import bench._runs as runs
from bench._common import SCALES

XEON, EPYC = "Intel(R) Xeon(R) Processor", "AMD EPYC"


def _write(path: Path, cpu: str, doc: dict) -> None:
    path.write_text(json.dumps({"machine": {"cpu_model": cpu}, **doc}))


def _rec(d: str, miou: float) -> dict:
    return {"dir": d, "miou": miou, "wall_s": 10.0}


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write(tmp_path / "a_accuracy.json", XEON, {
        "teacher": _rec("runs/t", 0.46),
        "runs": [_rec("runs/ce-s0", 0.32), {"dir": "runs/no-score"}],
        "rows": [{"student": "r18", "miou": 30.0}],  # an accuracy row: aggregate, no runs
    })
    _write(tmp_path / "b_ablate.json", XEON, {
        "rows": [{"group": "g", "runs": [_rec("runs/v-s0", 0.34), _rec("runs/ce-s0", 0.99)]}],
    })
    _write(tmp_path / "c_other_cpu.json", EPYC, {"runs": [_rec("runs/ce-s1", 0.30)]})
    (tmp_path / "d_no_machine.json").write_text(json.dumps({"runs": [_rec("runs/x", 0.1)]}))
    monkeypatch.setattr(runs, "RESULTS", tmp_path)
    monkeypatch.setattr(runs, "cpu_model", lambda: XEON)
    runs.recorded_runs.cache_clear()
    yield tmp_path
    runs.recorded_runs.cache_clear()


def test_only_records_of_this_cpu_model_with_scores_are_found(results: Path) -> None:
    found = runs.recorded_runs(XEON)
    assert sorted(found) == ["runs/ce-s0", "runs/t", "runs/v-s0"]
    assert found["runs/v-s0"]["recorded_in"] == "b_ablate.json"
    assert sorted(runs.recorded_runs(EPYC)) == ["runs/ce-s1"]
    assert runs.recorded_runs(None) == {}


def test_the_first_file_wins_and_keeps_its_provenance(results: Path) -> None:
    rec = runs.recorded_runs(XEON)["runs/ce-s0"]
    assert rec["miou"] == 0.32 and rec["recorded_in"] == "a_accuracy.json"


def test_a_record_is_used_only_when_asked_and_the_run_is_absent(results: Path,
                                                               tmp_path: Path) -> None:
    cpu = SCALES["cpu"]
    assert runs.run_scores(Path("runs/ce-s0"), cpu) is None
    assert runs.run_scores(Path("runs/ce-s0"), cpu, recorded=True)["miou"] == 0.32
    assert runs.run_scores(Path("runs/missing"), cpu, recorded=True) is None
    assert runs.recorded_only(Path("runs/ce-s0"))
    assert not runs.recorded_only(Path("runs/missing"))


def test_a_finished_local_run_is_never_replaced_by_its_record(results: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ce-s0"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"wall_s": 5.0}))
    (out / runs.SCORE_FILE).write_text(json.dumps({"miou": 0.5}))
    # the same directory name as a record: the local scores win and carry no provenance
    runs.recorded_runs.cache_clear()
    _write(results / "e.json", XEON, {"runs": [_rec(str(out), 0.1)]})
    assert not runs.recorded_only(out)
    assert runs.run_scores(out, SCALES["cpu"], recorded=True) == {"wall_s": 5.0, "miou": 0.5}


def test_the_provenance_note_counts_recorded_runs() -> None:
    assert runs.provenance_note([{"miou": 1}]) == ""
    note = runs.provenance_note([{"recorded_in": "b.json"}, {"miou": 1},
                                 {"recorded_in": "a.json"}])
    assert note.startswith("2 of 3 runs are recorded") and note.endswith("a.json, b.json")


def test_ensure_run_returns_a_record_instead_of_training(results: Path) -> None:
    spec = runs.student_spec(SCALES["cpu"], "deeplabv3_resnet18", "none", 0,
                             "deeplabv3_resnet50", Path("runs/t"))
    assert runs.ensure_run(spec, Path("runs/ce-s0"), recorded=True)["miou"] == 0.32
    assert not Path("runs/ce-s0").exists()  # nothing was trained or written


def test_a_file_of_another_cpu_signature_is_skipped(results: Path) -> None:
    # one model name, two kinds: a file that names its signature is used only on that one
    (results / "f_signed.json").write_text(json.dumps({
        "machine": {"cpu_model": XEON, "cpu_signature": "family 6 model 143 stepping 8"},
        "runs": [_rec("runs/signed-s0", 0.31)]}))
    assert "runs/signed-s0" in runs.recorded_runs(XEON, signature="family 6 model 143 stepping 8")
    other = runs.recorded_runs(XEON, signature="family 6 model 106 stepping 6")
    assert "runs/signed-s0" not in other
    assert "runs/ce-s0" in other  # files from before signatures stay usable
    assert "runs/signed-s0" in runs.recorded_runs(XEON)  # no signature known here: by model


def test_once_a_file_names_this_signature_unsigned_files_are_left_out(results: Path) -> None:
    # the unsigned "AMD EPYC" files of 2026-11-25 came from another teacher than the signed
    # family 25 model 17 file: once this kind has its own file, only that one stands in
    sig = "family 25 model 17 stepping 1"
    assert sorted(runs.recorded_runs(EPYC, signature=sig)) == ["runs/ce-s1"]  # none signed yet
    (results / "g_signed.json").write_text(json.dumps({
        "machine": {"cpu_model": EPYC, "cpu_signature": sig},
        "runs": [_rec("runs/epyc-s0", 0.29)]}))
    runs.recorded_runs.cache_clear()
    assert sorted(runs.recorded_runs(EPYC, signature=sig)) == ["runs/epyc-s0"]
    assert sorted(runs.recorded_runs(EPYC)) == ["runs/ce-s1", "runs/epyc-s0"]  # by model


def _teacher_here(out: Path, miou: float) -> None:
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"wall_s": 5.0}))
    (out / runs.SCORE_FILE).write_text(json.dumps({"miou": miou}))


def test_a_teacher_that_disagrees_with_its_record_refuses_the_records(
        results: Path, tmp_path: Path) -> None:
    t_dir = tmp_path / "runs" / "t"
    _write(results / "e.json", XEON, {"teacher": _rec(str(t_dir), 0.4790)})
    runs.recorded_runs.cache_clear()
    runs.check_teacher_record(t_dir, SCALES["cpu"])  # not trained here yet: nothing to check
    _teacher_here(t_dir, 0.4640)
    with pytest.raises(runs.RecordMismatch, match=re.escape("0.464 mIoU here and 0.479 in e.json")):
        runs.check_teacher_record(t_dir, SCALES["cpu"])


def test_a_teacher_that_matches_its_record_to_the_last_digit_passes(
        results: Path, tmp_path: Path) -> None:
    t_dir = tmp_path / "runs" / "t"
    _write(results / "e.json", XEON, {"teacher": _rec(str(t_dir), 0.4612241983655405)})
    runs.recorded_runs.cache_clear()
    _teacher_here(t_dir, 0.4612241983655405)
    runs.check_teacher_record(t_dir, SCALES["cpu"])
    runs.check_teacher_record(tmp_path / "runs" / "unrecorded", SCALES["cpu"])
