"""Import and export the Neuron persistent cache (what torch-neuronx, NxD Inference and
optimum-neuron write under NEURON_COMPILE_CACHE_URL, by default /var/tmp/neuron-compile-cache).

Layout: `<root>/neuronxcc-<compiler version>/MODULE_<key>/` holding `model.hlo_module.pb`
(older: `model.hlo.pb`), `compile_flags.json` (a JSON list of flag strings), `model.neff` and
`model.done` (the success marker); `model.log` after a failed compile and `*.lock` while one
runs.

Each complete entry becomes a Kiln compilation: the HLO blob (debug metadata stripped, as Kiln
stores every HLO), the NEFF blob (format "neff") and a compile record with status ok whose HLO
key is computed the Kiln way (compiler "neuronx-cc", the version from the folder name, the
canonical flags without --target). The target is the flags' --target; a flags file without
one (torch-neuronx then compiled for the host it ran on, which the cache does not record)
takes `default_target` (inf2 unless told). The record's provenance keeps the folder name, the
HLO file name and the original flag list, so an export writes the entry back under its own
name. Compilations without that provenance are exported as `MODULE_<hlo key hex[:20]>`.

An exported `model.hlo_module.pb` is the stored HLO, i.e. without the debug metadata
(OpMetadata, stack frames) the original may have carried: the same graph, under the same
folder name, which is how torch-neuronx finds an entry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from artifacts.digest import Digest
from artifacts.errors import InvalidReference, ReferenceNotFound
from artifacts.fsio import write_atomic
from artifacts.neff import NeffError, NeffHeader
from artifacts.records import CompilationRecord, RunStatus
from artifacts.redact import redact_url
from artifacts.store import Compilation, Store
from pipeline.errors import NeuronCacheError
from pipeline.keys import hlo_key
from pipeline.neuron_flags import NEURON_TARGETS, split_target
from pipeline.trace import hlo_digest_bytes
from pipeline.triage import triage

COMPILER = "neuronx-cc"
VERSION_PREFIX = "neuronxcc-"
MODULE_PREFIX = "MODULE_"
HLO_FILES = ("model.hlo_module.pb", "model.hlo.pb")
FLAGS_FILE = "compile_flags.json"
NEFF_FILE = "model.neff"
DONE_FILE = "model.done"
LOG_FILE = "model.log"
DEFAULT_TARGET = "inf2"
PROVENANCE_SOURCE = "neuron-cache"
# Folder names are kept in compile records and become paths again on export: each part must
# be printable ASCII that cannot climb out of the cache root.
_FOLDER_PART = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,254}\Z")

IMPORTED, PRESENT = "imported", "present"
INCOMPLETE, FAILED, LOCKED, INVALID = "incomplete", "failed", "locked", "invalid"
STATUSES = (IMPORTED, PRESENT, INCOMPLETE, FAILED, LOCKED, INVALID)



# --- where a cache lives -----------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    size: int
    mtime: float


class CacheSource(Protocol):
    """Read access to a cache root: a local folder or an S3 prefix."""

    url: str

    def list_dirs(self, rel: str) -> list[str]: ...

    def list_files(self, rel: str) -> dict[str, FileInfo]: ...

    def read(self, rel: str) -> bytes: ...


class LocalCacheSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def list_dirs(self, rel: str) -> list[str]:
        folder = self.root / rel
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def list_files(self, rel: str) -> dict[str, FileInfo]:
        out = {}
        for p in (self.root / rel).iterdir():
            if p.is_file():
                st = p.stat()
                out[p.name] = FileInfo(st.st_size, st.st_mtime)
        return out

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class S3CacheSource:
    """`s3://bucket/prefix` through boto3 (endpoint from AWS_ENDPOINT_URL, as boto3 reads it)."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        if client is None:
            client = _s3_client(f"s3://{bucket}/{prefix}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.url = redact_url(url)

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _pages(self, rel: str) -> Iterable[dict[str, Any]]:
        key = self._key(rel)
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(
            Bucket=self.bucket, Prefix=f"{key}/" if key else "", Delimiter="/"
        )

    @contextlib.contextmanager
    def _requests(self, rel: str) -> Iterator[None]:
        """botocore's errors as the store's (missing credentials: one line naming the URL)
        and a missing key as FileNotFoundError, as a local cache folder raises it."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        from artifacts.backends.s3 import CREDENTIALS_ERRORS, no_credentials  # noqa: PLC0415

        where = "/".join(p for p in (self.url, rel.strip("/")) if p)
        try:
            yield
        except CREDENTIALS_ERRORS as exc:
            raise no_credentials(self.url, exc) from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(errno.ENOENT, "no such object", where) from exc
            raise NeuronCacheError(
                f"reading {where} failed: {code}: {error.get('Message') or exc}"
            ) from exc
        except BotoCoreError as exc:
            raise NeuronCacheError(f"reading {where} failed: {exc}") from exc

    def list_dirs(self, rel: str) -> list[str]:
        names = []
        with self._requests(rel):
            for page in self._pages(rel):
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def list_files(self, rel: str) -> dict[str, FileInfo]:
        out = {}
        with self._requests(rel):
            for page in self._pages(rel):
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    modified = obj.get("LastModified")
                    mtime = modified.timestamp() if modified is not None else 0.0
                    out[name] = FileInfo(int(obj["Size"]), mtime)
        return out

    def read(self, rel: str) -> bytes:
        with self._requests(rel):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            data: bytes = response["Body"].read()
        return data


def _s3_client(url: str) -> Any:
    """The store's S3 client (adaptive retries: caches on S3 get throttled), else boto3's."""
    try:
        from artifacts.backends.s3 import _make_client  # noqa: PLC0415

        return _make_client(4, None, url)
    except (ImportError, AttributeError):
        pass
    try:
        import boto3  # noqa: PLC0415
    except ImportError as exc:
        raise NeuronCacheError(
            f"reading {redact_url(url)} needs boto3: pip install 'kiln[s3]'"
        ) from exc
    return boto3.client("s3")


def open_cache_source(path: str) -> tuple[CacheSource, list[str] | None]:
    """The source of a cache root, or of one `neuronxcc-<version>` folder (then the second
    value lists that one version folder)."""
    if path.startswith("s3://"):
        bucket, _, prefix = path[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        last = prefix.rsplit("/", 1)[-1]
        if last.startswith(VERSION_PREFIX):
            parent = prefix[: -len(last)].strip("/")
            return S3CacheSource(bucket, parent), [last]
        return S3CacheSource(bucket, prefix), None
    if "://" in path:
        scheme = path.split("://", 1)[0]
        if scheme != "file":
            raise NeuronCacheError(f"unsupported cache URL {path!r}: use a folder or s3://")
        path = path[len("file://") :]
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NeuronCacheError(f"{root}: not a folder (expected a Neuron cache root)")
    if root.name.startswith(VERSION_PREFIX):
        return LocalCacheSource(root.parent), [root.name]
    return LocalCacheSource(root), None


# --- scanning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One MODULE_ folder and what its files say about it."""

    folder: str  # "neuronxcc-<version>/MODULE_<key>"
    compiler_version: str
    state: str  # complete | incomplete | failed | locked | invalid
    files: dict[str, FileInfo] = field(default_factory=dict)
    detail: str = ""

    @property
    def hlo_file(self) -> str | None:
        return next((name for name in HLO_FILES if name in self.files), None)


def is_safe_folder(folder: object) -> bool:
    """True for `neuronxcc-<version>/MODULE_<key>` with only [A-Za-z0-9._+-] in each part."""
    if not isinstance(folder, str):
        return False
    parts = folder.split("/")
    return (
        len(parts) == 2
        and parts[0].startswith(VERSION_PREFIX)
        and parts[1].startswith(MODULE_PREFIX)
        and all(_FOLDER_PART.match(p) for p in parts)
    )


def _unsafe_entry(folder: str, version: str) -> CacheEntry:
    shown = ascii(folder)[1:-1]
    return CacheEntry(
        shown,
        ascii(version)[1:-1],
        INVALID,
        detail="folder name is not printable ASCII letters, digits, '.', '_', '+' or '-'; skipped",
    )


def _classify(files: dict[str, FileInfo]) -> tuple[str, str]:
    locks = sorted(n for n in files if n.endswith(".lock"))
    if locks:
        return LOCKED, f"{', '.join(locks)} present: a compile is running, or crashed"
    if LOG_FILE in files and NEFF_FILE not in files:
        return FAILED, "model.log without model.neff"
    if DONE_FILE not in files:
        return INCOMPLETE, "no model.done"
    missing = [n for n in (NEFF_FILE,) if n not in files]
    if not any(n in files for n in HLO_FILES):
        missing.append(HLO_FILES[0])
    if missing:
        return INVALID, f"model.done but no {' or '.join(missing)}"
    return "complete", ""


def scan_cache(source: CacheSource, versions: list[str] | None = None) -> list[CacheEntry]:
    """Every MODULE_ entry under the root's `neuronxcc-*` folders, sorted by folder name."""
    try:
        found = versions or [d for d in source.list_dirs("") if d.startswith(VERSION_PREFIX)]
        entries = []
        for version_dir in sorted(found):
            version = version_dir[len(VERSION_PREFIX) :]
            for module in source.list_dirs(version_dir):
                if not module.startswith(MODULE_PREFIX):
                    continue
                folder = f"{version_dir}/{module}"
                if not is_safe_folder(folder):
                    entries.append(_unsafe_entry(folder, version))
                    continue
                files = source.list_files(folder)
                state, detail = _classify(files)
                entries.append(CacheEntry(folder, version, state, files, detail))
    except OSError as exc:
        raise NeuronCacheError(f"cannot read the Neuron cache at {source.url}: {exc}") from exc
    return entries


# --- import ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryResult:
    folder: str
    status: str  # one of STATUSES
    detail: str = ""
    hlo_key: str | None = None
    target: str | None = None
    flags: tuple[str, ...] = ()
    bytes: int = 0  # bytes added to the store (or that would be, with --dry-run)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "flags": list(self.flags)}


@dataclass(frozen=True)
class ImportReport:
    source: str
    dry_run: bool
    entries: tuple[EntryResult, ...]

    def count(self, status: str) -> int:
        return sum(1 for e in self.entries if e.status == status)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "counts": {s: self.count(s) for s in STATUSES},
            "bytes": self.bytes,
            "entries": [e.to_json() for e in self.entries],
        }


