"""The S3 backend against a real SeaweedFS: multipart, ranged reads, races, corruption,
outages, a Store on S3 and the CLI's one-line errors. (The shared blob contract runs over S3
in test_backends.py.)"""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from artifacts.backends import open_backend
from artifacts.backends.local import LocalBlobBackend
from artifacts.backends.s3 import S3BlobBackend, parse_s3_url  # noqa: E402
from artifacts.digest import Digest
from artifacts.errors import (
    ArtifactError,
    BlobCorrupted,
    S3AccessDenied,
    S3BucketNotFound,
    S3Error,
    S3Unreachable,
    StoreConfigError,
)
from artifacts.gc import GcPolicy, execute_gc, plan_gc
from artifacts.store import Store
from tests.conftest import build_release
from tests.helpers.cli_helpers import assert_one_line_error
from tests.servers.s3_server import (
    BUCKET,
    S3Fixture,
    SeaweedServer,
    aws_environment,
    require_s3_tools,
)

MiB = 1024 * 1024
SMALL_PARTS: dict[str, Any] = {"multipart_threshold": 6 * MiB, "part_size": 5 * MiB}
KILN = [sys.executable, "-m", "kiln"]


class OnePass(io.RawIOBase):
    """A stream that can be read once and not seeked (like a socket), with a read hook."""

    def __init__(self, data: bytes, on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._data) - self._pos, 1 * MiB)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        if self._on_read:
            self._on_read(self._pos)
        return n


