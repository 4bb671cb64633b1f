"""NEFF (Neuron Executable File Format) headers, read without the Neuron runtime.

A NEFF is a 1024-byte little-endian header followed by a tarball (gzip-compressed unless the
compiler ran with --enable-fast-loading-neuron-binaries). The header has no magic number, so
a file is taken for a NEFF when header_size is 1024 and data_size is the file size minus 1024.
Field offsets are the documented ones (shared/RECIPES.md, "AWS Neuron facts").
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artifacts.errors import BlobNotFound, NeffError
from artifacts.targets import NEFF_FORMAT, NEFF_TARGETS

if TYPE_CHECKING:
    from artifacts.digest import Digest
    from artifacts.store import Store

HEADER_SIZE = 1024
GZIP_MAGIC = b"\x1f\x8b"
PREFIX_SIZE = HEADER_SIZE + len(GZIP_MAGIC)  # enough bytes to parse and see the compression

# (offset, struct format) of each header field
_U64 = "<Q"
_U32 = "<I"
_PKG_VERSION = 0
_HEADER_SIZE = 8
_DATA_SIZE = 16
_VERSION_MAJOR = 24
_VERSION_MINOR = 32
_BUILD_VERSION = (40, 128)
_NUM_TPB = 168
_HASH = (172, 32)
_UUID = (204, 16)
_NAME = (220, 256)
_REQUESTED_TPB = 476
_TPB_PER_NODE = (480, 64)
_FEATURE_BITS = 544
_LNC_SIZE = 552



def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(_U64, data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from(_U32, data, offset)[0])


def _text(data: bytes, span: tuple[int, int]) -> str:
    start, length = span
    return data[start : start + length].split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True)
class NeffHeader:
    """The documented fields of a NEFF header, plus whether the payload is gzip."""

    package_version: int
    header_size: int
    data_size: int
    version_major: int
    version_minor: int
    build_version: str
    num_tpb: int
    hash: str
    uuid: str
    name: str
    requested_tpb_count: int
    feature_bits: int
    lnc_size: int
    compressed: bool

    @property
    def version(self) -> str:
        return f"{self.version_major}.{self.version_minor}"

    @property
    def file_size(self) -> int:
        return self.header_size + self.data_size

    @classmethod
    def parse(cls, data: bytes, size: int | None = None) -> NeffHeader:
        """Parse the header of a NEFF whose first bytes are `data`.

        `size` is the whole file's size when `data` is only its start (at least PREFIX_SIZE
        bytes, or the whole file); by default the file is `data` itself. Raises NeffError."""
        data = bytes(data)
        size = len(data) if size is None else size
        if size < HEADER_SIZE or len(data) < HEADER_SIZE:
            raise NeffError(
                f"truncated NEFF: {min(size, len(data))} bytes, but the header alone is"
                f" {HEADER_SIZE} bytes"
            )
        header_size = _u64(data, _HEADER_SIZE)
        if header_size != HEADER_SIZE:
            raise NeffError(
                f"not a NEFF (or a corrupt one): header_size is {header_size}, expected"
                f" {HEADER_SIZE}"
            )
        data_size = _u64(data, _DATA_SIZE)
        if data_size != size - HEADER_SIZE:
            raise NeffError(
                f"NEFF header says {data_size} bytes follow the header, but the file has"
                f" {size - HEADER_SIZE} (truncated, padded or not a NEFF)"
            )
        if data_size >= len(GZIP_MAGIC) and len(data) < PREFIX_SIZE:
            raise NeffError(
                f"NEFF prefix too short: {len(data)} bytes given, need {PREFIX_SIZE} to see"
                " the payload's compression"
            )
        return cls(
            package_version=_u64(data, _PKG_VERSION),
            header_size=header_size,
            data_size=data_size,
            version_major=_u64(data, _VERSION_MAJOR),
            version_minor=_u64(data, _VERSION_MINOR),
            build_version=_text(data, _BUILD_VERSION),
            num_tpb=_u32(data, _NUM_TPB),
            hash=data[_HASH[0] : _HASH[0] + _HASH[1]].hex(),
            uuid=str(uuid.UUID(bytes=data[_UUID[0] : _UUID[0] + _UUID[1]])),
            name=_text(data, _NAME),
            requested_tpb_count=_u32(data, _REQUESTED_TPB),
            feature_bits=_u64(data, _FEATURE_BITS),
            lnc_size=_u32(data, _LNC_SIZE),
            compressed=data[HEADER_SIZE:PREFIX_SIZE] == GZIP_MAGIC,
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "version": self.version}

    def describe(self) -> str:
        """One line for `kiln show`."""
        lnc = self.lnc_size or 1  # older NEFFs leave it 0: one core per logical core
        payload = "gzip" if self.compressed else "uncompressed"
        return (
            f"NEFF {self.version}, compiler build {self.build_version or '?'},"
            f" {self.num_tpb} TPB, LNC {lnc}, {payload}, name {self.name or '-'},"
            f" uuid {self.uuid}"
        )


def read_neff_header(store: Store, digest: Digest) -> NeffHeader:
    """The header of a stored blob (reads only its first bytes). Raises NeffError."""
    info = store.backend.stat(digest)
    if info is None:
        raise BlobNotFound(digest, store.backend.url)
    reader = store.backend.open(digest)
    try:
        prefix = b""
        while len(prefix) < PREFIX_SIZE:
            chunk = reader.read(PREFIX_SIZE - len(prefix))
            if not chunk:
                break
            prefix += chunk
    finally:
        reader.close()
    try:
        return NeffHeader.parse(prefix, info.size)
    except NeffError as exc:
        raise NeffError(f"blob {digest}: {exc}") from None


def is_neff_blob(store: Store, digest: Digest | str) -> bool:
    """Whether the index knows `digest` as a NEFF: a compilation's executable of format neff,
    or the executable of a release for a Neuron target."""
    from sqlalchemy import select  # noqa: PLC0415

    from artifacts.index.models import (  # noqa: PLC0415
        CompilationRow,
        ManifestBlobRow,
        ManifestRow,
    )

    text = str(digest)
    with store.engine.connect() as conn:
        row = conn.execute(
            select(CompilationRow.id)
            .where(
                CompilationRow.executable_digest == text,
                CompilationRow.executable_format == NEFF_FORMAT,
            )
            .limit(1)
        ).first()
        if row is not None:
            return True
        row = conn.execute(
            select(ManifestBlobRow.blob_digest)
            .join(ManifestRow, ManifestRow.digest == ManifestBlobRow.manifest_digest)
            .where(
                ManifestBlobRow.blob_digest == text,
                ManifestBlobRow.role == "executable",
                ManifestRow.target.in_(NEFF_TARGETS),
            )
            .limit(1)
        ).first()
    return row is not None


def neff_blob_check(store: Store, digest: Digest, kind: str | None) -> str | None:
    """`kiln verify` hook: a NEFF blob whose header is inconsistent is a problem."""
    if kind not in (None, "executable") or not is_neff_blob(store, digest):
        return None
    try:
        read_neff_header(store, digest)
    except NeffError as exc:
        return f"bad NEFF header: {str(exc).removeprefix(f'blob {digest}: ')}"
    return None
