"""How many of PCD's kept teacher channels change when the scoring pass sees more batches.

    python bench/kept_overlap.py runs/bench/cpu/deeplabv3_resnet18-pcd-score_batches=32-s*
    python bench/kept_overlap.py RUN_DIR... --batches 8 32 --out bench/results/kept_overlap.json

Why: an ablation row is one choice against the default on a handful of seeds, and at the
cpu scale a student's mIoU swings by several points from seed to seed (bench/README.md).
To read a row, one needs to know how far the variant's runs actually moved from the
default's. This script recomputes the scoring pass of each finished run's spec (its own
teacher, data and seeds) at every ``--batches`` value, reports how many kept channels the
first and each other value share, and checks that the recomputation at the run's own value
gives the run's checkpointed ``kept`` exactly (so the overlap describes the runs that
trained). It trains nothing: a scoring pass is teacher forwards only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import machine_facts, write_json
from pcd_core import distributed as D
from pcd_core.checkpoint import load_checkpoint
from pcd_core.spec import RunSpec
from pcd_core.train import scoring_pass, seeded_models_and_data


def kept_channels(raw: dict[str, Any], batches: int, info: D.DistInfo) -> list[int]:
    """The kept teacher channels of ``raw``'s PCD run with ``batches`` scoring batches."""
    spec = RunSpec.model_validate({**raw, "method": {**raw["method"], "score_batches": batches}})
    models, train_ds = seeded_models_and_data(spec, info)  # as train.run starts
    scoring_pass(spec, models, train_ds, info)
    return [int(c) for c in models.method.kept.tolist()]  # type: ignore[union-attr,operator]


def overlap(run_dir: Path, batches: list[int], info: D.DistInfo) -> dict[str, Any]:
    raw = json.loads((run_dir / "spec.json").read_text())
    if raw["method"]["name"] != "pcd":
        raise SystemExit(f"{run_dir}: not a PCD run")
    batches = list(dict.fromkeys(batches))  # a budget named twice would compare with itself
    kept = {b: kept_channels(raw, b, info) for b in batches}
    own = RunSpec.model_validate(raw).method.score_batches
    trained = load_checkpoint(run_dir / "checkpoints" / "last.pt")["method"]["kept"].tolist()
    first = set(kept[batches[0]])
    return {
        "run": run_dir.name,
        "seed": raw["train"]["seed"],
        "kept": len(first),
        "shared_with_first": {str(b): len(first & set(kept[b])) for b in batches[1:]},
        "recomputed_equals_trained": kept.get(own) == [int(c) for c in trained]
        if own in kept else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished PCD run directories")
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = D.setup("cpu")
    rows = [overlap(d, args.batches, info) for d in args.runs]
    print(f"| run | seed | kept | shared with {args.batches[0]} batches | recomputed = trained |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        shared = ", ".join(f"{b}: {n}" for b, n in r["shared_with_first"].items())
        same = r["recomputed_equals_trained"]
        print(f"| {r['run']} | {r['seed']} | {r['kept']} | {shared} | {same} |")
    if args.out:
        out = write_json(args.out, {"command": " ".join(["python", *sys.argv]),
                                    "machine": machine_facts(), "batches": args.batches,
                                    "rows": rows})
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