def keys(client: Any, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", ())]


def open_uploads(client: Any, prefix: str) -> list[str]:
    return [
        u["Key"]
        for u in client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", ())
    ]


def count_requests(backend: S3BlobBackend, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every `operation` request the backend sends."""
    seen: list[dict[str, Any]] = []
    backend.client.meta.events.register(
        f"before-parameter-build.s3.{operation}", lambda params, **_: seen.append(dict(params))
    )
    return seen


def read_all(backend: Any, digest: Digest) -> bytes:
    with backend.open(digest) as reader:
        return reader.read_all()


# -- URLs and configuration ---------------------------------------------------------------------


def test_url_layout_and_bad_urls(s3_server: S3Fixture) -> None:
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://B/x", "s3://ab/x", "s3://bucket/a//b", "s3://bucket/a/../b"):
        with pytest.raises(StoreConfigError):
            parse_s3_url(bad)
    backend = open_backend("s3://kiln-test/team/store/")
    assert isinstance(backend, S3BlobBackend) and backend.url == "s3://kiln-test/team/store"
    digest = Digest.of_bytes(b"x")
    assert backend.location(digest) == (
        f"s3://kiln-test/team/store/blobs/sha256/{digest.hex[:2]}/{digest.hex[2:]}"
    )
    assert S3BlobBackend("kiln-test").key_of(digest).startswith("blobs/sha256/")


def test_missing_boto3_says_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.delitem(sys.modules, "artifacts.backends.s3")
    with pytest.raises(StoreConfigError, match=r"install kiln\[s3\]"):
        open_backend("s3://kiln-test/x")


# -- multipart writes, ranged reads ---------------------------------------------------------------


def test_multipart_puts_and_parallel_ranged_get(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    backend = S3BlobBackend.from_url(url, workers=4, **SMALL_PARTS)
    client = s3_server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    one_pass, seekable = os.urandom(23 * MiB), os.urandom(17 * MiB)
    parts = count_requests(backend, "UploadPart")
    copies = count_requests(backend, "CopyObject")

    # A one-pass stream: multipart to a temp key, hashed while streaming, then copied.
    result = backend.put(OnePass(one_pass))
    assert result.created and result.digest == Digest.of_bytes(one_pass)
    assert len(parts) == 5 and len(copies) == 1
    # A seekable stream is hashed first and goes straight to its final key (no copy).
    assert backend.put(io.BytesIO(seekable)).created
    assert len(parts) == 9 and len(copies) == 1
    # Known digest and already there: nothing is read or sent.
    again = backend.put(OnePass(one_pass), expected=result.digest)
    assert not again.created and again.size == len(one_pass) and len(parts) == 9

    assert keys(client, f"{prefix}/tmp/") == [] and open_uploads(client, prefix) == []
    gets = count_requests(backend, "GetObject")
    assert read_all(backend, result.digest) == one_pass
    ranges = sorted(g["Range"] for g in gets)
    assert len(ranges) == 5 and "bytes=20971520-24117247" in ranges
    assert all(g.get("IfMatch") for g in gets[1:])  # later ranges pinned to the first ETag
    assert read_all(backend, Digest.of_bytes(seekable)) == seekable


def test_multipart_copy_above_the_copy_limit(s3_server: S3Fixture) -> None:
    # The 5 GiB CopyObject limit, scaled down: the promotion uses UploadPartCopy instead.
    backend = S3BlobBackend.from_url(
        s3_server.new_url(), copy_threshold=8 * MiB, copy_part_size=5 * MiB, **SMALL_PARTS
    )
    part_copies = count_requests(backend, "UploadPartCopy")
    data = os.urandom(12 * MiB + 5)
    result = backend.put(OnePass(data))
    assert result.created and len(part_copies) == 3
    assert read_all(backend, result.digest) == data
    assert not backend.put(OnePass(data)).created


def test_multipart_put_with_wrong_digest_leaves_nothing(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    backend = S3BlobBackend.from_url(url, **SMALL_PARTS)
    data = os.urandom(13 * MiB)
    wrong = Digest.of_bytes(b"other")
    with pytest.raises(BlobCorrupted, match=wrong.hex):
        backend.put(OnePass(data), expected=wrong)
    client = s3_server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    assert keys(client, prefix) == [] and open_uploads(client, prefix) == []


class ChangesUnderfoot(io.BytesIO):
    """A seekable stream whose content changes after the backend's first (hashing) pass."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.rewinds = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        position = super().seek(offset, whence)
        if whence == 0 and offset == 0:
            self.rewinds += 1
            if self.rewinds == 2:  # the rewind after the hashing pass
                with self.getbuffer() as view:
                    view[-1] ^= 0xFF
        return position


def test_seekable_stream_that_changes_mid_put_stores_nothing(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    backend = S3BlobBackend.from_url(url, **SMALL_PARTS)
    with pytest.raises(S3Error, match="changed while it was uploaded"):
        backend.put(ChangesUnderfoot(os.urandom(13 * MiB)))
    client = s3_server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    assert keys(client, prefix) == [] and open_uploads(client, prefix) == []


# -- concurrent writers -------------------------------------------------------------------------


def _put_in_process(url: str, data: bytes) -> tuple[str, bool]:
    result = open_backend(url).put(io.BytesIO(data))
    return str(result.digest), result.created


def test_concurrent_writers_processes_small_blob(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    data = os.urandom(300_000)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["artifacts.backends.s3", "tests.artifacts.test_s3_backend"])
    with ProcessPoolExecutor(8, mp_context=context) as pool:
        results = list(pool.map(_put_in_process, [url] * 8, [data] * 8))
    assert {d for d, _ in results} == {str(Digest.of_bytes(data))}
    assert sum(created for _, created in results) == 1
    assert read_all(open_backend(url), Digest.of_bytes(data)) == data


def test_concurrent_writers_threads_multipart_blob(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    backend = S3BlobBackend.from_url(url, **SMALL_PARTS)
    data = os.urandom(7 * MiB)
    barrier = threading.Barrier(8)

    def put(_: int) -> bool:
        barrier.wait()
        return backend.put(OnePass(data)).created

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(put, range(8)))
    assert sum(created) == 1
    assert read_all(backend, Digest.of_bytes(data)) == data
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    client = s3_server.client()
    assert keys(client, f"{prefix}/tmp/") == [] and open_uploads(client, prefix) == []


# -- corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_corrupted_object_fails_the_read_naming_the_digest(s3_server: S3Fixture, size: int) -> None:
    backend = S3BlobBackend.from_url(s3_server.new_url(), **SMALL_PARTS)
    data = os.urandom(size)
    digest = backend.put(io.BytesIO(data)).digest
    flipped = bytearray(data)
    flipped[size // 2] ^= 0xFF
    s3_server.client().put_object(Bucket=BUCKET, Key=backend.key_of(digest), Body=bytes(flipped))
    with pytest.raises(BlobCorrupted) as info:
        read_all(backend, digest)
    assert str(digest) in str(info.value) and backend.location(digest) in str(info.value)
    # A conditional put does not overwrite: repair is delete, then put.
    assert not backend.put(io.BytesIO(data)).created
    assert backend.delete(digest) and backend.put(io.BytesIO(data)).created
    assert read_all(backend, digest) == data


# -- outages ------------------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[SeaweedServer]:
    """A server of this test's own, which it may stop and restart."""
    require_s3_tools()
    server = SeaweedServer(tmp_path / "weed").start()
    try:
        yield server
    finally:
        server.stop()


def test_server_stopped_mid_push_then_retry(own_server: SeaweedServer) -> None:
    with aws_environment(own_server.env):
        backend = S3BlobBackend("kiln-test", "outage", max_attempts=2, workers=2, **SMALL_PARTS)
    data = os.urandom(30 * MiB)
    digest = Digest.of_bytes(data)
    stopped = False

    def stop_midway(position: int) -> None:
        nonlocal stopped
        if position >= 12 * MiB and not stopped:
            stopped = True
            own_server.stop()

    # Refused connections, or 500s from a server shutting down: either way, after retries,
    # an error naming the key, and nothing at the final key.
    with pytest.raises(S3Error, match=f"s3://kiln-test/outage/blobs/sha256/{digest.hex[:2]}/"):
        backend.put(OnePass(data, stop_midway), expected=digest)
    own_server.start()
    assert not backend.has(digest)
    assert backend.put(OnePass(data), expected=digest).created
    assert read_all(backend, digest) == data


def test_server_stopped_mid_pull_then_retry(own_server: SeaweedServer, tmp_path: Path) -> None:
    with aws_environment(own_server.env):
        backend = S3BlobBackend("kiln-test", "outage", max_attempts=2, workers=1, **SMALL_PARTS)
    data = os.urandom(30 * MiB)
    digest = backend.put(io.BytesIO(data)).digest
    local = LocalBlobBackend(tmp_path / "cache")

    class StopAfterFirstRead(io.RawIOBase):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner, self.reads = inner, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            self.reads += 1
            if self.reads == 2:
                own_server.stop()
            return self.inner.readinto(buffer)

    with backend.open(digest) as reader, pytest.raises(S3Unreachable, match="cannot reach"):
        local.put(StopAfterFirstRead(reader), expected=digest)
    assert not local.has(digest) and list((tmp_path / "cache" / "tmp").iterdir()) == []
    own_server.start()
    with backend.open(digest) as reader:
        assert local.put(reader, expected=digest).created
    assert read_all(local, digest) == data


# -- a Store on S3 and the CLI ------------------------------------------------------------------


def kiln(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    full.pop("KILN_STORE", None)
    full.pop("KILN_INDEX_URL", None)
    return subprocess.run(KILN + list(args), capture_output=True, text=True, env=full, timeout=120)


def test_store_round_trip_release_tag_and_kiln_verify(s3_server: S3Fixture, tmp_path: Path) -> None:
    url = s3_server.new_url()
    index = f"sqlite:///{tmp_path / 'index.db'}"
    with Store.open(url, index) as store:
        release = build_release(store, name="m")
        digest = store.put_release(release)
        store.tag(str(digest), "m:prod")
        assert store.resolve("m:prod").digest == digest
        assert store.load_release(digest) == release
    with Store.open(url, index) as store:
        assert store.load_release(store.resolve("m:prod").digest) == release

    ok = kiln("verify", "--store", url, "--index", index)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(": ok")
    listed = kiln("ls", "--store", url, "--index", index)
    assert "m:prod" in listed.stdout

    backend = S3BlobBackend.from_url(url)
    victim = release.graphs[0].executable.digest
    s3_server.client().put_object(Bucket=BUCKET, Key=backend.key_of(victim), Body=b"garbage")
    bad = kiln("verify", "--store", url, "--index", index)
    assert bad.returncode == 1 and f"BAD {victim}" in bad.stdout


def test_gc_on_s3_takes_ages_from_the_listing(s3_server: S3Fixture, tmp_path: Path) -> None:
    """The plan reads each blob's age from the listing (no HEAD per blob); the sweep deletes
    an untagged release and leaves no temp object behind."""
    url = s3_server.new_url()
    with Store.open(url, f"sqlite:///{tmp_path / 'index.db'}") as store:
        kept = build_release(store, name="kept")
        kept_digest = store.put_release(kept)
        store.tag(str(kept_digest), "kept:prod")
        dropped = store.put_release(build_release(store, name="dropped", weights=b"other"))
        heads = count_requests(store.backend, "HeadObject")  # type: ignore[arg-type]
        plan = plan_gc(store, GcPolicy(min_age_s=-60.0))
        assert heads == []
        doomed = {b.digest for b in plan.delete}
        assert dropped in doomed
        assert not doomed & {ref.digest for _, ref in kept.blob_refs()}
        report = execute_gc(store, plan)
        assert report.blobs_deleted == len(doomed)
        assert {b.digest for b in store.backend.iter_blobs()}.isdisjoint(doomed)
        assert store.resolve("kept:prod").digest == kept_digest
        assert store.load_release(kept_digest) == kept


def test_cli_errors_are_one_line(s3_server: S3Fixture, tmp_path: Path) -> None:
    index = f"sqlite:///{tmp_path / 'index.db'}"
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    missing = kiln("verify", "--store", f"s3://{bucket}/x", "--index", index)
    assert_one_line_error(missing, "kiln: error:", f"{bucket!r} does not exist")

    url = s3_server.new_url()
    denied = kiln(
        "verify", "--store", url, "--index", index, env={"AWS_SECRET_ACCESS_KEY": "wrong"}
    )
    assert_one_line_error(denied, "access denied", url.removeprefix("s3://"))

    from tests.servers.s3_server import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    unreachable = kiln(
        "verify",
        "--store",
        url,
        "--index",
        index,
        env={"AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"},
    )
    assert_one_line_error(unreachable, "cannot reach the S3 endpoint", dead)


def test_errors_from_the_library(s3_server: S3Fixture) -> None:
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(S3BucketNotFound, match=missing):
        S3BlobBackend(missing, "x").has(Digest.of_bytes(b"x"))
    # Checked before the first write too: SeaweedFS would create the bucket on a PUT.
    with pytest.raises(S3BucketNotFound, match=missing):
        S3BlobBackend(missing, "x").put(io.BytesIO(b"x"))
    with pytest.raises(S3BucketNotFound, match=missing):
        list(S3BlobBackend(missing, "x").iter_blobs())
    with aws_environment({**s3_server.server.env, "AWS_SECRET_ACCESS_KEY": "wrong"}):
        denied = S3BlobBackend.from_url(s3_server.new_url(), max_attempts=1)
    with pytest.raises(S3AccessDenied) as info:
        denied.put(io.BytesIO(b"x"))
    assert isinstance(info.value, ArtifactError)


def test_clean_temp_removes_abandoned_uploads(s3_server: S3Fixture) -> None:
    url = s3_server.new_url()
    backend = S3BlobBackend.from_url(url)
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    client = s3_server.client()
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/tmp/abandoned", Body=b"half")
    client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/tmp/killed")
    kept = backend.put(io.BytesIO(b"keep me")).digest
    assert abs(backend.stat(kept).modified_at - time.time()) < 120  # type: ignore[union-attr]
    assert backend.stat(Digest.of_bytes(b"absent")) is None
    assert backend.clean_temp(older_than_seconds=3600) == 0
    assert backend.clean_temp(older_than_seconds=-60) == 2
    assert keys(client, f"{prefix}/tmp/") == [] and open_uploads(client, prefix) == []
    assert [b.digest for b in backend.iter_blobs()] == [kept]
