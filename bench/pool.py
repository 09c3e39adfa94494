"""Pool accuracy tables trained against different teachers: paired gains over (teacher, seed).

    python bench/pool.py                      # every bench/results/accuracy_cpu*.json
    python bench/pool.py A.json B.json --out bench/results/pooled_cpu.json
    python bench/pool.py --per-class          # also each class's IoU gain, pooled the same way

Why: each machine kind trains its own teacher from the same spec (floating-point order
differs between CPUs), and the same student defaults, seeds and budget gave PCD - KD +1.58
with one teacher and -0.30 with another (bench/README.md). A claim about the method has to
average over teachers as well as student seeds; this script is the one place that does it,
so that every pooled number in the README has a command behind it.

Rules, each there to keep a pair honest:

- A run counts only if its spec hash is the one the current code plans for its
  (student, method, seed) at the file's scale. Runs of an older default (PCD before
  2026-12-01, say) are left out and counted in the output, never mixed in.
- A teacher is identified by its val mIoU, an exact float: two files whose teachers score
  the same share a teacher (a re-printed table), and a run seen in both must carry the same
  score there, else the files disagree and the script stops.
- A gain is ``method - baseline`` on the same teacher, student budget and student seed; the
  mean is over those pairs, the standard error is their standard deviation over
  sqrt(pairs). The "by teacher" column weights each teacher once instead (the mean of the
  per-teacher means, s.e. over teachers): pairs of one teacher are not independent draws,
  teachers are; its 95 % interval is Student's t over teachers (teachers - 1 degrees of
  freedom), the one range a target can be read against. Students trained for another
  number of iterations (``accuracy.py --student-iterations``) are pooled on their own rows,
  never with the scale's budget.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import accuracy
from bench._common import (
    CAMVID_CLASSES,
    CLASS_METRICS,
    SCALES,
    TEACHERS,
    markdown_table,
    metric_value,
    write_json,
)
from bench._runs import run_dir, teacher_spec
from pcd_core.spec import CLASS_WEIGHT_CHOICES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMPARISONS = [("pcd", "none"), ("pcd", "kd"), ("pcd", "cwd"), ("kd", "none"), ("cwd", "none")]
METRICS = ("miou", "thin_miou", "miou_without_tree")

# (student iterations, teacher mIoU, student, method, seed) -> the run's record
Runs = dict[tuple[int, float, str, str, int], dict[str, Any]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path,
                   help="accuracy JSONs (default: bench/results/accuracy_<scale>*.json)")
    p.add_argument("--scale", default="cpu", help="only files of this scale")
    p.add_argument("--out", type=Path, help="default bench/results/pooled_<scale>.json")
    p.add_argument("--class-weights", choices=CLASS_WEIGHT_CHOICES, default="none",
                   help="pool only the tables trained with this train.class_weights "
                   "(accuracy.py --class-weights); default none")
    p.add_argument("--per-class", action="store_true",
                   help="also pool each class's IoU and print a class-by-gain table (where "
                        "a method's lead comes from)")
    return p.parse_args(argv)


def table_setting(doc: dict[str, Any], name: str) -> Any:
    """One ``Scale`` field a results file's table was trained with (``student_iterations``,
    ``class_weights``, ``teacher_seed``). A file written before the field existed ran the
    scale's own value, which is what ``SCALES`` still holds."""
    return doc.get("scale_config", {}).get(name, getattr(SCALES[doc["scale"]], name))


def current_hashes(scale_name: str, runs: list[dict[str, Any]], iterations: int | None = None,
                   weights: str = "none", teacher_seed: int = 0
                   ) -> dict[tuple[str, str, int], str]:
    """The spec hash the current code would train for each (student, method, seed) named, at
    ``iterations`` student iterations (default: the scale's budget), class ``weights`` and
    against the teacher of ``teacher_seed``."""
    budget = [] if iterations is None else ["--student-iterations", str(iterations)]
    args = accuracy.parse_args(["--scale", scale_name, *budget, "--class-weights", weights,
                                "--teacher-seed", str(teacher_seed)])
    scale = accuracy.scale_of(args)
    t_arch = TEACHERS[scale_name]
    t_dir = run_dir(args.runs_dir, scale, teacher_spec(scale, t_arch))
    keys = {(r["student"], r["method"], r["seed"]) for r in runs}
    return {k: accuracy.planned_spec(args, scale, *k, t_arch, t_dir).spec_hash() for k in keys}


