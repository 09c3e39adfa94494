"""A finished PCD run's scoring pass can be replayed from its spec alone.

bench/kept_overlap.py relies on it to say how far an ablation's runs moved from the
default's: it recomputes each run's kept channels at other scoring budgets, and the replay at
the run's own budget must give exactly the channels the run trained with.
"""

from __future__ import annotations

from pathlib import Path

from train_helpers import make_spec, pcd_dict, spec_dict

from bench.kept_overlap import overlap
from pcd_core import distributed as D
from pcd_core.train import run

ONLY_WEIGHTS = ("safetensors",)


def test_replayed_scoring_gives_the_trained_kept_channels(data_root: Path, tmp_path: Path,
                                                          one_thread: None) -> None:
    run(make_spec(spec_dict(data_root, iterations=1)), tmp_path / "t", export_formats=ONLY_WEIGHTS)
    d = pcd_dict(data_root, tmp_path / "t", iterations=1)
    d["method"]["keep"] = 4  # half the teacher's 8 tap channels: the choice is not trivial
    run(make_spec(d), tmp_path / "s", export_formats=ONLY_WEIGHTS)
    info = D.setup("cpu")
    row = overlap(tmp_path / "s", [2, 1, 2], info)  # the run's own budget is 2
    assert row["recomputed_equals_trained"] is True
    assert row["kept"] == 4
    assert list(row["shared_with_first"]) == ["1"]  # a repeated budget is not compared
    assert 0 <= row["shared_with_first"]["1"] <= 4
