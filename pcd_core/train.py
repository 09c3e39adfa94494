"""The training loop: one function, :func:`run`, around small named units.

``run`` trains a student (or a teacher: method ``none``, no teacher) from a :class:`RunSpec`,
evaluates it every ``eval_every`` iterations, checkpoints every ``checkpoint_every``, and
finally writes the deployable student directory (see :mod:`pcd_core.export`) and a small
grid of validation predictions (``samples.png``, see :mod:`pcd_core.samples`). Everything a
resume needs is in the checkpoint, and the data order is a pure function of (seed, epoch),
so a resumed run continues with the same losses as one that never stopped.

Cancellation (``Callback.should_stop``) is honoured in every long phase, not only between
training steps: before each scoring batch, every few evaluation batches and between export
formats. Each ends in :class:`RunCancelled`, after a checkpoint once training has started.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_core import distributed as D
from pcd_core.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    capture_rng,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from pcd_core.components import Models, build_models, check_run_spec
from pcd_core.data import build_dataset, build_loader
from pcd_core.data.class_weights import resolve_class_weights
from pcd_core.distill import weight_factor
from pcd_core.evaluate import build_eval_dataset, evaluate
from pcd_core.export import export_student
from pcd_core.optim import build_optimizer, build_scheduler
from pcd_core.progress import Callback, CallbackList, Progress, RunCancelled, StopRequested
from pcd_core.reproducible import BatchStream, preserve_rng, seed_everything
from pcd_core.samples import render_samples, write_samples
from pcd_core.spec import RunSpec

DEFAULT_FORMATS = ("safetensors", "torchscript", "onnx")
DEFAULT_SAMPLES = 4  # validation images in samples.png (0: none)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run produced. ``metrics`` are the final student's on the val split."""

    metrics: dict[str, Any]
    teacher_metrics: dict[str, Any] | None
    best: dict[str, Any] | None  # {"iteration", "miou"} of the best periodic evaluation
    paths: dict[str, Path]
    wall_s: float
    iterations: int
    scoring: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """The mutable part of a run that a checkpoint must carry besides modules/optimisers."""

    iteration: int = 0  # completed optimiser steps
    best: dict[str, Any] | None = None
    scoring: dict[str, Any] = field(default_factory=dict)
    # A stop interrupted the evaluation of step ``iteration``: a resume runs it first, so the
    # resumed run reports the same evaluations (and ``best``) as one that never stopped.
    eval_pending: bool = False