def load_runs(docs: list[tuple[str, dict[str, Any]]], scale_name: str, weights: str = "none"
              ) -> tuple[Runs, dict[str, int], dict[float, list[str]]]:
    """Runs of the current specs, keyed by teacher; how many of each file were left out;
    which files each teacher came from. Only tables trained with class ``weights`` count:
    a weighted table's teacher and students answer another question."""
    runs: Runs = {}
    left_out: dict[str, int] = {}
    sources: dict[float, list[str]] = defaultdict(list)
    for name, doc in docs:
        if (doc.get("scale") != scale_name or not doc.get("teacher")
                or table_setting(doc, "class_weights") != weights):
            continue
        teacher = float(doc["teacher"]["miou"])
        sources[teacher].append(name)
        iterations = int(table_setting(doc, "student_iterations"))
        wanted = current_hashes(scale_name, doc["runs"], iterations, weights,
                                int(table_setting(doc, "teacher_seed")))
        left_out[name] = 0
        for r in doc["runs"]:
            key = (r["student"], r["method"], r["seed"])
            if r.get("spec_hash") != wanted[key]:
                left_out[name] += 1
                continue
            seen = runs.setdefault((iterations, teacher, *key), r)
            if seen["miou"] != r["miou"]:
                raise SystemExit(f"{name}: {key} with teacher {teacher} scores {r['miou']}, "
                                 f"another file says {seen['miou']}: the files disagree")
    return runs, left_out, dict(sources)


def pooled_gain(runs: Runs, student: str, method: str, base: str, metric: str,
                iterations: int) -> dict[str, Any] | None:
    """``method - base`` over every (teacher, seed) that has both at ``iterations`` student
    iterations, in mIoU points."""
    diffs: dict[tuple[float, int], float] = {}
    for (its, teacher, s, m, seed), r in runs.items():
        other = runs.get((its, teacher, s, base, seed))
        if its != iterations or s != student or m != method or other is None:
            continue
        mine, theirs = metric_value(r, metric), metric_value(other, metric)
        if mine is not None and theirs is not None:
            diffs[(teacher, seed)] = 100 * (mine - theirs)
    if not diffs:
        return None
    values = list(diffs.values())
    per_teacher: dict[float, list[float]] = defaultdict(list)
    for (teacher, _), v in diffs.items():
        per_teacher[teacher].append(v)
    teacher_means = {t: statistics.fmean(vs) for t, vs in sorted(per_teacher.items())}
    teacher_mean = statistics.fmean(teacher_means.values())
    teacher_se = standard_error(list(teacher_means.values()))
    return {
        "student": student, "student_iterations": iterations, "method": method,
        "baseline": base, "metric": metric, "pairs": len(values), "teachers": len(per_teacher),
        "mean": statistics.fmean(values), "se": standard_error(values),
        # The same gain with each teacher weighted once, its s.e. over teachers: pairs of one
        # teacher are not independent draws (they share its quirks, and CE runs, which have
        # no teacher, are shared by every teacher of a machine kind), so the pair s.e. above
        # counts more independent evidence than there is; this one counts teachers.
        "teacher_mean": teacher_mean,
        "teacher_se": teacher_se,
        "teacher_ci95": interval95(teacher_mean, teacher_se, len(teacher_means)),
        "ahead": sum(v > 0 for v in values),
        "per_teacher": [{"teacher_miou": t, "pairs": len(per_teacher[t]), "mean": m}
                        for t, m in teacher_means.items()],
        "by_pair": [{"teacher_miou": t, "seed": seed, "gain": v}
                    for (t, seed), v in sorted(diffs.items())],
    }


def standard_error(values: list[float]) -> float:
    """Standard deviation over sqrt(n); nan for a single value (no spread to measure)."""
    n = len(values)
    return statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")


def interval95(mean: float, se: float, n: int) -> list[float]:
    """Two-sided 95 % interval of a mean of ``n`` independent draws, Student's t with n - 1
    degrees of freedom: with eight teachers it is 2.36 s.e. wide on each side, not the 1.96 of
    a normal, and that width is what a target has to clear. One draw has no s.e. (nan, see
    :func:`standard_error`) and no t quantile, so its ends are nan."""
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return [mean - half, mean + half]


