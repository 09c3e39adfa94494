"""Object storage for artifacts, checkpoints, uploads, teachers and datasets.

``open_store(url)`` picks the backend by scheme (DESIGN.md "Embedded default vs production"):

    file://./var/objects      a directory (relative to the cwd at open time, or absolute)
    s3://bucket[/prefix]      S3 / MinIO / SeaweedFS via boto3

Both implement ``ObjectStore``; ``fetch_cached`` gives the worker a local, content-addressed
copy of a stored object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from jobs.storage.base import (
    DEFAULT_CHUNK,
    ChecksumMismatch,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    check_key,
    file_sha256,
)
from jobs.storage.cache import fetch_cached
from jobs.storage.local import LocalStore

__all__ = [
    "DEFAULT_CHUNK",
    "ChecksumMismatch",
    "InvalidKey",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "StorageError",
    "check_key",
    "fetch_cached",
    "file_sha256",
    "open_store",
]


def open_store(url: str | os.PathLike[str], **s3_options: Any) -> ObjectStore:
    """The store a URL names.

    ``file://<path>``: ``file://./var/objects`` (relative), ``file:///srv/objects``
    (absolute); ``file://`` alone names the filesystem root, so that a ``file:///abs/x`` URI
    maps to key ``abs/x``. ``s3://bucket[/prefix]``: ``s3_options`` (``endpoint_url``,
    ``access_key``, ``secret_key``, ``session_token``, ``region``, ``part_size``, ...) are
    passed to ``S3Store``; anything not given comes from ``PCD_S3_*``/``AWS_*`` env.
    Raises ``ValueError`` for any other scheme.
    """
    text = str(url)  # settings may hand over a pydantic URL type
    if text.startswith("file:"):
        path = unquote(text[len("file://"):] if text.startswith("file://") else text[5:])
        return LocalStore(Path(path or "/"))
    if text.startswith("s3://"):
        from jobs.storage.s3 import S3Store  # boto3 loads only when S3 is used

        bucket, _, prefix = text[len("s3://"):].partition("/")
        return S3Store(bucket, prefix, **s3_options)
    raise ValueError(f"unsupported storage URL {text!r}: use file://<path> or s3://bucket[/prefix]")
