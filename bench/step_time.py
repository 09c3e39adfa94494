"""Training-step cost of PCD against KD (the floor), measured side by side in one process.

    python bench/step_time.py                       # CPU, the cpu-scale resolution
    python bench/step_time.py --device cuda --scale gpu
    python bench/step_time.py --hw 180 240 --methods teacher ce kd pcd --repeats 3 --steps 2

Why one process, interleaved: the machines are shared and noisy, so a ratio of two medians
taken in separate runs mostly measures the neighbours. Here every repeat times each method
for ``--steps`` steps in turn (kd, pcd, kd, pcd, ...), and the reported ratio is
median(pcd) / median(kd) over the repeats. The step is the training loop's own
(:func:`pcd_core.train.compute_losses` semantics: student forward, teacher forward under
no_grad, CE + the method's weighted losses, backward, SGD step), on random tensors at the
benchmark's resolution: step time does not depend on the pixel values.

Also reported, as a share of a whole run (iterations x PCD step time): the scoring pass
(``score_batches`` teacher forwards + exact statistics) and the rematching (one Hungarian
matching times iterations / rematch_every). Weights are random (timing only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    IGNORE_INDEX,
    SCALES,
    TEACHERS,
    machine_facts,
    markdown_table,
    time_call,
    write_json,
)
from pcd_core.distill import build_method
from pcd_core.models import build_model
from pcd_core.spec import MethodSpec

NUM_CLASSES = 11
ALL_METHODS = ("teacher", "ce", "kd", "cwd", "pcd")


def random_batch(batch: int, hw: tuple[int, int], device: torch.device,
                 gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(B,3,H,W) normalised-looking images and (B,H,W) labels in [0, 11] (11 = void)."""
    img = torch.randn(batch, 3, *hw, generator=gen).to(device)
    label = torch.randint(0, NUM_CLASSES + 1, (batch, *hw), generator=gen).to(device)
    return img, label


