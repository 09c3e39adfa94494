"""A run resumed from a checkpoint continues exactly like one that never stopped.

Stopped at iteration 3 of 6 (mid-epoch: 4 batches per epoch), with PCD rematching every 2
iterations, so the data position, every RNG, the optimiser, the LR schedule and the
method's scores and matching must all come back from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import Recorder, make_spec, pcd_dict, spec_dict

from pcd_core.progress import RunCancelled
from pcd_core.train import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run(make_spec(spec_dict(data_root, iterations=2)), out, export_formats=("safetensors",))
    return out


@pytest.mark.parametrize("method", ["none", "pcd", "pcd_keep_below_width"])
def test_resume_gives_the_same_losses(method: str, data_root: Path, teacher_dir: Path,
                                      tmp_path: Path):
    torch.set_num_threads(1)
    train = {"iterations": 6, "eval_every": 2, "checkpoint_every": 100}
    d = (spec_dict(data_root, **train) if method == "none"
         else pcd_dict(data_root, teacher_dir, **train))
    if method == "pcd_keep_below_width":  # 4 of the student's 8 channels are paired
        d["method"]["keep"] = 4
    d["dataset"]["scale_range"] = [0.75, 1.25]  # augmentation draws random numbers
    spec = make_spec(d)
    full = Recorder()
    run(spec, tmp_path / "full", callbacks=[full], export_formats=("safetensors",))

    parts = Recorder(stop_at=3)
    with pytest.raises(RunCancelled):
        run(spec, tmp_path / "part", callbacks=[parts], export_formats=("safetensors",))
    parts.stop_at = None
    run(spec, tmp_path / "part", callbacks=[parts], resume="auto",
        export_formats=("safetensors",))

    expected, got = full.losses(), parts.losses()
    assert [i for i, _ in got] == [1, 2, 3, 4, 5, 6] == [i for i, _ in expected]
    for (i, a), (_, b) in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (i, k)
    if method != "none":
        assert "pcd" in expected[0][1]
