"""``train.class_weights``: median frequency balancing, its spec field and its effect on a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from train_helpers import NUM_CLASSES, make_spec, spec_dict

from pcd_core.data import validate_dataset
from pcd_core.data.class_weights import median_frequency_weights, resolve_class_weights
from pcd_core.evaluate import build_eval_dataset
from pcd_core.export import load_student
from pcd_core.spec import DatasetSpec, RunSpec
from pcd_core.train import run

CAMVID = Path("/work/shared/datasets/camvid")
CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol",
                  "fence", "car", "pedestrian", "bicyclist"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_median_frequency_by_hand() -> None:
    # class 0: 90 of the 100 pixels of the images it is in (freq 0.9); class 1: 10 of 50
    # (0.2); class 2 absent. median(0.9, 0.2) = 0.55 -> 0.55/0.9, 0.55/0.2, and 1 for absent.
    w = median_frequency_weights([90, 10, 0], [100, 50, 0])
    assert w == pytest.approx([0.55 / 0.9, 0.55 / 0.2, 1.0])
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights([0, 0], [0, 0])
    with pytest.raises(ValueError, match="2 class counts but 3"):
        median_frequency_weights([1, 2], [1, 2, 3])


def test_summary_counts_the_pixels_of_the_labels_that_hold_each_class(data_root: Path) -> None:
    spec = DatasetSpec(uri=str(data_root), num_classes=NUM_CLASSES, ignore_index=255)
    summary = validate_dataset(spec, "train")
    expected = np.zeros(NUM_CLASSES, dtype=np.int64)
    for path in sorted((data_root / "train" / "labels").glob("*.png")):
        label = np.asarray(Image.open(path))
        labelled = int((label != 255).sum())
        for k in np.unique(label[label != 255]):
            expected[k] += labelled
    assert summary.class_image_pixels == expected.tolist()
    assert all(c <= i for c, i in zip(summary.class_pixel_counts, summary.class_image_pixels,
                                      strict=True))


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not present at {CAMVID}")
def test_real_camvid_weights_lift_the_thin_classes() -> None:
    d = spec_dict(CAMVID, class_weights="median_frequency")
    d["dataset"] = {"uri": str(CAMVID), "num_classes": 11, "ignore_index": 11,
                    "class_names": CAMVID_CLASSES}
    w = dict(zip(CAMVID_CLASSES, resolve_class_weights(make_spec(d)) or [], strict=True))
    # road, sky and building cover most of a frame; pole, sign, pedestrian, bicyclist little
    assert max(w["road"], w["sky"], w["building"]) < 0.5
    assert min(w["pole"], w["sign_symbol"], w["pedestrian"], w["bicyclist"]) > 2.0
    assert sorted(w.values())[5] == pytest.approx(1.0)  # the median class gets 1


def test_spec_field_checks_and_hash() -> None:
    base = spec_dict(Path("/data"))
    plain = make_spec(base)
    spelled_out = make_spec({**base, "train": {**base["train"], "class_weights": "none"}})
    weighted = make_spec({**base, "train": {**base["train"],
                                            "class_weights": "median_frequency"}})
    # the default hashes as specs did before the field existed; using it is another experiment
    assert plain.spec_hash() == spelled_out.spec_hash() != weighted.spec_hash()
    assert "class_weights" not in json.dumps(_hashed(plain))
    for bad, message in [([1.0, -1.0, 1.0, 1.0], "weight 1 is -1.0"),
                         ("median", "must be one of none, median_frequency"),
                         ([1.0, float("inf"), 1.0, 1.0], "weight 1 is inf")]:
        with pytest.raises(ValidationError, match=message) as e:
            make_spec({**base, "train": {**base["train"], "class_weights": bad}})
        assert e.value.errors()[0]["loc"] == ("train", "class_weights")
    with pytest.raises(ValidationError, match=r"train\.class_weights has 2 weights but "
                                              r"dataset\.num_classes is 4"):
        make_spec({**base, "train": {**base["train"], "class_weights": [1.0, 2.0]}})


def _hashed(spec: RunSpec) -> dict:
    from pcd_core.spec import HASH_SINCE_ADDED

    data = spec.model_dump(mode="json")
    for section, key, default in HASH_SINCE_ADDED:
        if data[section].get(key) == default:
            del data[section][key]
    return data


def _predicted_share(out: Path, data_root: Path, k: int) -> float:
    model, _ = load_student(out)
    model.eval()
    ds = build_eval_dataset(DatasetSpec(uri=str(data_root), num_classes=NUM_CLASSES), "val",
                            None)
    with torch.no_grad():
        preds = torch.cat([model(ds[i][0][None])["out"].argmax(1) for i in range(len(ds))])
    return float((preds == k).float().mean())


def test_a_heavy_class_weight_pulls_the_predictions_to_that_class(
        data_root: Path, tmp_path: Path) -> None:
    """Same data, seed and budget; only class 3's CE weight differs (1 vs 50)."""
    shares = {}
    for name, weights in (("plain", "none"), ("heavy", [1.0, 1.0, 1.0, 50.0])):
        spec = make_spec(spec_dict(data_root, iterations=6, class_weights=weights))
        run(spec, tmp_path / name, device="cpu", export_formats=("safetensors",), samples=0)
        shares[name] = _predicted_share(tmp_path / name, data_root, 3)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics.get("class_weights") == (None if weights == "none" else weights)
    assert shares["heavy"] > 1.5 * shares["plain"], shares  # measured: 0.13 -> 0.32


def test_median_frequency_run_records_the_weights_it_used(
        data_root: Path, tmp_path: Path) -> None:
    spec = make_spec(spec_dict(data_root, iterations=2, class_weights="median_frequency"))
    run(spec, tmp_path / "mf", device="cpu", export_formats=("safetensors",), samples=0)
    metrics = json.loads((tmp_path / "mf" / "metrics.json").read_text())
    summary = validate_dataset(spec.dataset, "train")
    assert metrics["class_weights"] == pytest.approx(
        median_frequency_weights(summary.class_pixel_counts, summary.class_image_pixels))
