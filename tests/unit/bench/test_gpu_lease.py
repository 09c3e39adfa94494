"""bench/gpu_lease.sh, the one command a GPU lease runs, on CPU at the smoke scale.

A lease is a few minutes of device time with no second try to spare, so the script and
everything it calls (step_time.py with AMP switched on for the scale, accuracy.py with a
deadline, a ResNet-50 teacher, every method) must already work when the device is lent. This
runs the same script on real CamVid with ``SCALE=smoke DEVICE=cpu``: a few iterations each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench._common import CAMVID

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason=f"CamVid not present at {CAMVID}")
def test_the_lease_script_runs_end_to_end_at_the_smoke_scale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "SCALE": "smoke", "DEVICE": "cpu", "SEEDS": "0",
           "OUT": str(out), "PYTHON": sys.executable, "PCD_CAMVID": str(CAMVID),
           "TABLE_S": "600", "STEP_S": "300",
           "RUNS_DIR": str(tmp_path / "runs")}  # not a finished run of an earlier test
    run = subprocess.run(["bash", "bench/gpu_lease.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "pydantic" in (out / "gpu.txt").read_text()

    step = json.loads((out / "step_time_cpu.json").read_text())
    assert set(step["median_step_s"]) == {"teacher", "ce", "kd", "cwd", "pcd"}
    assert all(v > 0 for v in step["median_step_s"].values())
    assert step["amp"] is None  # autocast is for CUDA only, as in training

    table = json.loads((out / "accuracy_smoke.json").read_text())
    assert table["scale"] == "smoke" and table["teacher"]["arch"] == "deeplabv3_resnet50"
    methods = {r["method"]: r for r in table["runs"]}
    assert set(methods) == {"none", "kd", "pcd", "cwd"}
    for r in methods.values():
        assert 0.0 <= r["miou"] <= 1.0 and len(r["per_class_iou"]) == 11
