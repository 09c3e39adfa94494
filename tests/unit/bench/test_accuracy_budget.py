"""bench/accuracy.py --student-iterations and --class-weights: each a different experiment.

The longer runs must never be mistaken for (or overwrite) the scale's own runs, and the
teacher they distil from must be the same one.
"""

from __future__ import annotations

from pathlib import Path

from bench._runs import run_dir, student_spec, teacher_spec
from bench.accuracy import parse_args, run_name, scale_of


def test_the_student_budget_changes_students_and_not_the_teacher() -> None:
    base = scale_of(parse_args([]))
    longer = scale_of(parse_args(["--student-iterations", "800"]))
    assert (base.student_iterations, longer.student_iterations) == (400, 800)
    assert teacher_spec(base, "deeplabv3_resnet50") == teacher_spec(longer, "deeplabv3_resnet50")

    t_dir = Path("runs/bench/cpu/teacher")
    short = student_spec(base, "deeplabv3_resnet18", "pcd", 0, "deeplabv3_resnet50", t_dir)
    long = student_spec(longer, "deeplabv3_resnet18", "pcd", 0, "deeplabv3_resnet50", t_dir)
    assert long.train.iterations == 800
    assert long.train.warmup_iterations == 2 * short.train.warmup_iterations
    runs = Path("runs/bench")
    assert run_dir(runs, base, short) != run_dir(runs, longer, long)


def test_no_flag_keeps_the_scale() -> None:
    args = parse_args(["--scale", "gpu"])
    assert scale_of(args).student_iterations == 1000


def test_a_longer_run_says_its_budget_in_its_name() -> None:
    assert run_name(parse_args([]), "deeplabv3_resnet18", "kd", 0) is None
    longer = parse_args(["--student-iterations", "800"])
    assert run_name(longer, "deeplabv3_resnet18", "kd", 3) == "deeplabv3_resnet18-kd-s3-it800"


def test_asking_for_the_scales_own_budget_is_the_default_run() -> None:
    same = parse_args(["--student-iterations", "400"])
    assert run_name(same, "deeplabv3_resnet18", "kd", 3) is None


def test_class_weights_change_the_whole_table_teacher_included() -> None:
    plain = scale_of(parse_args([]))
    weighted = scale_of(parse_args(["--class-weights", "median_frequency"]))
    t_plain = teacher_spec(plain, "deeplabv3_resnet50")
    t_weighted = teacher_spec(weighted, "deeplabv3_resnet50")
    assert (t_plain.train.class_weights, t_weighted.train.class_weights) == (
        "none", "median_frequency")
    runs = Path("runs/bench")
    t_dirs = run_dir(runs, plain, t_plain), run_dir(runs, weighted, t_weighted)
    assert t_dirs[0] != t_dirs[1]  # a weighted table never reuses the unweighted teacher
    for method in ("none", "kd", "pcd"):
        s = student_spec(weighted, "deeplabv3_resnet18", method, 0, "deeplabv3_resnet50",
                         t_dirs[1])
        assert s.train.class_weights == "median_frequency"


def test_a_teacher_seed_is_another_teacher_and_only_distilling_students_change() -> None:
    base = scale_of(parse_args([]))
    other = scale_of(parse_args(["--teacher-seed", "1"]))
    assert scale_of(parse_args(["--teacher-seed", "0"])) == base  # the default table
    t_base, t_other = (teacher_spec(s, "deeplabv3_resnet50") for s in (base, other))
    assert (t_base.train.seed, t_other.train.seed) == (0, 1)
    runs = Path("runs/bench")
    t_dirs = run_dir(runs, base, t_base), run_dir(runs, other, t_other)
    assert t_dirs[0] != t_dirs[1]
    for method in ("none", "kd", "pcd"):
        a, b = (student_spec(s, "deeplabv3_resnet18", method, 2, "deeplabv3_resnet50", d)
                for s, d in zip((base, other), t_dirs, strict=True))
        assert a.train.seed == b.train.seed == 2  # the student seed is the student's own
        # CE learns from no teacher: one run serves both tables; KD and PCD are new runs
        assert (a.spec_hash() == b.spec_hash()) is (method == "none")
