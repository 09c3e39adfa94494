"""bench/precise_bn.py: BN statistics recomputed over the train split, and the rule's summary."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from bench import precise_bn
from bench._common import CAMVID, CAMVID_CLASSES, SCALES, TREE
from pcd_core.data.loader import build_loader

SMOKE = SCALES["smoke"]  # 48x64 frames: the whole train split in a few seconds


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"CamVid not present at {CAMVID}")
def test_recalibrated_bn_is_the_average_of_the_train_batches_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(5.0)  # what training left: must not survive
    model.eval()
    batch_means = []
    with torch.no_grad():
        for images, _ in build_loader(precise_bn.val_dataset(SMOKE, "train"), batch_size=8,
                                      shuffle=False, num_workers=0, seed=0, drop_last=False):
            batch_means.append((model[0](images).mean(dim=(0, 2, 3)), images.shape[0]))
    assert sum(n for _, n in batch_means) == 367  # every train frame, once

    out = precise_bn.recalibrated_bn(model, SMOKE)

    assert out is model and not model.training
    # cumulative average (momentum None): each batch's mean weighs equally
    expected = torch.stack([m for m, _ in batch_means]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1  # restored for any later training
    first = bn.running_var.clone()
    precise_bn.recalibrated_bn(model, SMOKE)
    assert torch.equal(bn.running_var, first)  # fixed order: the same statistics each call


def _run(method: str, seed: int, saved: float, precise: float) -> dict[str, Any]:
    def scores(miou: float) -> dict[str, Any]:
        iou = [0.0] * len(CAMVID_CLASSES)
        iou[TREE] = miou / 2
        return {"miou": miou, "per_class_iou": iou}

    return {"method": method, "seed": seed, "saved": scores(saved),
            "precise_bn": scores(precise), "record_miou": None}


def test_summary_reports_both_scorings_and_applies_the_rule() -> None:
    runs = [_run("none", 0, 0.30, 0.31), _run("none", 1, 0.34, 0.32),
            _run("pcd", 0, 0.36, 0.33), _run("pcd", 1, 0.35, 0.35)]
    s = precise_bn.summarise(runs, ["none", "kd", "pcd"])

    assert set(s["per_method"]) == {"none", "pcd"}  # no KD run: no row
    ce = s["per_method"]["none"]
    assert math.isclose(ce["saved"]["mean"], 32.0)
    assert math.isclose(ce["saved"]["sd"], math.sqrt(8.0))  # 30 and 34: s.d. 2*sqrt(2)
    assert math.isclose(ce["precise_bn"]["sd"], math.sqrt(0.5))
    assert math.isclose(ce["mean_abs_change"], 1.5)  # |+1| and |-2|
    assert s["pairs"].keys() == {"pcd-none"}
    assert s["pairs"]["pcd-none"]["saved"] == pytest.approx({0: 6.0, 1: 1.0})
    assert s["pairs"]["pcd-none"]["precise_bn"] == pytest.approx({0: 2.0, 1: 3.0})
    assert math.isclose(s["mean_abs_change"], (1 + 2 + 3 + 0) / 4)
    assert s["material"]  # 1.5 >= 1.0

    calm = precise_bn.summarise([_run("none", 0, 0.30, 0.305)], ["none"])
    assert not calm["material"] and math.isnan(calm["per_method"]["none"]["saved"]["sd"])
    text = precise_bn.render([_run("none", 0, 0.30, 0.305)], calm)
    assert "+0.50" in text and "not material" in text
