"""S3 blob backend: `s3://bucket/prefix` -> `<prefix>/blobs/sha256/ab/<rest>`, atomic and verified.

The endpoint, region and credentials come from the environment exactly as boto3 reads them
(`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_PROFILE`, ...). Requests use botocore's
adaptive retry mode (client-side rate limiting on throttling, backoff on 5xx and dropped
connections); `AWS_MAX_ATTEMPTS` overrides the attempt count.

Writes never leave a half-written blob at its final key:

- up to `multipart_threshold` bytes: the stream is read into memory and hashed, then one
  `PutObject` with `IfNoneMatch='*'` and the SHA-256 checksum (the server rejects a body that
  changed in transit);
- larger, with the digest known beforehand (`expected`, or a seekable stream, hashed first):
  a multipart upload straight to the final key, parts in parallel, hashed while read, and
  completed with `IfNoneMatch='*'` only if the digest matches (otherwise aborted);
- larger, from a one-pass stream: a multipart upload to `<prefix>/tmp/<uuid>` hashed while
  streaming, then a server-side copy to the final key with `IfNoneMatch='*'` (a multipart
  `UploadPartCopy` above `copy_threshold`, 5 GiB by default: S3's limit for one copy), then
  the temp object is deleted.

A concurrent writer of the same blob gets 412 Precondition Failed: the blob is already there
with identical bytes, so that put reports `created=False`. A corrupted object is not repaired
by a put (the condition keeps it); `delete` it first. Abandoned temp objects and multipart
uploads (a killed writer) are removed by `clean_temp`, which `kiln gc` calls.

Reads stream one GET; objects larger than one part are read as consecutive ranges fetched in
parallel by a small thread pool (each pinned to the first response's ETag) and consumed in
order, so the content is still hashed in order and verified at the end.
"""

from __future__ import annotations

import base64
import io
import math
import os
import queue
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from artifacts.backends.base import (
    BLOB_DIR,
    REFS_DIR,
    TEMP_AGE_S,
    TEMP_DIR,
    BlobBackend,
    BlobInfo,
    PutResult,
    VerifyingReader,
    blob_key,
    digest_at,
)
from artifacts.digest import CHUNK_SIZE, Digest, Hasher
from artifacts.errors import (
    BlobCorrupted,
    BlobNotFound,
    S3AccessDenied,
    S3BucketNotFound,
    S3Error,
    S3Unreachable,
    SizeMismatch,
    StoreConfigError,
)
from artifacts.fsio import read_all, read_full
from artifacts.redact import redact_url

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 8 * MiB  # as boto3's transfer manager; measured faster than 16 MiB on SeaweedFS
DEFAULT_WORKERS = 8
DEFAULT_MAX_ATTEMPTS = 6  # total, the first request included
MAX_COPY_SIZE = 5 * GiB  # the largest object one CopyObject may copy
COPY_PART_SIZE = 512 * MiB
MAX_PARTS = 10_000
_PART_SIZE_DOUBLING = 1_000  # unknown-length streams: double the part size every 1000 parts
_STREAM_ATTEMPTS = 3  # re-requests of a range whose body broke off mid-transfer
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DENIED = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
    }
)
_NETWORK_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,
)

CREDENTIALS_ERRORS = (NoCredentialsError, PartialCredentialsError)

T = TypeVar("T")