def amp_dtype_for(spec: RunSpec, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA when ``train.amp``; None (full precision) elsewhere."""
    if not spec.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if spec.train.amp_dtype == "bf16" else torch.float16


def compute_losses(
    spec: RunSpec, models: Models, net: nn.Module, img: Tensor, target: Tensor, step: int,
    amp_dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    """Loss parts by name (``ce``, ``aux``, method parts), all already weighted.

    ``net`` is the student as trained (possibly DDP-wrapped); img (B,3,H,W), target (B,H,W).
    """
    ignore = spec.dataset.ignore_index
    with torch.autocast(img.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        s_out = net(img)
        t_out = None
        if models.method.needs_teacher:
            assert models.teacher is not None
            with torch.no_grad():
                t_out = models.teacher(img)
        w = models.class_weights
        losses = {"ce": F.cross_entropy(s_out["out"].float(), target, weight=w,
                                        ignore_index=ignore)}
        if "aux" in s_out:
            aux = F.cross_entropy(s_out["aux"].float(), target, weight=w, ignore_index=ignore)
            losses["aux"] = spec.train.aux_weight * aux
        for name, value in models.method(s_out, t_out, target, step).items():
            schedule = models.method.loss_schedule(name)
            # x 1.0 is exact: constant runs are unchanged
            losses[name] = value * weight_factor(schedule, step, spec.train.iterations)
    return losses


def train_step(
    spec: RunSpec, models: Models, net: nn.Module, batch: tuple[Tensor, Tensor], step: int,
    amp_dtype: torch.dtype | None, info: D.DistInfo,
) -> dict[str, Tensor]:
    """One optimiser step; returns the detached loss parts plus ``total``."""
    img = batch[0].to(info.device, non_blocking=True)
    target = batch[1].to(info.device, non_blocking=True)
    losses = compute_losses(spec, models, net, img, target, step, amp_dtype)
    total = torch.stack([v.float() for v in losses.values()]).sum()
    models.optimizer.zero_grad(set_to_none=True)
    models.scaler.scale(total).backward()
    D.average_gradients(models.method.parameters(), info)
    if spec.train.grad_clip is not None:
        models.scaler.unscale_(models.optimizer)
        params = [p for g in models.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, spec.train.grad_clip)
    models.scaler.step(models.optimizer)
    models.scaler.update()
    models.scheduler.step()
    # PCD may rematch on a rank's own batch; rank 0's matching is the one every rank keeps.
    D.broadcast_tensors(models.method.buffers(), info)
    out = {k: v.detach() for k, v in losses.items()}
    out["total"] = total.detach()
    return out


def checkpoint_state(spec: RunSpec, models: Models, state: _State) -> dict[str, Any]:
    return {
        "iteration": state.iteration,
        "model": models.student.state_dict(),
        "optimizer": models.optimizer.state_dict(),
        "scheduler": models.scheduler.state_dict(),
        "scaler": models.scaler.state_dict(),
        "method": models.method.state_dict(),
        "rng": capture_rng(),
        "best": state.best,
        "scoring": json.dumps(state.scoring),
        "eval_pending": state.eval_pending,
        "spec": spec.model_dump_json(),
        "spec_hash": spec.spec_hash(),
        "torch_version": str(torch.__version__),
    }


def restore_state(ckpt: dict[str, Any], models: Models, state: _State) -> None:
    """Load everything but the RNGs (restored once the data stream is positioned)."""
    models.student.load_state_dict(ckpt["model"])
    models.optimizer.load_state_dict(ckpt["optimizer"])
    models.scheduler.load_state_dict(ckpt["scheduler"])
    models.scaler.load_state_dict(ckpt["scaler"])
    models.method.load_state_dict(ckpt["method"])
    state.iteration = int(ckpt["iteration"])
    state.best = ckpt.get("best")
    state.scoring = json.loads(ckpt.get("scoring") or "{}")
    state.eval_pending = bool(ckpt.get("eval_pending", False))


def seeded_models_and_data(spec: RunSpec, info: D.DistInfo) -> tuple[Models, Any]:
    """Seed, build the models (student initialised, teacher loaded) and the train dataset:
    what a run does before its scoring pass, in that order. With ``num_workers`` 0 the scoring
    items draw from the global generator where seeding and initialisation left it, so
    replaying a run's scoring pass (bench/kept_overlap.py) must start from here too."""
    seed_everything(spec.train.seed + info.rank, spec.train.deterministic)
    models = build_models(spec, info.device)
    return models, build_dataset(spec.dataset, spec.dataset.train_split, train=True)


def scoring_pass(spec: RunSpec, models: Models, train_ds: Any, info: D.DistInfo,
                 cbs: Callback | None = None) -> dict:
    """The method's scoring pass over ``score_batches`` training batches (PCD only).

    ``cbs.should_stop`` is polled before every batch (each is a teacher forward, so a poll is
    cheap beside it; rank 0 decides for all ranks); a stop raises ``StopRequested``.
    """
    if models.teacher is None or not models.method.needs_teacher:
        return {}
    loader = build_loader(
        train_ds, batch_size=spec.train.batch_size, shuffle=True,
        num_workers=spec.train.num_workers, seed=spec.train.seed + 7919, drop_last=False,
        distributed=info.distributed,
    )

    def batches() -> Iterator[Any]:
        stream = BatchStream(loader, spec.train.seed + 7919)
        for _ in range(spec.method.score_batches):
            if cbs is not None and D.broadcast_flag(cbs.should_stop(), info):
                raise StopRequested("scoring")
            yield next(stream)

    return dict(models.method.prepare(models.teacher, batches(), info.device))


def _window_stats(sums: dict[str, Tensor], n: int, info: D.DistInfo) -> dict[str, float]:
    means = {k: float(v) / n for k, v in sums.items()}
    return D.all_reduce_mean(means, info)


def _eval_student(spec: RunSpec, models: Models, val_ds: Any, info: D.DistInfo,
                  amp_dtype: torch.dtype | None,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    # DDP keeps BN running stats per rank; evaluate (and later save) rank 0's everywhere.
    D.broadcast_tensors(models.student.buffers(), info)
    with preserve_rng():
        return evaluate(
            models.student, val_ds, num_classes=spec.dataset.num_classes,
            ignore_index=spec.dataset.ignore_index, batch_size=spec.train.eval_batch_size,
            info=info, num_workers=min(spec.train.num_workers, 2), amp_dtype=amp_dtype,
            class_names=spec.dataset.class_names, should_stop=should_stop,
        )


def _save(spec: RunSpec, models: Models, state: _State, out_dir: Path, info: D.DistInfo,
          cbs: Callback) -> Path:
    path = out_dir / CHECKPOINT_DIR / LATEST
    if info.is_main:
        save_checkpoint(checkpoint_state(spec, models, state), path)
        cbs.on_checkpoint(state.iteration, path)
    D.barrier(info)
    return path


def train_loop(
    spec: RunSpec, models: Models, net: nn.Module, stream: BatchStream, val_ds: Any,
    state: _State, out_dir: Path, info: D.DistInfo, cbs: Callback,
) -> dict[str, Any] | None:
    """Steps from ``state.iteration`` to ``train.iterations``; returns the last eval (if the
    last step was an eval step) so the caller does not evaluate the same weights twice."""
    tr = spec.train
    amp = amp_dtype_for(spec, info.device)
    poll_every = max(1, min(tr.log_every, 10))
    imgs_per_step = tr.batch_size * info.world_size
    sums: dict[str, Tensor] = {}

    def periodic_eval(it: int) -> dict[str, Any]:
        try:
            result = _eval_student(spec, models, val_ds, info, amp, cbs.should_stop)
        except StopRequested:  # step ``it`` is kept; its evaluation is redone on resume
            state.eval_pending = True
            path = _save(spec, models, state, out_dir, info, cbs)
            raise RunCancelled(it, path if info.is_main else None) from None
        state.eval_pending = False
        if state.best is None or result["miou"] > state.best["miou"]:
            state.best = {"iteration": it, "miou": float(result["miou"])}
        cbs.on_eval(it, result)
        return result

    last_eval = periodic_eval(state.iteration) if state.eval_pending else None
    n, t_window = 0, time.perf_counter()
    models.student.train()
    while state.iteration < tr.iterations:
        step = state.iteration
        losses = train_step(spec, models, net, next(stream), step, amp, info)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        state.iteration = it = step + 1
        if it % tr.log_every == 0 or it == tr.iterations:
            means = _window_stats(sums, n, info)
            dt = max(time.perf_counter() - t_window, 1e-9)
            cbs.on_progress(Progress(
                "training", it, tr.iterations, means, images_per_s=n * imgs_per_step / dt,
                eta_s=(tr.iterations - it) * dt / n, lr=models.scheduler.get_last_lr()[0]))
            sums, n, t_window = {}, 0, time.perf_counter()
        last_eval = None
        if it % tr.eval_every == 0 or it == tr.iterations:
            last_eval = periodic_eval(it)
            t_window = time.perf_counter()  # eval time is not training throughput
        saved = it % tr.checkpoint_every == 0 or it == tr.iterations
        if saved:
            _save(spec, models, state, out_dir, info, cbs)
        if it % poll_every == 0 and D.broadcast_flag(cbs.should_stop(), info):
            path = out_dir / CHECKPOINT_DIR / LATEST
            if not saved:
                path = _save(spec, models, state, out_dir, info, cbs)
            raise RunCancelled(it, path if info.is_main else None)
    return last_eval


def run(
    spec: RunSpec,
    out_dir: str | os.PathLike[str],
    *,
    callbacks: Sequence[Callback] = (),
    resume: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    export_formats: Sequence[str] = DEFAULT_FORMATS,
    sync_bn: bool = False,
    samples: int = DEFAULT_SAMPLES,
) -> RunResult:
    """Train ``spec`` into ``out_dir`` (student directory + ``checkpoints/``).

    ``samples``: how many validation images ``samples.png`` shows (0: no file).

    ``resume``: a checkpoint file, a run directory, or ``"auto"`` (this ``out_dir``'s last
    checkpoint if any). Under torchrun the process group is set up here; only rank 0 calls
    ``callbacks`` and writes files. Raises :class:`RunCancelled` when a callback asks to stop,
    ``ValueError`` for specs that cannot run (checked before any data or weights are read
    beyond what the check needs), ``WeightsError`` for an unusable teacher checkpoint.
    """
    t0 = time.perf_counter()
    check_run_spec(spec)
    out = Path(out_dir)
    info = D.setup(device)
    owns_group = info.distributed
    cbs = CallbackList(callbacks if info.is_main else ())
    try:
        return _run(spec, out, info, cbs, resume, export_formats, sync_bn, samples, t0)
    finally:
        if owns_group:
            D.teardown(info)


def _run(spec: RunSpec, out: Path, info: D.DistInfo, cbs: CallbackList, resume: Any,
         export_formats: Sequence[str], sync_bn: bool, samples: int, t0: float) -> RunResult:
    tr = spec.train
    cbs.on_progress(Progress("preparing", 0, tr.iterations))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(spec.model_dump_json(indent=2))
    models, train_ds = seeded_models_and_data(spec, info)
    class_weights = resolve_class_weights(spec)
    if class_weights is not None:
        models.class_weights = torch.tensor(class_weights, device=info.device)
    models.optimizer = build_optimizer(tr, [models.student, models.method])
    models.scheduler = build_scheduler(models.optimizer, tr)
    amp = amp_dtype_for(spec, info.device)
    models.scaler = torch.amp.GradScaler(info.device.type, enabled=amp is torch.float16)
    val_ds = build_eval_dataset(spec.dataset, spec.dataset.val_split, tr.max_eval_images)
    loader = build_loader(train_ds, batch_size=tr.batch_size, shuffle=True,
                          num_workers=tr.num_workers, seed=tr.seed, drop_last=True,
                          distributed=info.distributed)
    stream = BatchStream(loader, tr.seed)
    state = _State()
    ckpt_path = resolve_resume(resume, out)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        restore_state(ckpt, models, state)
        stream.seek(state.iteration)
        restore_rng(ckpt["rng"])  # after the skip-ahead, which may draw from the RNGs
    elif models.method.needs_teacher:
        cbs.on_progress(Progress("scoring", 0, tr.iterations))
        try:
            state.scoring = scoring_pass(spec, models, train_ds, info, cbs)
        except StopRequested:  # before the first step: nothing to checkpoint
            raise RunCancelled(state.iteration, None) from None
    net = D.wrap_ddp(models.student, info, sync_bn=sync_bn)
    if sync_bn and info.distributed:
        models.student = net.module  # type: ignore[assignment]
    cbs.on_progress(Progress("training", state.iteration, tr.iterations))
    final = train_loop(spec, models, net, stream, val_ds, state, out, info, cbs)
    # Training is over and its last checkpoint written: a stop from here on resumes into
    # the evaluations and the export only.
    last = out / CHECKPOINT_DIR / LATEST

    def cancelled() -> RunCancelled:
        return RunCancelled(state.iteration, last if info.is_main and last.is_file() else None)

    teacher_metrics = None
    try:
        if final is None:  # resumed at the end, or nothing to do: evaluate the weights we have
            cbs.on_progress(Progress("evaluating", state.iteration, tr.iterations))
            final = _eval_student(spec, models, val_ds, info, amp, cbs.should_stop)
        if models.teacher is not None:
            cbs.on_progress(Progress("evaluating", state.iteration, tr.iterations))
            with preserve_rng():
                teacher_metrics = _eval_teacher(spec, models, val_ds, info, amp,
                                                cbs.should_stop)
    except StopRequested:
        raise cancelled() from None
    fingerprints = D.gather_fingerprints(models.student, info)
    cbs.on_progress(Progress("exporting", state.iteration, tr.iterations))
    paths = {"checkpoint": last, "spec": out / "spec.json"}
    summary: dict[str, Any] = {} if class_weights is None else {"class_weights": class_weights}
    stopped = False
    if info.is_main:  # only rank 0 exports: it polls alone, then tells the others
        try:
            report = export_from_spec(models.student, out, spec, export_formats,
                                      should_stop=cbs.should_stop)
            paths.update(report.paths)
            summary["export"] = report.to_json()
        except StopRequested:
            stopped = True
    if D.broadcast_flag(stopped, info):
        raise cancelled()
    result = RunResult(final, teacher_metrics, state.best, paths,
                       time.perf_counter() - t0, state.iteration, state.scoring)
    if info.is_main and samples > 0:
        sample_path = _write_samples(spec, models, val_ds, info, amp, out, samples)
        if sample_path is not None:
            paths["samples"] = sample_path
    if info.is_main:
        paths["metrics"] = write_metrics(out, spec, result, fingerprints, summary)
    D.barrier(info)
    return result


def _write_samples(spec: RunSpec, models: Models, val_ds: Any, info: D.DistInfo,
                   amp: torch.dtype | None, out: Path, n: int) -> Path | None:
    """``samples.png`` (image | label | teacher | student); a failure here is logged, never
    fatal: the run's real results are already written."""
    columns = [m for m in (models.teacher, models.student) if m is not None]
    try:
        with preserve_rng():
            grid = render_samples(
                columns, val_ds, num_classes=spec.dataset.num_classes,
                ignore_index=spec.dataset.ignore_index, mean=spec.dataset.mean,
                std=spec.dataset.std, device=info.device, n=n, amp_dtype=amp)
        return write_samples(out / "samples.png", grid)
    except Exception:
        log.warning("could not write samples.png", exc_info=True)
        return None


def _eval_teacher(spec: RunSpec, models: Models, val_ds: Any, info: D.DistInfo,
                  amp: torch.dtype | None,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    assert models.teacher is not None
    return evaluate(
        models.teacher, val_ds, num_classes=spec.dataset.num_classes,
        ignore_index=spec.dataset.ignore_index, batch_size=spec.train.eval_batch_size,
        info=info, num_workers=min(spec.train.num_workers, 2), amp_dtype=amp,
        class_names=spec.dataset.class_names, should_stop=should_stop,
    )


def export_from_spec(model: nn.Module, out: Path, spec: RunSpec, formats: Sequence[str],
                     should_stop: Callable[[], bool] | None = None) -> Any:
    """Export the student with everything ``model.json`` needs, taken from the spec."""
    ds = spec.dataset
    names = ds.class_names or [f"class_{i}" for i in range(ds.num_classes)]
    hw: tuple[int, int] = ds.resize or ds.crop
    return export_student(
        model, out, spec_hash=spec.spec_hash(), arch=spec.student.arch,
        num_classes=ds.num_classes, class_names=names, mean=ds.mean, std=ds.std,
        output_stride=spec.student.output_stride, head_channels=int(model.feat_channels),  # type: ignore[arg-type]
        ignore_index=ds.ignore_index, formats=tuple(formats), input_hw=hw,
        should_stop=should_stop,
    )


def write_metrics(out: Path, spec: RunSpec, result: RunResult, fingerprints: list[str],
                  extra: dict[str, Any]) -> Path:
    """``metrics.json``: final student vs teacher, best periodic eval, run facts."""
    doc = {
        "name": spec.name,
        "spec_hash": spec.spec_hash(),
        "method": spec.method.name,
        "iterations": result.iterations,
        "wall_s": result.wall_s,
        "student": result.metrics,
        "teacher": result.teacher_metrics,
        "best": result.best,
        "scoring": result.scoring,
        "rank_weight_sha256": fingerprints,
        **extra,
    }
    path = out / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)
    return path
