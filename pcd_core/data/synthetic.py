"""Deterministic synthetic street-like scenes: for tests, smoke runs and the service's e2e tests.

A scene has a background, large regions (a ground band below a wavy horizon, ellipses), thin
objects (1-3 px vertical poles and a slanted 1-2 px wire) and small objects (blobs of radius
1-3 px), each of its own class. Pixels take a fixed class colour (distinct hues, alternating
brightness), a per-scene gain and Gaussian noise, so a small network can learn the classes
from colour while the thin and small ones still stress boundaries.

Class roles for ``num_classes = K`` (:func:`synthetic_class_names`): 0 background; then
``region`` classes; the last two are ``thin`` and ``small`` when K >= 4 (K = 3: the last is
``thin``; K = 2: background and one region). Labels never contain an ignore value.

Scene ``i`` of a split is a pure function of ``(seed, split, i, num_classes, size)``, so the
in-memory ``synthetic`` format and the PNGs of :func:`write_synthetic_dataset` are identical.

In-memory format URIs: ``DatasetSpec(format="synthetic")`` reads its counts from the query of
``uri``: ``synthetic://?n_train=64&n_val=16&size=96x128&seed=0`` (every key optional, these are
the defaults; anything before ``?`` is ignored). Splits are ``train`` and ``val``.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image

from pcd_core.data.errors import DatasetError

SPLIT_CODES = {"train": 0, "val": 1}
NOISE_STD = 10.0  # grey levels of per-pixel Gaussian noise


def synthetic_class_names(num_classes: int) -> list[str]:
    """Names giving each class's role: ``background``, ``region1``.., ``thin``, ``small``."""
    if num_classes < 2:
        raise ValueError("synthetic scenes need at least 2 classes")
    tail = ["thin", "small"] if num_classes >= 4 else ["thin"] if num_classes == 3 else []
    n_regions = num_classes - 1 - len(tail)
    return ["background", *(f"region{i + 1}" for i in range(n_regions)), *tail]


def class_colours(num_classes: int) -> np.ndarray:
    """(K, 3) float32 RGB in [0, 255]: grey background, then evenly spaced hues whose
    brightness alternates so that neighbours in hue still differ in value."""
    colours = [(110.0, 110.0, 110.0)]
    for k in range(1, num_classes):
        value = 0.95 if k % 2 else 0.6
        r, g, b = colorsys.hsv_to_rgb((k - 1) / max(num_classes - 1, 1), 0.75, value)
        colours.append((r * 255, g * 255, b * 255))
    return np.asarray(colours, dtype=np.float32)


