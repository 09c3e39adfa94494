"""Segmentation data: formats on disk, transforms, loaders, validation, synthetic scenes.

Public surface (CONTRACTS.md, pcd_core.data): :func:`build_dataset`, :func:`build_loader`,
:func:`validate_dataset`, :func:`write_synthetic_dataset`, plus :class:`DatasetError`,
:class:`DatasetSummary` and :func:`infinite_batches`.
"""

from pcd_core.data.dataset import SegmentationDataset, build_dataset
from pcd_core.data.errors import DatasetError
from pcd_core.data.formats import CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_IDS
from pcd_core.data.loader import build_loader, infinite_batches, seed_worker
from pcd_core.data.synthetic import synthetic_class_names, write_synthetic_dataset
from pcd_core.data.validate import DatasetSummary, validate_dataset

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "DatasetError",
    "DatasetSummary",
    "SegmentationDataset",
    "build_dataset",
    "build_loader",
    "infinite_batches",
    "seed_worker",
    "synthetic_class_names",
    "validate_dataset",
    "write_synthetic_dataset",
]