@dataclass(frozen=True)
class _Prepared:
    """A complete entry read and keyed, ready to store."""

    entry: CacheEntry
    target: str
    flags: tuple[str, ...]
    hlo: bytes
    neff: bytes
    key: str
    record: CompilationRecord


def _read_flags(source: CacheSource, entry: CacheEntry) -> tuple[list[str], str]:
    if FLAGS_FILE not in entry.files:
        return [], ""
    text = source.read(f"{entry.folder}/{FLAGS_FILE}").decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{FLAGS_FILE} is not JSON: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{FLAGS_FILE} is not a JSON list of strings")
    return value, text


def _prepare(source: CacheSource, entry: CacheEntry, default_target: str) -> _Prepared:
    """Read one complete entry; ValueError / NeffError say why it cannot be imported."""
    original_flags, flags_text = _read_flags(source, entry)
    target, flags = split_target(original_flags)
    target = target or default_target
    if target not in NEURON_TARGETS:
        raise ValueError(f"unknown --target {target!r} in {FLAGS_FILE}")
    hlo_file = entry.hlo_file
    assert hlo_file is not None
    raw = source.read(f"{entry.folder}/{hlo_file}")
    try:
        hlo = hlo_digest_bytes(raw)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{hlo_file} is not a serialized HloModuleProto: {exc}") from None
    neff = source.read(f"{entry.folder}/{NEFF_FILE}")
    header = NeffHeader.parse(neff)
    hlo_digest, neff_digest = Digest.of_bytes(hlo), Digest.of_bytes(neff)
    key = hlo_key(
        hlo_digest=str(hlo_digest),
        compiler=COMPILER,
        compiler_version=entry.compiler_version,
        flags=flags,
        target=target,
    )
    record = CompilationRecord(
        hlo_key=key,
        status=RunStatus.OK,
        compiler=COMPILER,
        compiler_version=entry.compiler_version,
        flags=tuple(flags),
        target=target,
        hlo_digest=str(hlo_digest),
        executable_digest=str(neff_digest),
        executable_format="neff",
        log_digest=None,
        seconds=0.0,
        error=None,
        reason=None,
        created_at=time.time(),  # when it entered the store (gc's grace period counts)
        provenance={
            "source": PROVENANCE_SOURCE,
            "folder": entry.folder,
            "hlo_file": hlo_file,
            "compile_flags": original_flags,
            "compile_flags_text": flags_text,
            "neff_mtime": entry.files[NEFF_FILE].mtime,
            "neff": {"name": header.name, "uuid": header.uuid, "version": header.version},
        },
    )
    return _Prepared(entry, target, flags, hlo, neff, key, record)


