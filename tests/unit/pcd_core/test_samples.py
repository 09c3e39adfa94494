"""samples.png: fixed palette (void black), evenly spread images, deterministic grid size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import HW, NUM_CLASSES, make_spec, spec_dict, write_dataset

from pcd_core.evaluate import build_eval_dataset
from pcd_core.models import build_model
from pcd_core.samples import (
    GAP,
    colorize,
    palette,
    render_samples,
    sample_indices,
    tile_size,
    write_samples,
)


def test_palette_is_fixed_distinct_and_never_black() -> None:
    colours = palette(21)
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 21
    assert not (colours == 0).all(axis=1).any()
    assert np.array_equal(palette(21), colours)
    assert tuple(colours[0]) == (128, 0, 0)  # VOC colour 1


def test_colorize_paints_ignore_and_out_of_range_black() -> None:
    colours = palette(3)
    label = np.array([[0, 1, 2], [255, 7, -1]])
    rgb = colorize(label, colours, ignore_index=255)
    assert rgb.shape == (2, 3, 3)
    assert [tuple(rgb[0, i]) for i in range(3)] == [tuple(c) for c in colours]
    assert (rgb[1] == 0).all()


def test_sample_indices_spread_over_the_split() -> None:
    assert sample_indices(100, 4) == [0, 33, 66, 99]
    assert sample_indices(3, 4) == [0, 1, 2]
    assert sample_indices(10, 1) == [0]
    assert sample_indices(0, 4) == [] and sample_indices(5, 0) == []
    assert tile_size(1024, 2048, 256) == (128, 256) and tile_size(32, 48, 256) == (32, 48)


def test_render_and_write_samples(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = write_dataset(tmp_path / "data")
    spec = make_spec(spec_dict(data))
    ds = build_eval_dataset(spec.dataset, "val", None)  # 4 images of 32x48
    torch.manual_seed(0)
    teacher = build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16, head_channels=8)
    student = build_model("deeplabv3_resnet18", NUM_CLASSES, output_stride=16, head_channels=8)
    student.train()
    kw = {"num_classes": NUM_CLASSES, "ignore_index": 255, "mean": spec.dataset.mean,
          "std": spec.dataset.std, "device": torch.device("cpu"), "n": 3}
    grid = render_samples([teacher, student], ds, **kw)
    rows, cols = 3, 4  # image | label | teacher | student
    assert grid.shape == (rows * HW[0] + (rows - 1) * GAP, cols * HW[1] + (cols - 1) * GAP, 3)
    assert student.training  # predicting does not leave the model in eval mode
    assert np.array_equal(grid, render_samples([teacher, student], ds, **kw))  # deterministic
    # the label column is the palette-coloured ground truth of the first sampled image
    _, label = ds[0]
    expected = colorize(label.numpy(), palette(NUM_CLASSES), 255)
    assert np.array_equal(grid[:HW[0], HW[1] + GAP:2 * HW[1] + GAP], expected)

    small = render_samples([student], ds, **{**kw, "max_side": 24})
    assert small.shape[:2] == (3 * 16 + 2 * GAP, 3 * 24 + 2 * GAP)
    path = write_samples(tmp_path / "samples.png", small)
    with Image.open(path) as im:
        assert (im.size, im.mode) == ((small.shape[1], small.shape[0]), "RGB")
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="no validation images"):
        render_samples([student], [], **kw)  # type: ignore[arg-type]
