"""bench/ablate.py: which alternatives a ``--variants`` selection starts.

A lane that asks for ``method.adapter=True`` must not also start the multi-field
alternatives that merely contain that pair: each one is seven CPU minutes a seed.
"""

from __future__ import annotations

from bench.ablate import parse_args, plan


def _selected(*argv: str) -> list[dict[str, object]]:
    args = parse_args(["--seeds", "0", *argv])
    return [ov for _group, ov, _seed in plan(args)]


def test_a_variant_is_selected_only_when_all_its_pairs_are_named() -> None:
    assert _selected("--groups", "adapter", "--variants", "method.adapter=True") == [
        {}, {"method.adapter": True}]
    both = _selected("--groups", "adapter", "weight_schedule", "--variants",
                     "method.adapter=True", "method.weight_schedule=constant")
    assert both == [{}, {"method.adapter": True}, {}, {"method.weight_schedule": "constant"},
                    {"method.weight_schedule": "constant", "method.adapter": True}]


def test_no_selection_runs_the_whole_group_default_first() -> None:
    assert _selected("--groups", "match") == [{}, {"method.match": "identity"}]
