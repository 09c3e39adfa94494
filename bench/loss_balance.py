"""How large each loss part's gradient is on a PCD student, and how well it agrees with CE.

    python bench/loss_balance.py runs/bench/cpu/deeplabv3_*-pcd-s0-*
    python bench/loss_balance.py RUN_DIR... --batches 8 --out bench/results/loss_balance.json

Why: PCD's default is CE (+ aux) + the feature term + pixel KD. On the CamVid cpu bench it
leads KD on ResNet-18 and trails it on MobileNetV2 (bench/README.md, "Pooled over
teachers"), and both students distil through the same 128-wide head. One candidate cause
is balance: a feature term whose gradient dwarfs CE's, or points against it, on one
student and not the other. This script measures that instead of guessing: for each
finished PCD run it rebuilds the run's models (its own spec, teacher and scoring pass),
takes the student either freshly initialised (``init``: the matching made on the first
batch, as at step 0) or as trained (``last``: the run's last checkpoint, its own
matching), and on ``--batches`` training batches computes each part's gradient over the
student's parameters separately: its norm (over the backbone and over the rest, head and
aux), and its cosine with the CE gradient. Numbers are means over batches of per-batch
values, since each step's update is made of one batch's gradients. Parts are weighted as
the run weighted them at that step (a ``linear_decay`` term is 0 at ``last``). It trains
nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from bench._common import machine_facts, write_json
from pcd_core import distributed as D
from pcd_core.checkpoint import load_checkpoint
from pcd_core.components import Models
from pcd_core.data import build_loader
from pcd_core.reproducible import preserve_rng
from pcd_core.spec import RunSpec
from pcd_core.train import compute_losses, scoring_pass, seeded_models_and_data

STATES = ("init", "last")


def grouped_parts(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """The loss parts as the comparison needs them: ``ce`` is the task loss (CE plus the
    aux head's CE, which the method cannot change), every other part stands alone."""
    task = losses["ce"] + losses["aux"] if "aux" in losses else losses["ce"]
    return {"ce": task, **{k: v for k, v in losses.items() if k not in ("ce", "aux")}}


def part_gradients(parts: dict[str, Tensor], params: list[nn.Parameter]) -> dict[str, Tensor]:
    """Each part's gradient over ``params`` as one flat vector (zeros where it has none)."""
    out = {}
    for name, value in parts.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params, strict=True)])
    return out


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two flat gradients, in float64 (float32 sums over millions of entries
    put a vector's cosine with itself visibly above 1)."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else float("nan")


def balance(run_dir: Path, states: list[str], batches: int,
            info: D.DistInfo) -> list[dict[str, Any]]:
    """Per-part gradient norms (all, backbone, rest) and cosines with CE, averaged, for each
    of ``states`` in order. The models and the scoring pass are built once per run; each
    state is measured without moving the RNGs, so it sees what it would see alone."""
    raw = json.loads((run_dir / "spec.json").read_text())
    if raw["method"]["name"] != "pcd":
        raise SystemExit(f"{run_dir}: not a PCD run")
    spec = RunSpec.model_validate(raw)
    models, train_ds = seeded_models_and_data(spec, info)  # as train.run starts
    scoring_pass(spec, models, train_ds, info)
    rows = []
    for state in sorted(states, key=STATES.index):  # init measures the fresh student first
        step = 0
        if state == "last":
            ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
            models.student.load_state_dict(ckpt["model"])
            models.method.load_state_dict(ckpt["method"])  # kept and matching as trained
            step = int(ckpt["iteration"])
        with preserve_rng():
            parts = measure(spec, models, train_ds, step, batches, info)
        rows.append({"run": run_dir.name, "student": spec.student.arch,
                     "seed": spec.train.seed, "state": state, "step": step,
                     "batches": batches, "parts": parts})
    return rows


def measure(spec: RunSpec, models: Models, train_ds: Any, step: int, batches: int,
            info: D.DistInfo) -> dict[str, dict[str, float]]:
    """The student's loss parts, their gradients' norms and cosines with CE on ``batches``
    training batches (a loader of its own seed), each value a mean over batches."""
    models.student.train()
    named = [(n, p) for n, p in models.student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    in_backbone = torch.cat([torch.full((p.numel(),), n.startswith("backbone."))
                             for n, p in named])
    loader = build_loader(train_ds, batch_size=spec.train.batch_size, shuffle=True,
                          num_workers=0, seed=spec.train.seed + 104729, drop_last=True)
    per_batch: dict[str, dict[str, list[float]]] = {}
    for img, target in itertools.islice(loader, batches):
        img, target = img.to(info.device), target.to(info.device)
        # ``step`` never triggers a rematch after the first batch of ``init`` (or at all for
        # ``last``: the checkpoint's matching is restored and ``step`` is its iteration).
        parts = grouped_parts(compute_losses(spec, models, models.student, img, target,
                                             step, None))
        grads = part_gradients(parts, params)
        for name, g in grads.items():
            row = per_batch.setdefault(name, {})
            row.setdefault("loss", []).append(float(parts[name].detach()))
            row.setdefault("norm", []).append(float(g.norm()))
            row.setdefault("norm_backbone", []).append(float(g[in_backbone].norm()))
            row.setdefault("norm_rest", []).append(float(g[~in_backbone].norm()))
            row.setdefault("cos_ce", []).append(cosine(g, grads["ce"]))
            row.setdefault("cos_ce_backbone", []).append(
                cosine(g[in_backbone], grads["ce"][in_backbone]))
    return {name: {k: statistics.fmean(v) for k, v in row.items()}
            for name, row in per_batch.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished PCD run directories")
    p.add_argument("--at", nargs="+", choices=STATES, default=list(STATES),
                   help="the student freshly initialised, as trained, or both")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = D.setup("cpu")
    rows = [row for d in args.runs for row in balance(d, args.at, args.batches, info)]
    print("| run | state | part | loss | grad norm | backbone | head + aux | cos with CE | "
          "cos with CE (backbone) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for name, v in r["parts"].items():
            print(f"| {r['run']} | {r['state']} | {name} | {v['loss']:.3f} | {v['norm']:.3f} | "
                  f"{v['norm_backbone']:.3f} | {v['norm_rest']:.3f} | {v['cos_ce']:+.2f} | "
                  f"{v['cos_ce_backbone']:+.2f} |")
    if args.out:
        out = write_json(args.out, {"command": " ".join(["python", *sys.argv]),
                                    "machine": machine_facts(), "rows": rows})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