class StepRunner:
    """One optimiser step of a given method, built like ``pcd_core.components.build_models``.

    ``method == "teacher"`` trains the teacher architecture with CE (what the teacher run
    costs per step); ``ce`` trains the student alone; ``kd``/``cwd``/``pcd`` add the frozen
    teacher forward and the method's loss.
    """

    def __init__(self, method: str, *, teacher: nn.Module, student_arch: str, os_: int,
                 device: torch.device, choices: Mapping[str, Any],
                 amp_dtype: torch.dtype | None = None) -> None:
        self.name = method
        self.device = device
        self.amp_dtype = amp_dtype
        if method == "teacher":
            self.net = build_model(teacher.arch, NUM_CLASSES, output_stride=os_,
                                   aux=True).to(device)
            self.teacher = None
            self.method = None
        else:
            self.net = build_model(student_arch, NUM_CLASSES, output_stride=os_).to(device)
            self.teacher = None if method == "ce" else teacher
            # validated per method, so each gets its own defaults (PCD's includes pixel KD)
            spec = MethodSpec.model_validate(
                {**choices, "name": "none" if method == "ce" else method})
            key = "feat" if spec.tap == "head" else "backbone"
            t_ch = int(teacher.feat_channels if key == "feat" else teacher.backbone_channels)
            s_ch = int(self.net.feat_channels if key == "feat" else self.net.backbone_channels)
            self.method = build_method(spec, teacher_channels=t_ch, student_channels=s_ch,
                                       num_classes=NUM_CLASSES,
                                       ignore_index=IGNORE_INDEX).to(device)
        params = list(self.net.parameters()) + (
            list(self.method.parameters()) if self.method is not None else [])
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.net.train()

    def step(self, img: Tensor, target: Tensor, iteration: int) -> float:
        """One step; returns the total loss (a float forces completion of the step)."""
        amp = self.amp_dtype
        with torch.autocast(img.device.type, dtype=amp, enabled=amp is not None):
            out = self.net(img)
            t_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(img)
            loss = F.cross_entropy(out["out"].float(), target, ignore_index=IGNORE_INDEX)
            if "aux" in out:
                loss = loss + 0.4 * F.cross_entropy(out["aux"].float(), target,
                                                    ignore_index=IGNORE_INDEX)
            if self.method is not None:
                for v in self.method(out, t_out, target, iteration).values():
                    loss = loss + v
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def measure_steps(runners: dict[str, StepRunner], batches: list[tuple[Tensor, Tensor]],
                  repeats: int, steps: int, sync: Callable[[], None],
                  rematch_every: int) -> dict[str, list[float]]:
    """Interleaved: per repeat, each runner does ``steps`` steps; returns seconds/step lists."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    it = 1  # iteration numbers avoid multiples of rematch_every: rematch is timed apart
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))  # no position bias
        for name in order:
            runner = runners[name]
            for _ in range(steps):
                if it % rematch_every == 0:
                    it += 1  # a rematch step is timed apart (pcd_overheads)
                img, lab = batches[it % len(batches)]

                def call(run: StepRunner = runner, x: Tensor = img, y: Tensor = lab,
                         i: int = it) -> float:
                    return run.step(x, y, i)

                times[name].append(time_call(call, sync=sync))
                it += 1
    return times


def pcd_overheads(runner: StepRunner, teacher: nn.Module, batches: list[tuple[Tensor, Tensor]],
                  score_batches: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Scoring pass seconds and the median of 5 Hungarian rematch seconds."""
    assert runner.method is not None
    feed = [batches[i % len(batches)] for i in range(score_batches)]
    sync()
    summary = runner.method.prepare(teacher, feed, runner.device, force=True)  # type: ignore[call-arg]
    sync()
    img, _ = batches[0]
    with torch.no_grad():
        t = teacher(img)[runner.method.tap_key]
        s = runner.net(img)[runner.method.tap_key]
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    rematch = [time_call(lambda: runner.method.rematch(s, t, 0), sync=sync)  # type: ignore[union-attr]
               for _ in range(5)]
    return {"scoring_s": summary["seconds"], "score_batches": score_batches,
            "rematch_s": statistics.median(rematch)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--hw", type=int, nargs=2, help="override the scale's resolution (H W)")
    p.add_argument("--batch", type=int, help="override the scale's batch size")
    p.add_argument("--os", type=int, dest="os_", help="override the output stride")
    p.add_argument("--teacher", help="teacher arch (default: the scale's)")
    p.add_argument("--student", default="deeplabv3_resnet18")
    p.add_argument("--methods", nargs="+", default=["kd", "pcd"], choices=ALL_METHODS)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="steps per method per repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, help="run length for the %% columns "
                   "(default: the scale's student iterations)")
    p.add_argument("--rematch-every", type=int, default=500)
    p.add_argument("--score-batches", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", help="JSON path (default bench/results/step_time_<device>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    hw = tuple(args.hw) if args.hw else scale.eval_hw
    batch = args.batch or scale.batch_size
    os_ = args.os_ or scale.output_stride
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # As the training loop: bf16 autocast on CUDA when the scale trains with AMP, and cuDNN
    # picking its fastest kernels (pcd_core.reproducible does the same for non-deterministic
    # runs); on CPU both are off, as in training.
    amp_dtype = torch.bfloat16 if scale.amp and device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    teacher = build_model(args.teacher or TEACHERS[args.scale], NUM_CLASSES,
                          output_stride=os_).to(device).eval().requires_grad_(False)
    choices = {"rematch_every": args.rematch_every, "score_batches": args.score_batches}
    runners = {m: StepRunner(m, teacher=teacher, student_arch=args.student, os_=os_,
                             device=device, choices=choices, amp_dtype=amp_dtype)
               for m in args.methods}
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(batch, hw, device, gen) for _ in range(4)]
    overheads = {}
    if "pcd" in runners:
        overheads = pcd_overheads(runners["pcd"], teacher, batches, args.score_batches, sync)
        runners["pcd"].step(*batches[0], 0)  # the first forward matches; untimed
    measure_steps(runners, batches, 1, args.warmup, sync, args.rematch_every)  # warm-up, discarded
    times = measure_steps(runners, batches, args.repeats, args.steps, sync,
                          args.rematch_every)
    doc = build_report(args, hw, batch, os_, scale, times, overheads, amp_dtype)
    print(render(doc))
    out = args.out or f"bench/results/step_time_{device.type}.json"
    write_json(out, doc)
    print(f"\nwrote {out}")
    return 0


def build_report(args: argparse.Namespace, hw: tuple[int, ...], batch: int, os_: int,
                 scale: Any, times: dict[str, list[float]],
                 overheads: dict[str, Any],
                 amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items()}
    doc: dict[str, Any] = {
        "machine": machine_facts(), "device": args.device, "hw": list(hw), "batch": batch,
        "output_stride": os_, "teacher": args.teacher or TEACHERS[args.scale],
        "amp": "bf16" if amp_dtype == torch.bfloat16 else None,
        "student": args.student, "repeats": args.repeats, "steps_per_repeat": args.steps,
        "median_step_s": med, "all_step_s": times,
        "command": "python bench/step_time.py " + " ".join(sys.argv[1:]),
    }
    if "kd" in med:
        doc["ratio_to_kd"] = {k: v / med["kd"] for k, v in med.items()}
        doc["paired_ratio_to_kd"] = paired_ratios(times, args.steps)
    if overheads and "pcd" in med:
        iters = args.iterations or scale.student_iterations
        run_s = iters * med["pcd"]
        n_rematch = iters // args.rematch_every + 1
        doc["pcd_overheads"] = {
            **overheads, "run_iterations": iters, "run_estimate_s": run_s,
            "rematch_every": args.rematch_every, "rematches_per_run": n_rematch,
            "scoring_pct_of_run": 100 * overheads["scoring_s"] / run_s,
            "one_rematch_pct_of_run": 100 * overheads["rematch_s"] / run_s,
            "all_rematches_pct_of_run": 100 * n_rematch * overheads["rematch_s"] / run_s,
        }
    return doc


def paired_ratios(times: dict[str, list[float]], steps: int) -> dict[str, float]:
    """Median over repeats of (method's mean step in repeat r) / (KD's in the same repeat).

    Adjacent in time, the two share whatever load the machine had then, so a burst from a
    neighbour's test run cancels out of the ratio instead of landing on one method."""
    def per_repeat(v: list[float]) -> list[float]:
        return [statistics.fmean(v[i:i + steps]) for i in range(0, len(v), steps)]

    kd = per_repeat(times["kd"])
    return {k: statistics.median(a / b for a, b in zip(per_repeat(v), kd, strict=True))
            for k, v in times.items()}


def render(doc: dict[str, Any]) -> str:
    rows = []
    for name, s in doc["median_step_s"].items():
        ratio = doc.get("ratio_to_kd", {}).get(name)
        paired = doc.get("paired_ratio_to_kd", {}).get(name)
        rows.append([name, f"{s * 1000:.0f}", f"{ratio:.3f}" if ratio is not None else "-",
                     f"{paired:.3f}" if paired is not None else "-"])
    head = (f"step time, {doc['device']}, {doc['hw'][0]}x{doc['hw'][1]}, batch {doc['batch']}, "
            f"OS{doc['output_stride']}, teacher {doc['teacher']}, student {doc['student']}")
    text = head + "\n\n" + markdown_table(
        ["method", "median ms/step", "median / median KD", "median of paired / KD"], rows)
    ov = doc.get("pcd_overheads")
    if ov:
        text += "\n\n" + markdown_table(
            ["PCD overhead", "seconds", "% of a run"],
            [["scoring pass", f"{ov['scoring_s']:.2f}", f"{ov['scoring_pct_of_run']:.2f}"],
             ["one rematch", f"{ov['rematch_s']:.4f}", f"{ov['one_rematch_pct_of_run']:.3f}"],
             [f"all {ov['rematches_per_run']} rematches",
              f"{ov['rematch_s'] * ov['rematches_per_run']:.3f}",
              f"{ov['all_rematches_pct_of_run']:.3f}"]])
        text += (f"\n(run = {ov['run_iterations']} iterations x PCD step = "
                 f"{ov['run_estimate_s']:.0f} s)")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
