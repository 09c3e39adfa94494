"""``validate_dataset``: check a split before training, and summarise it.

Everything a job can get wrong about its data is caught here, at job start, with a
:class:`DatasetError` naming the file: no images, unpaired stems (at listing), unreadable
images or labels, RGB labels, image/label size mismatch, label values outside
``[0, num_classes)`` or ``ignore_index``. Every image and label is decoded (a truncated JPEG
fails only when decoded); decoding runs in a thread pool because PIL releases the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pcd_core.data.dataset import FileSource, Source, build_source
from pcd_core.data.errors import DatasetError
from pcd_core.spec import DatasetSpec


@dataclass
class DatasetSummary:
    """What a split holds. ``class_pixel_counts[k]``: pixels of class k over all labels;
    ``class_image_pixels[k]``: labelled (not ignored) pixels of the labels that contain
    class k, the denominator of median frequency balancing (``data.class_weights``)."""

    split: str
    format: str
    num_images: int
    class_pixel_counts: list[int]
    ignore_pixels: int
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # distinct (H, W)
    class_image_pixels: list[int] = field(default_factory=list)

    @property
    def missing_classes(self) -> list[int]:
        """Classes with no pixel in the split (worth a warning: their IoU is undefined)."""
        return [k for k, n in enumerate(self.class_pixel_counts) if n == 0]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        d["missing_classes"] = self.missing_classes
        return d


def _check_item(source: Source, index: int,
                spec: DatasetSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """(value histogram of the label, (H, W)); raises DatasetError naming the file."""
    _, label = source.load(index)  # decodes both and checks their sizes agree
    flat = label.reshape(-1)
    if flat.size and flat.min() < 0:
        raise DatasetError(f"label {_label_name(source, index)} has negative values")
    hist = np.bincount(flat)  # (max value + 1,)
    valid = np.zeros(hist.shape[0], dtype=bool)
    valid[: spec.num_classes] = True
    if spec.ignore_index < hist.shape[0]:
        valid[spec.ignore_index] = True
    bad = np.nonzero((hist > 0) & ~valid)[0]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8])
        raise DatasetError(
            f"label {_label_name(source, index)} has values {shown} outside "
            f"[0, {spec.num_classes}) and ignore_index {spec.ignore_index}",
            path=_label_name(source, index))
    return hist, (int(label.shape[0]), int(label.shape[1]))


def _label_name(source: Source, index: int) -> str:
    if isinstance(source, FileSource):
        return str(source.samples[index].label)
    return source.name(index)


def validate_dataset(spec: DatasetSpec, split: str, *, max_threads: int | None = None,
                     on_item: Callable[[], object] | None = None) -> DatasetSummary:
    """Decode and check every item of ``split``; return its :class:`DatasetSummary`.

    ``on_item`` is called after each checked item: a caller that watches for stalls (the
    service's worker) sees a long scan of a big dataset as progress, not silence.

    Raises :class:`DatasetError` (code ``dataset_empty`` for no images) naming the first
    offending file in sorted order, so the message is the same however threads interleave.
    """
    source = build_source(spec, split)
    n = len(source)
    if n == 0:
        raise DatasetError(f"split {split!r} of {spec.uri} has no images", path=spec.uri,
                           code="dataset_empty")
    threads = max_threads or min(8, os.cpu_count() or 1)
    k = spec.num_classes
    counts = np.zeros(max(k, spec.ignore_index + 1), dtype=np.int64)
    image_pixels = np.zeros(k, dtype=np.int64)
    sizes: set[tuple[int, int]] = set()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # map yields in index order and re-raises an item's error when reaching it.
        for hist, size in pool.map(lambda i: _check_item(source, i, spec), range(n)):
            counts[: hist.shape[0]] += hist
            labelled = hist[:k]  # this label's class histogram, ignore excluded
            image_pixels[: labelled.shape[0]][labelled > 0] += labelled.sum()
            sizes.add(size)
            if on_item is not None:
                on_item()
    return DatasetSummary(
        split=split, format=spec.format, num_images=n,
        class_pixel_counts=[int(c) for c in counts[:k]],
        ignore_pixels=int(counts[spec.ignore_index]), image_sizes=sorted(sizes),
        class_image_pixels=[int(c) for c in image_pixels],
    )
