"""``file://`` object store: a directory tree, for the embedded (one machine) setup.

Atomicity: every write goes to ``<root>/.staging/<random>`` (same filesystem), is fsynced and
then ``os.replace``d onto the key's path, so readers never see a partial object and a failed
write leaves nothing. The sha256 rides along as a ``user.pcd.sha256`` extended attribute set
on the staged file before the rename (atomic with the bytes); where the filesystem has no
user xattrs, ``stat``/``list`` answer ``sha256=None`` rather than re-read the whole file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from jobs.storage.base import (
    DEFAULT_CHUNK,
    STAGING_DIR,
    Hasher,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    check_key,
    check_prefix,
)

_XATTR = "user.pcd.sha256"


class LocalStore:
    """An ``ObjectStore`` rooted at a directory (created on first use)."""

    def __init__(self, root: str | Path) -> None:
        # Resolved once so URIs stay valid whatever the process's later cwd.
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ----------------------------------------------------------------- paths and URIs
    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # check_key already refuses '..'; this also catches a symlink inside the root
        # that points out of it.
        if not path.resolve().is_relative_to(self.root):
            raise StorageError(f"object key {key!r} resolves outside the store root")
        return path

    def uri(self, key: str) -> str:
        return f"file://{self.root.as_posix().rstrip('/')}/{check_key(key)}"

    def key_from_uri(self, uri_or_key: str) -> str:
        if "://" not in uri_or_key:
            return check_key(uri_or_key)
        base = f"file://{self.root.as_posix().rstrip('/')}/"
        if not uri_or_key.startswith(base):
            raise ValueError(f"{uri_or_key} is not inside {base}")
        return check_key(uri_or_key[len(base):])

    # ------------------------------------------------------------------------ writes
    def _stage(self, key: str, write: Callable[[BinaryIO], str]) -> ObjectInfo:
        """Run ``write(fh) -> sha256`` on a staged file, then rename it onto ``key``."""
        target = self._path(key)
        staging = self.root / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                sha256 = write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            _set_sha256(tmp, sha256)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise StorageError(f"cannot store {key!r}: a parent is an object") from exc
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectInfo(key, target.stat().st_size, sha256, self.uri(key), _version(target))

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"no file at {src}")
        hasher = Hasher(key)

        def write(fh: BinaryIO) -> str:
            with open(src, "rb") as inp:
                while block := inp.read(DEFAULT_CHUNK):
                    hasher.update(block)
                    fh.write(block)
            return hasher.hexdigest

        return self._stage(key, write)

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> ObjectInfo:
        hasher = Hasher(key, max_bytes)

        def write(fh: BinaryIO) -> str:
            for chunk in chunks:
                if chunk:
                    hasher.update(chunk)  # raises ObjectTooLarge before the write
                    fh.write(chunk)
            return hasher.hexdigest

        return self._stage(key, write)

    # ------------------------------------------------------------------------- reads
    def get_file(self, key: str, dest_path: str | Path) -> Path:
        src = self._path(key)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except FileNotFoundError as exc:
            tmp.unlink(missing_ok=True)
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - opened now: a missing key fails here
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from exc
        return _read_chunks(fh, chunk_size)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(key, st.st_size, _get_sha256(path), self.uri(key), _version(path))

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names, then filter by string prefix.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != STAGING_DIR]
            for name in filenames:
                path = Path(dirpath, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    out.append(ObjectInfo(key, st.st_size, _get_sha256(path), self.uri(key),
                                          _version(path)))
        return sorted(out, key=lambda info: info.key)

    # ----------------------------------------------------------------------- deletes
    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the store)")
        objects = self.list(prefix)
        for info in objects:
            self.delete(info.key)
        return len(objects)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        check_key(key)
        return None

    def _prune(self, directory: Path) -> None:
        """Remove now-empty parent directories up to (not including) the root."""
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


def _read_chunks(fh: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with fh:
        while block := fh.read(chunk_size):
            yield block


def _version(path: Path) -> str:
    st = path.stat()
    return f"{st.st_mtime_ns}-{st.st_size}"


def _set_sha256(path: Path, sha256: str) -> None:
    with contextlib.suppress(OSError, AttributeError):  # no user xattrs here: sha256 unknown
        os.setxattr(path, _XATTR, sha256.encode())


def _get_sha256(path: Path) -> str | None:
    try:
        return os.getxattr(path, _XATTR).decode()
    except (OSError, AttributeError):
        return None
