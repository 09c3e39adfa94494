"""bench/ablate.py: which alternatives a ``--variants`` selection starts.

A lane that asks for ``method.adapter=True`` must not also start the multi-field
alternatives that merely contain that pair: each one is seven CPU minutes a seed.
"""

from __future__ import annotations

import pytest

from bench.ablate import PREVIOUS_DEFAULT, parse_args, plan, variant_name


def _selected(*argv: str) -> list[dict[str, object]]:
    args = parse_args(["--seeds", "0", *argv])
    return [ov for _group, ov, _seed in plan(args)]


def test_a_variant_is_selected_only_when_all_its_pairs_are_named() -> None:
    assert _selected("--groups", "adapter", "--variants", "method.adapter=True") == [
        {}, {"method.adapter": True}]
    both = _selected("--groups", "adapter", "weight_schedule", "--variants",
                     "method.adapter=True", "method.keep=256",
                     "method.weight_schedule=linear_decay")
    assert both == [{}, {"method.adapter": True}, {"method.adapter": True, "method.keep": 256},
                    {}, {"method.weight_schedule": "linear_decay"}]


def test_an_item_with_commas_selects_exactly_that_alternative() -> None:
    three = "method.weight=3.0,method.weight_schedule=linear_decay,method.logit_kd_weight=0.0"
    assert _selected("--groups", "logit_kd", "--variants", three) == [
        {}, {"method.weight": 3.0, "method.weight_schedule": "linear_decay",
             "method.logit_kd_weight": 0.0}]
    # the same pairs named one by one also select the alternatives made of fewer of them
    assert len(_selected("--groups", "logit_kd", "--variants", *three.split(","))) == 3
    assert _selected("--groups", "logit_kd", "--variants", "method.weight=3.0,x=1") == [{}]


def test_no_selection_runs_the_whole_group_default_first() -> None:
    assert _selected("--groups", "match") == [{}, {"method.match": "identity"}]


def test_a_baseline_is_ablated_under_its_own_name_with_its_own_groups() -> None:
    assert _selected("--method", "kd", "--groups", "weight_schedule") == [
        {}, {"method.weight_schedule": "linear_decay"}]
    ov = {"method.weight_schedule": "linear_decay"}
    assert variant_name("r18", ov, 1, "kd") == "r18-kd-weight_schedule=linear_decay-s1"
    assert variant_name("r18", {}, 1, "kd") is None  # the default IS accuracy.py's KD run


def test_a_group_the_method_does_not_have_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--method", "kd", "--groups", "adapter"])


def test_the_previous_pcd_default_keeps_accuracy_pys_name_and_so_its_old_hash() -> None:
    assert variant_name("r18", PREVIOUS_DEFAULT, 0) is None
    assert variant_name("r18", {"method.weight": 3.0}, 0) == "r18-pcd-weight=3.0-s0"


def test_twice_the_kd_term_is_ablated_on_pcd_and_on_the_kd_baseline_alike() -> None:
    assert _selected("--groups", "logit_kd", "--variants", "method.logit_kd_weight=2.0") == [
        {}, {"method.logit_kd_weight": 2.0}]
    assert _selected("--method", "kd", "--groups", "weight", "--variants",
                     "method.weight=2.0") == [{}, {"method.weight": 2.0}]
    assert variant_name("r18", {"method.weight": 2.0}, 3, "kd") == "r18-kd-weight=2.0-s3"


def test_the_without_tree_gap_ignores_tree_and_skips_records_without_classes() -> None:
    from bench._common import TREE, paired_delta
    from bench.ablate import _percent

    classes = [0.5] * 11
    base = {0: {"miou": 0.5, "per_class_iou": classes}, 1: {"miou": 0.4}}
    tree_only = [*classes]
    tree_only[TREE] = 0.9
    mine = {0: {"miou": 0.55, "per_class_iou": tree_only}, 1: {"miou": 0.45}}
    assert paired_delta(*_percent("miou", mine, base))["n"] == 2
    without_tree = paired_delta(*_percent("miou_without_tree", mine, base))
    assert without_tree["n"] == 1  # seed 1 has no per-class scores
    assert without_tree["mean"] == pytest.approx(0.0)
