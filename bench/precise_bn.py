"""Are the BN running statistics a run ends with part of the cpu bench's seed noise?

    python bench/precise_bn.py --scale cpu --methods none --seeds 0 --threads 1
    python bench/precise_bn.py --scale cpu --methods none kd pcd --seeds 0 1 2 3 --table-only \\
        --out bench/results/precise_bn_cpu_<kind>.json

At the cpu scale single runs swing by several mIoU points with near-null changes, and tree
IoU spans about 1 to 80 within one method. Weights are one source of that spread; another is
the BN running statistics, which with momentum 0.1 average only the last 10-20 training
batches. This script separates the two: for each (method, seed) it trains the bench's run
(``bench/_runs.ensure_run``: the spec, directory and hash accuracy.py uses, skipped when
finished) and scores the same student twice on val, as saved and after
``torch.optim.swa_utils.update_bn`` has recomputed every BN layer's statistics as a
cumulative average over the whole train split at the eval transform (train frames only:
nothing is fitted on val). If the two scorings differ by little, the spread lives in the
weights and only more seeds (or longer runs) narrow it.

KD and PCD need the bench teacher finished under ``--runs-dir`` (train it with
``bench/accuracy.py --teacher-only``); this script never trains it, so it can run CE seeds
beside a teacher in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    SCALES,
    TEACHERS,
    TREE,
    Scale,
    machine_facts,
    markdown_table,
    write_json,
)
from bench._runs import (
    ensure_run,
    is_finished,
    run_dir,
    score_dir,
    score_model,
    student_spec,
    teacher_spec,
    this_machines_records,
    val_dataset,
)

METHODS = ["none", "kd", "cwd", "pcd"]
LABEL = {"none": "CE", "kd": "KD", "cwd": "CWD", "pcd": "PCD"}
CACHE = "bench_val_precise_bn.json"
# Paired differences reported under both scorings (method, baseline).
PAIRS = [("pcd", "kd"), ("pcd", "none"), ("kd", "none")]
# The rule of stop 36 (commit f35b9c0): BN statistics are a material part of the seed noise
# when recomputing them moves a run's mIoU by at least this much on average.
MATERIAL = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--student", default="deeplabv3_resnet18")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["none", "kd", "pcd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    p.add_argument("--threads", type=int, help="torch threads of this process")
    p.add_argument("--table-only", action="store_true", help="train nothing; score and "
                   "tabulate the finished runs")
    p.add_argument("--out", type=Path, help="JSON to write (default: print only)")
    return p.parse_args(argv)


def recalibrated_bn(model: Any, scale: Scale, batch_size: int = 8) -> Any:
    """``model`` with every BN layer's running mean and variance recomputed as a cumulative
    average over the train split at the eval transform, in a fixed order (the same statistics
    on every call). Returns the model, in eval mode."""
    import torch
    from torch.optim.swa_utils import update_bn

    from pcd_core.data.loader import build_loader

    loader = build_loader(val_dataset(scale, "train"), batch_size=batch_size, shuffle=False,
                          num_workers=0, seed=0, drop_last=False)
    with torch.no_grad():
        update_bn((images for images, _labels in loader), model)
    return model.eval()


def score_precise_bn(out: Path, scale: Scale) -> dict[str, Any]:
    """Val scores of the student in ``out`` after :func:`recalibrated_bn`; cached in ``out``."""
    cache = out / CACHE
    if cache.is_file():
        return json.loads(cache.read_text())
    from pcd_core.export import load_student

    model, _meta = load_student(out)
    t0 = time.perf_counter()
    recalibrated_bn(model, scale)
    doc = {**score_model(model, scale), "recalibrate_s": time.perf_counter() - t0}
    write_json(cache, doc)
    return doc


def plan(args: argparse.Namespace, scale: Scale) -> list[tuple[str, int, Path, Any]]:
    """(method, seed, run directory, spec) for every run of the table."""
    t_arch = TEACHERS[args.scale]
    t_dir = run_dir(args.runs_dir, scale, teacher_spec(scale, t_arch))
    out = []
    for seed in args.seeds:
        for method in args.methods:
            spec = student_spec(scale, args.student, method, seed, t_arch, t_dir)
            out.append((method, seed, run_dir(args.runs_dir, scale, spec), spec))
    return out


def collect(args: argparse.Namespace, scale: Scale) -> list[dict[str, Any]]:
    """Both scorings of every finished run, with its record on this CPU kind where one exists
    (the as-saved score must equal it: the run is then the one the pool holds)."""
    records = this_machines_records()
    runs = []
    for method, seed, d, spec in plan(args, scale):
        if not is_finished(d, spec):
            continue
        saved, precise = score_dir(d, scale), score_precise_bn(d, scale)
        rec = records.get(str(d))
        runs.append({
            "method": method, "seed": seed, "dir": str(d), "spec_hash": spec.spec_hash(),
            "saved": saved, "precise_bn": precise,
            "wall_s": json.loads((d / "metrics.json").read_text()).get("wall_s"),
            "record_miou": rec["miou"] if rec else None,
            "recorded_in": rec.get("recorded_in") if rec else None,
        })
    return runs


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: mean and s.d. over seeds under each scoring, mean |change|; per pair: the
    paired differences by seed under each scoring; overall: the rule's mean |change|."""
    def pct(run: dict[str, Any], which: str, key: str = "miou") -> float:
        v = run[which]["per_class_iou"][TREE] if key == "tree" else run[which][key]
        return 100 * float(v)

    per_method: dict[str, Any] = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for which in ("saved", "precise_bn"):
            vals = [pct(r, which) for r in rs]
            row[which] = {"mean": statistics.fmean(vals),
                          "sd": statistics.stdev(vals) if len(vals) > 1 else float("nan")}
        row["mean_abs_change"] = statistics.fmean(
            abs(pct(r, "precise_bn") - pct(r, "saved")) for r in rs)
        per_method[m] = row
    pairs: dict[str, Any] = {}
    for a, b in PAIRS:
        by_seed = {(r["method"], r["seed"]): r for r in runs}
        seeds = sorted({s for (m, s) in by_seed if m == a} & {s for (m, s) in by_seed if m == b})
        if not seeds:
            continue
        pairs[f"{a}-{b}"] = {which: {s: pct(by_seed[a, s], which) - pct(by_seed[b, s], which)
                                     for s in seeds} for which in ("saved", "precise_bn")}
    changes = [abs(pct(r, "precise_bn") - pct(r, "saved")) for r in runs]
    overall = statistics.fmean(changes) if changes else float("nan")
    return {"per_method": per_method, "pairs": pairs, "mean_abs_change": overall,
            "material": overall >= MATERIAL, "material_threshold": MATERIAL}


