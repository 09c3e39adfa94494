"""bench/pool.py: gains pooled over (teacher, seed) pairs, never across specs or teachers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import pool
from bench._common import TREE, metric_value

STUDENT = "deeplabv3_resnet18"


def run(method: str, seed: int, miou: float, spec_hash: str | None = None,
        iterations: int | None = None, weights: str = "none",
        teacher_seed: int = 0) -> dict[str, Any]:
    wanted = pool.current_hashes("cpu", [{"student": STUDENT, "method": method, "seed": seed}],
                                 iterations, weights, teacher_seed)
    return {"student": STUDENT, "method": method, "seed": seed, "miou": miou,
            "thin_miou": miou / 10, "spec_hash": spec_hash or wanted[(STUDENT, method, seed)]}


def doc(teacher: float, runs: list[dict[str, Any]], iterations: int | None = None
        ) -> dict[str, Any]:
    d: dict[str, Any] = {"scale": "cpu", "teacher": {"miou": teacher}, "runs": runs}
    if iterations is not None:
        d["scale_config"] = {"student_iterations": iterations}
    return d


def test_pairs_are_within_a_teacher_and_a_seed() -> None:
    docs = [("a.json", doc(0.46, [run("none", 0, 0.30), run("pcd", 0, 0.33),
                                  run("none", 1, 0.28), run("pcd", 1, 0.29)])),
            ("b.json", doc(0.47, [run("none", 0, 0.40), run("pcd", 0, 0.45),
                                  run("pcd", 1, 0.99)]))]  # no CE for seed 1: unpaired
    runs, left_out, sources = pool.load_runs(docs, "cpu")
    gain = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    assert gain is not None
    assert (gain["pairs"], gain["teachers"], gain["ahead"]) == (3, 2, 3)
    assert gain["mean"] == pytest.approx((3 + 1 + 5) / 3)
    assert gain["se"] == pytest.approx(2 / math.sqrt(3))  # stdev of 3, 1, 5 is 2
    assert [t["mean"] for t in gain["per_teacher"]] == pytest.approx([2.0, 5.0])
    # each teacher once: the mean of 2 and 5, s.e. stdev(2, 5) / sqrt(2) = 1.5
    assert gain["teacher_mean"] == pytest.approx(3.5)
    assert gain["teacher_se"] == pytest.approx(1.5)
    # two teachers: t(0.975, 1 degree of freedom) = 12.706, so 3.5 ± 12.706 * 1.5
    assert gain["teacher_ci95"] == pytest.approx([3.5 - 19.0593, 3.5 + 19.0593], abs=1e-3)
    assert left_out == {"a.json": 0, "b.json": 0} and sources == {0.46: ["a.json"],
                                                                  0.47: ["b.json"]}
    assert pool.pooled_gain(runs, STUDENT, "cwd", "none", "miou", 400) is None


def test_runs_of_another_spec_are_left_out_and_counted() -> None:
    docs = [("a.json", doc(0.46, [run("none", 0, 0.30), run("pcd", 0, 0.33),
                                  run("pcd", 1, 0.50, spec_hash="0" * 64),
                                  run("none", 1, 0.28)]))]
    runs, left_out, _ = pool.load_runs(docs, "cpu")
    gain = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    assert gain is not None and gain["pairs"] == 1 and left_out == {"a.json": 1}


def test_a_longer_student_budget_pools_on_its_own_rows() -> None:
    long = [run("none", 0, 0.35, iterations=800), run("pcd", 0, 0.40, iterations=800)]
    assert long[0]["spec_hash"] != run("none", 0, 0.35)["spec_hash"]
    docs = [("a.json", doc(0.46, [run("none", 0, 0.30), run("pcd", 0, 0.31)])),
            ("b.json", doc(0.46, long, iterations=800)),
            # 400-iteration hashes in an 800-iteration file are another spec: left out
            ("c.json", doc(0.46, [run("none", 1, 0.30)], iterations=800))]
    runs, left_out, _ = pool.load_runs(docs, "cpu")
    short = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    longer = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 800)
    assert short is not None and longer is not None
    assert (short["pairs"], short["mean"]) == (1, pytest.approx(1.0))
    assert (longer["pairs"], longer["mean"]) == (1, pytest.approx(5.0))
    assert left_out == {"a.json": 0, "b.json": 0, "c.json": 1}


def test_class_weighted_tables_pool_apart_from_unweighted_ones() -> None:
    weighted = [run("none", 0, 0.33, weights="median_frequency"),
                run("pcd", 0, 0.40, weights="median_frequency")]
    assert weighted[0]["spec_hash"] != run("none", 0, 0.33)["spec_hash"]
    mf = {"scale": "cpu", "teacher": {"miou": 0.45}, "runs": weighted,
          "scale_config": {"class_weights": "median_frequency"}}
    docs = [("a.json", doc(0.46, [run("none", 0, 0.30), run("pcd", 0, 0.31)])), ("mf.json", mf)]
    plain_runs, plain_left, plain_sources = pool.load_runs(docs, "cpu")
    mf_runs, mf_left, mf_sources = pool.load_runs(docs, "cpu", "median_frequency")
    plain_gain = pool.pooled_gain(plain_runs, STUDENT, "pcd", "none", "miou", 400)
    mf_gain = pool.pooled_gain(mf_runs, STUDENT, "pcd", "none", "miou", 400)
    assert plain_gain is not None and mf_gain is not None
    assert (plain_gain["pairs"], plain_gain["mean"]) == (1, pytest.approx(1.0))
    assert (mf_gain["pairs"], mf_gain["mean"]) == (1, pytest.approx(7.0))
    assert list(plain_sources) == [0.46] and list(mf_sources) == [0.45]
    assert plain_left == {"a.json": 0} and mf_left == {"mf.json": 0}


def test_a_table_of_another_teacher_seed_pools_as_another_teacher() -> None:
    seed1 = [run("none", 0, 0.30, teacher_seed=1), run("pcd", 0, 0.36, teacher_seed=1)]
    assert seed1[1]["spec_hash"] != run("pcd", 0, 0.36)["spec_hash"]  # another teacher
    other = {"scale": "cpu", "teacher": {"miou": 0.44}, "runs": seed1,
             "scale_config": {"teacher_seed": 1}}
    docs = [("a.json", doc(0.46, [run("none", 0, 0.30), run("pcd", 0, 0.31)])),
            ("seed1.json", other),
            # a seed-1 student in a seed-0 file was trained against another teacher
            ("c.json", doc(0.46, [run("pcd", 0, 0.31), run("pcd", 1, 0.36, teacher_seed=1)]))]
    runs, left_out, sources = pool.load_runs(docs, "cpu")
    gain = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    assert gain is not None
    assert (gain["pairs"], gain["teachers"]) == (2, 2)
    assert gain["mean"] == pytest.approx((1 + 6) / 2)
    assert left_out == {"a.json": 0, "seed1.json": 0, "c.json": 1}
    assert sources == {0.46: ["a.json", "c.json"], 0.44: ["seed1.json"]}


def test_the_gain_without_tree_skips_tree_and_runs_without_per_class_scores() -> None:
    tree = TREE

    def per_class(rest: float, tree_iou: float) -> list[float]:
        return [tree_iou if i == tree else rest for i in range(11)]

    ce, pcd = run("none", 0, 0.30), run("pcd", 0, 0.36)
    ce["per_class_iou"], pcd["per_class_iou"] = per_class(0.30, 0.0), per_class(0.31, 0.60)
    # seed 1 has no per-class scores: it pairs on mIoU, not on the mean without tree
    docs = [("a.json", doc(0.46, [ce, pcd, run("none", 1, 0.28), run("pcd", 1, 0.30)]))]
    runs, _, _ = pool.load_runs(docs, "cpu")
    whole = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    rest = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou_without_tree", 400)
    assert whole is not None and rest is not None
    assert whole["pairs"] == 2 and rest["pairs"] == 1
    assert rest["mean"] == pytest.approx(1.0)  # tree's 0 -> 60 is gone; the other ten +1 each
    assert metric_value(run("pcd", 0, 0.3), "miou_without_tree") is None


def test_a_table_printed_twice_counts_once_and_must_agree() -> None:
    same = [run("none", 0, 0.30), run("pcd", 0, 0.33)]
    runs, _, sources = pool.load_runs([("a.json", doc(0.46, same)),
                                       ("b.json", doc(0.46, same))], "cpu")
    gain = pool.pooled_gain(runs, STUDENT, "pcd", "none", "miou", 400)
    assert gain is not None and gain["pairs"] == 1 and sources == {0.46: ["a.json", "b.json"]}
    with pytest.raises(SystemExit, match="disagree"):
        pool.load_runs([("a.json", doc(0.46, same)),
                        ("b.json", doc(0.46, [run("none", 0, 0.31)]))], "cpu")


def test_main_writes_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    src = tmp_path / "accuracy_cpu_x.json"
    src.write_text(json.dumps(doc(0.46, [run("none", 0, 0.30), run("kd", 0, 0.32)])))
    out = tmp_path / "pooled.json"
    assert pool.main([str(src), "--out", str(out)]) == 0
    row = "| deeplabv3_resnet18 | 400 | KD - CE | miou | 1 | 1 | +2.00 |"
    assert row in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert [g["mean"] for g in written["gains"] if g["metric"] == "miou"] == pytest.approx([2.0])


def test_per_class_gains_pair_each_class_and_print_a_class_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ce, kd = run("none", 0, 0.30), run("kd", 0, 0.32)
    ce["per_class_iou"] = [0.5] * 11
    kd["per_class_iou"] = [0.5] * 11
    kd["per_class_iou"][TREE] = 0.8  # only tree moves
    assert metric_value(kd, "iou_tree") == pytest.approx(0.8)
    assert metric_value(run("kd", 0, 0.3), "iou_sky") is None
    src = tmp_path / "accuracy_cpu_x.json"
    src.write_text(json.dumps(doc(0.46, [ce, kd])))
    out = tmp_path / "pooled.json"
    assert pool.main([str(src), "--out", str(out), "--per-class"]) == 0
    printed = capsys.readouterr().out
    assert "| class | deeplabv3_resnet18 400: KD - CE |" in printed
    assert "| tree | +30.00 (1/1) |" in printed and "| sky | +0.00 (0/1) |" in printed
    written = json.loads(out.read_text())
    by_metric = {g["metric"]: g["mean"] for g in written["per_class_gains"]}
    assert len(by_metric) == 11
    assert by_metric["iou_tree"] == pytest.approx(30.0)
    assert by_metric["iou_road"] == pytest.approx(0.0)
    # without the flag the file keeps its old shape
    assert pool.main([str(src), "--out", str(out)]) == 0
    assert "per_class_gains" not in json.loads(out.read_text())


def test_the_95_interval_is_students_t_over_teachers_and_undefined_for_one() -> None:
    # five teachers, 4 degrees of freedom: t = 2.7764
    assert pool.interval95(2.0, 0.5, 5) == pytest.approx([2.0 - 1.3882, 2.0 + 1.3882],
                                                         abs=1e-4)
    assert all(math.isnan(v) for v in pool.interval95(2.0, float("nan"), 1))
    assert pool.interval_text([-0.2, 1.875]) == "[-0.20, +1.88]"
    assert pool.interval_text(pool.interval95(2.0, float("nan"), 1)) == ""
