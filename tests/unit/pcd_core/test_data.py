"""pcd_core.data on tiny generated datasets (folder, cityscapes, voc, synthetic), the train
transforms' geometry and determinism, the loader, and one validation pass over real CamVid."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcd_core.data import (
    DatasetError,
    build_dataset,
    build_loader,
    infinite_batches,
    synthetic_class_names,
    validate_dataset,
    write_synthetic_dataset,
)
from pcd_core.data.transforms import train_transform
from pcd_core.spec import DatasetSpec

HW = (32, 48)
K = 5
CAMVID = Path("/work/shared/datasets/camvid")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return write_synthetic_dataset(root, num_classes=K, n_train=4, n_val=2, size=HW, seed=0)


@pytest.fixture
def tiny_copy(tiny: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny dataset for the error cases."""
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


def spec_for(root: Path | str, **kw: object) -> DatasetSpec:
    base: dict[str, object] = {"uri": str(root), "num_classes": K, "ignore_index": 255,
                               "crop": HW}
    return DatasetSpec.model_validate(base | kw)


def png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:
        im = im.convert("P") if im.mode != "P" else im
        im.putpalette(palette)
    im.save(path)


# --- synthetic scenes -------------------------------------------------------------------


def test_synthetic_scenes_are_deterministic_and_have_thin_and_small_objects(
        tiny: Path, tmp_path: Path) -> None:
    again = write_synthetic_dataset(tmp_path / "again", num_classes=K, n_train=4, n_val=2,
                                    size=HW, seed=0)
    other = write_synthetic_dataset(tmp_path / "other", num_classes=K, n_train=1, n_val=0,
                                    size=HW, seed=1)
    a = np.asarray(Image.open(tiny / "train/images/0000.png"))
    assert np.array_equal(a, np.asarray(Image.open(again / "train/images/0000.png")))
    assert not np.array_equal(a, np.asarray(Image.open(other / "train/images/0000.png")))
    names = synthetic_class_names(K)
    thin, small = names.index("thin"), names.index("small")
    for p in sorted((tiny / "train/labels").iterdir()):
        lab = np.asarray(Image.open(p))
        assert lab.shape == HW and {thin, small} <= set(np.unique(lab).tolist())
        # A thin class is thin: no 4x4 block of it anywhere.
        m = torch.from_numpy(lab == thin).float()[None, None]
        assert torch.nn.functional.avg_pool2d(m, 4, 1).max() < 1


def test_synthetic_format_equals_the_written_folder(tiny: Path) -> None:
    mem = build_dataset(spec_for("synthetic://?n_train=4&n_val=2&size=32x48&seed=0",
                                 format="synthetic"), "val", train=False)
    disk = build_dataset(spec_for(tiny), "val", train=False)
    assert len(mem) == len(disk) == 2
    for i in range(2):
        assert torch.equal(mem[i][0], disk[i][0]) and torch.equal(mem[i][1], disk[i][1])
    with pytest.raises(DatasetError, match="unknown synthetic uri key"):
        build_dataset(spec_for("synthetic://?n_trian=3", format="synthetic"), "train",
                      train=False)


# --- folder format and validation -------------------------------------------------------


def test_eval_items_are_normalised_full_frames(tiny: Path) -> None:
    spec = spec_for(tiny)
    img, lab = build_dataset(spec, "val", train=False)[0]
    assert img.shape == (3, *HW) and img.dtype == torch.float32
    assert lab.shape == HW and lab.dtype == torch.int64
    raw = np.asarray(Image.open(tiny / "val/images/0000.png"), dtype=np.float32) / 255
    expected = (raw - np.array(spec.mean)) / np.array(spec.std)
    assert np.allclose(img.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert np.array_equal(lab.numpy(), np.asarray(Image.open(tiny / "val/labels/0000.png")))
    img, lab = build_dataset(spec_for(tiny, resize=(16, 24)), "val", train=False)[0]
    assert img.shape == (3, 16, 24) and lab.shape == (16, 24)


def test_validate_summarises_the_split(tiny: Path) -> None:
    s = validate_dataset(spec_for(tiny), "train")
    assert s.num_images == 4 and s.image_sizes == [HW]
    assert sum(s.class_pixel_counts) == 4 * HW[0] * HW[1] and s.ignore_pixels == 0
    assert s.missing_classes == []


def test_missing_label_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "train/labels/0002.png").unlink()
    with pytest.raises(DatasetError, match=r"train/images/0002\.png has no label") as e:
        build_dataset(spec_for(tiny_copy), "train", train=True)
    assert e.value.code == "dataset_invalid"


