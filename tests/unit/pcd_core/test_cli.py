"""``python -m pcd_core``: train a teacher, distil a student, evaluate and export it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import pcd_dict, spec_dict, write_dataset

from pcd_core.cli import apply_overrides, load_run_spec, main

ROOT = Path(__file__).resolve().parents[3]


def test_overrides_are_dotted_and_yaml_typed():
    d = apply_overrides({"train": {"iterations": 5}},
                        ["train.iterations=50", "dataset.crop=[180, 240]", "teacher=null",
                         "method.name=kd"])
    assert d == {"train": {"iterations": 50}, "dataset": {"crop": [180, 240]},
                 "teacher": None, "method": {"name": "kd"}}
    with pytest.raises(ValueError, match=r"key\.path=value"):
        apply_overrides({}, ["iterations"])


def test_train_and_distill_refuse_the_wrong_method(tmp_path: Path):
    spec = tmp_path / "s.yaml"
    d = spec_dict(tmp_path)
    del d["method"]
    spec.write_text(yaml.safe_dump(d))
    assert load_run_spec(str(spec), [], "train").method.name == "none"
    with pytest.raises(ValueError, match="use `train`"):
        load_run_spec(str(spec), ["method.name=none"], "distill")
    with pytest.raises(ValueError, match="use `distill`"):
        load_run_spec(str(spec), ["method.name=pcd"], "train")


def test_distill_without_teacher_checkpoint_exits_with_a_clear_error(tmp_path: Path, capsys):
    d = pcd_dict(tmp_path, tmp_path / "teacher")
    d["teacher"]["checkpoint"] = None
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    code = main(["distill", "--spec", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "teacher.checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_distill_eval_export_end_to_end(tmp_path: Path):
    torch.set_num_threads(1)
    data = write_dataset(tmp_path / "data")
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(spec_dict(data, iterations=2)))
    (tmp_path / "pcd.yaml").write_text(yaml.safe_dump(pcd_dict(data, Path("unset"))))
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(["train", "--spec", str(tmp_path / "teacher.yaml"), "--out", str(teacher),
                 "--formats", "safetensors", "--no-progress"]) == 0
    assert main(["distill", "--spec", str(tmp_path / "pcd.yaml"), "--out", str(student),
                 "--set", f"teacher.checkpoint={teacher}", "--set", "train.iterations=3",
                 "--no-progress"]) == 0
    for name in ("student.safetensors", "model.json", "student.onnx", "student.torchscript.pt",
                 "metrics.json", "checkpoints/last.pt"):
        assert (student / name).is_file(), name
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and metrics["teacher"] is not None

    # eval in a fresh process, as a user would run it
    out_json = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pcd_core", "eval", "--model", str(student), "--data", str(data),
         "--json", str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    for key in ("miou", "per_class_iou", "boundary_f", "pixel_acc", "class_names"):
        assert key in result, key
    assert len(result["per_class_iou"]) == 4

    assert main(["export", "--model", str(student), "--formats", "safetensors,torchscript"]) == 0
