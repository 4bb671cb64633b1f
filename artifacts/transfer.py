"""Moving releases between stores without a network: one OCI-image-layout-like tar file.

Layout inside the archive::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 an OCI image index listing the release manifests
    blobs/sha256/<hex>         the manifests and every blob they reference

Export streams each blob out of the store through its verifying reader and writes the archive
atomically. Import trusts nothing in the archive: member names and types are checked against
that layout, every blob is hashed while it is stored, and releases are registered only once
all their blobs are in, with tags moved last of all.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from artifacts.backends.base import PutResult
from artifacts.digest import ALGORITHM, Digest, canonical_json
from artifacts.diskspace import is_disk_full
from artifacts.errors import (
    ArchiveError,
    BlobCorrupted,
    InvalidManifest,
    InvalidReference,
    ReferenceNotFound,
    SizeMismatch,
)
from artifacts.fsio import AtomicFile, read_full, write_all
from artifacts.manifest import RELEASE_MEDIA_TYPE, Release
from artifacts.records import SNIFF_LIMIT
from artifacts.refs import TagName, parse_tag_name
from artifacts.store import Store

OCI_LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
RELEASE_NAME_ANNOTATION = "io.kiln.release.name"

LAYOUT_MEMBER = "oci-layout"
INDEX_MEMBER = "index.json"
BLOB_DIR = f"blobs/{ALGORITHM}"
_DIRECTORY_MEMBERS = frozenset({"blobs", BLOB_DIR})  # tarfile strips the trailing slash
_BLOB_MEMBER = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")

DOCUMENT_LIMIT = 1024 * 1024
MANIFEST_LIMIT = SNIFF_LIMIT
COPY_BUFSIZE = 1024 * 1024
STREAM_NAME = Path("-")


@dataclass(frozen=True)
class ExportReport:
    """What `export_release` wrote: the release, how many blobs, the archive's size in bytes."""

    digest: Digest
    ref: str
    blob_count: int
    bytes: int
    path: Path

    @property
    def summary_str(self) -> str:
        return (
            f"exported {self.ref} ({self.digest.short}): {self.blob_count} blobs,"
            f" {self.bytes} bytes to {self.path}"
        )


@dataclass(frozen=True)
class ImportReport:
    """What `import_archive` did.

    `releases` holds (the `name:tag` moved, or None when no tag was moved; manifest digest).
    Blob counts include the manifests; `bytes` is what was newly written to the store.
    """

    releases: tuple[tuple[str | None, Digest], ...]
    blobs_added: int
    blobs_present: int
    bytes: int

    @property
    def summary_str(self) -> str:
        names = ", ".join(ref or str(digest) for ref, digest in self.releases)
        return (
            f"imported {names}: {self.blobs_added} blobs added ({self.bytes} bytes),"
            f" {self.blobs_present} already present"
        )


# -- export ------------------------------------------------------------------------------------


def export_release(
    store: Store, ref: str, out_path: Path | IO[bytes], include_tag: bool = True
) -> ExportReport:
    """Write the release `ref` resolves to, and every blob it references, to a tar file.

    Blobs are streamed through the store's verifying reader, so a corrupt blob fails the
    export (naming its digest). `out_path` is a path or an open binary stream (stdout for
    `-o -`). A regular file (a symbolic link to one included: the link stays and its target
    is replaced) appears whole or not at all; a FIFO or a device is written to in place.
    """
    if not isinstance(out_path, (str, os.PathLike)):
        return _export(store, ref, _Output(out_path, STREAM_NAME), include_tag)
    out_path = Path(out_path)
    with _open_output(out_path) as out:
        return _export(store, ref, out, include_tag)