def test_label_without_image_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "train/images/0001.png").unlink()
    with pytest.raises(DatasetError, match=r"train/labels/0001\.png has no image"):
        validate_dataset(spec_for(tiny_copy), "train")


def test_bad_label_value_is_named(tiny_copy: Path) -> None:
    path = tiny_copy / "train/labels/0003.png"
    lab = np.asarray(Image.open(path)).copy()
    lab[5, 7] = 200
    png(path, lab)
    with pytest.raises(DatasetError, match=r"0003\.png has values 200 outside"):
        validate_dataset(spec_for(tiny_copy), "train")


def test_empty_split_dir(tmp_path: Path) -> None:
    (tmp_path / "train/images").mkdir(parents=True)
    (tmp_path / "train/labels").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images in") as e:
        validate_dataset(spec_for(tmp_path), "train")
    assert e.value.code == "dataset_empty"


def test_size_mismatch_unreadable_and_rgb_labels_are_named(tiny_copy: Path) -> None:
    png(tiny_copy / "train/labels/0000.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"labels/0000\.png is 10x10 but image"):
        validate_dataset(spec_for(tiny_copy), "train")
    (tiny_copy / "train/labels/0000.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read label .*0000\.png"):
        validate_dataset(spec_for(tiny_copy), "train")
    png(tiny_copy / "train/labels/0000.png", np.zeros((*HW, 3), np.uint8))
    with pytest.raises(DatasetError, match="mode RGB"):
        validate_dataset(spec_for(tiny_copy), "train")


def test_remote_uri_is_refused() -> None:
    with pytest.raises(DatasetError, match="not a local path"):
        build_dataset(spec_for("s3://bucket/data"), "train", train=False)


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not present at {CAMVID}")
def test_real_camvid_train_validates_quickly() -> None:
    spec = DatasetSpec(uri=str(CAMVID), num_classes=11, ignore_index=11)
    start = time.perf_counter()
    s = validate_dataset(spec, "train")
    assert s.num_images == 367 and s.image_sizes == [(360, 480)]
    assert min(s.class_pixel_counts) > 0 and s.ignore_pixels > 0
    assert time.perf_counter() - start < 20  # ~1 s on two cores; generous for shared CI


# --- other formats ----------------------------------------------------------------------


def test_cityscapes_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    ids = np.array([[7, 8, 26, 0], [33, 255, 24, 6]], dtype=np.uint8)
    stem = "aachen_000000_000019"
    png(tmp_path / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png",
        np.zeros((2, 4, 3), np.uint8))
    png(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png", ids)
    spec = DatasetSpec(uri=str(tmp_path), format="cityscapes", num_classes=19,
                       ignore_index=255)
    _, lab = build_dataset(spec, "train", train=False)[0]
    assert lab.tolist() == [[0, 1, 13, 255], [18, 255, 11, 255]]
    assert validate_dataset(spec, "train").num_images == 1
    with pytest.raises(DatasetError, match="19 train classes"):
        build_dataset(spec.model_copy(update={"num_classes": 20}), "train", train=False)


def test_voc_reads_palette_indices_and_maps_255_to_ignore(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 15], [255, 20, 1]], dtype=np.uint8)
    palette = [0, 0, 0, 128, 0, 0] + [7] * (3 * 254)  # colours unrelated to the indices
    png(tmp_path / "SegmentationClass/2007_000032.png", idx, palette)
    png(tmp_path / "JPEGImages/2007_000032.jpg", np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    assert Image.open(tmp_path / "SegmentationClass/2007_000032.png").mode == "P"
    spec = DatasetSpec(uri=str(tmp_path), format="voc", num_classes=21, ignore_index=21)
    _, lab = build_dataset(spec, "train", train=False)[0]
    assert lab.tolist() == [[0, 1, 15], [21, 20, 1]]
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("2007_000032\nmissing\n")
    with pytest.raises(DatasetError, match=r"JPEGImages/missing\.jpg"):
        build_dataset(spec, "train", train=False)


# --- train transforms -------------------------------------------------------------------


def coded_pair(h: int, w: int, block: int) -> tuple[Image.Image, np.ndarray]:
    """A blocky label and an image whose red channel encodes it (40 * class)."""
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, size=(h // block + 1, w // block + 1)).repeat(block, 0)
    lab = lab.repeat(block, 1)[:h, :w].astype(np.uint8)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = lab * 40
    img[..., 1] = np.arange(w, dtype=np.uint8)[None, :]  # makes a flip visible everywhere
    return Image.fromarray(img), lab


def decode_red(img: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    red = img[0] * spec.std[0] + spec.mean[0]
    return torch.round(red * 255 / 40).long()


def test_crop_size_and_ignore_padding() -> None:
    image, lab = coded_pair(*HW, block=4)
    spec = spec_for("x", crop=(40, 60), scale_range=(1.0, 1.0), hflip=False)
    img, out = train_transform(image, lab, spec, np.random.default_rng(3))
    assert img.shape == (3, 40, 60) and out.shape == (40, 60)
    pad = out == 255
    assert int(pad.sum()) == 40 * 60 - HW[0] * HW[1]
    assert torch.all(img[:, pad] == 0)  # the mean colour after normalisation
    assert torch.equal(decode_red(img, spec)[~pad], out[~pad])  # content stays aligned


@pytest.mark.parametrize("scale", [0.6, 1.7])
def test_scaled_crop_keeps_image_and_label_aligned(scale: float) -> None:
    image, lab = coded_pair(64, 96, block=8)
    spec = spec_for("x", crop=(48, 64), scale_range=(scale, scale))
    for seed in range(4):
        img, out = train_transform(image, lab, spec, np.random.default_rng(seed))
        valid = out != 255
        agree = (decode_red(img, spec) == out)[valid].float().mean()
        assert agree > 0.8  # only bilinear blends at block edges disagree


def test_flip_flips_image_and_label_together() -> None:
    image, lab = coded_pair(*HW, block=4)
    spec = spec_for("x", crop=HW, scale_range=(1.0, 1.0), hflip=True)
    green = torch.from_numpy(np.asarray(image)[..., 1].astype(np.float32))
    flipped = set()
    for seed in range(12):
        img, out = train_transform(image, lab, spec, np.random.default_rng(seed))
        g = torch.round((img[1] * spec.std[1] + spec.mean[1]) * 255)
        is_flipped = torch.equal(g, green.flip(1))
        assert is_flipped or torch.equal(g, green)
        ref = torch.from_numpy(lab.astype(np.int64))
        assert torch.equal(out, ref.flip(1) if is_flipped else ref)
        flipped.add(is_flipped)
    assert flipped == {True, False}


def test_train_items_are_deterministic_given_the_seed(tiny: Path) -> None:
    ds = build_dataset(spec_for(tiny, crop=(24, 24)), "train", train=True)

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [t for i in range(len(ds)) for t in ds[i]]

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# --- loaders ------------------------------------------------------------------------------


def test_loader_batches_and_seeded_order(tiny: Path) -> None:
    ds = build_dataset(spec_for(tiny), "train", train=False)

    def labels(seed: int) -> torch.Tensor:
        loader = build_loader(ds, batch_size=2, shuffle=True, num_workers=0, seed=seed,
                              drop_last=True)
        batches = list(loader)
        assert len(batches) == 2 and batches[0][0].shape == (2, 3, *HW)
        return torch.cat([lab for _, lab in batches])

    assert torch.equal(labels(5), labels(5))


def test_worker_augmentation_follows_the_loader_seed(tiny: Path) -> None:
    ds = build_dataset(spec_for(tiny, crop=(24, 24)), "train", train=True)

    def first(seed: int) -> torch.Tensor:
        loader = build_loader(ds, batch_size=4, shuffle=False, num_workers=1, seed=seed,
                              drop_last=False)
        return next(iter(loader))[0]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_infinite_batches_bumps_the_sampler_epoch(tiny: Path) -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    ds = build_dataset(spec_for(tiny), "train", train=False)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=1, sampler=sampler)  # 2 batches per epoch
    stream = infinite_batches(loader)
    for _ in range(5):
        next(stream)
    assert sampler.epoch == 2
    empty = build_loader(ds, batch_size=8, shuffle=False, num_workers=0, seed=0,
                         drop_last=True)
    with pytest.raises(ValueError, match="no batches"):
        next(infinite_batches(empty))
