"""``samples.png``: a small qualitative grid of validation predictions, written at a run's end.

One row per validation image, columns ``image | label | teacher | student`` (DESIGN.md,
"Artifacts"; the teacher column only when the run has a teacher). The rows are ``n`` images
spread evenly over the (capped) validation split, so every run of a spec shows the same
images and two runs can be compared side by side. Classes get fixed colours (the PASCAL VOC
bit-interleaved palette, shifted by one so that no class is black); ignored label pixels are
black. Tiles are downscaled so their long side is at most ``max_side`` pixels, which keeps
the file small for Cityscapes-sized images. Cost: ``n`` forward passes per model.

Deterministic: no RNG is drawn (the eval transform is deterministic, the models run in eval
mode), and the PNG depends only on the weights and the images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

GAP = 2  # pixels of white between tiles
GAP_VALUE = 255


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8: class k gets VOC colour k+1 (VOC's 0 is black, kept for void).

    The VOC scheme gives 255 distinct non-black colours; beyond that they repeat.
    """
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, r, g, b = k % 255 + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def colorize(label: np.ndarray, colours: np.ndarray, ignore_index: int | None) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; ``ignore_index`` and out-of-range pixels are
    black."""
    label = np.asarray(label, dtype=np.int64)
    valid = (label >= 0) & (label < len(colours))
    if ignore_index is not None:
        valid &= label != ignore_index
    rgb = np.zeros((*label.shape, 3), dtype=np.uint8)
    rgb[valid] = colours[label[valid]]
    return rgb


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) float image (see ``pcd_core.data.transforms``) -> (H, W, 3)
    uint8."""
    x = image.detach().float().cpu().numpy()  # (3,H,W), (x/255 - mean) / std
    x = x * np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    x = x + np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def sample_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (all of them when ``total <= n``)."""
    if total <= 0 or n <= 0:
        return []
    if total <= n:
        return list(range(total))
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, device: torch.device,
            amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Argmax of ``model`` (a plain module, eval mode meanwhile) on one (3, H, W) image ->
    (H, W) int64."""
    was_training = model.training
    model.eval()
    try:
        x = image.unsqueeze(0).to(device)  # (1,3,H,W)
        use_amp = amp_dtype is not None and device.type == "cuda"
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(x)["out"]  # (1,K,H,W)
        return logits.argmax(1)[0].cpu().numpy().astype(np.int64)
    finally:
        model.train(was_training)


def tile_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) of a tile: the image's size, scaled down so the long side is <= ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _fit(rgb: np.ndarray, hw: tuple[int, int], smooth: bool) -> np.ndarray:
    if rgb.shape[:2] == hw:
        return rgb
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), resample))


def render_samples(
    models: Sequence[nn.Module],
    dataset: Dataset,
    *,
    num_classes: int,
    ignore_index: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    n: int = 4,
    max_side: int = 256,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """The grid as (H, W, 3) uint8: rows = images, columns = image, label, one per model.

    Every tile has the first sampled image's tile size (see :func:`tile_size`); tiles are
    separated by ``GAP`` white pixels.
    """
    indices = sample_indices(len(dataset), n)  # type: ignore[arg-type]
    if not indices:
        raise ValueError("no validation images to draw samples from")
    colours = palette(num_classes)
    rows: list[list[np.ndarray]] = []
    hw: tuple[int, int] | None = None
    for index in indices:
        image, label = dataset[index]
        image, label = torch.as_tensor(image), torch.as_tensor(label)  # (3,H,W), (H,W)
        if hw is None:
            hw = tile_size(int(image.shape[-2]), int(image.shape[-1]), max_side)
        tiles = [_fit(denormalize(image, mean, std), hw, smooth=True),
                 _fit(colorize(label.numpy(), colours, ignore_index), hw, smooth=False)]
        for model in models:
            pred = predict(model, image, device, amp_dtype)
            tiles.append(_fit(colorize(pred, colours, None), hw, smooth=False))
        rows.append(tiles)
    assert hw is not None
    n_rows, n_cols = len(rows), len(rows[0])
    grid = np.full((n_rows * hw[0] + (n_rows - 1) * GAP, n_cols * hw[1] + (n_cols - 1) * GAP, 3),
                   GAP_VALUE, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            y, x = r * (hw[0] + GAP), c * (hw[1] + GAP)
            grid[y:y + hw[0], x:x + hw[1]] = tile
    return grid


def write_samples(path: str | os.PathLike[str], grid: np.ndarray) -> Path:
    """Write a grid from :func:`render_samples` as a PNG, atomically; returns the path."""
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