def _export(store: Store, ref: str, out: _Output, include_tag: bool) -> ExportReport:
    resolved = store.resolve(ref)
    digest = resolved.digest
    manifest = store.read_bytes(digest)
    release = Release.from_bytes(manifest, source=f"manifest {digest}")
    blobs = _export_plan(store, release)
    # Import refuses a tag of another name than the release's, so such a tag is not recorded.
    tag_ref = (
        f"{resolved.name}:{resolved.tag}"
        if include_tag and resolved.name == release.name and resolved.tag is not None
        else None
    )
    index = _index_document(digest, len(manifest), release.name, tag_ref)

    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_BUFSIZE
    ) as tar:
        _add_bytes(tar, LAYOUT_MEMBER, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
        _add_bytes(tar, INDEX_MEMBER, canonical_json(index))
        for directory in ("blobs", BLOB_DIR):
            tar.addfile(_tar_info(directory, 0, tarfile.DIRTYPE, 0o755))
        _add_bytes(tar, _blob_member(digest), manifest)
        for blob, size in blobs:
            _add_blob(tar, store, blob, size)
    out.flush()
    return ExportReport(
        digest=digest,
        ref=ref,
        blob_count=len(blobs) + 1,
        bytes=out.written,
        path=out.path,
    )


def _export_plan(store: Store, release: Release) -> list[tuple[Digest, int]]:
    """The release's distinct blobs with their sizes, checked against what the store holds."""
    return list(store.check_blobs(release).items())


def _index_document(digest: Digest, size: int, name: str, tag_ref: str | None) -> dict[str, Any]:
    annotations = {RELEASE_NAME_ANNOTATION: name}
    if tag_ref is not None:
        annotations[REF_NAME_ANNOTATION] = tag_ref
    return {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {
                "mediaType": RELEASE_MEDIA_TYPE,
                "digest": str(digest),
                "size": size,
                "annotations": annotations,
            }
        ],
    }


def _blob_member(digest: Digest) -> str:
    return f"{BLOB_DIR}/{digest.hex}"


def _tar_info(
    name: str, size: int, kind: bytes = tarfile.REGTYPE, mode: int = 0o444
) -> tarfile.TarInfo:
    # Fixed owner and time so the same release always exports to the same bytes.
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, store: Store, digest: Digest, size: int) -> None:
    with store.open_blob(digest) as reader:
        tar.addfile(_tar_info(_blob_member(digest), size), _FullReads(reader))
        # tarfile reads exactly `size` bytes; reaching EOF is what makes the reader verify.
        if reader.read(1):
            raise SizeMismatch(
                f"blob {digest} at {store.backend.location(digest)} is longer than {size} bytes"
            )


