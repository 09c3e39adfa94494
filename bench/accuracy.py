"""Does PCD help? The CamVid accuracy table: teacher, then students x methods x seeds.

    python bench/accuracy.py --scale cpu                       # the whole cpu table
    python bench/accuracy.py --scale cpu --students deeplabv3_resnet18 --seeds 0 1
    python bench/accuracy.py --scale gpu                       # one H100, ~25 min
    python bench/accuracy.py --scale cpu --table-only          # re-print from finished runs

Every student trains under the same iterations, batch, crop, schedule, augmentation and
seed; only the method differs. Runs are directories under ``--runs-dir`` named by spec
hash, so the script is resumable: finished runs are skipped, a cut-off run resumes from its
last checkpoint, and the teacher is trained once and reused while its spec is unchanged.
Scores are the engine's ``evaluate`` on val (``bench/_runs.score_dir``). The scales
(resolution, stride, budgets) are in ``bench/_common.SCALES``; why those, in bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    CAMVID_CLASSES,
    SCALES,
    TEACHERS,
    THIN_CLASSES,
    Scale,
    format_paired,
    machine_facts,
    markdown_table,
    mean_spread,
    paired_delta,
    write_json,
)
from bench._runs import (
    ensure_run,
    is_finished,
    provenance_note,
    ready_teacher,
    run_dir,
    run_scores,
    student_spec,
    teacher_spec,
)
from pcd_core.spec import CLASS_WEIGHT_CHOICES, RunSpec

DEFAULT_STUDENTS = ["deeplabv3_resnet18", "deeplabv3_mobilenet_v2"]
DEFAULT_METHODS = ["none", "kd", "cwd", "pcd"]
LABEL = {"none": "CE", "kd": "KD", "cwd": "CWD", "pcd": "PCD"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--students", nargs="+", default=DEFAULT_STUDENTS)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   choices=DEFAULT_METHODS)
    p.add_argument("--teacher", help="teacher arch (default: the scale's)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    p.add_argument("--out", type=Path, help="default bench/results/accuracy_<scale>.json")
    p.add_argument("--teacher-only", action="store_true")
    p.add_argument("--teacher-seed", type=int, default=0,
                   help="train.seed of the teacher (default 0): another teacher from the same "
                   "spec, for pooling over teachers on a machine kind that repeats another "
                   "kind's teacher bit for bit; students are unchanged but for the teacher "
                   "they distil from")
    p.add_argument("--recorded", action="store_true",
                   help="runs missing under --runs-dir are taken from committed "
                   "bench/results JSON measured on this CPU model (and not trained); the "
                   "table says how many and from which files")
    p.add_argument("--table-only", action="store_true", help="train nothing; table from "
                   "the finished runs")
    p.add_argument("--deadline", help="HH:MM (machine clock): start no run that would not "
                   "finish by then, judged from the wall time of finished runs")
    p.add_argument("--threads", type=int, help="torch threads (1 per process runs two seeds "
                   "in parallel without OpenMP barrier stalls on a loaded 2-core machine)")
    p.add_argument("--student-iterations", type=int, metavar="N",
                   help="train every student N iterations instead of the scale's budget (the "
                   "teacher is unchanged; warmup and checkpoints scale with N): does a gap "
                   "between methods grow or shrink with training length?")
    p.add_argument("--class-weights", choices=CLASS_WEIGHT_CHOICES, default="none",
                   help="train.class_weights of the teacher and every student: the whole "
                   "table's task loss (median_frequency: can a teacher that learns the thin "
                   "classes pass them on?); default none, the table as pooled so far")
    return p.parse_args(argv)


def planned_spec(args: argparse.Namespace, scale: Scale, student: str, method: str, seed: int,
                 t_arch: str, t_dir: Path) -> RunSpec:
    """The spec of one (student, method, seed) of the plan: what main trains and collect
    scores, built in one place so that the two always name the same directory."""
    return student_spec(scale, student, method, seed, t_arch, t_dir,
                        name=run_name(args, student, method, seed))


def run_name(args: argparse.Namespace, student: str, method: str, seed: int) -> str | None:
    """None (bench/_runs' default name) at the scale's budget; with ``--student-iterations``
    the budget is in the name, so a longer run's directory says what it is (asking for the
    scale's own budget names, and so hashes, the run as the default does)."""
    if args.student_iterations in (None, SCALES[args.scale].student_iterations):
        return None
    return f"{student}-{method}-s{seed}-it{args.student_iterations}"


def scale_of(args: argparse.Namespace) -> Scale:
    """The named scale, with the student budget of ``--student-iterations`` when given, the
    table's ``--class-weights`` and ``--teacher-seed``."""
    scale = dataclasses.replace(SCALES[args.scale], class_weights=args.class_weights,
                                teacher_seed=args.teacher_seed)
    if args.student_iterations:
        scale = dataclasses.replace(scale, student_iterations=args.student_iterations)
    return scale


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(student, method, seed) in the order that makes a cut-off table most useful: the
    first student, both seeds, all methods side by side, before the second student."""
    return [(s, m, seed) for s in args.students for seed in args.seeds for m in args.methods]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = scale_of(args)
    t_arch = args.teacher or TEACHERS[args.scale]
    t_spec = teacher_spec(scale, t_arch)
    t_dir = run_dir(args.runs_dir, scale, t_spec)
    walls: dict[str, float] = {}
    if not ready_teacher(t_spec, t_dir, scale, train=not args.table_only,
                         recorded=args.recorded):
        return 2
    if not args.table_only:
        if args.teacher_only:
            return report(args, scale, t_dir, t_arch)
        for student, method, seed in plan(args):
            spec = planned_spec(args, scale, student, method, seed, t_arch, t_dir)
            d = run_dir(args.runs_dir, scale, spec)
            if not fits_deadline(args.deadline, d, spec, walls.get(method)):
                continue
            done = ensure_run(spec, d, recorded=args.recorded)
            if done.get("wall_s"):
                walls[method] = float(done["wall_s"])
            report(args, scale, t_dir, t_arch)  # the JSON grows run by run
    return report(args, scale, t_dir, t_arch)


def fits_deadline(deadline: str | None, out: Path, spec: Any, wall: float | None) -> bool:
    """False (and say so) when a run that is not finished would end after ``deadline``.

    The estimate is the wall time of the last finished run of the same method (the
    session's own measurement); with none yet, the run is started."""
    if deadline is None or wall is None or is_finished(out, spec):
        return True
    hh, mm = (int(x) for x in deadline.split(":"))
    now = time.localtime()
    end = time.mktime((*now[:3], hh, mm, 0, *now[6:]))
    if time.time() + wall <= end:
        return True
    print(f"[bench] not starting {out.name}: ~{wall:.0f}s would end after {deadline}",
          flush=True)
    return False


def collect(args: argparse.Namespace, scale: Any, t_dir: Path, t_arch: str) -> dict[str, Any]:
    """Scores of every finished run of the plan (unfinished ones are simply absent)."""
    runs: list[dict[str, Any]] = []
    for student, method, seed in plan(args):
        spec = planned_spec(args, scale, student, method, seed, t_arch, t_dir)
        d = run_dir(args.runs_dir, scale, spec)
        scores = run_scores(d, scale, recorded=args.recorded)
        if scores is not None:
            runs.append({**scores, "student": student, "method": method, "seed": seed,
                         "dir": str(d), "spec_hash": spec.spec_hash()})
    t_scores = run_scores(t_dir, scale, recorded=args.recorded)
    teacher = None if t_scores is None else {**t_scores, "arch": t_arch, "dir": str(t_dir)}
    return {"teacher": teacher, "runs": runs}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (student, method), with gains over that student's CE."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r["student"], r["method"]) for r in runs))
    for student, method in keys:
        rs = [r for r in runs if r["student"] == student and r["method"] == method]
        row: dict[str, Any] = {"student": student, "method": method,
                               "seeds": [r["seed"] for r in rs]}
        for k in ("miou", "thin_miou", "boundary_f", "wall_s"):
            row[k], row[k + "_spread"] = mean_spread([100 * r[k] if k != "wall_s" else r[k]
                                                      for r in rs])
        row["per_class_iou"] = [100 * sum(r["per_class_iou"][c] for r in rs) / len(rs)
                                for c in range(len(CAMVID_CLASSES))]
        row["params"], row["flops"] = rs[0]["params"], rs[0]["flops"]
        rows.append(row)
    for row in rows:
        if row["method"] != "none":
            row.update(paired_gains(runs, row["student"], row["method"]))
    return rows


def paired_gains(runs: list[dict[str, Any]], student: str, method: str) -> dict[str, Any]:
    """Gain over the same student's CE run of the SAME seed, averaged over the seeds both
    have: a method whose seeds ran ahead of CE's is never compared with other CE seeds."""
    def by_seed(m: str, key: str) -> dict[int, float]:
        return {r["seed"]: 100 * r[key] for r in runs
                if r["student"] == student and r["method"] == m}

    return {"miou_vs_ce": paired_delta(by_seed(method, "miou"), by_seed("none", "miou")),
            "thin_vs_ce": paired_delta(by_seed(method, "thin_miou"),
                                       by_seed("none", "thin_miou"))}


def render(doc: dict[str, Any]) -> str:
    t = doc["teacher"]
    head = ["model", "method", "seeds", "mIoU", "Δ CE (paired)", "thin mIoU", "Δ thin (paired)",
            "boundary F", "params (M)", "GFLOPs", "wall (s/run)"]
    body = []
    if t:
        body.append([t["arch"], "CE (teacher)", "0", f"{100 * t['miou']:.2f}", "",
                     f"{100 * t['thin_miou']:.2f}", "", f"{100 * t['boundary_f']:.2f}",
                     f"{t['params'] / 1e6:.1f}", f"{t['flops'] / 1e9:.2f}",
                     f"{t['wall_s']:.0f}" if t.get("wall_s") else ""])
    for r in doc["rows"]:
        body.append([
            r["student"], LABEL[r["method"]], ",".join(map(str, r["seeds"])),
            f"{r['miou']:.2f} ± {r['miou_spread']:.2f}", format_paired(r.get("miou_vs_ce", {})),
            f"{r['thin_miou']:.2f} ± {r['thin_miou_spread']:.2f}",
            format_paired(r.get("thin_vs_ce", {})),
            f"{r['boundary_f']:.2f} ± {r['boundary_f_spread']:.2f}",
            f"{r['params'] / 1e6:.1f}", f"{r['flops'] / 1e9:.2f}", f"{r['wall_s']:.0f}"])
    text = markdown_table(head, body)
    pc_head = ["model", "method"] + [f"{c}{'*' if i in THIN_CLASSES else ''}"
                                     for i, c in enumerate(CAMVID_CLASSES)]
    pc_body = []
    if t:
        pc_body.append([t["arch"], "teacher"] + [f"{100 * v:.1f}" for v in t["per_class_iou"]])
    pc_body += [[r["student"], LABEL[r["method"]]] + [f"{v:.1f}" for v in r["per_class_iou"]]
                for r in doc["rows"]]
    note = provenance_note(doc["runs"] + ([t] if t else []))
    return (text + (f"\n\n{note}" if note else "")
            + "\n\nper-class IoU (%, mean over seeds; * thin/small)\n\n"
            + markdown_table(pc_head, pc_body))


def report(args: argparse.Namespace, scale: Any, t_dir: Path, t_arch: str) -> int:
    found = collect(args, scale, t_dir, t_arch)
    doc = {
        "scale": scale.name, "scale_config": scale, "machine": machine_facts(),
        "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seeds": args.seeds, "students": args.students, "methods": args.methods,
        "teacher": found["teacher"], "runs": found["runs"],
        "rows": aggregate(found["runs"]),
    }
    print(render(doc), flush=True)
    if args.teacher_only and not args.out:
        # the table JSON of the last full run stays as it is (it may be another CPU's)
        return 0
    weighted = "" if scale.class_weights == "none" else f"_{scale.class_weights}"
    out = args.out or Path(f"bench/results/accuracy_{scale.name}{weighted}.json")
    write_json(out, doc)
    print(f"\nwrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