def _disk(label: np.ndarray, cy: float, cx: float, ry: float, rx: float, k: int) -> None:
    """Paint an axis-aligned ellipse of class ``k`` (in place, clipped to the frame)."""
    h, w = label.shape
    y0, y1 = max(int(cy - ry), 0), min(int(np.ceil(cy + ry)) + 1, h)
    x0, x1 = max(int(cx - rx), 0), min(int(np.ceil(cx + rx)) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    label[y0:y1, x0:x1][inside] = k


def render_scene(num_classes: int, size: tuple[int, int], seed: int, split: str,
                 index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split``: (image uint8 (H, W, 3), label uint8 (H, W))."""
    if split not in SPLIT_CODES:
        raise DatasetError(f"synthetic data has splits {sorted(SPLIT_CODES)}, not {split!r}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index, num_classes])
    names = synthetic_class_names(num_classes)
    regions = [k for k, n in enumerate(names) if n.startswith("region")]
    h, w = size
    label = np.zeros((h, w), dtype=np.uint8)  # (H, W) background

    # Ground: everything below a wavy horizon (the "road" of a street scene).
    xs = np.arange(w)
    horizon = h * rng.uniform(0.45, 0.7) + h * 0.08 * np.sin(
        xs / w * rng.uniform(1.0, 4.0) * np.pi + rng.uniform(0, 2 * np.pi))
    label[np.arange(h)[:, None] > horizon[None, :]] = regions[0]
    for k in regions[1:]:  # one or two ellipses per further region class
        for _ in range(int(rng.integers(1, 3))):
            _disk(label, rng.uniform(0, h), rng.uniform(0, w), h * rng.uniform(0.1, 0.3),
                  w * rng.uniform(0.1, 0.3), k)
    if "thin" in names:
        k = names.index("thin")
        for _ in range(int(rng.integers(2, 5))):  # poles: 1-3 px wide, 30-80 % of the height
            width, x = int(rng.integers(1, 4)), int(rng.integers(0, w))
            top = int(h * rng.uniform(0.1, 0.5))
            bottom = min(h, top + max(2, int(h * rng.uniform(0.3, 0.8))))
            label[top:bottom, x:x + width] = k
        # A slanted wire 1-2 px thick across the upper half.
        y_start, y_end = rng.uniform(0, h / 2, size=2)
        ys = np.round(np.linspace(y_start, y_end, w)).astype(np.int64)
        for t in range(int(rng.integers(1, 3))):
            label[np.clip(ys + t, 0, h - 1), xs] = k
    if "small" in names:
        k = names.index("small")
        for _ in range(int(rng.integers(3, 9))):  # blobs of radius 1-3 px
            r = float(rng.uniform(1.0, 3.0))
            _disk(label, rng.uniform(0, h), rng.uniform(0, w), r, r, k)

    colours = class_colours(num_classes)
    gain = rng.uniform(0.85, 1.15)
    jitter = rng.normal(0.0, 6.0, size=colours.shape)  # per-scene colour shift per class
    image = (colours + jitter)[label] * gain + rng.normal(0.0, NOISE_STD, size=(h, w, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


@dataclass(frozen=True)
class SyntheticConfig:
    """Counts and size of an in-memory synthetic dataset, parsed from ``DatasetSpec.uri``."""

    n_train: int = 64
    n_val: int = 16
    size: tuple[int, int] = (96, 128)
    seed: int = 0

    @classmethod
    def from_uri(cls, uri: str) -> SyntheticConfig:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        values: dict[str, object] = {}
        try:
            for key, value in parse_qsl(query, strict_parsing=bool(query)):
                if key in ("n_train", "n_val", "seed"):
                    values[key] = int(value)
                elif key == "size":
                    hh, ww = value.lower().split("x")
                    values[key] = (int(hh), int(ww))
                else:
                    raise DatasetError(f"unknown synthetic uri key {key!r} in {uri!r} "
                                       "(known: n_train, n_val, size, seed)", path=uri)
        except ValueError as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"bad synthetic uri {uri!r}: {exc}", path=uri) from exc
        cfg = cls(**values)  # type: ignore[arg-type]
        if min(cfg.n_train, cfg.n_val) < 0 or min(cfg.size) < 4:
            raise DatasetError(f"bad synthetic uri {uri!r}: counts >= 0, size >= 4x4", path=uri)
        return cfg

    def count(self, split: str) -> int:
        if split not in SPLIT_CODES:
            raise DatasetError(f"synthetic data has splits {sorted(SPLIT_CODES)}, not {split!r}")
        return self.n_train if split == "train" else self.n_val


def write_synthetic_dataset(
    root: str | Path, *, num_classes: int = 5, n_train: int = 16, n_val: int = 4,
    size: tuple[int, int] = (96, 128), seed: int = 0,
) -> Path:
    """Write scenes in the ``folder`` format (lossless PNG images and labels) under ``root``.

    ``root/{train,val}/{images,labels}/<0000..>.png``; deterministic in all arguments and
    equal, pixel for pixel, to ``format="synthetic"`` with the same counts, size and seed.
    Returns ``root``.
    """
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        image_dir, label_dir = root / split / "images", root / split / "labels"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = render_scene(num_classes, size, seed, split, i)
            Image.fromarray(image).save(image_dir / f"{i:04d}.png", compress_level=1)
            Image.fromarray(label).save(label_dir / f"{i:04d}.png", compress_level=1)
    return root
