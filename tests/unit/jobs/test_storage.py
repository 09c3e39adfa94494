"""``file://`` object store: the shared contract plus what only a directory can get wrong.

The contract itself lives in storage_contract.py and also runs against a real SeaweedFS
in tests/integration/test_storage_s3.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from storage_contract import CONTRACT, Check, read_all

from jobs.storage import InvalidKey, LocalStore, ObjectStore, StorageError, open_store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_contract(check: Check, store: LocalStore, tmp_path: Path) -> None:
    check(store, "base/", tmp_path)


def test_is_an_object_store(store: LocalStore) -> None:
    assert isinstance(store, ObjectStore)


def test_open_store_by_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("file://./var/objects")
    assert isinstance(rel, LocalStore) and rel.root == tmp_path / "var" / "objects"
    assert rel.uri("a/b") == f"file://{tmp_path}/var/objects/a/b"
    assert open_store(f"file://{tmp_path}/abs").root == tmp_path / "abs"  # type: ignore[attr-defined]
    # file:// alone is the filesystem root: a file:///x/y URI maps to key x/y
    assert open_store("file://").key_from_uri(f"file://{tmp_path}/f") == f"{tmp_path}/f"[1:]
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://host/x")
    with pytest.raises(ValueError):
        rel.key_from_uri("s3://bucket/a")


def test_presigned_url_is_none(store: LocalStore) -> None:
    store.put_stream("a", [b"x"])
    assert store.presigned_url("a", 60) is None


def test_keys_cannot_escape_the_root(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    for key in ("../secret", "a/../../secret", "/etc/passwd"):
        with pytest.raises(InvalidKey):
            store.open_stream(key)
        with pytest.raises(InvalidKey):
            store.delete(key)
    # a symlink planted inside the root that points out of it is refused too
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "link").symlink_to(tmp_path)
    with pytest.raises(StorageError):
        store.open_stream("link/secret")
    assert outside.read_bytes() == b"secret"


def test_no_partial_file_while_writing(store: LocalStore) -> None:
    """Readers never see a half-written object: bytes go to .staging until the rename."""
    seen = []

    def chunks():  # type: ignore[no-untyped-def]
        yield b"a" * 1000
        seen.append(store.exists("obj"))
        seen.append([p.name for p in (store.root / ".staging").iterdir()])
        yield b"b" * 1000

    store.put_stream("obj", chunks())
    assert seen[0] is False and len(seen[1]) == 1
    assert read_all(store, "obj") == b"a" * 1000 + b"b" * 1000
    assert list((store.root / ".staging").iterdir()) == []  # staged file renamed away
    assert [i.key for i in store.list()] == ["obj"]  # .staging never listed


def test_failed_write_leaves_no_temp(store: LocalStore) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b"x" * 100
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.put_stream("obj", chunks())
    assert not store.exists("obj")
    assert list((store.root / ".staging").iterdir()) == []


def test_delete_prunes_empty_directories(store: LocalStore) -> None:
    store.put_stream("jobs/1/checkpoints/c1", [b"1"])
    store.delete_prefix("jobs/1/")
    assert not (store.root / "jobs").exists()


def test_sha256_survives_reopen(store: LocalStore) -> None:
    info = store.put_stream("a/b", [b"payload"])
    again = LocalStore(store.root).stat("a/b")
    assert again is not None and again.sha256 in (info.sha256, None)
    if hasattr(os, "getxattr"):
        assert again.sha256 == info.sha256  # the xattr travels with the renamed file
