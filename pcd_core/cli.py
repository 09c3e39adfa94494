"""``python -m pcd_core``: train, distill, evaluate and export without the service.

    python -m pcd_core train   --spec examples/camvid_teacher_r50.yaml --out runs/teacher
    python -m pcd_core distill --spec examples/camvid_pcd_r18.yaml --out runs/r18 \
        --set teacher.checkpoint=runs/teacher --set train.iterations=50
    python -m pcd_core eval    --model runs/r18 --data /data/camvid --json runs/r18/val.json
    python -m pcd_core export  --model runs/r18

``train`` and ``distill`` write the same student directory (see :mod:`pcd_core.export`), so
a trained teacher directory is directly usable as ``teacher.checkpoint``. Runs launched by
torchrun train data-parallel. The first Ctrl-C (or SIGTERM) stops at the next poll with a
resumable checkpoint (``--resume auto`` continues); a second one aborts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pcd_core.spec import RunSpec

EXIT_SPEC, EXIT_CANCELLED = 2, 130


def parse_overrides(pairs: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value): ``50`` is an int, ``[180,240]``
    a list, ``null`` None, ``pcd`` a string."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key.path=value, got {pair!r}")
        out.append((key.strip().split("."), yaml.safe_load(raw) if raw else ""))
    return out


def apply_overrides(data: dict[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    for keys, value in parse_overrides(pairs):
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ValueError(f"--set {'.'.join(keys)}: {k!r} is not a mapping")
        node[keys[-1]] = value
    return data


def load_run_spec(path: str, overrides: Sequence[str], command: str) -> RunSpec:
    """Read a JSON/YAML spec, apply ``--set`` overrides, validate for ``command``.

    ``train`` is plain cross-entropy: the method defaults to ``none`` there (and any other is
    refused), while ``distill`` refuses ``none``.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec is a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    method = data.setdefault("method", {})
    if command == "train":
        method.setdefault("name", "none")
        if method["name"] != "none":
            raise ValueError(f"`train` runs method 'none'; use `distill` for {method['name']!r}")
    elif method.get("name", "pcd") == "none":
        raise ValueError("`distill` needs a distillation method; use `train` for method 'none'")
    return RunSpec.model_validate(data)


class SignalStop:
    """First SIGINT/SIGTERM: ask the run to stop cleanly; second: default behaviour."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True
        print("\n[pcd] stop requested: checkpointing at the next poll", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from pcd_core.progress import Callback, RunCancelled, TqdmCallback
    from pcd_core.train import run

    spec = load_run_spec(args.spec, args.set or [], args.command)
    stop = SignalStop()
    stop.install()

    class _Stop(Callback):
        def should_stop(self) -> bool:
            return stop.requested

    bar = TqdmCallback()
    callbacks = [_Stop()] + ([] if args.no_progress else [bar])
    try:
        result = run(spec, args.out, callbacks=callbacks, resume=args.resume,
                     device=args.device, export_formats=args.formats.split(","),
                     sync_bn=args.sync_bn, samples=args.samples)
    except RunCancelled as exc:
        print(f"[pcd] {exc}; continue with --resume auto", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        bar.close()
    if "metrics" in result.paths:  # rank 0 only
        m = result.metrics
        print(f"[pcd] done in {result.wall_s:.1f}s: {result.iterations} iterations, "
              f"val mIoU {m['miou']:.4f}, student directory {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pcd_core.distributed import DistInfo
    from pcd_core.evaluate import build_eval_dataset, evaluate
    from pcd_core.export import load_student
    from pcd_core.spec import DatasetSpec

    t0 = time.perf_counter()
    model, meta = load_student(args.model)
    num_classes = args.num_classes or meta["num_classes"]
    ignore = args.ignore_index if args.ignore_index is not None else meta.get("ignore_index")
    ds_spec = DatasetSpec(
        uri=args.data, format=args.format, num_classes=num_classes,
        ignore_index=255 if ignore is None else ignore, class_names=meta.get("class_names"),
        mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        resize=tuple(args.resize) if args.resize else None, val_split=args.split,
    )
    dataset = build_eval_dataset(ds_spec, args.split, args.max_images)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    metrics = evaluate(model.to(device), dataset, num_classes=num_classes,
                       ignore_index=ds_spec.ignore_index, batch_size=args.batch_size,
                       info=DistInfo(0, 1, 0, device), class_names=ds_spec.class_names)
    metrics.update({"model": str(args.model), "data": str(args.data), "split": args.split,
                    "images": len(dataset), "seconds": time.perf_counter() - t0})  # type: ignore[arg-type]
    text = json.dumps(metrics, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(f"[pcd] {args.split}: mIoU {metrics['miou']:.4f}, pixel acc "
          f"{metrics['pixel_acc']:.4f}, boundary F {metrics['boundary_f']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pcd_core.export import export_student, load_student

    model, meta = load_student(args.model)
    hw = tuple(args.input_hw) if args.input_hw else tuple(meta["input_hw"])
    report = export_student(
        model, args.model, spec_hash=meta["spec_hash"], arch=meta["arch"],
        num_classes=meta["num_classes"], class_names=meta["class_names"], mean=meta["mean"],
        std=meta["std"], output_stride=meta["output_stride"],
        head_channels=meta["head_channels"], ignore_index=meta.get("ignore_index"),
        formats=args.formats.split(","), input_hw=hw, tol=args.tol,  # type: ignore[arg-type]
    )
    print(json.dumps(report.to_json(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcd_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train a teacher or a CE-only student (method none)"),
                        ("distill", "distil a student from a trained teacher")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--spec", required=True, help="run spec, JSON or YAML")
        s.add_argument("--out", required=True, help="student directory to write")
        s.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a spec field, e.g. train.iterations=50 (repeatable)")
        s.add_argument("--resume", help="checkpoint file, run directory, or 'auto'")
        s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
        s.add_argument("--formats", default="safetensors,torchscript,onnx")
        s.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
        s.add_argument("--samples", type=int, default=4, metavar="N",
                       help="validation images drawn in samples.png (0: no samples.png)")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.set_defaults(func=cmd_run)
    s = sub.add_parser("eval", help="evaluate a student directory on a dataset split")
    s.add_argument("--model", required=True, help="student directory (model.json + weights)")
    s.add_argument("--data", required=True, help="dataset root")
    s.add_argument("--split", default="val")
    s.add_argument("--format", default="folder",
                   choices=["folder", "cityscapes", "voc", "synthetic"])
    s.add_argument("--num-classes", type=int, help="default: model.json")
    s.add_argument("--ignore-index", type=int, help="default: model.json, else 255")
    s.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"))
    s.add_argument("--max-images", type=int)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--device")
    s.add_argument("--json", help="write the metrics here")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("export", help="(re)write TorchScript/ONNX from student.safetensors")
    s.add_argument("--model", required=True, help="student directory")
    s.add_argument("--formats", default="safetensors,torchscript,onnx")
    s.add_argument("--input-hw", type=int, nargs=2, metavar=("H", "W"))
    s.add_argument("--tol", type=float, default=1e-3)
    s.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"[pcd] invalid spec:\n{exc}", file=sys.stderr)
        return EXIT_SPEC
    except ValueError as exc:  # includes TeacherMissingError, WeightsError, DatasetError
        print(f"[pcd] error: {exc}", file=sys.stderr)
        return EXIT_SPEC