class _FullReads:
    """Makes `read(n)` return n bytes unless the stream ends (tarfile treats less as EOF)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self._stream.read()
        buffer = bytearray(size)
        del buffer[read_full(self._stream, memoryview(buffer)) :]
        return buffer


class _Output:
    """The archive's destination: counts the bytes written, and names `path` in any OSError
    (a full disk, a closed pipe) as one ArchiveError instead of a traceback."""

    def __init__(self, stream: IO[bytes], path: Path, in_place: bool = True) -> None:
        self._stream = stream
        self.path = path
        self.in_place = in_place
        self.written = 0

    def write(self, data: bytes) -> int:
        try:
            write_all(self._stream, data)
        except OSError as exc:
            raise _write_error(self.path, exc, self.in_place) from None
        self.written += len(data)
        return len(data)

    def tell(self) -> int:  # tarfile asks; a pipe cannot answer, and only the count matters
        return self.written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _write_error(self.path, exc, self.in_place) from None

    def fsync(self) -> None:
        self.flush()
        try:
            os.fsync(self._stream.fileno())
        except OSError as exc:
            raise _write_error(self.path, exc, self.in_place) from None


def _write_error(path: Path, exc: OSError, in_place: bool) -> ArchiveError:
    outcome = "what was written is incomplete" if in_place else "nothing was written"
    if is_disk_full(exc):
        return ArchiveError(f"cannot write archive {path}: no space left on device; {outcome}")
    return ArchiveError(f"cannot write archive {path}: {exc.strerror or exc}; {outcome}")


@contextmanager
def _open_output(path: Path) -> Iterator[_Output]:
    """Where `kiln export -o PATH` writes: through links, never over a FIFO or device node.

    A new or regular file (after following symbolic links) gets the atomic temp-and-rename;
    a FIFO or a character or block device (/dev/null, /dev/stdout on a pipe) is opened and
    written in place, since renaming over it would replace the node rather than feed it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ArchiveError(f"cannot write archive {path}: {exc.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ArchiveError(f"cannot write archive {path}: it is a directory")
    if st is None or stat.S_ISREG(st.st_mode):
        real = Path(os.path.realpath(path))
        if st is None or _same_file(real, st):
            with _atomic_file(real, path) as out:
                yield out
            return
    elif not (
        stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    ):
        raise ArchiveError(
            f"cannot write archive {path}: it is not a file, a FIFO or a device"
            " (write to a file, or to stdout with -o -)"
        )
    # A FIFO, a device, or a name that does not lead back to its file (/proc/self/fd/N).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ArchiveError(f"cannot write archive {path}: {exc.strerror}") from None
    # Unbuffered, so a failed write is reported once and closing has nothing left to flush.
    with os.fdopen(fd, "wb", buffering=0) as stream:
        out = _Output(stream, path)
        yield out
        out.flush()


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


@contextmanager
def _atomic_file(path: Path, shown: Path | None = None) -> Iterator[_Output]:
    """A temp file beside `path`, fsynced and renamed into place if the block succeeds.

    `shown` is the name the user gave (a link to `path`), used in messages."""
    shown = shown or path
    with AtomicFile(
        path.parent,
        prefix=f".{path.name}.",
        on_error=lambda exc: ArchiveError(f"cannot write archive {shown}: {exc.strerror}"),
    ) as tmp:
        out = _Output(tmp.file, shown, in_place=False)
        yield out
        out.fsync()
        tmp.commit(path)


# -- import ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One release listed in an archive's index.json, validated but not yet stored."""

    digest: Digest
    release: Release
    tag: TagName | None


def import_archive(
    store: Store, archive: Path, tag: bool = True, move_tags: bool = False
) -> ImportReport:
    """Import every release in an archive made by `export_release` into `store`.

    Nothing is written until the whole archive has been checked (names, member types,
    index, manifests, and, if `tag`, that no tag the store already has would move unless
    `move_tags`); then blobs are stored (each hashed against its name), then releases are
    registered, then, if `tag`, the tags named in the index are set. A tag must carry its
    release's own name: an archive cannot move another model's tag.
    """
    archive = Path(archive)
    try:
        tar = tarfile.open(archive, mode="r:")
    except FileNotFoundError:
        raise ArchiveError(f"archive {archive} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"cannot import {archive}: not a readable tar archive ({exc})") from None
    with tar:
        importer = _Importer(store, archive, tar)
        entries = importer.plan()
        if tag:
            for entry in entries:
                importer.check_tag_move(entry, move_tags)
        return importer.apply(entries, tag, move_tags)


class _Importer:
    def __init__(self, store: Store, archive: Path, tar: tarfile.TarFile) -> None:
        self.store = store
        self.archive = archive
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        self.blobs: dict[Digest, tarfile.TarInfo] = {}

    def fail(self, member: str, problem: str) -> ArchiveError:
        return ArchiveError(f"cannot import {self.archive}: member {member!r} {problem}")

    # -- checking (writes nothing) -------------------------------------------------------------
    def plan(self) -> list[_Entry]:
        self._load_members()
        self._check_layout()
        entries = self._read_index()
        referenced: set[Digest] = set()
        for entry in entries:
            referenced.add(entry.digest)
            for role, ref in entry.release.blob_refs():
                referenced.add(ref.digest)
                member = self.blobs.get(ref.digest)
                if member is not None:
                    size = member.size
                else:
                    info = self.store.backend.stat(ref.digest)
                    if info is None:
                        raise self.fail(
                            _blob_member(ref.digest),
                            f"is missing: release {entry.release.name} references it as {role}"
                            " and the target store does not have it",
                        )
                    size = info.size
                if size != ref.size:
                    raise self.fail(
                        _blob_member(ref.digest),
                        f"is {size} bytes; release {entry.release.name} says {ref.size}",
                    )
        for digest, member in self.blobs.items():
            if digest not in referenced:
                raise self.fail(member.name, "is not referenced by any release in index.json")
        return entries

    def _load_members(self) -> None:
        try:
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(
                f"cannot import {self.archive}: it is truncated or damaged ({exc})"
            ) from None
        for member in members:
            self._check_member(member)
            if member.name in self.members:
                raise self.fail(member.name, "appears more than once")
            self.members[member.name] = member
            match = _BLOB_MEMBER.match(member.name)
            if match and member.isreg():
                self.blobs[Digest(ALGORITHM, match.group(1))] = member
        self._check_end_marker()

    def _check_member(self, member: tarfile.TarInfo) -> None:
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise self.fail(name, "has an absolute path")
        if ".." in parts:
            raise self.fail(name, "has a '..' component")
        if member.issym():
            raise self.fail(name, f"is a symbolic link (to {member.linkname!r})")
        if member.islnk():
            raise self.fail(name, f"is a hard link (to {member.linkname!r})")
        if member.ischr() or member.isblk():
            raise self.fail(name, "is a device file")
        if member.isfifo():
            raise self.fail(name, "is a FIFO")
        if member.issparse() or not (member.isreg() or member.isdir()):
            raise self.fail(name, "is not a regular file or directory")
        if member.isdir():
            expected = name in _DIRECTORY_MEMBERS
        else:
            expected = name in (LAYOUT_MEMBER, INDEX_MEMBER) or bool(_BLOB_MEMBER.match(name))
        if not expected:
            raise self.fail(
                name,
                "is unexpected: an archive holds only oci-layout, index.json and"
                " blobs/sha256/<64 lowercase hex>",
            )

    def _check_end_marker(self) -> None:
        # tarfile stops quietly at a missing header, so a file cut at a member boundary looks
        # like a shorter archive; the two zero blocks that end every tar file tell them apart.
        marker = 2 * tarfile.BLOCKSIZE
        with open(self.archive, "rb") as raw:
            raw.seek(self.tar.offset)
            end = raw.read(marker)
        if len(end) != marker or end.count(0) != marker:
            last = f" after member {self.tar.members[-1].name!r}" if self.tar.members else ""
            raise ArchiveError(
                f"cannot import {self.archive}: it is truncated (no end-of-archive marker{last})"
            )

    def _read_member(self, name: str, limit: int) -> bytes:
        member = self.members.get(name)
        if member is None or not member.isreg():
            raise ArchiveError(f"cannot import {self.archive}: it has no {name!r} member")
        if member.size > limit:
            raise self.fail(name, f"is {member.size} bytes, more than the {limit} allowed")
        try:
            stream = self.tar.extractfile(member)
            assert stream is not None
            with stream:
                return stream.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise self.fail(name, f"cannot be read (archive truncated?): {exc}") from None

    def _read_json(self, name: str) -> dict[str, Any]:
        data = self._read_member(name, DOCUMENT_LIMIT)
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.fail(name, f"is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise self.fail(name, "is not a JSON object")
        return value

    def _check_layout(self) -> None:
        layout = self._read_json(LAYOUT_MEMBER)
        version = layout.get("imageLayoutVersion")
        if version != OCI_LAYOUT_VERSION:
            raise self.fail(
                LAYOUT_MEMBER,
                f"has imageLayoutVersion {version!r}; expected {OCI_LAYOUT_VERSION!r}",
            )

    def _read_index(self) -> list[_Entry]:
        index = self._read_json(INDEX_MEMBER)
        if index.get("schemaVersion") != 2:
            raise self.fail(INDEX_MEMBER, f"has schemaVersion {index.get('schemaVersion')!r}")
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests:
            raise self.fail(INDEX_MEMBER, "lists no manifests")
        return [self._read_entry(i, value) for i, value in enumerate(manifests)]

    def _read_entry(self, i: int, value: Any) -> _Entry:
        where = f"manifests[{i}]"
        if not isinstance(value, dict):
            raise self.fail(INDEX_MEMBER, f"{where} is not an object")
        if value.get("mediaType") != RELEASE_MEDIA_TYPE:
            raise self.fail(
                INDEX_MEMBER,
                f"{where}.mediaType is {value.get('mediaType')!r}; expected {RELEASE_MEDIA_TYPE}",
            )
        try:
            digest = Digest.parse(value.get("digest", ""))
        except ValueError as exc:
            raise self.fail(INDEX_MEMBER, f"{where}.digest: {exc}") from None
        size = value.get("size")
        annotations = value.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise self.fail(INDEX_MEMBER, f"{where}.annotations is not an object")

        name = _blob_member(digest)
        data = self._read_member(name, MANIFEST_LIMIT)
        if len(data) != size:
            raise self.fail(name, f"is {len(data)} bytes; index.json says {size!r}")
        actual = Digest.of_bytes(data)
        if actual != digest:
            raise self.fail(name, f"does not hash to its name (content is {actual})")
        try:
            release = Release.from_bytes(data, source=f"{self.archive}:{name}")
        except InvalidManifest as exc:
            raise self.fail(name, f"is not a valid release manifest: {exc}") from None
        if Digest.of_bytes(release.to_bytes()) != digest:
            raise self.fail(name, "is not in canonical form; re-export it with kiln")
        release_name = annotations.get(RELEASE_NAME_ANNOTATION)
        if release_name is not None and release_name != release.name:
            raise self.fail(
                INDEX_MEMBER,
                f"{where} names release {release_name!r} but its manifest is {release.name!r}",
            )
        ref = annotations.get(REF_NAME_ANNOTATION)
        tag: TagName | None = None
        if ref is not None:
            try:
                tag = parse_tag_name(str(ref))
            except InvalidReference as exc:
                raise self.fail(INDEX_MEMBER, f"{where}: {exc}") from None
            if tag.name != release.name:
                raise self.fail(
                    INDEX_MEMBER,
                    f"{where} would tag {str(tag)!r}, but its release is named"
                    f" {release.name!r}: an archive may only tag its own release's name",
                )
        return _Entry(digest, release, tag)

    def check_tag_move(self, entry: _Entry, move_tags: bool) -> None:
        """Refuse to move a tag the store has at another release, unless `move_tags`."""
        if entry.tag is None or move_tags:
            return
        current = self._tag_target(entry.tag)
        if current is not None and current != entry.digest:
            raise ArchiveError(
                f"cannot import {self.archive}: tag {entry.tag} already points at"
                f" {current.short} in this store and the archive would move it to"
                f" {entry.digest.short}; pass --move-tags to move it, or --no-tag"
            )

    # -- writing: blobs, then releases, then tags ----------------------------------------------
    def apply(self, entries: list[_Entry], tag: bool, move_tags: bool = False) -> ImportReport:
        manifests = {entry.digest for entry in entries}
        added = present = written = 0
        for digest, member in self.blobs.items():
            if digest in manifests:
                continue  # put_release stores the manifest itself, after its blobs
            result = self._put_blob(digest, member)
            if result.created:
                added += 1
                written += result.size
            else:
                present += 1

        for digest in manifests:
            if self.store.has_blob(digest):
                present += 1
            else:
                added += 1
                written += self.blobs[digest].size
        for entry in entries:
            stored = self.store.put_release(entry.release)
            if stored != entry.digest:
                raise self.fail(
                    _blob_member(entry.digest), f"was stored as {stored}; the archive is damaged"
                )

        releases: list[tuple[str | None, Digest]] = []
        for entry in entries:
            moved: str | None = None
            if tag and entry.tag is not None:
                moved = str(entry.tag)
                self.check_tag_move(entry, move_tags)  # again: the tag may have moved since
                if self._tag_target(entry.tag) != entry.digest:
                    self.store.move_tag(
                        entry.tag, entry.digest, reason=f"import {self.archive.name}"
                    )
            releases.append((moved, entry.digest))
        return ImportReport(tuple(releases), added, present, written)

    def _put_blob(self, digest: Digest, member: tarfile.TarInfo) -> PutResult:
        try:
            stream = self.tar.extractfile(member)
            assert stream is not None
            with stream:
                return self.store.put_stream(stream, expected=digest)
        except BlobCorrupted as exc:
            raise self.fail(
                member.name, f"does not hash to its name (content is {exc.actual})"
            ) from None
        except (tarfile.TarError, EOFError) as exc:
            raise self.fail(member.name, f"cannot be read (archive truncated?): {exc}") from None

    def _tag_target(self, name: TagName) -> Digest | None:
        try:
            return self.store.resolve(str(name)).digest
        except ReferenceNotFound:
            return None
