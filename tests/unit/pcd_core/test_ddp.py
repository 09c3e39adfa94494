"""Data-parallel training with the real torchrun CLI: 2 CPU processes on Gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import spec_dict, write_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


def test_torchrun_two_processes_end_with_identical_weights(tmp_path: Path):
    data = write_dataset(tmp_path / "data")
    spec = spec_dict(data, iterations=4, eval_every=2, checkpoint_every=2, log_every=2)
    spec["train"]["deterministic"] = False
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pcd_core", "train", "--spec", str(tmp_path / "spec.yaml"), "--out", str(out),
           "--formats", "safetensors", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    fingerprints = metrics["rank_weight_sha256"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert metrics["iterations"] == 4
    assert (out / "checkpoints" / "last.pt").is_file()
