"""Unpack dataset archives into the worker's cache, safely and once per content.

Why a module of its own: an archive comes from a user, so extraction must refuse paths that
escape the target (``../``, absolute names, links out), and two jobs on one host that use the
same dataset must neither unpack it twice nor see a half-written tree. The cache key is the
archive's sha256; extraction goes to a temporary sibling that is renamed into place at the
end, which is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
_MARKER = ".pcd-complete"


class ArchiveError(ValueError):
    """The archive is unreadable or tries to write outside its target (a user error)."""


def is_archive(path: Path) -> bool:
    """True for the archive names we unpack (by suffix; content is checked on extraction)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_cached(archive: Path, cache_dir: Path, sha256: str | None = None,
                   on_member: Callable[[], object] | None = None) -> Path:
    """Extract ``archive`` under ``cache_dir/extracted/<sha256>`` once; return the data root.

    The data root is the extracted tree, descending through a lone top-level directory
    (``camvid.tar`` usually holds ``camvid/train/...``). ``on_member`` is called after each
    member is written (the worker's stall watchdog: a big archive unpacks for minutes).
    """
    key = sha256 or file_sha256(archive)
    target = cache_dir / "extracted" / key
    if not (target / _MARKER).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=target.parent))
        try:
            _extract(archive, tmp, on_member or _nothing)
            (tmp / _MARKER).write_text(key)
            try:
                os.replace(tmp, target)
            except OSError:
                # another worker won the race (target exists and is non-empty): use theirs
                if not (target / _MARKER).exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return data_root(target)


def data_root(path: Path) -> Path:
    """Descend through single-directory levels (ignoring our marker and hidden files)."""
    while True:
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            path = entries[0]
        else:
            return path


def _nothing() -> None:
    return None


def _extract(archive: Path, dest: Path, on_member: Callable[[], object]) -> None:
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, on_member)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, on_member)
        else:
            raise ArchiveError(f"{archive.name}: not a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: unreadable archive ({exc})") from exc


def _reporting(members: Iterable[T], on_member: Callable[[], object]) -> Iterator[T]:
    """``members`` unchanged; ``on_member`` runs as each next one is asked for, i.e. after
    the previous one was written."""
    for member in members:
        yield member
        on_member()


def _extract_tar(archive: Path, dest: Path, on_member: Callable[[], object]) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            # Python's "data" filter refuses absolute paths, '..', links out of dest and
            # device files, and strips set-uid bits: exactly what user archives need.
            try:
                tar.extractall(dest, members=_reporting(tar, on_member), filter="data")
            except tarfile.FilterError as exc:
                raise ArchiveError(f"{archive.name}: unsafe member ({exc})") from exc
            return
        root = dest.resolve()
        for member in tar.getmembers():
            _check_inside(root, member.name, archive)
            if member.issym() or member.islnk() or member.isdev():
                raise ArchiveError(f"{archive.name}: links and devices are refused "
                                   f"({member.name})")
        tar.extractall(dest, members=_reporting(tar.getmembers(), on_member))


def _extract_zip(archive: Path, dest: Path, on_member: Callable[[], object]) -> None:
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        for name in names:
            _check_inside(root, name, archive)
        zf.extractall(dest, members=_reporting(names, on_member))


def _check_inside(root: Path, name: str, archive: Path) -> None:
    target = (root / name).resolve()
    with contextlib.suppress(ValueError):
        target.relative_to(root)
        return
    raise ArchiveError(f"{archive.name}: member {name!r} would be written outside the target")