def _present(store: Store, prepared: _Prepared) -> bool:
    """The store already holds this compilation (same HLO key, same NEFF, blobs present)."""
    exe = prepared.record.executable_digest
    assert exe is not None
    rows = store.compilations(hlo_key=prepared.key, ok_only=True)
    return any(
        store.backend.has(Digest.parse(row.hlo_digest)) and store.backend.has(Digest.parse(exe))
        for row in rows
        if row.executable_digest == exe
    )


def _store(store: Store, prepared: _Prepared) -> int:
    """Blobs first, then the record blob, then its index row. Returns the new HLO and NEFF
    bytes (the small record is not counted, so a dry run's figure is the same)."""
    added = 0
    for data, kind in ((prepared.hlo, "hlo"), (prepared.neff, "executable")):
        put = store.put_bytes(data, kind=kind)
        added += put.size if put.created else 0
    store.record_compilation(prepared.record)
    return added


def _would_add(store: Store, prepared: _Prepared, seen: set[Digest]) -> int:
    added = 0
    for data in (prepared.hlo, prepared.neff):
        digest = Digest.of_bytes(data)
        if digest not in seen and not store.backend.has(digest):
            added += len(data)
        seen.add(digest)
    return added


def _failure_detail(source: CacheSource, entry: CacheEntry, fallback: str) -> str:
    """The triaged cause of a failed entry, from its model.log."""
    if LOG_FILE not in entry.files:
        return fallback
    try:
        log = source.read(f"{entry.folder}/{LOG_FILE}").decode("utf-8", "replace")
    except OSError:
        return fallback
    found = triage(log, None)
    if found.cause == "unknown":
        return fallback
    code = f"[{found.code}] " if found.code else ""
    return f"{code}{found.summary}; {found.suggestion}"


