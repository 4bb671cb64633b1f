"""Release manifests: what one compiled model release is, as canonical JSON stored as a blob."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from artifacts.digest import Digest, canonical_json
from artifacts.errors import InvalidManifest
from artifacts.refs import NAME_RULE, is_valid_name
from artifacts.targets import EXECUTABLE_FORMATS
from artifacts.validate import Reader

RELEASE_MEDIA_TYPE = "application/vnd.kiln.release.v1+json"
# the release annotation naming its weights key (the index maps it to the weights blob)
WEIGHTS_KEY_ANNOTATION = "io.kiln.weights_key"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BlobRef:
    """A pointer to a blob with its size (and, for files, the name it had)."""

    digest: Digest
    size: int
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": str(self.digest), "size": self.size}
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def read(cls, r: Reader) -> BlobRef:
        return cls(r.digest("digest"), r.integer("size"), r.get("name", str, required=False))


@dataclass(frozen=True)
class CompilerInfo:
    name: str
    version: str
    flags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "flags": list(self.flags)}

    @classmethod
    def read(cls, r: Reader) -> CompilerInfo:
        return cls(r.text("name"), r.text("version"), r.strings("flags"))


@dataclass(frozen=True)
class Graph:
    """One compiled graph of a release: a graph kind at one bucket."""

    kind: str
    bucket: dict[str, int]
    signature: dict[str, Any]
    hlo: BlobRef
    executable: BlobRef
    format: str
    compiler: CompilerInfo
    hlo_key: str
    compile_seconds: float = 0.0
    log: BlobRef | None = None
    direct_key: str | None = None

    @property
    def bucket_label(self) -> str:
        return "x".join(f"{k}{v}" for k, v in sorted(self.bucket.items()))

    @property
    def identity(self) -> tuple[str, str]:
        return (self.kind, self.bucket_label)

    def to_json(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "bucket": dict(self.bucket),
            "signature": self.signature,
            "hlo": self.hlo.to_json(),
            "executable": self.executable.to_json(),
            "format": self.format,
            "compiler": self.compiler.to_json(),
            "hlo_key": self.hlo_key,
            "compile_seconds": self.compile_seconds,
        }
        if self.log is not None:
            out["log"] = self.log.to_json()
        if self.direct_key is not None:
            out["direct_key"] = self.direct_key
        return out

    @classmethod
    def read(cls, r: Reader) -> Graph:
        bucket_reader = r.child("bucket")
        bucket = {}
        for key in bucket_reader.value:
            bucket[key] = bucket_reader.integer(key, minimum=1)
        fmt = r.text("format")
        if fmt not in EXECUTABLE_FORMATS:
            r.fail(f"{r.where}.format", f"must be one of {', '.join(EXECUTABLE_FORMATS)}")
        log = r.child("log", required=False)
        return cls(
            kind=r.text("kind"),
            bucket=bucket,
            signature=r.get("signature", dict),
            hlo=BlobRef.read(r.child("hlo")),
            executable=BlobRef.read(r.child("executable")),
            format=fmt,
            compiler=CompilerInfo.read(r.child("compiler")),
            hlo_key=r.text("hlo_key"),
            compile_seconds=r.number("compile_seconds", required=False) or 0.0,
            log=BlobRef.read(log) if log else None,
            direct_key=r.get("direct_key", str, required=False),
        )


@dataclass(frozen=True)
class Source:
    """What the release was built from: architecture, weights and side files (tokenizer...)."""

    task: str
    architecture_digest: str
    config: dict[str, Any] = field(default_factory=dict)
    weights: tuple[BlobRef, ...] = ()
    files: tuple[BlobRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "architecture_digest": self.architecture_digest,
            "config": self.config,
            "weights": [w.to_json() for w in self.weights],
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def read(cls, r: Reader) -> Source:
        return cls(
            task=r.text("task"),
            architecture_digest=r.text("architecture_digest"),
            config=r.get("config", dict, required=False) or {},
            weights=tuple(BlobRef.read(w) for w in r.items("weights")),
            files=tuple(BlobRef.read(f) for f in r.items("files", required=False)),
        )


@dataclass(frozen=True)
class Provenance:
    kiln_version: str
    created: str
    host: str = ""
    user: str = ""
    spec_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kiln_version": self.kiln_version,
            "created": self.created,
            "host": self.host,
            "user": self.user,
            "spec_digest": self.spec_digest,
        }

    @classmethod
    def read(cls, r: Reader) -> Provenance:
        return cls(
            kiln_version=r.text("kiln_version"),
            created=r.text("created"),
            host=r.get("host", str, required=False) or "",
            user=r.get("user", str, required=False) or "",
            spec_digest=r.get("spec_digest", str, required=False),
        )


@dataclass(frozen=True)
class Release:
    """A compiled model release for one target."""

    name: str
    target: str
    source: Source
    graphs: tuple[Graph, ...]
    provenance: Provenance
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mediaType": RELEASE_MEDIA_TYPE,
            "schemaVersion": SCHEMA_VERSION,
            "name": self.name,
            "target": self.target,
            "source": self.source.to_json(),
            "graphs": [g.to_json() for g in self.graphs],
            "provenance": self.provenance.to_json(),
            "annotations": dict(self.annotations),
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def blob_refs(self) -> Iterator[tuple[str, BlobRef]]:
        """Every blob the release references, with its role."""
        for w in self.source.weights:
            yield "weights", w
        for f in self.source.files:
            yield "file", f
        for g in self.graphs:
            yield "hlo", g.hlo
            yield "executable", g.executable
            if g.log is not None:
                yield "log", g.log

    @property
    def total_size(self) -> int:
        seen: dict[Digest, int] = {ref.digest: ref.size for _, ref in self.blob_refs()}
        return sum(seen.values())

    @classmethod
    def from_json(cls, value: Any, source: str = "manifest") -> Release:
        r = Reader(value, "", source)
        media_type = r.text("mediaType")
        if media_type != RELEASE_MEDIA_TYPE:
            r.fail("mediaType", f"expected {RELEASE_MEDIA_TYPE}, got {media_type!r}")
        version = r.integer("schemaVersion")
        if version > SCHEMA_VERSION:
            r.fail(
                "schemaVersion",
                f"version {version} is newer than this Kiln reads ({SCHEMA_VERSION}); upgrade kiln",
            )
        if version != SCHEMA_VERSION:
            r.fail("schemaVersion", f"unsupported version {version}")
        graphs = tuple(Graph.read(g) for g in r.items("graphs"))
        seen: set[tuple[str, str]] = set()
        for i, g in enumerate(graphs):
            if g.identity in seen:
                r.fail(f"graphs[{i}]", f"duplicate graph {g.kind} {g.bucket_label}")
            seen.add(g.identity)
        annotations = r.get("annotations", dict, required=False) or {}
        name = r.text("name")
        if not is_valid_name(name):
            r.fail("name", f"must be {NAME_RULE}, got {name!r}")
        return cls(
            name=name,
            target=r.text("target"),
            source=Source.read(r.child("source")),
            graphs=graphs,
            provenance=Provenance.read(r.child("provenance")),
            annotations=annotations,
        )

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> Release:
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"{source}: not valid JSON: {exc}") from None
        return cls.from_json(value, source)
