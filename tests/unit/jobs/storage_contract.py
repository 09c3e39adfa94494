"""The ``ObjectStore`` contract as plain check functions, run against every backend.

One place for the behaviour both backends promise (jobs/storage/base.py): the unit tests
run it on ``file://`` (tests/unit/jobs/test_storage.py) and the integration tests on a
real SeaweedFS (tests/integration/test_storage_s3.py). A check takes a store and a fresh
key prefix (``base``, ending in ``/``) so runs on a shared bucket never collide.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobs.storage import (
    ChecksumMismatch,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    fetch_cached,
)

Check = Callable[[ObjectStore, str, Path], None]
CONTRACT: list[Check] = []


def check(fn: Check) -> Check:
    CONTRACT.append(fn)
    return fn


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: ObjectStore, key: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.open_stream(key, chunk_size))


@check
def put_file_round_trip(store: ObjectStore, base: str, tmp: Path) -> None:
    data = os.urandom(300_000)
    src = tmp / "src.bin"
    src.write_bytes(data)
    info = store.put_file(base + "dir/a.bin", src)
    assert (info.key, info.size, info.sha256) == (base + "dir/a.bin", len(data), sha(data))
    assert info.uri == store.uri(base + "dir/a.bin")
    assert store.key_from_uri(info.uri) == base + "dir/a.bin"
    stat = store.stat(base + "dir/a.bin")
    assert stat is not None and stat.size == len(data)
    assert stat.sha256 in (None, sha(data))  # None only where the backend keeps no metadata
    dest = store.get_file(base + "dir/a.bin", tmp / "out" / "a.bin")
    assert Path(dest).read_bytes() == data
    assert [p.name for p in (tmp / "out").iterdir()] == ["a.bin"]  # no temp left beside it


@check
def put_stream_hashes_while_streaming(store: ObjectStore, base: str, tmp: Path) -> None:
    parts = [b"", b"a" * 10, b"", os.urandom(70_001), b"z"]
    data = b"".join(parts)
    info = store.put_stream(base + "s.bin", iter(parts))
    assert (info.size, info.sha256) == (len(data), sha(data))
    assert read_all(store, base + "s.bin", chunk_size=4096) == data
    assert all(len(c) <= 4096 for c in store.open_stream(base + "s.bin", 4096))
    empty = store.put_stream(base + "empty", iter([]))
    assert (empty.size, empty.sha256) == (0, sha(b""))
    assert read_all(store, base + "empty") == b""


@check
def overwrite_replaces(store: ObjectStore, base: str, tmp: Path) -> None:
    store.put_stream(base + "k", [b"old"])
    store.put_stream(base + "k", [b"new!"])
    assert read_all(store, base + "k") == b"new!"
    assert [i.key for i in store.list(base)] == [base + "k"]


@check
def missing_objects(store: ObjectStore, base: str, tmp: Path) -> None:
    key = base + "nope/missing.bin"
    assert store.stat(key) is None and not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.open_stream(key)  # eager: fails at the call, not at the first chunk
    with pytest.raises(FileNotFoundError):  # ObjectNotFound is a FileNotFoundError
        store.get_file(key, tmp / "x")
    assert not (tmp / "x").exists()
    store.delete(key)  # deleting what is gone is fine


@check
def list_and_delete(store: ObjectStore, base: str, tmp: Path) -> None:
    for key in ("b/2", "a/1", "a/10", "ab", "c"):
        store.put_stream(base + key, [key.encode()])
    listed = store.list(base)
    assert [i.key for i in listed] == [base + k for k in ("a/1", "a/10", "ab", "b/2", "c")]
    assert all(i.size == len(i.key) - len(base) for i in listed)
    assert [i.key for i in store.list(base + "a/")] == [base + "a/1", base + "a/10"]
    assert [i.key for i in store.list(base + "a")] == [base + "a/1", base + "a/10", base + "ab"]
    assert store.list(base + "zzz/") == []
    store.delete(base + "c")
    assert not store.exists(base + "c")
    assert store.delete_prefix(base + "a/") == 2
    assert [i.key for i in store.list(base)] == [base + "ab", base + "b/2"]
    with pytest.raises(ValueError):
        store.delete_prefix("")
    assert store.delete_prefix(base) == 2 and store.list(base) == []


@check
def too_large_leaves_nothing(store: ObjectStore, base: str, tmp: Path) -> None:
    ok = store.put_stream(base + "exact", [b"x" * 600, b"y" * 424], max_bytes=1024)
    assert ok.size == 1024
    with pytest.raises(ObjectTooLarge):
        store.put_stream(base + "big", (b"x" * 100 for _ in range(11)), max_bytes=1024)
    assert not store.exists(base + "big")
    store.put_stream(base + "kept", [b"previous"])
    with pytest.raises(ObjectTooLarge):
        store.put_stream(base + "kept", [b"x" * 2000], max_bytes=1024)
    assert read_all(store, base + "kept") == b"previous"  # the old object is untouched
    assert [i.key for i in store.list(base)] == [base + "exact", base + "kept"]


class Broken(Exception):
    pass


def _failing_stream(good: int) -> Iterator[bytes]:
    yield b"g" * good
    raise Broken("client went away")


@check
def failed_stream_leaves_nothing(store: ObjectStore, base: str, tmp: Path) -> None:
    with pytest.raises(Broken):
        store.put_stream(base + "half", _failing_stream(50_000))
    assert not store.exists(base + "half")
    store.put_stream(base + "old", [b"old"])
    with pytest.raises(Broken):
        store.put_stream(base + "old", _failing_stream(10))
    assert read_all(store, base + "old") == b"old"
    assert [i.key for i in store.list(base)] == [base + "old"]


@check
def unsafe_keys_refused(store: ObjectStore, base: str, tmp: Path) -> None:
    bad = ["", "/abs", "../up", base + "../../x", base + "a//b", base + "./a", base + "a/",
           "a\\b", "nul\x00", ".staging/x", "x" * 1100]
    for key in bad:
        with pytest.raises(InvalidKey):
            store.put_stream(key, [b"x"])
        with pytest.raises(InvalidKey):
            store.stat(key)
    assert store.list(base) == []


@check
def fetch_cached_downloads_once(store: ObjectStore, base: str, tmp: Path) -> None:
    data = os.urandom(50_000)
    info = store.put_stream(base + "teachers/t.safetensors", [data])
    calls = []
    original = store.open_stream

    def counting(key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        calls.append(key)
        return original(key, chunk_size)

    store.open_stream = counting  # type: ignore[method-assign]
    try:
        first = fetch_cached(store, info.uri, tmp / "cache")
        again = fetch_cached(store, base + "teachers/t.safetensors", tmp / "cache")
        pinned = fetch_cached(store, info.uri, tmp / "cache", expected_sha256=sha(data))
    finally:
        del store.open_stream  # type: ignore[attr-defined]
    assert first == again == pinned and first.name == "t.safetensors"
    assert first.read_bytes() == data and first.parent.name == sha(data)
    assert len(calls) == 1, "the second and third fetch must hit the cache"
    sizes: list[int] = []  # what the worker's stall watchdog hears during a download
    fetch_cached(store, info.uri, tmp / "cache3", on_chunk=sizes.append)
    assert sizes and sum(sizes) == len(data)
    with pytest.raises(ChecksumMismatch):
        fetch_cached(store, info.uri, tmp / "cache2", expected_sha256="0" * 64)
    assert not list((tmp / "cache2" / "objects").glob("*/*"))  # nothing corrupt cached
    with pytest.raises(FileNotFoundError):
        fetch_cached(store, base + "teachers/none.pt", tmp / "cache")
    store.put_stream(base + "teachers/t.safetensors", [b"changed"])  # new version: refetch
    assert fetch_cached(store, info.uri, tmp / "cache").read_bytes() == b"changed"
