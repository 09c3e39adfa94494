"""S3Store's retries, against a real boto3 client whose answers come from botocore's Stubber.

No network: the Stubber answers each request with a queued response or error, so these
tests pin which answers are retried, how many times, and what the caller finally sees. The
same behaviour against a real SeaweedFS that restarts mid-request is in
tests/integration/test_storage_s3.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber

from jobs.storage import ObjectNotFound, StorageError
from jobs.storage import s3 as s3_module
from jobs.storage.s3 import S3Store, is_transient

HEAD_OK = {"ContentLength": 3, "ETag": '"e"', "Metadata": {"sha256": "abc"}}


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")


def _raised_from(outer: type[Exception], inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as boto3's transfer code does."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer("wrapped")  # noqa: B904 (an implicit __context__, as in boto3)
    except BaseException as exc:
        return exc


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "RETRY_FIRST_WAIT_S", 0.01)


@pytest.fixture
def stubbed() -> Iterator[tuple[S3Store, Stubber]]:
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="k", aws_secret_access_key="s")
    store = S3Store("bucket", "pre", client=client, retry_s=5)
    with Stubber(client) as stub:
        yield store, stub


@pytest.mark.parametrize(("exc", "transient"), [
    (_client_error(500, "InternalError"), True),
    (_client_error(503, "SlowDown"), True),
    (_client_error(429, "TooManyRequests"), True),
    (_client_error(400, "RequestTimeout"), True),
    (_client_error(404, "NoSuchKey"), False),
    (_client_error(403, "AccessDenied"), False),
    (_client_error(400, "InvalidArgument"), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (RetriesExceededError(ValueError("body cut short")), True),
    (ValueError("not S3"), False),
    (None, False),
])
def test_is_transient(exc: BaseException | None, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_is_transient_looks_through_boto3s_wrappers() -> None:
    """upload_file turns the server's answer into S3UploadFailedError (a message only); the
    answer is still on the chain, and it decides."""
    assert is_transient(_raised_from(S3UploadFailedError, _client_error(500, "InternalError")))
    assert not is_transient(_raised_from(S3UploadFailedError, _client_error(403, "AccessDenied")))


def test_a_5xx_is_retried_until_the_server_answers(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stub = stubbed
    stub.add_client_error("head_object", "InternalError", http_status_code=500)
    stub.add_client_error("head_object", "SlowDown", http_status_code=503)
    stub.add_response("head_object", HEAD_OK, {"Bucket": "bucket", "Key": "pre/a"})
    info = store.stat("a")
    assert info is not None and (info.size, info.sha256) == (3, "abc")
    stub.assert_no_pending_responses()


def test_a_4xx_is_final_at_once(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stub = stubbed
    stub.add_client_error("delete_object", "AccessDenied", http_status_code=403)
    stub.add_response("delete_object", {})  # would be used by a (wrong) retry
    with pytest.raises(StorageError, match="AccessDenied"):
        store.delete("a")
    with pytest.raises(AssertionError):  # the second answer was never asked for
        stub.assert_no_pending_responses()


def test_not_found_stays_not_found(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stub = stubbed
    stub.add_client_error("get_object", "NoSuchKey", http_status_code=404)
    with pytest.raises(ObjectNotFound):
        store.open_stream("missing")
    stub.assert_no_pending_responses()


def test_gives_up_after_the_window_with_a_storage_error(monkeypatch: pytest.MonkeyPatch,
                                                       stubbed: tuple[S3Store, Stubber]
                                                       ) -> None:
    store, stub = stubbed
    monkeypatch.setattr(s3_module, "RETRY_FIRST_WAIT_S", 0.1)
    store.retry_s = 0.5
    for _ in range(50):
        stub.add_client_error("list_objects_v2", "InternalError", http_status_code=500)
    start = time.monotonic()
    with pytest.raises(StorageError, match="InternalError"):
        store.list("p/")
    elapsed = time.monotonic() - start
    asked = 50 - len(stub._queue)
    assert 2 <= asked < 50 and elapsed < 3.0, (asked, elapsed)


def test_retry_s_zero_sends_once(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stub = stubbed
    store.retry_s = 0
    stub.add_client_error("head_object", "InternalError", http_status_code=500)
    stub.add_response("head_object", HEAD_OK)
    with pytest.raises(StorageError):
        store.stat("a")
    assert len(stub._queue) == 1


def test_a_failed_upload_is_a_storage_error_not_an_internal_one(
        stubbed: tuple[S3Store, Stubber], tmp_path: Path) -> None:
    """boto3 raises S3UploadFailedError (not a botocore error); it must reach the worker as
    StorageError, whose code is storage_error, not internal."""
    store, stub = stubbed
    store.retry_s = 0
    stub.add_client_error("put_object", "AccessDenied", http_status_code=403)
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with pytest.raises(StorageError, match="AccessDenied"):
        store.put_file("k", path)


def test_a_failed_download_is_a_storage_error(stubbed: tuple[S3Store, Stubber],
                                             tmp_path: Path) -> None:
    store, stub = stubbed
    store.retry_s = 0
    stub.add_client_error("head_object", "Forbidden", http_status_code=403)
    with pytest.raises(StorageError):
        store.get_file("k", tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


@pytest.mark.parametrize(("value", "expected"), [("", 120.0), ("30", 30.0), ("0", 0.0),
                                                 ("-5", 0.0)])
def test_the_window_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                              expected: float) -> None:
    monkeypatch.setenv("PCD_S3_RETRY_S", value)
    assert S3Store("b", client=object()).retry_s == expected
    assert S3Store("b", client=object(), retry_s=7).retry_s == 7


def test_a_malformed_window_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCD_S3_RETRY_S", "two minutes")
    with pytest.raises(ValueError, match="PCD_S3_RETRY_S"):
        S3Store("b", client=object())


def test_a_transfer_that_ran_out_of_retries_names_its_last_error(
        stubbed: tuple[S3Store, Stubber], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 says only "Max Retries Exceeded"; the error and each retry's log line must also
    say what the transfer retried on (here a read timeout): whether the server timed out,
    cut the body short or dropped the connection."""
    store, _ = stubbed
    monkeypatch.setattr(s3_module, "RETRY_FIRST_WAIT_S", 0.01)
    store.retry_s = 0.05
    timeout = ReadTimeoutError(endpoint_url="http://s3.test/b/k")

    def download() -> None:
        raise RetriesExceededError(timeout)

    with caplog.at_level("WARNING", logger=s3_module.__name__), \
            pytest.raises(StorageError) as failed:
        store._retried("k", download)
    assert "Max Retries Exceeded" in str(failed.value)
    assert "(last: ReadTimeoutError: Read timeout on endpoint URL" in str(failed.value)
    retries = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert retries and all("last: ReadTimeoutError" in m for m in retries), retries
