"""``s3://bucket[/prefix]`` object store through boto3 (AWS S3, MinIO, SeaweedFS).

Why it is built this way:
- Memory stays bounded: ``put_file`` lets boto3's transfer manager do multipart uploads in
  ``part_size`` pieces; ``put_stream`` drives ``create_multipart_upload`` itself, holding at
  most one part in memory, and hashes/counts the bytes as they pass.
- Atomic and clean: an S3 object appears only when its single PUT or its multipart
  ``complete`` succeeds. Any failure (``ObjectTooLarge``, a broken input stream, a network
  error) aborts the multipart upload, so no object and no orphaned parts are left.
- The sha256 travels as user metadata (``x-amz-meta-sha256``) so ``stat`` knows it without
  reading the bytes. A multipart stream only knows it at the end and S3 metadata is fixed
  at creation, so the object is then copied onto itself with the metadata replaced.
- Self-hosted servers need path-style addressing and an explicit endpoint; both come from
  arguments or the environment (``PCD_S3_ENDPOINT_URL``, ``AWS_*``), never from settings
  imports, so this module stays usable by any caller.
- A blip is not a failed job. botocore retries a request 3 times within about a second;
  an S3 server that restarts, fails over or sheds load is away for longer, and a worker
  that gives up then loses a run at its checkpoint or its final upload. So every request
  that is safe to repeat (whole-object PUT from a file or bytes, a part, GET, HEAD, LIST,
  DELETE) is retried on errors that say "try again" (5xx, throttling, a dropped or timed-out
  connection, a truncated body) with exponential backoff and jitter (tenacity) until
  ``retry_s`` seconds (``PCD_S3_RETRY_S``, default 120) have passed since the first attempt;
  the last wait may overrun that by at most 15 s. A 4xx answer is final at once.
  Creating and completing a multipart upload are not repeated: a repeat after a lost
  answer would open a second upload or fail on the finished one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as botocore_errors
import s3transfer.exceptions
import tenacity
from boto3.exceptions import Boto3Error
from boto3.exceptions import RetriesExceededError as Boto3RetriesExceeded
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from jobs.storage.base import (
    DEFAULT_CHUNK,
    Hasher,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    check_key,
    check_prefix,
    file_sha256,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_MAX_COPY = 5 * 1024 * MIB  # copy_object's single-request limit
_MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's ceiling
DEFAULT_RETRY_S = 120.0
RETRY_FIRST_WAIT_S = 0.5  # then doubling, with jitter, up to 15 s between attempts
# Error codes that mean "the server could not take it now", whatever the HTTP status.
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                              "ThrottlingException", "RequestTimeout", "RequestTimeoutException"})
# A connection refused, reset or timed out, or a body cut short: the request never completed.
_TRANSIENT_ERRORS = (botocore_errors.ConnectionError, botocore_errors.HTTPClientError,
                     botocore_errors.IncompleteReadError, Boto3RetriesExceeded,
                     s3transfer.exceptions.RetriesExceededError)
T = TypeVar("T")


def is_transient(exc: BaseException | None) -> bool:
    """Whether the same request may succeed if sent again.

    boto3 wraps what went wrong (an upload's ``ClientError`` becomes ``S3UploadFailedError``,
    its message the only trace), so the chain of causes is walked to the first botocore
    error, and that decides: a 5xx, 429 or throttling code, or a transport failure, is
    transient; any other answer (403, 404, a bad request) is not.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
        if isinstance(exc, _TRANSIENT_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class S3Store:
    """An ``ObjectStore`` on one bucket, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        region: str | None = None,
        public_endpoint_url: str | None = None,
        client: Any = None,
        part_size: int = 8 * MIB,
        multipart_threshold: int = 16 * MIB,
        max_concurrency: int = 2,
        retry_s: float | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an s3:// store needs a bucket name")
        if part_size < 5 * MIB:
            raise ValueError("S3 parts must be at least 5 MiB (except the last)")
        self.bucket = bucket
        self.prefix = check_prefix(prefix.strip("/") + "/") if prefix.strip("/") else ""
        self.part_size = part_size
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=part_size,
            max_concurrency=max_concurrency, use_threads=max_concurrency > 1,
        )
        self._bucket_checked = False
        self.retry_s = _retry_window(retry_s)
        self.client = client or _make_client(endpoint_url, access_key, secret_key,
                                             session_token, region)
        # Presigned URLs are signed for the host that clients will call. Inside compose the
        # API reaches S3 as http://seaweedfs:8333, which a user's browser cannot resolve, so
        # a public endpoint (PCD_S3_PUBLIC_ENDPOINT_URL) gets a client of its own.
        public = public_endpoint_url or os.environ.get("PCD_S3_PUBLIC_ENDPOINT_URL")
        self._presigner = (self.client if not public else _make_client(
            public, access_key, secret_key, session_token, region))

    def __repr__(self) -> str:
        return f"S3Store({self.uri_base!r})"

    # ----------------------------------------------------------------- keys and URIs
    @property
    def uri_base(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def uri(self, key: str) -> str:
        return self.uri_base + check_key(key)

    def key_from_uri(self, uri_or_key: str) -> str:
        if "://" not in uri_or_key:
            return check_key(uri_or_key)
        if not uri_or_key.startswith(self.uri_base):
            raise ValueError(f"{uri_or_key} is not inside {self.uri_base}")
        return check_key(uri_or_key[len(self.uri_base):])

    def _retried(self, key: str, request: Callable[[], T]) -> T:
        """``request()``, sent again on transient errors for up to ``retry_s`` seconds, its
        final error translated into the contract's (see the module doc)."""
        with _errors(key):
            if self.retry_s <= 0:
                return request()
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(is_transient),
                stop=tenacity.stop_after_delay(self.retry_s),
                wait=(tenacity.wait_exponential(multiplier=RETRY_FIRST_WAIT_S, max=15.0)
                      + tenacity.wait_random(0, RETRY_FIRST_WAIT_S)),
                before_sleep=lambda state: _log_retry(self, key, state),
                reraise=True,
            )
            return retrying(request)

    # ------------------------------------------------------------------------ writes
    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        full = self._full(key)
        sha256, size = file_sha256(path)  # first, so the metadata can carry it
        self._retried(key, lambda: self.client.upload_file(
            str(path), self.bucket, full, ExtraArgs={"Metadata": {"sha256": sha256}},
            Config=self._transfer))
        return ObjectInfo(key, size, sha256, self.uri(key))

    def put_stream(
        self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> ObjectInfo:
        full = self._full(key)
        hasher = Hasher(key, max_bytes)
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for chunk in chunks:
                if not chunk:
                    continue
                hasher.update(chunk)  # raises ObjectTooLarge; the except below cleans up
                buf += chunk
                while len(buf) >= self.part_size:
                    if upload_id is None:
                        with _errors(key):
                            upload_id = self.client.create_multipart_upload(
                                Bucket=self.bucket, Key=full)["UploadId"]
                    with memoryview(buf) as view:  # one copy of the part, not two
                        part = bytes(view[:self.part_size])
                    del buf[:self.part_size]
                    parts.append(self._upload_part(key, full, upload_id, len(parts) + 1, part))
                    del part
            sha256 = hasher.hexdigest
            if upload_id is None:  # small: one PUT, metadata known up front
                body = bytes(buf)
                self._retried(key, lambda: self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=body, Metadata={"sha256": sha256}))
            else:
                if buf:
                    parts.append(self._upload_part(key, full, upload_id, len(parts) + 1,
                                                   bytes(buf)))
                with _errors(key):
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
                upload_id = None  # completed: nothing to abort from here on
                self._set_sha256(full, sha256, hasher.size)
        except BaseException:
            if upload_id is not None:
                with contextlib.suppress(ClientError, BotoCoreError):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                       UploadId=upload_id)
            raise
        return ObjectInfo(key, hasher.size, sha256, self.uri(key))

    def _upload_part(self, key: str, full: str, upload_id: str, number: int,
                     body: bytes) -> dict[str, Any]:
        resp = self._retried(key, lambda: self.client.upload_part(
            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body))
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _set_sha256(self, full: str, sha256: str, size: int) -> None:
        """Best effort: record the sha256 after a multipart upload (see the module doc)."""
        if size > _MAX_COPY:
            return
        try:
            self.client.copy_object(
                Bucket=self.bucket, Key=full, CopySource={"Bucket": self.bucket, "Key": full},
                Metadata={"sha256": sha256}, MetadataDirective="REPLACE")
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not record sha256 metadata on s3://%s/%s: %s",
                        self.bucket, full, exc)

    # ------------------------------------------------------------------------- reads
    def get_file(self, key: str, dest_path: str | Path) -> Path:
        full = self._full(key)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._retried(key, lambda: self.client.download_file(
                self.bucket, full, str(tmp), Config=self._transfer))
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        full = self._full(key)
        # The GET happens now, so a missing key fails at the call. Only the request is
        # retried: once bytes have gone to the caller, a cut stream is the caller's error.
        body = self._retried(key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=full))["Body"]
        return _iter_body(body, key, chunk_size)

    def stat(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        try:
            head = self._retried(key, lambda: self.client.head_object(
                Bucket=self.bucket, Key=full))
        except ObjectNotFound:
            # HEAD cannot tell a missing key from a missing bucket; a readiness probe must.
            self._check_bucket()
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head.get("Metadata", {}).get("sha256"),
                          self.uri(key), head.get("ETag", "").strip('"') or None)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self.prefix + check_prefix(prefix)

        def listing() -> list[ObjectInfo]:  # a retry starts the listing again
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):  # directory markers some servers list
                        continue
                    key = obj["Key"][len(self.prefix):]
                    out.append(ObjectInfo(key, int(obj["Size"]), None, self.uri(key),
                                          obj.get("ETag", "").strip('"') or None))
            return out

        return sorted(self._retried(prefix, listing), key=lambda info: info.key)

    # ----------------------------------------------------------------------- deletes
    def delete(self, key: str) -> None:
        full = self._full(key)
        self._retried(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the store)")
        keys = [self.prefix + info.key for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            resp = self._retried(prefix, functools.partial(
                self.client.delete_objects, Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True}))
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"could not delete {len(resp['Errors'])} objects under "
                                   f"{prefix!r}: {first.get('Key')}: {first.get('Message')}")
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        with _errors(key):
            return str(self._presigner.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=max(1, min(int(expires_s), _MAX_PRESIGN_S))))

    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        try:
            self._retried(self.bucket, lambda: self.client.head_bucket(Bucket=self.bucket))
        except ObjectNotFound as exc:  # HEAD's 404: no such bucket
            raise StorageError(f"bucket {self.bucket!r} unreachable: it does not exist "
                               f"({exc.__cause__})") from exc
        except StorageError as exc:
            raise StorageError(f"bucket {self.bucket!r} unreachable: {exc.__cause__ or exc}"
                               ) from exc
        self._bucket_checked = True