def render(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    def f(v: float) -> str:
        return f"{100 * v:.2f}"

    body = [[LABEL[r["method"]], r["seed"], f(r["saved"]["miou"]), f(r["precise_bn"]["miou"]),
             f"{100 * (r['precise_bn']['miou'] - r['saved']['miou']):+.2f}",
             f(r["saved"]["per_class_iou"][TREE]), f(r["precise_bn"]["per_class_iou"][TREE]),
             "" if r["record_miou"] is None else
             ("yes" if r["record_miou"] == r["saved"]["miou"] else f"no ({f(r['record_miou'])})")]
            for r in runs]
    text = markdown_table(["method", "seed", "mIoU as saved", "mIoU, BN recomputed", "Δ",
                           "tree as saved", "tree, BN recomputed", "equals its record"], body)
    rows = [[LABEL[m], ",".join(map(str, row["seeds"])),
             f"{row['saved']['mean']:.2f} ± {row['saved']['sd']:.2f}",
             f"{row['precise_bn']['mean']:.2f} ± {row['precise_bn']['sd']:.2f}",
             f"{row['mean_abs_change']:.2f}"] for m, row in summary["per_method"].items()]
    text += "\n\n" + markdown_table(["method", "seeds", "mIoU as saved (mean ± s.d.)",
                                     "BN recomputed (mean ± s.d.)", "mean abs Δ"], rows)
    prow = []
    for name, d in summary["pairs"].items():
        a, b = name.split("-")
        for which in ("saved", "precise_bn"):
            vals = d[which]
            prow.append([f"{LABEL[a]} - {LABEL[b]}", which.replace("_", " "),
                         ", ".join(f"{v:+.2f}" for v in vals.values()),
                         f"{statistics.fmean(vals.values()):+.2f}",
                         f"{sum(v > 0 for v in vals.values())}/{len(vals)}"])
    text += "\n\n" + markdown_table(["pair", "scoring", "by seed", "mean", "ahead"], prow)
    verdict = "material" if summary["material"] else "not material"
    return (text + f"\n\nmean |Δ mIoU| over {len(runs)} runs: "
            f"{summary['mean_abs_change']:.2f} (rule: material at >= {MATERIAL}): {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = dataclasses.replace(SCALES[args.scale], teacher_seed=args.teacher_seed)
    if not args.table_only:
        for _method, _seed, d, spec in plan(args, scale):
            teacher = spec.teacher.checkpoint if spec.teacher else None
            if teacher and not is_finished(Path(teacher), teacher_spec(scale, TEACHERS[
                    args.scale])):
                print(f"[bench] skip {d.name}: the teacher {teacher} is not finished "
                      f"(bench/accuracy.py --teacher-only trains it)", file=sys.stderr)
                continue
            ensure_run(spec, d)
    runs = collect(args, scale)
    summary = summarise(runs, args.methods)
    print(render(runs, summary), flush=True)
    if args.out:
        write_json(args.out, {
            "scale": scale.name, "scale_config": scale, "machine": machine_facts(),
            "command": "python bench/precise_bn.py " + " ".join(sys.argv[1:]),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "student": args.student, "runs": runs, "summary": summary})
        print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
