"""Per-class weights for the task loss: ``train.class_weights`` of a run spec.

Street scenes are dominated by a few classes (road, building and sky are 72 % of CamVid's
train pixels; pole 1.0 %, sign_symbol 1.2 %, pedestrian 0.6 %, bicyclist 0.3 %), so a
network trained with plain cross-entropy on a small budget can ignore the thin classes
altogether: at the cpu bench scale every teacher and every student scored exactly 0 IoU on
pole and sign_symbol (bench/README.md, "Pooled over teachers"). A teacher that never
predicts a class has nothing about it to distil. Median frequency balancing (Eigen & Fergus,
ICCV 2015; the weighting SegNet trained CamVid with) scales each class's loss by
``median(freq) / freq(c)``, where ``freq(c)`` is the class's pixels over the labelled pixels
of the images that contain it.

The weights apply to the cross-entropy terms only (main and aux): the distillation terms
follow the teacher's distribution, which is what they are there to transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pcd_core.data.validate import DatasetSummary, validate_dataset
from pcd_core.spec import RunSpec


def median_frequency_weights(class_pixels: Sequence[int],
                             image_pixels: Sequence[int]) -> list[float]:
    """``median(freq) / freq(c)`` with ``freq(c) = class_pixels[c] / image_pixels[c]``.

    The median is over the classes present in the split. A class with no pixel gets weight
    1.0: it never appears in a target, so its weight never enters the loss, and 1.0 keeps
    the list readable in ``metrics.json``.
    """
    pixels = np.asarray(class_pixels, dtype=np.float64)
    denom = np.asarray(image_pixels, dtype=np.float64)
    if pixels.shape != denom.shape:
        raise ValueError(f"{pixels.shape[0]} class counts but {denom.shape[0]} image counts")
    present = pixels > 0
    if not present.any():
        raise ValueError("no labelled pixel in the split: class frequencies are undefined")
    freq = np.ones_like(pixels)
    freq[present] = pixels[present] / denom[present]
    median = float(np.median(freq[present]))
    weights = np.ones_like(pixels)
    weights[present] = median / freq[present]
    return [float(w) for w in weights]


def summary_weights(summary: DatasetSummary) -> list[float]:
    """Median frequency weights of a split that ``validate_dataset`` has summarised."""
    return median_frequency_weights(summary.class_pixel_counts, summary.class_image_pixels)


def resolve_class_weights(spec: RunSpec) -> list[float] | None:
    """The CE class weights a run trains with: None (unweighted), the spec's own list, or
    median frequency weights counted over the train split (``validate_dataset`` decodes
    every image and label once: 0.8 s for CamVid's 367 frames on two cores)."""
    choice = spec.train.class_weights
    if choice == "none":
        return None
    if choice == "median_frequency":
        return summary_weights(validate_dataset(spec.dataset, spec.dataset.train_split))
    return [float(w) for w in choice]


__all__ = ["median_frequency_weights", "resolve_class_weights", "summary_weights"]
