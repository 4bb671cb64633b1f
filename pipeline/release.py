"""Assemble and publish a release manifest per model and target."""

from __future__ import annotations

import datetime as dt
import getpass
import socket
from dataclasses import dataclass

from artifacts.digest import Digest
from artifacts.errors import ReferenceNotFound
from artifacts.manifest import (
    WEIGHTS_KEY_ANNOTATION,
    BlobRef,
    CompilerInfo,
    Graph,
    Provenance,
    Release,
    Source,
)
from artifacts.refs import TagName
from artifacts.store import Store
from pipeline.jobs import CompiledGraph, GraphJob, ModelPlan
from pipeline.sources import raw_config, tokenizer_files
from pipeline.tracers.versions import kiln_version
from pipeline.weights import WeightBlobs


@dataclass(frozen=True)
class Published:
    ref: str
    digest: str
    model: str
    target: str
    unchanged: bool


def release_ref(plan: ModelPlan, target: str, tag: str) -> TagName:
    suffix = f"-{target}" if len(plan.model.targets) > 1 else ""
    return TagName(plan.model.name, f"{tag}{suffix}")


def _ref(digest: str, size: int | None, name: str | None = None) -> BlobRef:
    return BlobRef(Digest.parse(digest), size or 0, name)


def build_release(
    store: Store,
    plan: ModelPlan,
    target: str,
    graphs: dict[GraphJob, CompiledGraph],
    weights: WeightBlobs,
    spec_digest: str,
) -> Release:
    files = []
    for path in tokenizer_files(plan.model):
        put = store.put_bytes(path.read_bytes(), kind="file")
        files.append(BlobRef(put.digest, put.size, path.name))
    entries = []
    for job in sorted(graphs, key=lambda j: (j.graph_kind, j.bucket.batch, j.bucket.seq)):
        c = graphs[job]
        entries.append(
            Graph(
                kind=job.graph_kind,
                bucket=job.bucket_json,
                signature=c.signature,
                hlo=_ref(c.hlo_digest, c.hlo_size),
                executable=_ref(c.executable_digest, c.executable_size),
                format=c.executable_format,
                compiler=CompilerInfo(c.compiler, c.compiler_version, c.flags),
                hlo_key=c.hlo_key,
                compile_seconds=round(c.seconds, 3),
                log=_ref(c.log_digest, c.log_size) if c.log_digest else None,
                direct_key=job.direct_key,
            )
        )
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Release(
        name=plan.model.name,
        target=target,
        source=Source(
            plan.model.task,
            plan.architecture,
            raw_config(plan.model),
            tuple(_ref(digest, size, name) for digest, size, name in weights),
            tuple(files),
        ),
        graphs=tuple(entries),
        provenance=Provenance(
            kiln_version(),
            dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            socket.gethostname(),
            user,
            spec_digest,
        ),
        annotations={WEIGHTS_KEY_ANNOTATION: plan.weights_key, "io.kiln.dtype": plan.model.dtype},
    )


def _content(release: Release) -> dict:  # type: ignore[type-arg]
    value = release.to_json()
    value.pop("provenance")
    for graph in value["graphs"]:
        graph.pop("compile_seconds", None)
    return value


def publish(store: Store, release: Release, ref: TagName, reason: str) -> Published:
    """Store the release and move its tag, unless the tag already holds the same content."""
    try:
        current = store.resolve(str(ref)).digest
        if _content(store.load_release(current)) == _content(release):
            return Published(str(ref), str(current), release.name, release.target, True)
    except ReferenceNotFound:
        pass
    digest = store.put_release(release)
    store.move_tag(ref, digest, reason)
    return Published(str(ref), str(digest), release.name, release.target, False)
