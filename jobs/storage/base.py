"""The object-store contract shared by every backend, its value type and its errors.

Why one small interface: the API streams uploads in and artifacts out, the worker fetches
teachers/datasets and pushes checkpoints, and both must run unchanged on a laptop
(``file://``) and in production (``s3://``). Only the URL changes (DESIGN.md).

Keys are ``/``-separated relative names (``jobs/<id>/artifacts/student.onnx``). They are
validated the same way on every backend so that a key accepted in development is accepted
in production, and so that no key can name a path outside a ``file://`` root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

DEFAULT_CHUNK = 1 << 20  # 1 MiB: big enough for throughput, small enough to bound memory
MAX_KEY_LENGTH = 1024  # S3's own limit, applied everywhere
# First path segment reserved by the file:// backend for its temporary files.
STAGING_DIR = ".staging"


class StorageError(RuntimeError):
    """The store failed (unreachable, refused, corrupt). Jobs fail with ``storage_error``."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object under that key. Also a ``FileNotFoundError`` so callers may catch either."""


class ObjectTooLarge(StorageError):
    """``put_stream`` saw more than ``max_bytes``; nothing was stored."""

    def __init__(self, key: str, max_bytes: int) -> None:
        super().__init__(f"object {key!r} is larger than the limit of {max_bytes} bytes")
        self.key = key
        self.max_bytes = max_bytes


class ChecksumMismatch(StorageError):
    """Downloaded bytes do not hash to the sha256 the caller (or the store) expected."""


class InvalidKey(ValueError):
    """A key that could escape the root or that S3 and the filesystem would read differently."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    ``sha256`` is the hex digest of the bytes when the store knows it without reading them
    (always on the result of ``put_*``; on ``stat``/``list`` when this package wrote the
    object and the backend keeps metadata), else ``None``. ``version`` changes whenever the
    bytes change (S3 ETag, or mtime+size on disk); caches use it when ``sha256`` is unknown.
    """

    key: str
    size: int
    sha256: str | None
    uri: str
    version: str | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Blob storage by key. Every method is blocking; call it from a thread in async code.

    Contract shared by all backends (tests/unit/jobs/storage_contract.py holds it):
    - writes are atomic: a reader sees the old object, the new one or none, never a part;
    - ``put_stream`` hashes and counts while streaming with bounded memory, and past
      ``max_bytes`` raises ``ObjectTooLarge`` leaving no object (nor any partial upload);
    - reading a missing key raises ``ObjectNotFound``; ``stat`` answers ``None`` instead;
    - ``delete`` of a missing key is not an error; ``list`` is sorted by key and its
      ``prefix`` is a plain string prefix (``"a/b"`` matches ``a/b/c`` and ``a/bc``).
    """

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        """Store the file at ``path`` under ``key``."""
        ...

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> ObjectInfo:
        """Store the concatenated ``chunks``; refuse (``ObjectTooLarge``) past ``max_bytes``."""
        ...

    def get_file(self, key: str, dest_path: str | Path) -> Path:
        """Download to ``dest_path`` atomically (a temp sibling renamed into place)."""
        ...

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks. Raises ``ObjectNotFound`` at the call, not lazily."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or ``None`` when absent. Raises ``StorageError`` when the
        store itself is unreachable (so readiness probes can use it)."""
        ...

    def exists(self, key: str) -> bool:
        """``stat(key) is not None``."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; no error when it is already gone."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under a non-empty ``prefix``; answer how many."""
        ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited GET URL, or ``None`` when the backend has none (``file://``)."""
        ...

    def uri(self, key: str) -> str:
        """The absolute URI of ``key`` (``s3://bucket/prefix/key``, ``file:///root/key``)."""
        ...

    def key_from_uri(self, uri_or_key: str) -> str:
        """The key of a URI inside this store (a bare key passes through validated).
        Raises ``ValueError`` for a URI of another store."""
        ...


def check_key(key: str) -> str:
    """Answer ``key`` if it is a safe relative object name, else raise ``InvalidKey``.

    Refused: empty, absolute (``/x``), backslashes, NUL, empty/``.``/``..`` segments,
    a trailing ``/`` and the reserved staging directory. The same rules on every backend,
    so nothing that works on S3 breaks on disk, nor escapes a ``file://`` root.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("an object key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"object key longer than {MAX_KEY_LENGTH} characters")
    if "\\" in key or "\x00" in key:
        raise InvalidKey(f"object key {key!r} contains a backslash or NUL")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"object key {key!r} has an empty, '.' or '..' segment")
    if parts[0] == STAGING_DIR:
        raise InvalidKey(f"object keys may not start with the reserved {STAGING_DIR}/")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything), or a key-like string that may end in ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


class Hasher:
    """Counts and sha256-hashes bytes as they pass, enforcing an optional size limit."""

    def __init__(self, key: str, max_bytes: int | None = None) -> None:
        self.key = key
        self.max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        """Account for ``chunk``; raise ``ObjectTooLarge`` as soon as the limit is passed."""
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise ObjectTooLarge(self.key, self.max_bytes)
        self._digest.update(chunk)

    @property
    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def file_sha256(path: str | Path, chunk_size: int = DEFAULT_CHUNK) -> tuple[str, int]:
    """The sha256 hex digest and size of a local file, read in bounded chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