def _make_client(endpoint_url: str | None, access_key: str | None, secret_key: str | None,
                 session_token: str | None, region: str | None) -> Any:
    """A boto3 client; explicit arguments win over ``PCD_S3_*`` and then ``AWS_*`` env."""
    env = os.environ
    endpoint_url = endpoint_url or env.get("PCD_S3_ENDPOINT_URL") or None
    region = (region or env.get("PCD_S3_REGION") or env.get("AWS_REGION")
              or env.get("AWS_DEFAULT_REGION") or "us-east-1")
    config = Config(
        signature_version="s3v4",
        # Self-hosted servers (SeaweedFS, MinIO) serve buckets by path, not by subdomain.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5, read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        aws_session_token=session_token,
    )


def _retry_window(retry_s: float | None) -> float:
    """Seconds to keep retrying: the argument, else ``PCD_S3_RETRY_S``, else the default."""
    if retry_s is not None:
        return max(0.0, float(retry_s))
    raw = os.environ.get("PCD_S3_RETRY_S", "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_S
    except ValueError as exc:
        raise ValueError(f"PCD_S3_RETRY_S must be a number of seconds, not {raw!r}") from exc


def _log_retry(store: S3Store, key: str, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("S3 %s/%s: attempt %d failed (%s); again in %.1f s (gives up %.0f s "
                "after the first)", store.uri_base, key, state.attempt_number,
                _describe(exc), wait, store.retry_s)


def _describe(exc: BaseException | None) -> str:
    """``Type: message`` of ``exc``, with what a transfer retried on when it ran out.

    boto3's "Max Retries Exceeded" names no cause: s3transfer keeps the last error of its
    own download retries (a read timeout, a body cut short, a reset connection) in
    ``last_exception``. Without it, a job that failed after two minutes of retries does
    not say whether the server timed out, cut the body short or dropped the connection.
    """
    if exc is None:
        return "no exception"
    text = f"{type(exc).__name__}: {exc}"
    last = getattr(exc, "last_exception", None)
    if isinstance(last, BaseException):
        text += f" (last: {_describe(last)})"
    return text


@contextlib.contextmanager
def _errors(key: str) -> Iterator[None]:
    """Translate botocore errors into the storage errors of the contract."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            raise ObjectNotFound(f"no object {key!r}") from exc
        raise StorageError(f"S3 error on {key!r}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 unreachable on {key!r}: {exc}") from exc
    except Boto3Error as exc:  # S3UploadFailedError, RetriesExceededError: transfer failures
        raise StorageError(f"S3 transfer of {key!r} failed: {_describe(exc)}") from exc


def _iter_body(body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
    try:
        with _errors(key):
            yield from body.iter_chunks(chunk_size)
    finally:
        body.close()
