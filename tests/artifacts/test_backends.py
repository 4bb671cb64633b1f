"""The blob-backend contract, run over every backend: local, and S3 on a real SeaweedFS server
started once per test session (tests/servers/s3_server.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.backends import BlobBackend, open_backend
from artifacts.backends.local import LocalBlobBackend
from artifacts.digest import Digest
from artifacts.errors import BlobCorrupted, BlobNotFound, StoreConfigError


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "s3":
        return open_backend(request.getfixturevalue("s3_server").new_url())
    return open_backend(str(tmp_path / "blobs-store"))


def test_put_get_has_delete(backend) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(10_000_000)
    result = backend.put(io.BytesIO(data))
    assert result.created and result.size == len(data)
    assert result.digest == Digest.of_bytes(data)
    assert backend.has(result.digest)
    assert backend.stat(result.digest).size == len(data)
    with backend.open(result.digest) as reader:
        assert reader.read_all() == data
    again = backend.put(io.BytesIO(data))
    assert not again.created and again.digest == result.digest
    assert [b.digest for b in backend.iter_blobs()] == [result.digest]
    assert backend.delete(result.digest)
    assert not backend.has(result.digest)
    assert not backend.delete(result.digest)


def test_missing_blob_names_digest(backend) -> None:  # type: ignore[no-untyped-def]
    missing = Digest.of_bytes(b"nope")
    with pytest.raises(BlobNotFound, match=missing.hex):
        backend.open(missing)
    assert backend.stat(missing) is None


def test_put_with_wrong_expected_digest_stores_nothing(backend) -> None:  # type: ignore[no-untyped-def]
    wrong = Digest.of_bytes(b"something else")
    with pytest.raises(BlobCorrupted, match=wrong.hex):
        backend.put(io.BytesIO(b"actual bytes"), expected=wrong)
    assert list(backend.iter_blobs()) == []


def test_empty_blob(backend) -> None:  # type: ignore[no-untyped-def]
    result = backend.put(io.BytesIO(b""))
    with backend.open(result.digest) as reader:
        assert reader.read_all() == b""


def test_listing_gives_size_and_modification_time(backend) -> None:  # type: ignore[no-untyped-def]
    before = time.time()
    small = backend.put(io.BytesIO(b"first")).digest
    large = backend.put(io.BytesIO(os.urandom(1000))).digest
    after = time.time()
    listed = {info.digest: info for info in backend.iter_blobs()}
    assert sorted(listed) == sorted([small, large])
    assert (listed[small].size, listed[large].size) == (5, 1000)
    for digest, info in listed.items():
        # S3 keeps whole seconds in a HEAD's Last-Modified: allow one either side.
        assert before - 1 <= info.modified_at <= after + 1
        stat = backend.stat(digest)
        assert stat.size == info.size and abs(stat.modified_at - info.modified_at) <= 1


# A writer killed mid-put: its stream ends the process once it has handed over 7 MiB. With
# 5 MiB parts above 6 MiB, an S3 put is by then a multipart upload to a temp key.
_KILLED_WRITER = """
import io, os, sys
from artifacts.backends import open_backend
from artifacts.backends.s3 import S3BlobBackend

url = sys.argv[1]
MiB = 1 << 20
if url.startswith("s3://"):
    backend = S3BlobBackend.from_url(url, multipart_threshold=6 * MiB, part_size=5 * MiB)
else:
    backend = open_backend(url)

class DiesMidway(io.RawIOBase):
    left = 7 * MiB

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.left:
            os._exit(3)
        n = min(len(buffer), self.left)
        buffer[:n] = b"k" * n
        self.left -= n
        return n

backend.put(DiesMidway())
"""


def test_clean_temp_removes_what_a_killed_writer_left(backend) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(backend, BlobBackend)
    assert backend.clean_temp(older_than_seconds=-60) == 0
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, backend.url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert killed.returncode == 3, killed.stderr
    assert list(backend.iter_blobs()) == []  # the temp is never listed as a blob
    assert backend.clean_temp() == 0  # young: it could be a put still in flight
    assert backend.clean_temp(older_than_seconds=-60) == 1
    assert backend.clean_temp(older_than_seconds=-60) == 0
    stored = backend.put(io.BytesIO(b"after the cleanup"))
    assert [b.digest for b in backend.iter_blobs()] == [stored.digest]


def test_local_layout_is_sharded_and_read_only(tmp_path: Path) -> None:
    backend = LocalBlobBackend(tmp_path / "s")
    result = backend.put(io.BytesIO(b"hello"))
    path = tmp_path / "s" / "blobs" / "sha256" / result.digest.hex[:2] / result.digest.hex[2:]
    assert path.read_bytes() == b"hello"
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert oct(path.stat().st_mode & 0o777) == "0o444"
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_local_read_detects_corruption_naming_digest_and_path(tmp_path: Path) -> None:
    backend = LocalBlobBackend(tmp_path / "s")
    result = backend.put(io.BytesIO(b"hello world"))
    path = backend.path_of(result.digest)
    path.chmod(0o644)
    path.write_bytes(b"hellO world")
    with pytest.raises(BlobCorrupted) as info:
        with backend.open(result.digest) as reader:
            reader.read_all()
    assert str(result.digest) in str(info.value) and str(path) in str(info.value)


def test_iter_ignores_foreign_files(tmp_path: Path) -> None:
    backend = LocalBlobBackend(tmp_path / "s")
    (tmp_path / "s" / "blobs" / "sha256" / "zz").mkdir()
    (tmp_path / "s" / "blobs" / "sha256" / "ab").mkdir()
    (tmp_path / "s" / "blobs" / "sha256" / "ab" / "short").write_text("x")
    assert list(backend.iter_blobs()) == []


def test_bad_store_urls(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="unsupported store URL"):
        open_backend("ftp://host/x")
    file_path = tmp_path / "afile"
    file_path.write_text("x")
    with pytest.raises(StoreConfigError, match="not a folder"):
        open_backend(str(file_path))
    with pytest.raises(StoreConfigError, match="does not exist"):
        open_backend(str(tmp_path / "missing"), create=False)
