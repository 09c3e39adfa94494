"""Inputs of the production tests and the reliability/load bench: a synthetic dataset, a
tiny teacher trained with ``pcd_core``, and job specs small enough for two shared cores."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _procs import Cluster

# Tiny everything: 32x48 images, a ResNet-18 DeepLabV3 with narrow heads (DESIGN: 2 cores).
HW = (32, 48)
NUM_CLASSES = 4
TEACHER = {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 16}
STUDENT = {"arch": "deeplabv3_resnet18", "output_stride": 16, "head_channels": 8}


def make_inputs(folder: Path, *, n_train: int = 8, n_val: int = 4,
                teacher_iterations: int = 4, teacher: bool = True,
                teacher_model: Mapping[str, Any] = TEACHER) -> dict[str, Path]:
    """A synthetic folder dataset as ``ds.tar.gz`` and (unless ``teacher=False``) a teacher
    (tiny unless ``teacher_model`` says otherwise) trained on it with ``pcd_core``
    (``teacher.safetensors``). Returns the paths."""
    from pcd_core.data import write_synthetic_dataset

    folder.mkdir(parents=True, exist_ok=True)
    ds = folder / "ds"
    write_synthetic_dataset(ds, num_classes=NUM_CLASSES, n_train=n_train, n_val=n_val,
                            size=HW, seed=0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(ds, arcname="synthetic")
    archive = folder / "ds.tar.gz"
    archive.write_bytes(buf.getvalue())
    if not teacher:
        return {"dataset": archive}
    from pcd_core import train
    from pcd_core.spec import RunSpec

    spec = RunSpec.model_validate({
        "name": "it-teacher",
        "dataset": {"uri": str(ds), "format": "folder", "num_classes": NUM_CLASSES,
                    "crop": list(HW), "scale_range": [1.0, 1.0]},
        "student": dict(teacher_model),
        "method": {"name": "none"},
        "train": {"iterations": teacher_iterations, "batch_size": 2, "num_workers": 0,
                  "eval_every": 10_000, "checkpoint_every": 10_000, "log_every": 1},
    })
    result = train.run(spec, folder / "teacher", device="cpu",
                       export_formats=("safetensors",))
    weights = Path(result.paths.get("safetensors", folder / "teacher" / "student.safetensors"))
    return {"dataset": archive, "teacher": weights}


def job_spec(inputs: Mapping[str, str], name: str, *, method: Mapping[str, Any] | None = None,
             teacher_model: Mapping[str, Any] = TEACHER,
             student_model: Mapping[str, Any] = STUDENT, **train: Any) -> dict[str, Any]:
    """A PCD job on the uploaded inputs, tiny unless the models say otherwise (the teacher's
    must be the one :func:`upload_inputs` trained); ``train`` overrides the budget."""
    return {
        "name": name,
        "dataset": {"uri": inputs["dataset"], "format": "folder", "num_classes": NUM_CLASSES,
                    "crop": list(HW), "scale_range": [1.0, 1.0]},
        "teacher": {**teacher_model, "checkpoint": inputs.get("teacher")},
        "student": dict(student_model),
        "method": {"name": "pcd", "rematch_every": 5, "score_batches": 2, **(method or {})},
        "train": {"iterations": 6, "batch_size": 2, "num_workers": 0, "log_every": 1,
                  "eval_every": 100_000, "checkpoint_every": 100_000, **train},
        "resources": {"gpus": 0, "queue": "cpu"},
    }


def upload_inputs(cluster: Cluster, folder: Path, teacher: bool = True,
                  teacher_model: Mapping[str, Any] = TEACHER) -> dict[str, str]:
    """:func:`make_inputs`, uploaded through the API; returns their ``upload:`` URIs."""
    from client.api import PcdClient

    files = make_inputs(folder, teacher=teacher, teacher_model=teacher_model)
    with PcdClient(cluster.url, cluster.api_key) as c:
        return {name: c.upload(path, "dataset" if name == "dataset" else "checkpoint")["uri"]
                for name, path in files.items()}
