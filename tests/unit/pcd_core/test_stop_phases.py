"""Cancellation outside the training steps: the scoring pass, evaluations and export all poll
``should_stop`` and end in ``RunCancelled``; a resume continues as if nothing happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import HW, NUM_CLASSES, Recorder, make_spec, pcd_dict, spec_dict

from pcd_core.checkpoint import load_checkpoint
from pcd_core.distributed import DistInfo
from pcd_core.evaluate import build_eval_dataset, evaluate
from pcd_core.export import export_student
from pcd_core.models import build_model, save_weights
from pcd_core.progress import Progress, RunCancelled, StopRequested
from pcd_core.train import run

ONLY_WEIGHTS = ("safetensors",)
STUDENT_FILES = ("student.safetensors", "model.json", "student.torchscript.pt", "student.onnx",
                 "samples.png", "metrics.json")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_weights(build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16,
                             head_channels=16), path)
    return path


class StopInPhase(Recorder):
    """Says stop from the moment a given phase has been reported; counts the polls."""

    def __init__(self, phase: str | None) -> None:
        super().__init__()
        self.phase = phase
        self.seen = False
        self.polls = 0

    def on_progress(self, progress: Progress) -> None:
        super().on_progress(progress)
        self.seen = self.seen or progress.phase == self.phase

    def should_stop(self) -> bool:
        self.polls += 1
        return self.seen


def _grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of samples.png for 32x48 tiles and 2-pixel gaps."""
    return cols * HW[1] + (cols - 1) * 2, rows * HW[0] + (rows - 1) * 2


def test_evaluate_polls_every_few_batches_and_stops(data_root: Path) -> None:
    spec = make_spec(spec_dict(data_root))
    ds = build_eval_dataset(spec.dataset, "val", None)  # 4 images
    model = build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16, head_channels=8)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    kw = {"num_classes": NUM_CLASSES, "ignore_index": 255, "batch_size": 1, "info": info}
    evaluate(model, ds, should_stop=never, poll_every=2, **kw)
    assert len(calls) == 2  # before batches 0 and 2 of 4
    model.train()
    with pytest.raises(StopRequested):
        evaluate(model, ds, should_stop=lambda: True, **kw)
    assert model.training  # the mode is restored on the way out


def test_export_stops_between_formats_and_leaves_no_partial_directory(tmp_path: Path) -> None:
    model = build_model("deeplabv3_resnet18", 3, output_stride=16, head_channels=8)
    answers = iter([False, True])  # before torchscript: go on; before onnx: stop
    kwargs = {"spec_hash": "abc", "arch": "deeplabv3_resnet18", "num_classes": 3,
              "class_names": ["a", "b", "c"], "mean": (0.5,) * 3, "std": (0.2,) * 3,
              "output_stride": 16, "head_channels": 8, "input_hw": HW}
    (tmp_path / "model.json").write_text("{}")  # an older export's: must not survive
    with pytest.raises(StopRequested):
        export_student(model, tmp_path, formats=("safetensors", "torchscript"),
                       should_stop=lambda: next(answers), **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stop_during_scoring_pass_cancels_before_the_first_step(
        data_root: Path, teacher_file: Path, tmp_path: Path) -> None:
    spec = make_spec(pcd_dict(data_root, teacher_file, iterations=20))
    rec = StopInPhase("scoring")
    with pytest.raises(RunCancelled) as info:
        run(spec, tmp_path, callbacks=[rec], export_formats=ONLY_WEIGHTS)
    assert (info.value.iteration, info.value.checkpoint) == (0, None)
    assert rec.polls == 1  # the poll before the first scoring batch
    assert [p.phase for p in rec.progress] == ["preparing", "scoring"]
    assert rec.checkpoints == [] and rec.evals == []
    assert not any((tmp_path / name).exists() for name in STUDENT_FILES)


@pytest.mark.slow
def test_stop_during_periodic_eval_checkpoints_and_resume_replays_the_eval(
        data_root: Path, tmp_path: Path) -> None:
    spec = make_spec(spec_dict(data_root, iterations=4, eval_every=2))
    full = Recorder()
    run(spec, tmp_path / "full", callbacks=[full], export_formats=ONLY_WEIGHTS, samples=0)
    assert not (tmp_path / "full" / "samples.png").exists()  # samples=0 skips it

    part = Recorder(stop_at=2)  # true from the eval of step 2 on: the eval's poll sees it
    with pytest.raises(RunCancelled) as info:
        run(spec, tmp_path / "part", callbacks=[part], export_formats=ONLY_WEIGHTS)
    assert info.value.iteration == 2 and part.evals == []
    assert info.value.checkpoint is not None
    ckpt = load_checkpoint(info.value.checkpoint)
    assert ckpt["iteration"] == 2 and ckpt["eval_pending"] is True

    part.stop_at = None
    result = run(spec, tmp_path / "part", callbacks=[part], resume="auto",
                 export_formats=ONLY_WEIGHTS)
    assert [i for i, _ in part.evals] == [i for i, _ in full.evals] == [2, 4]
    for (_, a), (_, b) in zip(full.evals, part.evals, strict=True):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)
    assert [i for i, _ in part.losses()] == [1, 2, 3, 4]
    assert result.paths["samples"] == tmp_path / "part" / "samples.png"
    with Image.open(result.paths["samples"]) as im:  # image | label | student, 4 val images
        assert (im.size, im.mode) == (_grid_size(4, 3), "RGB")


@pytest.mark.slow
def test_stop_during_final_evaluation_then_export_then_finish(
        data_root: Path, teacher_file: Path, tmp_path: Path) -> None:
    spec = make_spec(pcd_dict(data_root, teacher_file, iterations=1, eval_every=100))
    last = tmp_path / "checkpoints" / "last.pt"
    # 1. the student's eval at the last step ran; the teacher's eval polls and stops
    rec = StopInPhase("evaluating")
    with pytest.raises(RunCancelled) as info:
        run(spec, tmp_path, callbacks=[rec], export_formats=ONLY_WEIGHTS)
    assert (info.value.iteration, info.value.checkpoint) == (1, last)
    assert [p.phase for p in rec.progress][-1] == "evaluating"
    assert not any((tmp_path / name).exists() for name in STUDENT_FILES)
    # 2. resumed at the end: stopped between export formats, nothing half-written stays
    rec = StopInPhase("exporting")
    with pytest.raises(RunCancelled) as info:
        run(spec, tmp_path, callbacks=[rec], resume="auto",
            export_formats=("safetensors", "torchscript"))
    assert (info.value.iteration, info.value.checkpoint) == (1, last)
    assert not any((tmp_path / name).exists() for name in STUDENT_FILES)
    # 3. resumed again without a stop: a complete student directory, samples with a teacher
    result = run(spec, tmp_path, resume="auto", export_formats=ONLY_WEIGHTS)
    assert result.teacher_metrics is not None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["teacher"] is not None and (tmp_path / "model.json").is_file()
    with Image.open(tmp_path / "samples.png") as im:  # image | label | teacher | student
        assert im.size == _grid_size(4, 4)


def test_cli_samples_option() -> None:
    from pcd_core.cli import build_parser

    args = build_parser().parse_args(["train", "--spec", "s.yaml", "--out", "o"])
    assert args.samples == 4
    args = build_parser().parse_args(["distill", "--spec", "s.yaml", "--out", "o",
                                      "--samples", "0"])
    assert args.samples == 0
