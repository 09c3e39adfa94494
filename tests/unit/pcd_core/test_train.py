"""The training loop on tiny synthetic data: it learns, it reports, it stops, it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import Recorder, make_spec, pcd_dict, spec_dict

from pcd_core.checkpoint import capture_rng, load_checkpoint, restore_rng
from pcd_core.components import TeacherMissingError, build_teacher
from pcd_core.optim import PolySchedule, param_groups
from pcd_core.progress import RunCancelled
from pcd_core.train import run

ONLY_WEIGHTS = ("safetensors",)  # export of other formats is tested in test_export

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_decreases_and_run_writes_student_directory(data_root: Path, tmp_path: Path):
    spec = make_spec(spec_dict(data_root, iterations=30, optimizer="adamw", lr=5e-3,
                               log_every=5, eval_every=15, checkpoint_every=15,
                               deterministic=False))
    rec = Recorder()
    result = run(spec, tmp_path, callbacks=[rec], export_formats=ONLY_WEIGHTS)
    totals = [losses["total"] for _, losses in rec.losses()]
    assert len(totals) == 6 and totals[-1] < 0.8 * totals[0], totals
    assert [i for i, _ in rec.evals] == [15, 30]
    assert [i for i, _ in rec.checkpoints] == [15, 30]
    phases = [p.phase for p in rec.progress]
    assert phases[0] == "preparing" and phases[-1] == "exporting"
    last = rec.losses()[-1][1]
    assert {"ce", "total"} <= set(last)
    assert result.iterations == 30 and result.teacher_metrics is None
    assert result.best is not None and result.best["iteration"] in (15, 30)
    for name in ("student.safetensors", "model.json", "metrics.json", "spec.json",
                 "checkpoints/last.pt"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"miou", "per_class_iou", "pixel_acc", "boundary_f"} <= set(metrics["student"])


def test_checkpoint_is_self_describing_and_weights_only(data_root: Path, tmp_path: Path):
    run(make_spec(spec_dict(data_root, iterations=2)), tmp_path, export_formats=ONLY_WEIGHTS)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")  # weights_only=True inside
    assert ckpt["iteration"] == 2
    for key in ("model", "optimizer", "scheduler", "scaler", "method", "rng", "spec"):
        assert key in ckpt
    assert json.loads(ckpt["spec"])["name"] == "tiny"


def test_should_stop_raises_run_cancelled_after_a_checkpoint(data_root: Path, tmp_path: Path):
    rec = Recorder(stop_at=2)
    with pytest.raises(RunCancelled) as info:
        run(make_spec(spec_dict(data_root, iterations=50)), tmp_path, callbacks=[rec],
            export_formats=ONLY_WEIGHTS)
    assert info.value.iteration == 2
    assert info.value.checkpoint is not None and info.value.checkpoint.is_file()
    assert rec.checkpoints == [(2, info.value.checkpoint)]
    assert load_checkpoint(info.value.checkpoint)["iteration"] == 2
    assert not (tmp_path / "student.safetensors").exists()  # no export for a cancelled run


def test_distill_without_teacher_checkpoint_fails_before_training(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import pcd_core.train as train_mod

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("data must not be read before the spec check")

    monkeypatch.setattr(train_mod, "build_dataset", no_data)
    d = pcd_dict(data_root, tmp_path / "missing")
    d["teacher"]["checkpoint"] = None
    with pytest.raises(TeacherMissingError, match=r"teacher\.checkpoint"):
        run(make_spec(d), tmp_path / "out")
    d["teacher"]["checkpoint"] = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(TeacherMissingError, match="does not exist"):
        run(make_spec(d), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_teacher_is_frozen_in_eval_mode(data_root: Path, tmp_path: Path):
    run(make_spec(spec_dict(data_root, iterations=1)), tmp_path / "t", export_formats=ONLY_WEIGHTS)
    teacher = build_teacher(make_spec(pcd_dict(data_root, tmp_path / "t")), torch.device("cpu"))
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_poly_schedule_with_warmup_and_no_decay_groups():
    s = PolySchedule(total=10, warmup=2, power=1.0)
    assert [round(s(i), 3) for i in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    bn = torch.nn.BatchNorm2d(3)
    conv = torch.nn.Conv2d(3, 3, 1)
    groups = param_groups([conv, bn], weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [1, 3]  # conv.weight | conv.bias, bn w/b
    assert groups[1]["weight_decay"] == 0.0


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_pcd_at_the_pre_activation_tap_distils_another_feature(data_root: Path, tmp_path: Path):
    """``tap: head_preact`` reads the head's signed batch-norm output: same model, same seed,
    a PCD loss of its own at the first step (not the post-ReLU tap's)."""
    run(make_spec(spec_dict(data_root, iterations=1)), tmp_path / "t", export_formats=ONLY_WEIGHTS)
    first: dict[str, float] = {}
    for tap in ("head", "head_preact"):
        d = pcd_dict(data_root, tmp_path / "t", iterations=2, log_every=1)
        d["method"]["tap"] = tap
        rec = Recorder()
        run(make_spec(d), tmp_path / tap, callbacks=[rec], export_formats=ONLY_WEIGHTS)
        losses = rec.losses()
        assert [i for i, _ in losses] == [1, 2]
        first[tap] = losses[0][1]["pcd"]
        assert all(0 < lo["pcd"] < float("inf") for _, lo in losses), losses
    assert first["head"] != pytest.approx(first["head_preact"], rel=1e-3), first
