"""A content-addressed download cache: the worker fetches each teacher/dataset once.

Layout under ``cache_dir``::

    objects/<sha256>/<basename of the key>   the bytes (the name keeps suffixes such as
                                             ``.tar.gz`` that the worker dispatches on)
    refs/<sha256 of the URI>                 "<version> <size> <sha256>" of the last fetch
    tmp/                                     downloads in progress (same filesystem)

Why both: when the caller (or the store's metadata) knows the sha256, the cache answers
without any network call beyond a ``stat``; when nobody does, the ref remembers which
content a URI had at which version, so an unchanged object is still fetched only once.
Every download is hashed while it is written and verified before it is renamed into place,
so a cached file is never partial nor corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from jobs.storage.base import ChecksumMismatch, Hasher, ObjectNotFound, ObjectStore


def fetch_cached(store: ObjectStore, uri: str, cache_dir: str | Path,
                 expected_sha256: str | None = None,
                 on_chunk: Callable[[int], object] | None = None) -> Path:
    """A local path holding the object ``uri`` (a URI of ``store`` or a bare key).

    ``on_chunk`` is called with the size of each downloaded chunk (a download of gigabytes
    is minutes of silence otherwise: the worker's stall watchdog listens to it).
    Raises ``ObjectNotFound`` (a ``FileNotFoundError``) when it is missing and
    ``ChecksumMismatch`` when its bytes do not hash to ``expected_sha256``.
    """
    key = store.key_from_uri(uri)
    cache = Path(cache_dir)
    name = key.rsplit("/", 1)[-1]
    expected = expected_sha256.lower() if expected_sha256 else None
    if expected and (hit := _hit(cache, expected, name)):
        return hit  # known content already here: no network at all
    info = store.stat(key)
    if info is None:
        raise ObjectNotFound(f"no object {uri}")
    if expected and info.sha256 and info.sha256 != expected:
        raise ChecksumMismatch(f"{uri} has sha256 {info.sha256}, expected {expected}")
    known = expected or info.sha256 or _ref(cache, store.uri(key), info.version, info.size)
    if known and (hit := _hit(cache, known, name)):
        return hit
    path = _download(store, key, cache, name, expected or info.sha256, on_chunk)
    if info.version:
        _write_ref(cache, store.uri(key), info.version, info.size, path.parent.name)
    return path


def _hit(cache: Path, sha256: str, name: str) -> Path | None:
    """The cached file for ``sha256`` named ``name``; linked from a sibling if needed."""
    folder = cache / "objects" / sha256
    wanted = folder / name
    if wanted.is_file():
        return wanted
    siblings = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
    if not siblings:
        return None
    tmp = _tmp(cache)
    try:
        try:
            os.link(siblings[0], tmp)
        except OSError:
            shutil.copyfile(siblings[0], tmp)
        os.replace(tmp, wanted)
    finally:
        tmp.unlink(missing_ok=True)
    return wanted


def _download(store: ObjectStore, key: str, cache: Path, name: str,
              expected: str | None, on_chunk: Callable[[int], object] | None) -> Path:
    tmp = _tmp(cache)
    hasher = Hasher(key)
    try:
        with open(tmp, "wb") as fh:
            for chunk in store.open_stream(key):
                hasher.update(chunk)
                fh.write(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
        sha256 = hasher.hexdigest
        if expected and sha256 != expected:
            raise ChecksumMismatch(f"{store.uri(key)} downloaded with sha256 {sha256}, "
                                   f"expected {expected}")
        dest = cache / "objects" / sha256 / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)  # two workers racing both write whole files: last one wins
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _tmp(cache: Path) -> Path:
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    return cache / "tmp" / f"{uuid.uuid4().hex}.part"


def _ref_path(cache: Path, uri: str) -> Path:
    return cache / "refs" / hashlib.sha256(uri.encode()).hexdigest()


def _ref(cache: Path, uri: str, version: str | None, size: int) -> str | None:
    """The sha256 this URI had when last fetched, if its version and size are unchanged."""
    if not version:
        return None
    try:
        old_version, old_size, sha256 = _ref_path(cache, uri).read_text().split()
    except (OSError, ValueError):
        return None
    return sha256 if (old_version, old_size) == (version, str(size)) else None


def _write_ref(cache: Path, uri: str, version: str, size: int, sha256: str) -> None:
    path = _ref_path(cache, uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(cache)
    tmp.write_text(f"{version} {size} {sha256}\n")
    with contextlib.suppress(OSError):
        os.replace(tmp, path)
    tmp.unlink(missing_ok=True)