def import_neuron_cache(
    store: Store,
    path: str,
    *,
    dry_run: bool = False,
    default_target: str = DEFAULT_TARGET,
) -> ImportReport:
    """Import every complete entry of the cache at `path`; report the others."""
    if default_target not in NEURON_TARGETS:
        raise NeuronCacheError(
            f"unknown default target {default_target!r}; choose one of {NEURON_TARGETS}"
        )
    source, versions = open_cache_source(path)
    results: list[EntryResult] = []
    seen: set[Digest] = set()  # blobs a dry run already counted
    for entry in scan_cache(source, versions):
        if entry.state == FAILED:
            detail = _failure_detail(source, entry, entry.detail)
            results.append(EntryResult(entry.folder, FAILED, detail))
            continue
        if entry.state != "complete":
            results.append(EntryResult(entry.folder, entry.state, entry.detail))
            continue
        try:
            prepared = _prepare(source, entry, default_target)
        except (ValueError, NeffError, OSError) as exc:
            status = FAILED if LOG_FILE in entry.files else INVALID
            results.append(EntryResult(entry.folder, status, str(exc)))
            continue
        base = EntryResult(
            entry.folder, IMPORTED, "", prepared.key, prepared.target, prepared.flags
        )
        if _present(store, prepared):
            results.append(replace(base, status=PRESENT))
        elif dry_run:
            results.append(replace(base, bytes=_would_add(store, prepared, seen)))
        else:
            results.append(replace(base, bytes=_store(store, prepared)))
    return ImportReport(source.url, dry_run, tuple(results))


# --- export ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedEntry:
    folder: str
    hlo_key: str
    status: str  # written | present
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ExportReport:
    ref: str
    path: str
    entries: tuple[ExportedEntry, ...]
    skipped: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "path": self.path,
            "entries": [e.to_json() for e in self.entries],
            "skipped": list(self.skipped),
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class _ExportItem:
    folder: str
    hlo_key: str
    hlo_file: str
    flags_text: str
    hlo_digest: str
    neff_digest: str


