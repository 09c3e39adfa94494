"""The one piece of code that turns "a student with these overrides" into a scored run.

accuracy.py and ablate.py both call :func:`ensure_run` (train, or skip when the run
directory already holds a finished run with the same spec hash, or resume a cut-off one from
its checkpoint) and :func:`score_dir` (evaluate a student directory on val with the engine's
own ``evaluate``, plus params and FLOPs). Runs live under ``runs/`` (gitignored), one
directory per spec: ``<runs_dir>/<scale>/<name>-<spec hash[:10]>``, each a student directory
that ``python -m pcd_core eval --model DIR`` can score on any split.

:func:`run_scores` also reads *recorded* runs: the per-run scores that committed JSON under
``bench/results/`` holds for a run directory this machine no longer has. CPU training here is
bit-for-bit reproducible per CPU kind (bench/README.md), so a record is only taken from a
file whose ``machine.cpu_model`` is this machine's (and whose ``cpu_signature``, where the
file has one, too; unsigned files only until a file of this signature exists), and every
use of one is marked with the file it came from (``recorded_in``). That lets a session that
has lost ``runs/`` add seeds or variants without spending an hour re-training baselines
whose numbers are already known. A model name can
still cover machines that do not reproduce each other (files written before the signature
was recorded), so the scripts also check the teacher (:func:`check_teacher_record`): every
distilled student depends on it, and a teacher retrained here that does not score its
record to the last digit refuses the records.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench._common import (
    CAMVID,
    CAMVID_CLASSES,
    IGNORE_INDEX,
    THIN_CLASSES,
    Scale,
    count_flops,
    count_params,
    write_json,
)
from bench._prodfacts import cpu_model, cpu_signature
from pcd_core.cli import apply_overrides
from pcd_core.progress import Callback, Progress
from pcd_core.spec import RunSpec

SCORE_FILE = "bench_val.json"
RESULTS = Path(__file__).resolve().parent / "results"


def dataset_dict(scale: Scale) -> dict[str, Any]:
    """CamVid at the scale's resolution. Scale range (0.75, 1.5): with frames already at
    120x160, the engine's default 0.5 would fill a quarter of a crop with padding, which a
    few hundred iterations from scratch cannot afford."""
    return {
        "uri": str(CAMVID), "format": "folder", "num_classes": len(CAMVID_CLASSES),
        "ignore_index": IGNORE_INDEX, "class_names": CAMVID_CLASSES,
        "resize": list(scale.resize) if scale.resize else None, "crop": list(scale.crop),
        "scale_range": [0.75, 1.5], "hflip": True,
    }


def train_dict(scale: Scale, iterations: int, seed: int) -> dict[str, Any]:
    """The shared schedule: SGD, poly decay, short linear warmup (from scratch, BN nets)."""
    return {
        "iterations": iterations, "batch_size": scale.batch_size, "optimizer": "sgd",
        "lr": scale.lr, "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9,
        "warmup_iterations": max(1, iterations // 20), "amp": scale.amp,
        "eval_every": scale.eval_every, "checkpoint_every": max(25, iterations // 6),
        "log_every": 10, "seed": seed, "num_workers": scale.num_workers,
        "eval_batch_size": 8, "class_weights": scale.class_weights,
    }


def teacher_spec(scale: Scale, arch: str) -> RunSpec:
    """Teacher: plain CE with an aux head (torchvision's recipe), trained once, with the
    scale's ``teacher_seed`` (0 unless a table asks for another teacher)."""
    return RunSpec.model_validate({
        "name": f"teacher-{arch}", "dataset": dataset_dict(scale),
        "student": {"arch": arch, "output_stride": scale.output_stride, "aux": True},
        "method": {"name": "none"},
        "train": train_dict(scale, scale.teacher_iterations, scale.teacher_seed),
    })


def student_spec(scale: Scale, arch: str, method: str, seed: int, teacher_arch: str,
                 teacher_dir: Path, overrides: Mapping[str, Any] | None = None,
                 name: str | None = None) -> RunSpec:
    """A student run; ``overrides`` are dotted keys like the CLI's ``--set``
    (``method.score=fisher``). Every method gets the same data, budget and schedule."""
    data: dict[str, Any] = {
        "name": name or f"{arch}-{method}-s{seed}", "dataset": dataset_dict(scale),
        "student": {"arch": arch, "output_stride": scale.output_stride},
        "method": {"name": method},
        "train": train_dict(scale, scale.student_iterations, seed),
    }
    if method != "none":
        data["teacher"] = {"arch": teacher_arch, "output_stride": scale.output_stride,
                           "checkpoint": str(teacher_dir)}
    pairs = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    return RunSpec.model_validate(apply_overrides(data, pairs))


def run_dir(runs_dir: Path, scale: Scale, spec: RunSpec) -> Path:
    return runs_dir / scale.name / f"{spec.name}-{spec.spec_hash()[:10]}"


def is_finished(out: Path, spec: RunSpec) -> bool:
    """A finished run: metrics.json for this exact spec hash and the exported weights."""
    metrics = out / "metrics.json"
    if not metrics.is_file() or not (out / "student.safetensors").is_file():
        return False
    return json.loads(metrics.read_text()).get("spec_hash") == spec.spec_hash()


class LogCallback(Callback):
    """One line per ``log_every`` iterations, so a nohup log shows a run's pulse."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_progress(self, progress: Progress) -> None:
        losses = " ".join(f"{k}={v:.3f}" for k, v in progress.losses.items())
        print(f"[{time.strftime('%H:%M:%S')}] {self.tag} {progress.phase} "
              f"{progress.iteration}/{progress.max_iterations} {losses} "
              f"{progress.images_per_s or 0:.1f} img/s", flush=True)


def ensure_run(spec: RunSpec, out: Path, *, recorded: bool = False) -> dict[str, Any]:
    """Train ``spec`` into ``out`` unless already finished (or, with ``recorded``, recorded
    in this CPU model's committed JSON: the record is returned); resume a cut-off run.

    Returns ``metrics.json``. Only ONNX export is skipped (safetensors + TorchScript are
    written): export_speed.py exports on its own, and the ONNX parity check costs a run
    on these CPUs more than a minute.
    """
    from pcd_core.train import run

    if is_finished(out, spec):
        print(f"[bench] skip {out} (finished)", flush=True)
        return json.loads((out / "metrics.json").read_text())
    if recorded and recorded_only(out):
        print(f"[bench] skip {out} (recorded)", flush=True)
        return this_machines_records()[str(out)]
    resume = "auto" if (out / "checkpoints").is_dir() else None
    print(f"[bench] {'resume' if resume else 'start'} {out}", flush=True)
    run(spec, out, callbacks=[LogCallback(spec.name)], resume=resume, device="cpu"
        if not _cuda() else None, export_formats=("safetensors",))
    return json.loads((out / "metrics.json").read_text())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def score_dir(out: Path, scale: Scale) -> dict[str, Any]:
    """Val metrics of a student directory by the engine's ``evaluate``, with the thin-class
    mean, params and FLOPs at the eval resolution; cached in ``bench_val.json``."""
    cache = out / SCORE_FILE
    if cache.is_file():
        return json.loads(cache.read_text())
    from pcd_core.export import load_student

    model, meta = load_student(out)
    doc = score_model(model, scale)
    doc["arch"] = meta["arch"]
    write_json(cache, doc)
    return doc


def score_model(model: Any, scale: Scale) -> dict[str, Any]:
    """:func:`score_dir`'s metrics for a model in memory (bench/precise_bn.py scores the same
    weights again after recomputing their BN statistics)."""
    import torch

    from pcd_core.distributed import DistInfo
    from pcd_core.evaluate import evaluate

    device = torch.device("cuda" if _cuda() else "cpu")
    t0 = time.perf_counter()
    m = evaluate(model.to(device), val_dataset(scale), num_classes=len(CAMVID_CLASSES),
                 ignore_index=IGNORE_INDEX, batch_size=8,
                 info=DistInfo(0, 1, 0, device), class_names=CAMVID_CLASSES)
    iou = m["per_class_iou"]
    return {
        "miou": m["miou"], "per_class_iou": iou, "boundary_f": m["boundary_f"],
        "pixel_acc": m["pixel_acc"], "thin_miou": sum(iou[c] for c in THIN_CLASSES) / 4,
        "params": count_params(model.cpu()), "flops": count_flops(model.cpu(), scale.eval_hw),
        "eval_hw": list(scale.eval_hw), "eval_s": time.perf_counter() - t0,
    }


def val_dataset(scale: Scale, split: str = "val") -> Any:
    """CamVid ``split`` at the scale's resolution with the eval transform (resize, normalise)."""
    from pcd_core.evaluate import build_eval_dataset
    from pcd_core.spec import DatasetSpec

    return build_eval_dataset(DatasetSpec.model_validate(dataset_dict(scale)), split, None)


def run_scores(out: Path, scale: Scale, *, recorded: bool = False) -> dict[str, Any] | None:
    """A run's val scores and wall time: from its directory when it finished here, else
    (with ``recorded``) from committed JSON of this CPU model, else None (not run)."""
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        return {"wall_s": metrics.get("wall_s"), **score_dir(out, scale)}
    if recorded:
        return this_machines_records().get(str(out))
    return None


def recorded_only(out: Path) -> bool:
    """True when ``out`` did not finish here but this CPU model's JSON records it: a script
    run with ``--recorded`` then skips training it (its record stands in for it)."""
    return not (out / "metrics.json").is_file() and str(out) in this_machines_records()


def provenance_note(runs: list[dict[str, Any]]) -> str:
    """One line under a table saying how many of its runs are recorded, and from where."""
    files = sorted({r["recorded_in"] for r in runs if r.get("recorded_in")})
    if not files:
        return ""
    n = sum(bool(r.get("recorded_in")) for r in runs)
    return (f"{n} of {len(runs)} runs are recorded results of this CPU model (not trained "
            f"in this checkout), from: {', '.join(files)}")


class RecordMismatch(RuntimeError):
    """This machine does not reproduce the committed records of its CPU model."""


def check_teacher_record(t_dir: Path, scale: Scale) -> None:
    """Raise :class:`RecordMismatch` when the teacher trained here does not score exactly what
    this CPU model's records say it scored: then every recorded student was distilled from
    a different teacher and the machine does not reproduce the files, so none of their runs
    may stand in for a run here (not even CE, which needs no teacher: the check is by file
    kind, not by run). A teacher not trained here yet cannot be checked (and is not recorded-only:
    the scripts always train it)."""
    rec = this_machines_records().get(str(t_dir))
    if rec is None or not (t_dir / "metrics.json").is_file():
        return
    here = score_dir(t_dir, scale)["miou"]
    if here != rec["miou"]:
        raise RecordMismatch(
            f"the teacher {t_dir} scores {here!r} mIoU here and {rec['miou']!r} in "
            f"{rec['recorded_in']} (CPU model {cpu_model()!r}, signature "
            f"{cpu_signature()!r}): the recorded students were distilled from another "
            f"teacher and this machine does not reproduce that file; run without --recorded")


def ready_teacher(spec: RunSpec, t_dir: Path, scale: Scale, *, train: bool,
                  recorded: bool) -> bool:
    """Train the teacher (when ``train``) and, when records may stand in for runs, check it
    against its record first (:func:`check_teacher_record`). False, said on stderr, when the
    records must not be used: the script should stop before training any student."""
    if train:
        ensure_run(spec, t_dir)
    if not recorded:
        return True
    try:
        check_teacher_record(t_dir, scale)
    except RecordMismatch as e:
        print(f"[bench] {e}", file=sys.stderr, flush=True)
        return False
    return True


def this_machines_records() -> dict[str, dict[str, Any]]:
    """:func:`recorded_runs` for this machine's CPU model and signature."""
    return recorded_runs(cpu_model(), signature=cpu_signature())


@functools.cache
def recorded_runs(cpu: str | None, results: Path | None = None,
                  signature: str | None = None) -> dict[str, dict[str, Any]]:
    """Per-run records by run directory, from every ``results/*.json`` measured on ``cpu``
    (and, when both the file and the caller name one, on the same ``signature``; files
    without one only while no file names the caller's).

    A record is a run's scores as ``score_dir`` wrote them (plus ``dir`` and ``wall_s``),
    found in an accuracy JSON (``teacher``, ``runs``) or an ablation JSON (``rows[].runs``).
    The first file in name order wins when two hold the same directory (a record copied by
    a later table keeps its ``recorded_in``, so provenance is never lost).
    """
    found: dict[str, dict[str, Any]] = {}
    if cpu is None:
        return found
    files: list[tuple[Path, dict[str, Any], str | None]] = []
    for path in sorted((results or RESULTS).glob("*.json")):
        doc = json.loads(path.read_text())
        machine = (doc.get("machine") or {}) if isinstance(doc, dict) else {}
        if machine and machine.get("cpu_model") == cpu:
            files.append((path, doc, machine.get("cpu_signature")))
    if signature:
        # Files that name this signature are this kind's; unsigned ones (written before
        # signatures were recorded) may be another kind sold under the same model name, so
        # they stand in only while no file of this signature exists.
        signed_here = any(sig == signature for _, _, sig in files)
        wanted = {signature} if signed_here else {signature, None}
        files = [f for f in files if f[2] in wanted]
    for path, doc, _sig in files:
        for rec in _run_records(doc):
            found.setdefault(rec["dir"], {"recorded_in": path.name, **rec})
    return found


def _run_records(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    candidates = [doc.get("teacher"), *(doc.get("runs") or [])]
    for row in doc.get("rows") or []:
        if isinstance(row, dict):
            candidates += row.get("runs") or []
    for rec in candidates:
        if isinstance(rec, dict) and "dir" in rec and "miou" in rec:
            yield rec