def no_credentials(url: str, exc: BaseException) -> S3AccessDenied:
    """The one error for a request that botocore could not sign (CREDENTIALS_ERRORS), for
    every S3 caller: the store backend and readers of other S3 prefixes (Neuron caches)."""
    return S3AccessDenied(
        f"no usable AWS credentials for {url} ({exc}): set AWS_ACCESS_KEY_ID and"
        " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); StoreConfigError if malformed."""
    if not url.startswith("s3://"):
        raise StoreConfigError(
            f"not an S3 store URL: {redact_url(url)!r} (expected s3://BUCKET/PREFIX)"
        )
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if "@" in bucket:
        raise StoreConfigError(
            f"store URL {redact_url(url)!r}: credentials do not belong in an S3 store URL;"
            " set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if not _BUCKET_RE.match(bucket):
        raise StoreConfigError(
            f"store URL {url!r}: {bucket!r} is not a valid S3 bucket name"
            " (3-63 lowercase letters, digits, '.' or '-')"
        )
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise StoreConfigError(f"store URL {url!r}: the prefix has an empty, '.' or '..' part")
    return bucket, prefix


class S3BlobBackend(BlobBackend):
    """Blobs as S3 objects; see the module docstring for how writes stay atomic."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        workers: int = DEFAULT_WORKERS,
        max_attempts: int | None = None,
        copy_threshold: int = MAX_COPY_SIZE,
        copy_part_size: int = COPY_PART_SIZE,
    ) -> None:
        if part_size < 1 or multipart_threshold < part_size:
            raise StoreConfigError(
                f"S3 backend: part size {part_size} must be positive and at most the"
                f" multipart threshold {multipart_threshold}"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._blob_prefix = f"{self._root}{BLOB_DIR}/"
        self._ref_prefix = f"{self._root}{REFS_DIR}/"
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.workers = max(1, workers)
        self.copy_threshold = min(copy_threshold, MAX_COPY_SIZE)
        self.copy_part_size = copy_part_size
        self.client = client if client is not None else _make_client(
            self.workers, max_attempts, self.url
        )
        self.endpoint = str(getattr(self.client.meta, "endpoint_url", "") or "AWS S3")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3BlobBackend:
        """Open `s3://bucket/prefix` (options as for the constructor)."""
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **options)

    # -- keys --------------------------------------------------------------------------------
    def key_of(self, digest: Digest) -> str:
        """The object key of a blob: `<prefix>/blobs/sha256/ab/<rest>`."""
        return f"{self._root}{blob_key(digest)}"

    def location(self, digest: Digest) -> str:
        """`s3://bucket/key` of a blob, for messages."""
        return f"s3://{self.bucket}/{self.key_of(digest)}"

    def _temp_key(self) -> str:
        return f"{self._root}{TEMP_DIR}/{uuid.uuid4().hex}"

    # -- reads -------------------------------------------------------------------------------
    def has(self, digest: Digest) -> bool:
        """Whether the blob exists (one HEAD)."""
        return self.stat(digest) is not None

    def stat(self, digest: Digest) -> BlobInfo | None:
        """The blob's size and modification time from a HEAD, or None if absent."""
        response = self._head_response(self.key_of(digest))
        if response is None:
            self._check_bucket()
            return None
        return BlobInfo(
            digest, int(response["ContentLength"]), response["LastModified"].timestamp()
        )

    def _head(self, key: str) -> int | None:
        response = self._head_response(key)
        if response is None:
            self._check_bucket()
            return None
        return int(response["ContentLength"])

    def _head_response(self, key: str) -> dict | None:  # type: ignore[type-arg]
        """The HEAD response for `key`, or None when the object does not exist."""
        try:
            return self._call(
                key,
                "HEAD",
                lambda: self.client.head_object(Bucket=self.bucket, Key=key),
                expect=(404,),
            )
        except _Status:
            return None

    def open(self, digest: Digest) -> IO[bytes]:
        """A verifying reader (BlobNotFound if absent); large objects read in parallel ranges."""
        key = self.key_of(digest)
        response: dict[str, Any] | None
        try:
            response = self._call(
                key,
                "GET",
                lambda: self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes=0-{self.part_size - 1}"
                ),
                expect=(404, 416),
            )
        except _Status as exc:
            if exc.status == 404:
                raise BlobNotFound(digest, self.url) from None
            response = None  # 416: an empty object has no byte 0 to ask for
        if response is None:
            response = self._call(
                key, "GET", lambda: self.client.get_object(Bucket=self.bucket, Key=key)
            )
            size = int(response["ContentLength"])
        else:
            size = _total_size(response)
        if size > int(response["ContentLength"]):
            return _ParallelReader(self, key, digest, size, response)  # type: ignore[return-value]
        raw = _BodyReader(self, key, size, response)
        return VerifyingReader(raw, digest, self.location(digest), size)  # type: ignore[return-value]

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob under `<prefix>/blobs/sha256/`, in digest order (temp objects excluded)."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._blob_prefix)
        iterator = iter(pages)
        while True:
            page = self._call(self._blob_prefix, "LIST", lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", ()):
                shard, _, rest = item["Key"][len(self._blob_prefix) :].partition("/")
                digest = digest_at(shard, rest)
                if digest is not None:
                    yield BlobInfo(digest, int(item["Size"]), item["LastModified"].timestamp())

    # -- writes ------------------------------------------------------------------------------
    def put(self, stream: IO[bytes], expected: Digest | None = None) -> PutResult:
        """Store a stream, hashed while uploaded; visible whole or not at all (module doc)."""
        self._check_bucket()
        if expected is not None:
            size = self._head(self.key_of(expected))
            if size is not None:
                return PutResult(expected, size, False)
        elif _remaining(stream) >= self.multipart_threshold:
            # One local pass to learn the digest lets the upload go straight to its final key
            # (no server-side copy); the upload hashes again and must agree.
            prehashed = _prehash(stream)
            size = self._head(self.key_of(prehashed))
            if size is not None:
                return PutResult(prehashed, size, False)
            try:
                return self._put(stream, prehashed)
            except BlobCorrupted as exc:
                raise S3Error(
                    f"the data changed while it was uploaded (it hashed to {prehashed}, then"
                    f" to {exc.actual}); nothing was stored"
                ) from None
        return self._put(stream, expected)

    def _put(self, stream: IO[bytes], expected: Digest | None) -> PutResult:
        hasher = Hasher()
        head = _read_upto(stream, self.multipart_threshold)
        if len(head) < self.multipart_threshold:
            return self._put_small(head, hasher, expected)
        source = _Prefixed(head, stream)
        if expected is not None:
            return self._put_multipart_direct(source, hasher, expected)
        return self._put_via_temp(source, hasher)

    def _put_small(self, data: bytes, hasher: Hasher, expected: Digest | None) -> PutResult:
        hasher.update(data)
        digest = hasher.digest()
        _check_expected(expected, digest)
        key = self.key_of(digest)
        checksum = base64.b64encode(bytes.fromhex(digest.hex)).decode()
        try:
            self._call(
                key,
                "PUT",
                lambda: self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    IfNoneMatch="*",
                    ChecksumSHA256=checksum,
                ),
                expect=(412,),
            )
        except _Status:
            return PutResult(digest, hasher.size, False)
        return PutResult(digest, hasher.size, True)

    def _put_multipart_direct(
        self, stream: IO[bytes], hasher: Hasher, expected: Digest
    ) -> PutResult:
        key = self.key_of(expected)
        upload_id, parts = self._upload_parts(key, _chunks(stream, hasher, self.part_size))
        created = False
        try:
            digest = hasher.digest()
            _check_expected(expected, digest)
            created = self._complete(key, upload_id, parts)
        finally:
            if not created:
                self._abort(key, upload_id)
        return PutResult(expected, hasher.size, created)

    def _put_via_temp(self, stream: IO[bytes], hasher: Hasher) -> PutResult:
        temp = self._temp_key()
        upload_id, parts = self._upload_parts(temp, _chunks(stream, hasher, self.part_size))
        try:
            if not self._complete(temp, upload_id, parts):
                raise S3Error(f"temporary object s3://{self.bucket}/{temp} already exists")
        except BaseException:
            self._abort(temp, upload_id)
            raise
        try:
            digest = hasher.digest()
            key = self.key_of(digest)
            if self._head(key) is not None:
                return PutResult(digest, hasher.size, False)
            if hasher.size <= self.copy_threshold:
                created = self._copy_once(temp, key)
            else:
                created = self._copy_multipart(temp, key, hasher.size)
            return PutResult(digest, hasher.size, created)
        finally:
            self._delete_quietly(temp)

    def _upload_parts(
        self, key: str, chunks: Iterator[bytes | bytearray]
    ) -> tuple[str, list[dict[str, Any]]]:
        """Upload `chunks` as the parts of a new multipart upload; returns (id, parts)."""
        created = self._call(
            key,
            "CreateMultipartUpload",
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
            ),
        )
        upload_id: str = created["UploadId"]
        try:
            parts = self._run_bounded(
                (
                    (lambda n=number, c=chunk: self._upload_part(key, upload_id, n, c))
                    for number, chunk in enumerate(chunks, 1)
                )
            )
        except BaseException:
            self._abort(key, upload_id)
            raise
        return upload_id, parts

    def _upload_part(
        self, key: str, upload_id: str, number: int, chunk: bytes | bytearray
    ) -> dict[str, Any]:
        response = self._call(
            key,
            f"UploadPart {number}",
            lambda: self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                ChecksumAlgorithm="CRC32",
            ),
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> bool:
        """Complete with `IfNoneMatch='*'`: False if the key already exists (the upload stays
        open for the caller to abort)."""
        try:
            self._call(
                key,
                "CompleteMultipartUpload",
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
                expect=(412,),
            )
        except _Status:
            return False
        return True

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError):
            pass  # best effort: `clean_temp` aborts what is left

    def _copy_once(self, source: str, key: str) -> bool:
        try:
            self._call(
                key,
                "CopyObject",
                lambda: self.client.copy_object(
                    Bucket=self.bucket,
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    IfNoneMatch="*",
                ),
                expect=(412,),
            )
        except _Status:
            return False
        return True

    def _copy_multipart(self, source: str, key: str, size: int) -> bool:
        part = max(self.copy_part_size, math.ceil(size / MAX_PARTS))
        created = self._call(
            key,
            "CreateMultipartUpload",
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key),
        )
        upload_id: str = created["UploadId"]

        def copy_part(number: int, start: int) -> dict[str, Any]:
            end = min(start + part, size) - 1
            response = self._call(
                key,
                f"UploadPartCopy {number}",
                lambda: self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    CopySourceRange=f"bytes={start}-{end}",
                ),
            )
            return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

        done = False
        try:
            parts = self._run_bounded(
                (lambda n=i + 1, s=start: copy_part(n, s))
                for i, start in enumerate(range(0, size, part))
            )
            done = self._complete(key, upload_id, parts)
        finally:
            if not done:
                self._abort(key, upload_id)
        return done

    def delete(self, digest: Digest) -> bool:
        """Delete the blob; False if it was not there."""
        key = self.key_of(digest)
        if self._head(key) is None:
            return False
        self._call(key, "DELETE", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        return True

    def _delete_quietly(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError):
            pass  # an orphan temp object: `clean_temp` removes it later

    def clean_temp(self, older_than_seconds: float = TEMP_AGE_S) -> int:
        """Delete temp objects and abort multipart uploads older than this; returns how many."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        temp_prefix = f"{self._root}{TEMP_DIR}/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(
            temp_prefix,
            "LIST",
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=temp_prefix)),
        ):
            for item in page.get("Contents", ()):
                if item["LastModified"].timestamp() < cutoff:
                    self._delete_quietly(item["Key"])
                    removed += 1
        uploads = self.client.get_paginator("list_multipart_uploads")
        for page in self._call(
            self._root,
            "ListMultipartUploads",
            lambda: list(uploads.paginate(Bucket=self.bucket, Prefix=self._root)),
        ):
            for upload in page.get("Uploads", ()):
                ours = upload["Key"].startswith((temp_prefix, self._blob_prefix))
                if ours and upload["Initiated"].timestamp() < cutoff:
                    self._abort(upload["Key"], upload["UploadId"])
                    removed += 1
        return removed

    # -- ref objects: small named objects beside the blobs (artifacts/tagrefs.py) --------
    def ref_location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._ref_prefix}{key}"

    def read_ref(self, key: str) -> bytes | None:
        """The bytes of ref object `key` (`name/tag`, one GET), or None if there is none."""
        full = f"{self._ref_prefix}{key}"
        try:
            response = self._call(
                full,
                "GET",
                lambda: self.client.get_object(Bucket=self.bucket, Key=full),
                expect=(404,),
            )
        except _Status:
            self._check_bucket()
            return None
        try:
            return bytes(response["Body"].read())
        except _NETWORK_ERRORS as exc:
            raise self._unreachable(exc, full, "GET") from exc

    def write_ref(self, key: str, data: bytes) -> None:
        """Replace ref object `key` with one PutObject: readers get the old or the new object
        whole, never a mix (S3 writes are atomic per object)."""
        self._check_bucket()
        full = f"{self._ref_prefix}{key}"
        self._call(
            full,
            "PUT",
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType="application/json"
            ),
        )

    def delete_ref(self, key: str) -> bool:
        full = f"{self._ref_prefix}{key}"
        if self.read_ref(key) is None:
            return False
        self._call(full, "DELETE", lambda: self.client.delete_object(Bucket=self.bucket, Key=full))
        return True

    def iter_refs(self, prefix: str = "") -> Iterator[str]:
        """Keys of the ref objects whose key starts with `prefix`, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        listed = f"{self._ref_prefix}{prefix}"
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=listed))
        while True:
            page = self._call(listed, "LIST", lambda: next(pages, None))
            if page is None:
                return
            for item in page.get("Contents", ()):
                yield item["Key"][len(self._ref_prefix) :]

    # -- plumbing ----------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kiln-s3")
            return self._pool

    def _run_bounded(self, tasks: Iterator[Callable[[], T]]) -> list[T]:
        """Run tasks on the pool, at most `workers` at once (bounding memory), in order."""
        pool = self._executor()
        slots = threading.Semaphore(self.workers)
        futures: list[Future[T]] = []
        checked = 0
        try:
            for task in tasks:
                slots.acquire()
                while checked < len(futures) and futures[checked].done():
                    futures[checked].result()  # stop early at the first failure
                    checked += 1
                future = pool.submit(task)
                future.add_done_callback(lambda _: slots.release())
                futures.append(future)
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()  # wait: nothing may still write after an abort
            raise

    def _call(
        self,
        key: str,
        action: str,
        request: Callable[[], T],
        expect: tuple[int, ...] = (),
    ) -> T:
        """Run one request, turning botocore errors into store errors that name the key.

        A status in `expect` raises `_Status` for the caller (a missing bucket never does).
        """
        try:
            return request()
        except ClientError as exc:
            status = _status(exc)
            if status in expect and _code(exc) != "NoSuchBucket":
                raise _Status(status) from None
            raise self._client_error(exc, key, action) from exc
        except CREDENTIALS_ERRORS as exc:
            raise no_credentials(self.url, exc) from exc
        except _NETWORK_ERRORS as exc:
            raise self._unreachable(exc, key, action) from exc
        except BotoCoreError as exc:
            raise S3Error(f"S3 {action} s3://{self.bucket}/{key} failed: {exc}") from exc

    def _client_error(self, exc: ClientError, key: str, action: str) -> S3Error:
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message") or code
        where = f"s3://{self.bucket}/{key}"
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code in _DENIED:
            return S3AccessDenied(
                f"access denied: S3 {action} {where} at {self.endpoint} ({code}: {message});"
                " check the AWS credentials and the bucket policy"
            )
        hint = " (a server error that outlasted the retries; try again later)"
        return S3Error(
            f"S3 {action} {where} at {self.endpoint} failed: {code}: {message}"
            + (hint if _status(exc) >= 500 else "")
        )

    def _unreachable(self, exc: BaseException, key: str, action: str) -> S3Unreachable:
        return S3Unreachable(
            f"cannot reach the S3 endpoint {self.endpoint} for {action}"
            f" s3://{self.bucket}/{key}: {exc} (the operation can be retried)"
        )

    def _no_bucket(self) -> S3BucketNotFound:
        return S3BucketNotFound(
            f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
            f" (store {self.url}): create it or fix the store URL"
        )

    def _check_bucket(self) -> None:
        """Once per backend: fail clearly if the bucket is missing. HEAD on a key answers a
        bare 404 for a missing bucket too, and some servers (SeaweedFS) create a bucket on
        the first PUT to it, so a typo in the store URL would go unnoticed."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._no_bucket() from exc
            # 403: a policy may allow objects but not HeadBucket (s3:ListBucket); the
            # requests themselves will say if access is really denied.
        except CREDENTIALS_ERRORS as exc:
            raise no_credentials(self.url, exc) from exc
        except _NETWORK_ERRORS as exc:
            raise self._unreachable(exc, "", "HeadBucket") from exc
        self._bucket_checked = True

    def _get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes [start, end) of `key`, re-requested if the body breaks off mid-transfer."""
        for attempt in range(1, _STREAM_ATTEMPTS + 1):
            response = self._call(
                key,
                "GET",
                lambda: self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
                ),
            )
            try:
                data = response["Body"].read()
            except _NETWORK_ERRORS as exc:
                if attempt == _STREAM_ATTEMPTS:
                    raise self._unreachable(exc, key, "GET") from exc
                time.sleep(0.2 * attempt)
                continue
            if len(data) == end - start:
                return data
        raise S3Error(f"S3 GET s3://{self.bucket}/{key}: range {start}-{end - 1} came back short")

    def close(self) -> None:
        """Stop the transfer threads (idle ones only hold memory)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class _Status(Exception):
    """Internal: a status the caller asked to handle itself (404 absent, 412 exists, 416)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _BodyReader(io.RawIOBase):
    """One GET's body, streamed; if it breaks off, the rest is asked for again (same ETag)."""

    def __init__(self, backend: S3BlobBackend, key: str, size: int, response: dict[str, Any]):
        super().__init__()
        self._backend = backend
        self._key = key
        self._end = size
        self._etag: str = response.get("ETag", "")
        self._body: Any = response["Body"]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._end - self._pos)
        if want <= 0:
            return 0
        for attempt in range(1, _STREAM_ATTEMPTS + 1):
            try:
                data = self._body.read(want)
            except _NETWORK_ERRORS as exc:
                if attempt == _STREAM_ATTEMPTS:
                    raise self._backend._unreachable(exc, self._key, "GET") from exc
                data = b""
            if data:
                view[: len(data)] = data
                self._pos += len(data)
                return len(data)
            if attempt < _STREAM_ATTEMPTS:  # ended or broke early: ask again from here
                time.sleep(0.2 * attempt)
                self._reopen()
        raise S3Error(
            f"S3 GET s3://{self._backend.bucket}/{self._key}: the body ended at byte"
            f" {self._pos} of {self._end}"
        )

    def _reopen(self) -> None:
        backend = self._backend
        self._body.close()
        response = backend._call(
            self._key,
            "GET",
            lambda: backend.client.get_object(
                Bucket=backend.bucket,
                Key=self._key,
                Range=f"bytes={self._pos}-{self._end - 1}",
                IfMatch=self._etag,
            ),
        )
        self._body = response["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _Done:
    """End of a pipeline: the digest and size of everything it hashed."""

    def __init__(self, digest: Digest, size: int) -> None:
        self.digest = digest
        self.size = size


class _Failed:
    """A pipeline's error, handed to the reading thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ParallelReader(io.RawIOBase):
    """A large object as consecutive ranges, verified: fetched in parallel by the backend's
    pool, hashed in order by a pipeline thread while the caller copies earlier ranges out.

    The digest is checked before the last bytes are handed out, so a caller that stops at
    the object's size without reading EOF still never gets unverified bytes. Ranges after
    the first are pinned with `IfMatch` to the first response's ETag.
    """

    def __init__(
        self,
        backend: S3BlobBackend,
        key: str,
        digest: Digest,
        size: int,
        response: dict[str, Any],
    ) -> None:
        super().__init__()
        self._backend = backend
        self._key = key
        self._digest = digest
        self._size = size
        self._etag: str = response.get("ETag", "")
        self._pos = 0
        self._chunk = memoryview(b"")
        self._error: BaseException | None = None
        self._queue: queue.Queue[bytes | _Done | _Failed] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._pipeline, args=(response,), name="kiln-s3-read", daemon=True
        )
        self._thread.start()

    def readable(self) -> bool:
        return True

    # -- the pipeline thread -----------------------------------------------------------------
    def _pipeline(self, response: dict[str, Any]) -> None:
        backend = self._backend
        pool = backend._executor()
        first_end = min(self._size, int(response["ContentLength"]))
        pending: deque[Future[bytes]] = deque([pool.submit(self._first, response, first_end)])
        next_start = first_end
        hasher = Hasher()
        try:
            while True:
                while next_start < self._size and len(pending) < backend.workers:
                    end = min(next_start + backend.part_size, self._size)
                    pending.append(
                        pool.submit(backend._get_range, self._key, next_start, end, self._etag)
                    )
                    next_start = end
                if not pending:
                    break
                data = pending.popleft().result()
                hasher.update(data)
                if not self._offer(data):
                    return
            self._offer(_Done(hasher.digest(), hasher.size))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
            self._offer(_Failed(exc))
        finally:
            for future in pending:
                future.cancel()

    def _first(self, response: dict[str, Any], end: int) -> bytes:
        try:
            data = response["Body"].read()
        except _NETWORK_ERRORS:
            data = b""
        finally:
            response["Body"].close()
        if len(data) == end:
            return data
        return self._backend._get_range(self._key, 0, end, self._etag)

    def _offer(self, item: bytes | _Done | _Failed) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    # -- the reading thread ------------------------------------------------------------------
    def _next(self) -> bytes | _Done:
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._error is not None:
            raise self._error
        if not len(view) or self._pos >= self._size:
            return 0
        if not self._chunk:
            try:
                item = self._next()
                if isinstance(item, _Done):
                    raise self._size_error(item.size)
                if self._pos + len(item) >= self._size:
                    self._verify()
            except BaseException as exc:
                self._error = exc  # the pipeline has ended: every later read fails the same
                raise
            self._chunk = memoryview(item)
        n = min(len(view), len(self._chunk))
        view[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        self._pos += n
        return n

    def _verify(self) -> None:
        done = self._next()
        if not isinstance(done, _Done):
            raise self._size_error(self._size + len(done))
        if done.size != self._size:
            raise self._size_error(done.size)
        if done.digest != self._digest:
            raise BlobCorrupted(self._digest, done.digest, self._backend.location(self._digest))

    def _size_error(self, got: int) -> SizeMismatch:
        return SizeMismatch(
            f"blob {self._digest} at {self._backend.location(self._digest)}: read {got}"
            f" bytes, expected {self._size}"
        )

    def read_all(self) -> bytes:
        """Read everything (verified)."""
        return read_all(self, CHUNK_SIZE)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._chunk = memoryview(b"")
            while True:  # free what the pipeline already handed over
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        super().close()


def _make_client(workers: int, max_attempts: int | None, url: str = "S3") -> Any:
    """A client with adaptive retries; partial credentials in the environment (botocore
    checks them here, not at the first request) fail as `no_credentials(url)`."""
    retries: dict[str, Any] = {"mode": "adaptive"}
    if max_attempts is not None:
        retries["total_max_attempts"] = max_attempts
    elif not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = DEFAULT_MAX_ATTEMPTS
    config = Config(retries=retries, max_pool_connections=max(10, 2 * workers))  # type: ignore[arg-type]
    try:
        return boto3.session.Session().client("s3", config=config)
    except CREDENTIALS_ERRORS as exc:
        raise no_credentials(url, exc) from exc


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or _status(exc))


def _total_size(response: dict[str, Any]) -> int:
    """The object's size from a ranged GET's `Content-Range: bytes 0-N/TOTAL`."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return int(response["ContentLength"])  # a server that ignored the range sent it all


def _check_expected(expected: Digest | None, actual: Digest) -> None:
    if expected is not None and actual != expected:
        raise BlobCorrupted(expected, actual, "<upload stream>")


def _remaining(stream: IO[bytes]) -> int:
    """Bytes left in a seekable stream, or -1 if it cannot tell."""
    try:
        if not stream.seekable():
            return -1
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
    except (AttributeError, OSError, ValueError):
        return -1
    return end - here


def _prehash(stream: IO[bytes]) -> Digest:
    here = stream.tell()
    hasher = Hasher()
    buffer = memoryview(bytearray(8 * MiB))
    while n := read_full(stream, buffer):
        hasher.update(buffer[:n])
    stream.seek(here)
    return hasher.digest()


def _read_upto(stream: IO[bytes], limit: int) -> bytes:
    """Read until `limit` bytes or the end, without allocating `limit` bytes up front."""
    pieces: list[bytes] = []
    total = 0
    while total < limit:
        data = stream.read(min(limit - total, 8 * MiB))
        if not data:
            break
        pieces.append(data)
        total += len(data)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream, followed by the rest of that stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return read_full(self._rest, view) if len(view) else 0


def _chunks(stream: IO[bytes], hasher: Hasher, part_size: int) -> Iterator[bytes | bytearray]:
    """The upload's parts, hashed in order; every part but the last is `part_size` long."""
    number = 0
    while True:
        if number and number % _PART_SIZE_DOUBLING == 0:
            part_size *= 2
        buffer = bytearray(part_size)
        n = read_full(stream, memoryview(buffer))
        if not n:
            return
        if n < part_size:
            del buffer[n:]
        hasher.update(buffer)
        number += 1
        if number > MAX_PARTS:
            raise S3Error(f"upload too large: more than {MAX_PARTS} parts")
        yield buffer
