"""Each PCD choice against its alternatives, same teacher, budget and seeds as accuracy.py.

    python bench/ablate.py --scale cpu --groups score match --seeds 0 1
    python bench/ablate.py --scale cpu                       # every group (long)
    python bench/ablate.py --scale cpu --table-only
    python bench/ablate.py --scale cpu --method kd --groups weight_schedule --seeds 0 1

The default run of each seed IS accuracy.py's run of that method (same spec, same hash,
reused), so every alternative is compared with it under identical data order and budget;
``--method kd`` or ``cwd`` ablates a baseline the same way, so that a choice tried on PCD can
be given to the baselines too. The table pairs every row with accuracy.py's CE and KD runs
of the same seeds (train them there first). Runs go through ``bench/_runs.ensure_run``
(skip finished, resume cut-off) like the accuracy table.
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
    SCALES,
    TEACHERS,
    format_paired,
    machine_facts,
    markdown_table,
    mean_spread,
    metric_value,
    paired_delta,
    write_json,
)
from bench._runs import (
    ensure_run,
    provenance_note,
    ready_teacher,
    run_dir,
    run_scores,
    student_spec,
    teacher_spec,
)

# group -> alternatives as spec overrides; the first entry of each group is the default.
# Since 2026-12-01 PCD's default is the feature term at weight 1, constant, plus pixel KD at
# the KD baseline's recipe (pcd_core.spec.METHOD_DEFAULTS), so every alternative below keeps
# that KD term unless it says otherwise. The JSON of earlier ablations (bench/results) holds
# the groups as they were against the previous default (weight 3, linear_decay, no KD).
PREVIOUS_DEFAULT = {"method.weight": 3.0, "method.weight_schedule": "linear_decay",
                    "method.logit_kd_weight": 0.0}
GROUPS: dict[str, list[dict[str, Any]]] = {
    "score": [{}, {"method.score": "fisher"}, {"method.score": "l1"},
              {"method.score": "random"}],
    # 64: below the ResNet-18 head's 128 channels, half the student's channels go undistilled
    "keep": [{}, {"method.keep": 64}, {"method.keep": 192}, {"method.keep": 256}],
    "prune": [{}, {"method.prune": "class_balanced"}],
    "match": [{}, {"method.match": "identity"}],
    "rematch_every": [{}, {"method.rematch_every": 100}, {"method.rematch_every": 25}],
    "score_weighting": [{}, {"method.score_weighting": True}],
    # four times the scoring data: class means of rare classes from 8 batches are noisy
    "score_batches": [{}, {"method.score_batches": 32}],
    "tap": [{}, {"method.tap": "backbone"}, {"method.tap": "head_preact"}],
    "weight": [{}, {"method.weight": 0.3}, {"method.weight": 3.0}, {"method.weight": 10.0}],
    "tau": [{}, {"method.tau": 1.0}, {"method.tau": 8.0}],
    # the whole map up to scale and offset instead of the spatial softmax's peaks; or how the
    # channel's mean response differs between classes, with nothing of where it fires
    "feature_loss": [{}, {"method.feature_loss": "pearson"},
                     {"method.feature_loss": "pearson", "method.weight": 3.0},
                     {"method.feature_loss": "class_profile"},
                     {"method.feature_loss": "class_profile", "method.weight": 3.0}],
    # the feature term alone (no KD), the default before 2026-12-01, and twice the KD term
    # (its pair is the KD baseline at weight 2, BASELINE_GROUPS "weight")
    "logit_kd": [{}, {"method.logit_kd_weight": 0.0}, PREVIOUS_DEFAULT,
                 {"method.logit_kd_weight": 2.0}],
    "adapter": [{}, {"method.adapter": True}, {"method.adapter": True, "method.keep": 256}],
    # the feature term decays (the previous default's schedule) with KD kept constant; both decay
    "weight_schedule": [{}, {"method.weight_schedule": "linear_decay",
                             "method.logit_kd_schedule": "constant"},
                        {"method.weight_schedule": "linear_decay"}],
}

# The baselines' groups: PCD's decaying weight tried on them (their default is constant),
# and KD at twice its weight, so that PCD with twice the KD term has a baseline to face.
BASELINE_GROUPS: dict[str, list[dict[str, Any]]] = {
    "weight_schedule": [{}, {"method.weight_schedule": "linear_decay"}],
    "weight": [{}, {"method.weight": 2.0}],
}


def groups_of(method: str) -> dict[str, list[dict[str, Any]]]:
    return GROUPS if method == "pcd" else BASELINE_GROUPS


def variant_name(student: str, overrides: dict[str, Any], seed: int,
                 method: str = "pcd") -> str | None:
    """None for the default (so the spec, and its hash, equal accuracy.py's run), and for
    PCD's previous default: under accuracy.py's name its spec is the one accuracy.py ran
    before 2026-12-01, so its finished directories and recorded results are found as such."""
    if not overrides or (method == "pcd" and overrides == PREVIOUS_DEFAULT):
        return None
    tag = "-".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    return f"{student}-{method}-{tag}-s{seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--method", choices=["pcd", "kd", "cwd"], default="pcd",
                   help="the method whose choices are ablated (kd/cwd: BASELINE_GROUPS)")
    p.add_argument("--groups", nargs="+", choices=sorted({*GROUPS, *BASELINE_GROUPS}),
                   help="default: every group of --method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--student", default="deeplabv3_resnet18")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    p.add_argument("--out", type=Path, help="default bench/results/ablate_<scale>.json")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--recorded", action="store_true",
                   help="runs missing under --runs-dir are taken from committed "
                   "bench/results JSON measured on this CPU model (and not trained); the "
                   "table says how many and from which files")
    p.add_argument("--variants", nargs="+", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="only the alternatives all of whose pairs are named (e.g. "
                   "method.weight=1.0), or, for an item with commas, the one alternative "
                   "with exactly those pairs; default all")
    p.add_argument("--threads", type=int, help="torch threads (see accuracy.py --threads)")
    p.add_argument("--teacher-seed", type=int, default=0,
                   help="train.seed of the teacher, as accuracy.py --teacher-seed: ablate "
                   "against the students of that table's teacher")
    args = p.parse_args(argv)
    known = groups_of(args.method)
    args.groups = args.groups or list(known)
    unknown = [g for g in args.groups if g not in known]
    if unknown:
        p.error(f"--method {args.method} has no group(s) {unknown}; it has {sorted(known)}")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any], int]]:
    """(group, overrides, seed): seeds inner, so each alternative completes both seeds."""
    return [(g, ov, seed) for g in args.groups for ov in _variants(args, g)
            for seed in args.seeds]


def _variants(args: argparse.Namespace, group: str) -> list[dict[str, Any]]:
    """The group's alternatives, filtered by ``--variants`` (the default is kept always).

    An alternative is selected when every one of its KEY=VALUE pairs is named, so
    ``method.adapter=True`` alone does not also start ``adapter=True, keep=256``; an item
    with commas selects the one alternative whose pairs are exactly those, so naming a
    four-pair alternative does not also start the alternatives made of fewer of its pairs."""
    items = args.variants or []
    pairs = {item for item in items if "," not in item}
    exact = [set(item.split(",")) for item in items if "," in item]

    def selected(ov: dict[str, Any]) -> bool:
        named = {f"{k}={v}" for k, v in ov.items()}
        return named <= pairs or named in exact

    return [ov for ov in groups_of(args.method)[group] if not items or not ov or selected(ov)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scale = dataclasses.replace(SCALES[args.scale], teacher_seed=args.teacher_seed)
    t_arch = TEACHERS[args.scale]
    t_spec = teacher_spec(scale, t_arch)
    t_dir = run_dir(args.runs_dir, scale, t_spec)
    if not ready_teacher(t_spec, t_dir, scale, train=not args.table_only,
                         recorded=args.recorded):
        return 2
    if not args.table_only:
        for _group, ov, seed in plan(args):
            spec = student_spec(scale, args.student, args.method, seed, t_arch, t_dir, ov,
                                name=variant_name(args.student, ov, seed, args.method))
            ensure_run(spec, run_dir(args.runs_dir, scale, spec), recorded=args.recorded)
            report(args, scale, t_dir, t_arch)
    return report(args, scale, t_dir, t_arch)


def collect(args: argparse.Namespace, scale: Any, t_dir: Path, t_arch: str) -> list[dict]:
    rows = []
    for group in args.groups:
        for ov in _variants(args, group):
            scores = []
            for seed in args.seeds:
                spec = student_spec(scale, args.student, args.method, seed, t_arch, t_dir, ov,
                                    name=variant_name(args.student, ov, seed, args.method))
                d = run_dir(args.runs_dir, scale, spec)
                found = run_scores(d, scale, recorded=args.recorded)
                if found is not None:
                    scores.append({**found, "seed": seed, "dir": str(d)})
            rows.append({"group": group, "overrides": ov or "default", "runs": scores})
    ce = _reference(args, scale, t_dir, t_arch, "none")
    kd = _reference(args, scale, t_dir, t_arch, "kd")
    default = {r["seed"]: r for r in rows[0]["runs"]} if rows else {}
    for row in rows:
        row["miou"], row["miou_spread"] = mean_spread([100 * r["miou"] for r in row["runs"]])
        row["thin"], row["thin_spread"] = mean_spread([100 * r["thin_miou"]
                                                      for r in row["runs"]])
        mine = {r["seed"]: r for r in row["runs"]}
        for key, metric in (("", "miou"), ("_without_tree", "miou_without_tree")):
            # same seed, paired; without tree: the lead that is not the tree toss (_common.TREE)
            row[f"vs_ce{key}"] = paired_delta(*_percent(metric, mine, ce))
            row[f"vs_kd{key}"] = paired_delta(*_percent(metric, mine, kd))
            row[f"vs_default{key}"] = paired_delta(*_percent(metric, mine, default))
    return rows


def _percent(metric: str, *by_seed: dict[int, dict]) -> list[dict[int, float]]:
    """Each seed -> record map as seed -> ``metric`` in %, seeds without the metric dropped."""
    out = []
    for records in by_seed:
        values = {seed: metric_value(r, metric) for seed, r in records.items()}
        out.append({seed: 100 * v for seed, v in values.items() if v is not None})
    return out


def _reference(args: argparse.Namespace, scale: Any, t_dir: Path, t_arch: str,
               method: str) -> dict[int, dict]:
    """The records by seed of accuracy.py's finished runs of ``method``, for paired deltas."""
    found: dict[int, dict] = {}
    for seed in args.seeds:
        d = run_dir(args.runs_dir, scale,
                    student_spec(scale, args.student, method, seed, t_arch, t_dir))
        scores = run_scores(d, scale, recorded=args.recorded)
        if scores is not None:
            found[seed] = scores
    return found


def render(rows: list[dict], method: str = "pcd") -> str:
    body = []
    for r in rows:
        ov = r["overrides"]
        label = "default" if ov == "default" else ", ".join(f"{k}={v}" for k, v in ov.items())
        seeds = ",".join(str(x["seed"]) for x in r["runs"]) or "-"
        miou = f"{r['miou']:.2f} ± {r['miou_spread']:.2f}" if r["runs"] else "not run"
        thin = f"{r['thin']:.2f} ± {r['thin_spread']:.2f}" if r["runs"] else ""
        vs_default = [format_paired(r["vs_default"]),
                      format_paired(r["vs_default_without_tree"])]
        body.append([r["group"], label, seeds, miou, format_paired(r["vs_ce"]),
                     format_paired(r["vs_kd"]),
                     format_paired(r["vs_kd_without_tree"]),
                     *(vs_default if ov != "default" else ["", ""]), thin])
    return markdown_table(["group", "variant", "seeds", "mIoU", "Δ CE (paired)",
                           "Δ KD (paired)", "Δ KD w/o tree",
                           f"Δ default {method.upper()} (paired)", "Δ default w/o tree",
                           "thin mIoU"], body)


def report(args: argparse.Namespace, scale: Any, t_dir: Path, t_arch: str) -> int:
    rows = collect(args, scale, t_dir, t_arch)
    doc = {"scale": scale.name, "scale_config": scale, "student": args.student,
           "method": args.method,
           "seeds": args.seeds, "machine": machine_facts(),
           "command": "python bench/ablate.py " + " ".join(sys.argv[1:]),
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out = args.out or Path(f"bench/results/ablate_{scale.name}.json")
    write_json(out, doc)
    print(render(rows, args.method), flush=True)
    note = provenance_note([r for row in rows for r in row["runs"]])
    if note:
        print(f"\n{note} (the CE and KD references are taken the same way)", flush=True)
    print(f"\nwrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
