"""Dataset archives: extracted once per content, safely, to the data root."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from worker.archives import ArchiveError, extract_cached


def _tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_gz_extracts_to_lone_top_directory(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "camvid.tar.gz", {"camvid/train/images/a.png": b"1",
                                                 "camvid/val/images/b.png": b"2"}, "w:gz")
    root = extract_cached(archive, tmp_path / "cache")
    assert root.name == "camvid"
    assert (root / "train" / "images" / "a.png").read_bytes() == b"1"
    # a second call reuses the extraction (same content -> same directory)
    (root / "marker").write_text("kept")
    assert extract_cached(archive, tmp_path / "cache") == root
    assert (root / "marker").exists()


def test_zip_is_supported(tmp_path: Path) -> None:
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/images/a.png", b"z")
        zf.writestr("val/images/a.png", b"z")
    root = extract_cached(archive, tmp_path / "cache")
    assert (root / "train" / "images" / "a.png").exists()


def test_escaping_members_are_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "evil.tar", {"../escape.txt": b"x"})
    with pytest.raises(ArchiveError):
        extract_cached(archive, tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists()
    assert not list((tmp_path / "cache" / "extracted").glob("*/*"))


def test_absolute_members_stay_inside(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "abs.tar", {"/abs/inside.txt": b"x", "/abs/other.txt": b"y"})
    root = extract_cached(archive, tmp_path / "cache")
    assert (root / "inside.txt").read_bytes() == b"x"
    assert root.is_relative_to(tmp_path / "cache")


def test_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "data.tar"
    bogus.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(ArchiveError):
        extract_cached(bogus, tmp_path / "cache")
