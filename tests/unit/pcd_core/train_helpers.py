"""Tiny CPU run specs and recorders shared by the train/resume/DDP/CLI tests.

Everything is sized for two shared CPU cores: 32x48 synthetic scenes, batch 2, a
DeepLabV3-ResNet18 at output stride 16 with a 16-channel head (8 for distilled students).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pcd_core.progress import Callback, Progress
from pcd_core.spec import RunSpec

NUM_CLASSES = 4
HW = (32, 48)


def write_dataset(root: Path) -> Path:
    from pcd_core.data import write_synthetic_dataset

    write_synthetic_dataset(root, num_classes=NUM_CLASSES, n_train=8, n_val=4, size=HW, seed=0)
    return root


def spec_dict(data_root: Path, **train: Any) -> dict[str, Any]:
    """A plain-CE run (method none); ``train`` overrides TrainSpec fields."""
    return {
        "name": "tiny",
        "dataset": {"uri": str(data_root), "format": "folder", "num_classes": NUM_CLASSES,
                    "ignore_index": 255, "crop": list(HW), "scale_range": [1.0, 1.0]},
        "student": {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 16},
        "method": {"name": "none"},
        "train": {"iterations": 4, "batch_size": 2, "num_workers": 0, "log_every": 1,
                  "eval_every": 100, "checkpoint_every": 100, "deterministic": True,
                  **train},
    }


def pcd_dict(data_root: Path, teacher_dir: Path, **train: Any) -> dict[str, Any]:
    d = spec_dict(data_root, **train)
    d["teacher"] = copy.deepcopy(d["student"]) | {"checkpoint": str(teacher_dir)}
    d["student"]["head_channels"] = 8
    d["method"] = {"name": "pcd", "rematch_every": 2, "score_batches": 2}
    return d


def make_spec(d: dict[str, Any]) -> RunSpec:
    return RunSpec.model_validate(d)


class Recorder(Callback):
    """Keeps every training Progress, eval and checkpoint event."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.evals: list[tuple[int, dict[str, Any]]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.stop_at = stop_at
        self._last_iteration = 0

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)
        self._last_iteration = progress.iteration

    def on_eval(self, iteration: int, metrics: Any) -> None:
        self.evals.append((iteration, dict(metrics)))

    def on_checkpoint(self, iteration: int, path: Path) -> None:
        self.checkpoints.append((iteration, path))

    def should_stop(self) -> bool:
        return self.stop_at is not None and self._last_iteration >= self.stop_at

    def losses(self) -> list[tuple[int, dict[str, float]]]:
        return [(p.iteration, p.losses) for p in self.progress
                if p.phase == "training" and p.losses]
