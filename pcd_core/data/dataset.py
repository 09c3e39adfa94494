"""``build_dataset``: a torch Dataset over any format, with the train or eval transform.

A dataset is a *source* (decodes item ``i`` to a PIL image and an integer label array) plus
a transform. Sources are small picklable objects, so DataLoader workers (fork or spawn) get
them cheaply.

Randomness: a train item draws one 62-bit seed from torch's default generator and runs the
transform with ``numpy.random.default_rng(seed)``. In the main process that generator is the
one ``torch.manual_seed`` sets; in a DataLoader worker torch seeds it from the loader's
generator (``base_seed + worker_id``). So an item stream is reproducible from the seeds
alone, whatever ``numpy.random``/``random`` global state other code left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pcd_core.data.errors import DatasetError
from pcd_core.data.formats import Sample, list_samples, read_image, read_label
from pcd_core.data.synthetic import SyntheticConfig, render_scene
from pcd_core.data.transforms import eval_transform, train_transform
from pcd_core.spec import DatasetSpec


class Source(Protocol):
    """Decodes the items of one split."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image (W, H), integer label (H, W)) in the spec's class-index space."""
        ...


class FileSource:
    """Items of a ``folder``/``cityscapes``/``voc`` split, decoded with PIL once per item."""

    def __init__(self, samples: list[Sample], fmt: str, ignore_index: int) -> None:
        self.samples, self.fmt, self.ignore_index = samples, fmt, ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index].stem

    def path(self, index: int) -> Path:
        return self.samples[index].image

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        s = self.samples[index]
        image = read_image(s.image)
        label = read_label(s.label, self.fmt, self.ignore_index)
        if label.shape != (image.size[1], image.size[0]):
            raise DatasetError(
                f"label {s.label} is {label.shape[0]}x{label.shape[1]} but image {s.image} "
                f"is {image.size[1]}x{image.size[0]}", path=s.label)
        return image, label


class SyntheticSource:
    """In-memory scenes of :mod:`pcd_core.data.synthetic`, rendered on demand."""

    def __init__(self, cfg: SyntheticConfig, split: str, num_classes: int) -> None:
        self.cfg, self.split, self.num_classes = cfg, split, num_classes
        self.n = cfg.count(split)

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"{self.split}/{index:04d}"

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image, label = render_scene(self.num_classes, self.cfg.size, self.cfg.seed,
                                    self.split, index)
        return Image.fromarray(image), label


def build_source(spec: DatasetSpec, split: str) -> Source:
    """The format's source for ``split``; raises :class:`DatasetError` (naming the file)."""
    if spec.format == "synthetic":
        return SyntheticSource(SyntheticConfig.from_uri(spec.uri), split, spec.num_classes)
    if spec.format == "cityscapes" and spec.num_classes != 19:
        raise DatasetError(f"cityscapes has 19 train classes, the spec says {spec.num_classes}")
    return FileSource(list_samples(spec, split), spec.format, spec.ignore_index)


class SegmentationDataset(Dataset):
    """Items ``(image float32 (3, H, W) normalised, label int64 (H, W))``.

    ``train=True``: random scale, crop to ``spec.crop`` (ignore-padded), flip; every item
    has the crop size, so batches stack. ``train=False``: ``spec.resize`` + normalisation of
    the full frame (frames of different sizes then need batch size 1 or a ``resize``).
    """

    def __init__(self, source: Source, spec: DatasetSpec, *, train: bool) -> None:
        self.source, self.spec, self.train = source, spec, train

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        """The item's stem (for sample grids and error messages)."""
        return self.source.name(index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, label = self.source.load(index)
        if not self.train:
            return eval_transform(image, label, self.spec)
        seed = int(torch.randint(0, 2**62, ()))  # torch's generator: seeded per worker
        return train_transform(image, label, self.spec, np.random.default_rng(seed))


def build_dataset(spec: DatasetSpec, split: str, *, train: bool) -> SegmentationDataset:
    """The ``split`` of ``spec`` as a Dataset with the train or eval transform.

    Lists (and pairs) the files now, so a missing directory or an unpaired stem fails here
    with a :class:`DatasetError`; label *values* are checked by ``validate_dataset``.
    """
    return SegmentationDataset(build_source(spec, split), spec, train=train)
