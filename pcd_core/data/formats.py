"""Dataset formats on disk: which (image, label) files make a split, and how labels decode.

Formats (``DatasetSpec.format``):

- ``folder``: ``<root>/<split>/images/<stem>.{jpg,jpeg,png}`` and
  ``<root>/<split>/labels/<stem>.png``; label pixels are class indices as stored (CamVid).
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; labelIds map to the 19 trainIds
  through :data:`CITYSCAPES_TRAIN_IDS`, every other id to ``ignore_index``.
- ``voc``: ``ImageSets/Segmentation/<split>.txt`` lists stems; ``JPEGImages/<stem>.jpg`` and
  ``SegmentationClass/<stem>.png`` (palette PNGs: the palette *indices* are the classes,
  never the RGB colours); index 255 (object outlines) becomes ``ignore_index``.

``synthetic`` has no files; see :mod:`pcd_core.data.synthetic`.

Listing fails early with a :class:`DatasetError` naming the file when an image has no label
or a label no image: a mismatched archive must fail at job start, not hours later.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pcd_core.data.errors import DatasetError
from pcd_core.spec import DatasetSpec

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
VOC_BOUNDARY = 255

# Cityscapes (labelId, trainId, name) for the 19 evaluated classes, as in the official
# cityscapesScripts labels.py; every labelId absent from this table is ignored.
CITYSCAPES_TRAIN_IDS: tuple[tuple[int, int, str], ...] = (
    (7, 0, "road"), (8, 1, "sidewalk"), (11, 2, "building"), (12, 3, "wall"),
    (13, 4, "fence"), (17, 5, "pole"), (19, 6, "traffic light"), (20, 7, "traffic sign"),
    (21, 8, "vegetation"), (22, 9, "terrain"), (23, 10, "sky"), (24, 11, "person"),
    (25, 12, "rider"), (26, 13, "car"), (27, 14, "truck"), (28, 15, "bus"),
    (31, 16, "train"), (32, 17, "motorcycle"), (33, 18, "bicycle"),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for _, _, name in CITYSCAPES_TRAIN_IDS)


@dataclass(frozen=True)
class Sample:
    """One image and its label map on disk."""

    stem: str
    image: Path
    label: Path


def resolve_root(uri: str) -> Path:
    """A local directory from a ``DatasetSpec.uri`` (plain path or ``file://``).

    Remote URIs (``s3://``, ``upload:``) are the service's business: the worker downloads
    them first and hands pcd_core a local path, so they are refused here.
    """
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path or path.startswith("upload:"):
        raise DatasetError(
            f"dataset uri {uri!r} is not a local path; fetch it to a directory first", path=uri
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory",
                           path=root, code="dataset_empty")
    return root


def list_samples(spec: DatasetSpec, split: str) -> list[Sample]:
    """Every (image, label) pair of ``split``, sorted by stem; raises :class:`DatasetError`."""
    root = resolve_root(spec.uri)
    if spec.format == "folder":
        samples = _folder(root, split)
    elif spec.format == "cityscapes":
        samples = _cityscapes(root, split)
    elif spec.format == "voc":
        samples = _voc(root, split)
    else:
        raise DatasetError(f"format {spec.format!r} has no files to list")
    return sorted(samples, key=lambda s: s.stem)


def _by_stem(paths: Iterable[Path], key: Callable[[Path], str]) -> dict[str, Path]:
    """``{key(path): path}``; two files with one stem (``a.jpg``, ``a.png``) are an error."""
    out: dict[str, Path] = {}
    for p in sorted(paths):
        stem = key(p)
        if stem in out:
            raise DatasetError(f"two files for stem {stem!r}: {out[stem]} and {p}", path=p)
        out[stem] = p
    return out


def _pair(images: dict[str, Path], labels: dict[str, Path], image_dir: Path,
          expected_label: dict[str, Path]) -> list[Sample]:
    """Join images and labels by stem, naming the first orphan (and how many more)."""
    if not images:
        raise DatasetError(f"no images in {image_dir}", path=image_dir, code="dataset_empty")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        s = no_label[0]
        more = f" (and {len(no_label) - 1} more)" if len(no_label) > 1 else ""
        raise DatasetError(f"image {images[s]} has no label (expected {expected_label[s]})"
                           f"{more}", path=images[s])
    no_image = sorted(set(labels) - set(images))
    if no_image:
        s = no_image[0]
        more = f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""
        raise DatasetError(f"label {labels[s]} has no image in {image_dir}{more}",
                           path=labels[s])
    return [Sample(s, images[s], labels[s]) for s in images]


def _stem(p: Path) -> str:
    return p.stem


def _folder(root: Path, split: str) -> list[Sample]:
    image_dir, label_dir = root / split / "images", root / split / "labels"
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DatasetError(f"missing directory {d} (folder format: <root>/<split>/images "
                               f"and <root>/<split>/labels)", path=d, code="dataset_empty")
    images = _by_stem((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS),
                      _stem)
    labels = _by_stem((p for p in label_dir.iterdir() if p.suffix.lower() == ".png"), _stem)
    expected = {s: label_dir / f"{s}.png" for s in images}
    return _pair(images, labels, image_dir, expected)


def _cityscapes(root: Path, split: str) -> list[Sample]:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_dir.is_dir():
        raise DatasetError(f"missing directory {image_dir}", path=image_dir,
                           code="dataset_empty")
    img_sfx, lbl_sfx = "_leftImg8bit.png", "_gtFine_labelIds.png"
    # The city folder is part of the key: stems are unique across cities in practice,
    # but keying by "city/stem" keeps a misplaced file from pairing across cities.
    def key(sfx: str) -> Callable[[Path], str]:
        return lambda p: f"{p.parent.name}/{p.name[: -len(sfx)]}"

    images = _by_stem(image_dir.glob(f"*/*{img_sfx}"), key(img_sfx))
    labels = _by_stem(label_dir.glob(f"*/*{lbl_sfx}"), key(lbl_sfx))
    expected = {k: label_dir / f"{k}{lbl_sfx}" for k in images}
    return _pair(images, labels, image_dir, expected)


def _voc(root: Path, split: str) -> list[Sample]:
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"missing split list {list_file}", path=list_file,
                           code="dataset_empty")
    stems = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not stems:
        raise DatasetError(f"no images listed in {list_file}", path=list_file,
                           code="dataset_empty")
    samples = []
    for stem in stems:
        image = root / "JPEGImages" / f"{stem}.jpg"
        label = root / "SegmentationClass" / f"{stem}.png"
        if not image.is_file():
            raise DatasetError(f"image {image} listed in {list_file} does not exist",
                               path=image)
        if not label.is_file():
            raise DatasetError(f"image {image} has no label (expected {label})", path=image)
        samples.append(Sample(stem, image, label))
    return samples


@functools.lru_cache(maxsize=8)
def cityscapes_lut(ignore_index: int) -> np.ndarray:
    """(256,) int64 lookup table labelId -> trainId, ``ignore_index`` elsewhere."""
    lut = np.full(256, ignore_index, dtype=np.int64)
    for label_id, train_id, _ in CITYSCAPES_TRAIN_IDS:
        lut[label_id] = train_id
    lut.setflags(write=False)
    return lut


def read_image(path: Path) -> Image.Image:
    """Decode an RGB image (fully, so a truncated file fails here, naming itself)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}", path=path) from exc


def read_label(path: Path, fmt: str, ignore_index: int) -> np.ndarray:
    """Decode a label map to class indices (H, W), integer dtype, in the spec's index space.

    Palette ("P") PNGs are read as their indices. RGB labels are refused: colour-coded
    labels need a colour table that the folder format does not carry.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise DatasetError(f"label {path} has mode {im.mode}; expected a single-channel"
                                   " PNG of class indices (palette or greyscale)", path=path)
            arr = np.asarray(im)
    except DatasetError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read label {path}: {exc}", path=path) from exc
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if fmt == "cityscapes":
        if arr.dtype != np.uint8:
            raise DatasetError(f"label {path}: Cityscapes labelIds must be 8-bit", path=path)
        return cityscapes_lut(ignore_index)[arr]
    if fmt == "voc" and ignore_index != VOC_BOUNDARY:
        arr = arr.astype(np.int64)
        arr[arr == VOC_BOUNDARY] = ignore_index
    return arr