def _provenance(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _item(
    *,
    hlo_key_: str,
    version: str,
    target: str,
    flags: Iterable[str],
    hlo_digest: str,
    neff_digest: str,
    provenance: dict[str, Any],
) -> _ExportItem:
    folder = provenance.get("folder") if provenance.get("source") == PROVENANCE_SOURCE else None
    if not is_safe_folder(folder):
        folder = f"{VERSION_PREFIX}{version}/{MODULE_PREFIX}{Digest.parse(hlo_key_).hex[:20]}"
        provenance = {}
    text = provenance.get("compile_flags_text")
    if not isinstance(text, str) or not text:
        text = json.dumps([f"--target={target}", *flags])
    hlo_file = provenance.get("hlo_file")
    if hlo_file not in HLO_FILES:
        hlo_file = HLO_FILES[0]
    return _ExportItem(folder, hlo_key_, hlo_file, text, hlo_digest, neff_digest)


def _row_item(row: Compilation) -> _ExportItem:
    assert row.executable_digest is not None
    return _item(
        hlo_key_=row.hlo_key,
        version=row.compiler_version,
        target=row.target,
        flags=row.flags,
        hlo_digest=row.hlo_digest,
        neff_digest=row.executable_digest,
        provenance=_provenance(row.provenance),
    )


def _export_items(store: Store, ref: str) -> tuple[list[_ExportItem], list[str]]:
    """What to write for REF: a release's NEFF graphs, or compilations by HLO key or record."""
    try:
        digest = store.resolve(ref).digest
    except (ReferenceNotFound, InvalidReference):
        digest = None
    items: list[_ExportItem] = []
    skipped: list[str] = []
    if digest is not None:
        release = store.load_release(digest)
        for g in release.graphs:
            label = f"{g.kind} {g.bucket_label}"
            if g.format != "neff":
                skipped.append(f"{label}: format {g.format}, not a NEFF")
                continue
            rows = store.compilations(hlo_key=g.hlo_key, ok_only=True)
            rows.sort(key=lambda r: r.executable_digest != str(g.executable.digest))
            provenance = _provenance(rows[0].provenance) if rows else {}
            items.append(
                _item(
                    hlo_key_=g.hlo_key,
                    version=g.compiler.version,
                    target=release.target,
                    flags=g.compiler.flags,
                    hlo_digest=str(g.hlo.digest),
                    neff_digest=str(g.executable.digest),
                    provenance=provenance,
                )
            )
        return items, skipped
    rows = store.compilations(hlo_key=ref, ok_only=True)
    if not rows:
        try:
            record = str(store.resolve_blob(ref))
        except (ReferenceNotFound, InvalidReference):
            record = ref
        rows = store.compilations(record_digest=record, ok_only=True)
    for row in rows[:1]:
        if row.executable_format != "neff":
            skipped.append(f"{row.hlo_key}: format {row.executable_format}, not a NEFF")
        else:
            items.append(_row_item(row))
    if not items and not skipped:
        raise ReferenceNotFound(
            f"{ref!r} is neither a release, an HLO key nor a compile record in this store"
        )
    return items, skipped


def export_neuron_cache(store: Store, ref: str, path: str | Path) -> ExportReport:
    """Write REF's NEFF compilations under `path` in the Neuron cache layout (model.done
    last, so a reader never sees a half-written entry as done)."""
    if str(path).startswith("s3://"):
        raise NeuronCacheError(
            "export writes a local folder; copy it to S3 afterwards (aws s3 sync PATH s3://...)"
        )
    root = Path(path).expanduser()
    items, skipped = _export_items(store, ref)
    if not items:
        raise NeuronCacheError(f"{ref}: nothing to export ({'; '.join(skipped)})")
    written: list[ExportedEntry] = []
    seen: set[str] = set()
    for item in items:
        if item.folder in seen:
            continue
        seen.add(item.folder)
        folder = root / item.folder
        neff = store.read_bytes(Digest.parse(item.neff_digest))
        done = folder / DONE_FILE
        if done.is_file() and (folder / NEFF_FILE).is_file():
            if (folder / NEFF_FILE).read_bytes() == neff:
                written.append(ExportedEntry(item.folder, item.hlo_key, "present", 0))
                continue
        hlo = store.read_bytes(Digest.parse(item.hlo_digest))
        folder.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        flags = item.flags_text.encode()
        write_atomic(folder / item.hlo_file, hlo)
        write_atomic(folder / FLAGS_FILE, flags)
        write_atomic(folder / NEFF_FILE, neff)
        write_atomic(done, b"")
        size = len(hlo) + len(flags) + len(neff)
        written.append(ExportedEntry(item.folder, item.hlo_key, "written", size))
    return ExportReport(ref, str(root), tuple(written), tuple(skipped))
