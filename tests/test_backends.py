"""The blob-backend contract, run over every backend: local, and S3 on a real SeaweedFS server
started once per test session (tests/s3_server.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from artifacts.backends import open_backend
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
