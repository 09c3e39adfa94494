"""Helpers the bench scripts share: CamVid facts, scale presets, timing, FLOPs, JSON and tables.

The bench is a *user* of ``pcd_core`` (like torchvision's ``references/`` against its
models): nothing here is imported by the engine, and everything that defines an experiment
(resolution, stride, budget) lives in :data:`SCALES` so the README can point at one place.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._prodfacts import cpu_model, cpu_signature

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("PCD_CAMVID", REPO.parent / "shared" / "datasets" / "camvid"))
CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol",
                  "fence", "car", "pedestrian", "bicyclist"]
IGNORE_INDEX = 11
# The thin/small classes the paper says PCD sharpens (pole, sign_symbol, pedestrian, bicyclist).
THIN_CLASSES = (2, 6, 9, 10)
# At the cpu scale tree is the class a student learns or misses by chance: its IoU spans about
# 1 to 80 within one method, up to 7 mIoU points on its own (bench/README.md, "A fifth machine
# kind", has the measured spread). The mean over the other ten classes tells a method's lead
# from that toss.
TREE = CAMVID_CLASSES.index("tree")
# one metric per class, the class's IoU (``iou_<class>``)
CLASS_METRICS = tuple(f"iou_{name}" for name in CAMVID_CLASSES)


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """A run's score on ``metric``: a recorded field, or one derived from ``per_class_iou``
    (``miou_without_tree``, the mean IoU of the ten classes other than tree, or one class's
    IoU ``iou_<class>``); None for a record that has no per-class scores."""
    per_class = record.get("per_class_iou")
    if metric in CLASS_METRICS:
        return float(per_class[CLASS_METRICS.index(metric)]) if per_class else None
    if metric == "miou_without_tree":
        return statistics.fmean(v for i, v in enumerate(per_class) if i != TREE) if per_class \
            else None
    return record.get(metric)


TEACHERS = {"cpu": "deeplabv3_resnet50", "gpu": "deeplabv3_resnet101",
            "smoke": "deeplabv3_resnet50"}


@dataclass(frozen=True)
class Scale:
    """One benchmark scale: everything that differs between the CPU and the GPU table.

    ``resize`` is applied to every frame (train and val) before cropping, so the whole
    benchmark (training, evaluation, FLOPs) runs at that resolution. Budgets were chosen
    from measured step times (see bench/README.md, "Choosing the CPU budget").
    """

    name: str
    resize: tuple[int, int] | None
    crop: tuple[int, int]
    output_stride: int
    batch_size: int
    teacher_iterations: int
    student_iterations: int
    lr: float
    amp: bool
    num_workers: int
    eval_every: int
    # ``train.class_weights`` of the teacher and every student (bench/accuracy.py
    # --class-weights): the task loss of the whole table, never one method's advantage.
    class_weights: str = "none"
    # ``train.seed`` of the teacher (bench/accuracy.py --teacher-seed): a second teacher
    # from the same spec on a machine kind whose floating-point order repeats another's.
    teacher_seed: int = 0

    @property
    def eval_hw(self) -> tuple[int, int]:
        return self.resize or (360, 480)


SCALES: dict[str, Scale] = {
    # 2-core CPU: 120x160 frames (1/3 linear), OS16, batch 8. See README for the measurements.
    # Teacher 2000 iterations: at 800 it scored 35.5 mIoU against 35.3 for a 400-iteration
    # CE ResNet-18 (measured 2026-11-24), i.e. not a teacher at all.
    "cpu": Scale("cpu", resize=(120, 160), crop=(120, 160), output_stride=16, batch_size=8,
                 teacher_iterations=2000, student_iterations=400, lr=0.02, amp=False,
                 num_workers=1, eval_every=100000),
    # One H100, ~25 min for the teacher + 16 students: full frames, OS8, bf16 AMP. NOT yet
    # measured (no GPU in the session that wrote this): budgets from FLOPs (R101 318, R18 75,
    # MobileNetV2 18 GFLOPs per 360x480 image at OS8) at an assumed 60 TFLOP/s sustained,
    # i.e. ~0.13 s/teacher step, ~0.07 s/KD step; confirm with step_time.py --device cuda.
    "gpu": Scale("gpu", resize=None, crop=(360, 480), output_stride=8, batch_size=8,
                 teacher_iterations=2000, student_iterations=1000, lr=0.02, amp=True,
                 num_workers=6, eval_every=100000),
    # Not a benchmark: the gpu scale's code path (AMP on, loader workers, a teacher that is
    # not the student's arch) in seconds on real CamVid, so bench/gpu_lease.sh and the
    # scripts it calls are tested on CPU before a GPU lease spends minutes on them.
    "smoke": Scale("smoke", resize=(48, 64), crop=(48, 64), output_stride=16, batch_size=2,
                   teacher_iterations=3, student_iterations=3, lr=0.02, amp=True,
                   num_workers=1, eval_every=100000),
}


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge a timing: host, cores, torch version, threads, date."""
    import torch

    facts: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "cpu_count": os.cpu_count(),
        # CPU results differ between machines (the same teacher spec gave 46.12 mIoU on an
        # earlier machine and 47.90 on an AVX-512 EPYC), so a result names its CPU.
        # and "AMD EPYC" alone names more than one kind (47.90 and 46.40 for that teacher).
        "cpu_model": cpu_model(), "cpu_signature": cpu_signature(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            check=False).stdout.strip()
    except OSError:
        facts["git_commit"] = None
    return facts


def time_call(fn: Callable[[], Any], *, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds of one call of ``fn`` (synchronised before and after for CUDA)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def summarise(values: Sequence[float]) -> dict[str, float]:
    """median / mean / min / max of a list of timings or scores."""
    vals = list(values)
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals),
            "min": min(vals), "max": max(vals), "n": len(vals)}


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2: with 2 seeds the honest spread."""
    vals = list(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def paired_delta(mine: dict[int, float], base: dict[int, float]) -> dict[str, Any]:
    """Per-seed differences ``mine - base`` over the seeds both have (same seed = same init
    and data order, so the pairing removes most of the seed-to-seed swing), their mean and
    half-range, and how many seeds came out ahead. Empty when no seed is shared."""
    diffs = {seed: mine[seed] - base[seed] for seed in sorted(mine) if seed in base}
    if not diffs:
        return {}
    mean, spread = mean_spread(list(diffs.values()))
    return {"mean": mean, "spread": spread, "by_seed": diffs,
            "ahead": sum(v > 0 for v in diffs.values()), "n": len(diffs)}


def format_paired(d: dict[str, Any]) -> str:
    """A :func:`paired_delta` as '+1.20 ± 0.50 (1/2)': mean, half-range, seeds ahead."""
    if not d:
        return ""
    return f"{d['mean']:+.2f} ± {d['spread']:.2f} ({d['ahead']}/{d['n']})"


def count_flops(model: Any, hw: tuple[int, int]) -> float:
    """Forward FLOPs (multiply-adds x 2) of ``model`` on one (1,3,H,W) image, via
    ``torch.utils.flop_counter.FlopCounterMode`` (counts convs, matmuls, interpolation is
    excluded), in eval mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *hw))
    model.train(was)
    return float(counter.get_total_flops())


def count_params(model: Any) -> int:
    """Parameters of the deployable model (aux head excluded by the caller if needed)."""
    return sum(p.numel() for p in model.parameters())


def write_json(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Atomic JSON write (a cut-off session never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_plain))
    os.replace(tmp, p)
    return p


def _plain(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep what the caller formatted."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
