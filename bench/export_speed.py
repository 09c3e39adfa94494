"""Deployment latency: exported student vs teacher at 360x480 on CPU, batch 1.

    python bench/export_speed.py                                  # R18 student vs R50 teacher
    python bench/export_speed.py --models deeplabv3_resnet18 deeplabv3_resnet101 --os 8
    python bench/export_speed.py --weights deeplabv3_resnet18=runs/bench/cpu/<run dir>

Each model goes through the engine's own ``export_student`` (safetensors, TorchScript, ONNX,
with its parity check), then eager PyTorch, the TorchScript file and the ONNX file under
onnxruntime (CPU provider) are timed on the same (1,3,360,480) input, interleaved by
repeat (model x runtime, round-robin) so the machine's background noise hits every cell
alike; the median of ``--repeats`` is reported with the max abs logit difference of each
exported form to eager. Latency does not depend on the weights, so random weights are the
default; ``--weights ARCH=DIR`` uses a trained student directory instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    CAMVID_CLASSES,
    count_flops,
    count_params,
    machine_facts,
    markdown_table,
    time_call,
    write_json,
)
from pcd_core.export import LogitsOnly, export_student, load_student
from pcd_core.models import build_model

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def prepare(arch: str, os_: int, hw: tuple[int, int], weights: str | None,
            out_root: Path) -> tuple[dict[str, Callable[[Tensor], Tensor]], dict[str, Any]]:
    """Export ``arch`` into ``out_root/arch`` and return a callable per runtime + facts."""
    if weights:
        model, meta = load_student(weights)
        os_, head = meta["output_stride"], meta["head_channels"]
    else:
        torch.manual_seed(0)
        model = build_model(arch, len(CAMVID_CLASSES), output_stride=os_).eval()
        head = model.feat_channels
    out = out_root / f"{arch}-os{os_}"
    report = export_student(
        model, out, spec_hash="bench", arch=arch, num_classes=len(CAMVID_CLASSES),
        class_names=CAMVID_CLASSES, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        output_stride=os_, head_channels=head, input_hw=hw)
    eager, _ = load_student(out)
    wrapper = LogitsOnly(eager).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(report.paths["torchscript"]), map_location="cpu")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(report.paths["onnx"]), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fns: dict[str, Callable[[Tensor], Tensor]] = {
        "eager": wrapper,
        "torchscript": scripted,
        "onnxruntime": lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]),
    }
    facts = {"arch": arch, "output_stride": os_, "params": count_params(eager),
             "flops": count_flops(eager, hw), "export_parity_max_abs": report.max_abs_diff,
             "weights": weights or "random", "onnx_exporter": report.onnx_exporter}
    return fns, facts


def measure(models: dict[str, dict[str, Callable[[Tensor], Tensor]]], x: Tensor,
            repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Round-robin over (model, runtime) per repeat; seconds per call."""
    times: dict[str, dict[str, list[float]]] = {m: {r: [] for r in RUNTIMES} for m in models}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for m, fns in models.items():
                for rt, fn in fns.items():
                    t = time_call(lambda fn=fn: fn(x))
                    if r >= warmup:
                        times[m][rt].append(t)
    return times


def parity(fns: dict[str, Callable[[Tensor], Tensor]], x: Tensor) -> dict[str, float]:
    """Max abs logit difference of each exported runtime to eager on the benchmark input."""
    with torch.inference_mode():
        ref = fns["eager"](x)
        return {rt: float((fns[rt](x) - ref).abs().max()) for rt in RUNTIMES if rt != "eager"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deeplabv3_resnet18", "deeplabv3_resnet50"],
                   help="first is the student; the others are compared with it")
    p.add_argument("--os", type=int, default=8, dest="os_",
                   help="output stride (8: the published CamVid setting)")
    p.add_argument("--hw", type=int, nargs=2, default=[360, 480])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--weights", nargs="*", default=[], metavar="ARCH=DIR")
    p.add_argument("--threads", type=int, help="torch + onnxruntime threads (default: all)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/export_speed"))
    p.add_argument("--out", type=Path, default=Path("bench/results/export_speed_cpu.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = (args.hw[0], args.hw[1])
    weights = dict(w.split("=", 1) for w in args.weights)
    fns, facts = {}, {}
    for arch in args.models:
        fns[arch], facts[arch] = prepare(arch, args.os_, hw, weights.get(arch), args.work_dir)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    for arch in args.models:
        facts[arch]["parity_max_abs"] = parity(fns[arch], x)
    times = measure(fns, x, args.repeats, args.warmup)
    doc = {"machine": machine_facts(), "hw": list(hw), "batch": 1, "repeats": args.repeats,
           "command": "python bench/export_speed.py " + " ".join(sys.argv[1:]),
           "models": facts, "times_s": times,
           "median_ms": {m: {rt: 1000 * statistics.median(v) for rt, v in t.items()}
                         for m, t in times.items()}}
    print(render(doc, args.models[0]))
    write_json(args.out, doc)
    print(f"\nwrote {args.out}")
    return 0


def render(doc: dict[str, Any], student: str) -> str:
    rows = []
    for m, med in doc["median_ms"].items():
        f = doc["models"][m]
        for rt in RUNTIMES:
            speedup = doc["median_ms"][m][rt] / doc["median_ms"][student][rt]
            par = f["parity_max_abs"].get(rt)
            rows.append([m, f"OS{f['output_stride']}", rt, f"{med[rt]:.0f}",
                         f"{speedup:.2f}x" if m != student else "1.00x",
                         f"{par:.2e}" if par is not None else "-",
                         f"{f['params'] / 1e6:.1f}", f"{f['flops'] / 1e9:.1f}"])
    return (f"CPU latency, batch 1, {doc['hw'][0]}x{doc['hw'][1]}, median of {doc['repeats']}\n\n"
            + markdown_table(["model", "stride", "runtime", "median ms", "x student",
                              "parity max|diff|", "params (M)", "GFLOPs"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
