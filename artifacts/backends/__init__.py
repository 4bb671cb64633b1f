"""Blob backends and the URL -> backend factory."""

from __future__ import annotations

from pathlib import Path

from artifacts.backends.base import BlobBackend, BlobInfo, PutResult, VerifyingReader
from artifacts.backends.local import LocalBlobBackend
from artifacts.errors import StoreConfigError
from artifacts.redact import redact_url

__all__ = ["BlobBackend", "BlobInfo", "PutResult", "VerifyingReader", "open_backend"]


def open_backend(url: str, create: bool = True) -> BlobBackend:
    """Open the backend for a store URL: a path, `file://PATH` or `s3://bucket/prefix`."""
    if not url:
        raise StoreConfigError("empty store URL: pass --store or set KILN_STORE")
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme == "file":
            return _local(rest, create)
        if scheme == "s3":
            try:
                from artifacts.backends.s3 import S3BlobBackend  # noqa: PLC0415
            except ImportError as exc:
                raise StoreConfigError(
                    f"store {redact_url(url)}: the S3 backend is not available ({exc});"
                    " install kiln[s3]"
                ) from exc
            return S3BlobBackend.from_url(url)
        raise StoreConfigError(
            f"unsupported store URL {redact_url(url)!r}: use a path, file://PATH or s3://BUCKET/PREFIX"
        )
    return _local(url, create)


def _local(path: str, create: bool) -> BlobBackend:
    if not path:
        raise StoreConfigError("store URL 'file://' has no path: use file:///PATH or a path")
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise StoreConfigError(f"store path {root} exists and is not a folder")
    return LocalBlobBackend(root, create=create)