def pooled_gains(runs: Runs, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every comparison on every metric, for each (student, budget) the runs hold, students
    in the order they first appear."""
    students = list(dict.fromkeys(k[2] for k in runs))
    groups = sorted({(k[2], k[0]) for k in runs}, key=lambda g: (students.index(g[0]), g[1]))
    return [g for student, its in groups for method, base in COMPARISONS for metric in metrics
            if (g := pooled_gain(runs, student, method, base, metric, its)) is not None]


def display_name(path: Path) -> str:
    """A results file as the README names it: relative to the checkout when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def interval_text(ends: list[float]) -> str:
    """``[lo, hi]`` in signed points; blank where one teacher leaves no interval."""
    return "" if any(math.isnan(e) for e in ends) else "[{:+.2f}, {:+.2f}]".format(*ends)


def render(gains: list[dict[str, Any]]) -> str:
    label = accuracy.LABEL
    rows = [[g["student"], g["student_iterations"],
             f"{label[g['method']]} - {label[g['baseline']]}", g["metric"],
             g["pairs"], g["teachers"], f"{g['mean']:+.2f}", f"{g['se']:.2f}",
             f"{g['teacher_mean']:+.2f} ± {g['teacher_se']:.2f}",
             interval_text(g["teacher_ci95"]), f"{g['ahead']}/{g['pairs']}",
             ", ".join(f"{100 * t['teacher_miou']:.2f}: {t['mean']:+.2f} ({t['pairs']})"
                       for t in g["per_teacher"])]
            for g in gains]
    return markdown_table(["student", "iterations", "gain", "metric", "pairs", "teachers",
                           "mean", "s.e.", "by teacher (mean ± s.e.)",
                           "by teacher, 95 % interval", "ahead",
                           "per teacher (teacher mIoU: mean (pairs))"], rows)


def render_per_class(gains: list[dict[str, Any]]) -> str:
    """Classes down, (student, budget, gain) across: mean paired IoU gain (pairs ahead)."""
    label = accuracy.LABEL
    columns = list(dict.fromkeys((g["student"], g["student_iterations"], g["method"],
                                  g["baseline"]) for g in gains))
    cell = {(g["student"], g["student_iterations"], g["method"], g["baseline"], g["metric"]): g
            for g in gains}
    rows = []
    for metric, name in zip(CLASS_METRICS, CAMVID_CLASSES, strict=True):
        row: list[Any] = [name]
        for col in columns:
            g = cell.get((*col, metric))
            row.append("" if g is None else f"{g['mean']:+.2f} ({g['ahead']}/{g['pairs']})")
        rows.append(row)
    headers = ["class"] + [f"{s} {its}: {label[m]} - {label[b]}" for s, its, m, b in columns]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = args.files or sorted(RESULTS.glob(f"accuracy_{args.scale}*.json"))
    read = [(display_name(f), json.loads(Path(f).read_text())) for f in files]
    weighted_as_asked = {name: table_setting(doc, "class_weights") == args.class_weights
                         for name, doc in read}
    docs = [(name, doc) for name, doc in read if weighted_as_asked[name]]
    other_weights = [name for name, _ in read if not weighted_as_asked[name]]
    runs, left_out, sources = load_runs(docs, args.scale, args.class_weights)
    gains = pooled_gains(runs, METRICS)
    print(render(gains))
    per_class = pooled_gains(runs, CLASS_METRICS) if args.per_class else []
    if args.per_class:
        print("\nPer class (IoU points, mean over pairs; pairs ahead):\n")
        print(render_per_class(per_class))
    for name, n in left_out.items():
        if n:
            print(f"\n{name}: {n} runs of other specs (older defaults) left out")
    if other_weights:
        print(f"\nnot pooled (trained with other class weights): {', '.join(other_weights)}")
    doc = {"scale": args.scale, "class_weights": args.class_weights,
           "command": " ".join(["python bench/pool.py", *sys.argv[1:]]),
           "files": [name for name, _ in docs], "other_class_weights": other_weights,
           "teachers": sources, "left_out": left_out, "gains": gains}
    if args.per_class:
        doc["per_class_gains"] = per_class
    weighted = "" if args.class_weights == "none" else f"_{args.class_weights}"
    out = args.out or RESULTS / f"pooled_{args.scale}{weighted}.json"
    write_json(out, doc)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
