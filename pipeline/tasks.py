"""Work that runs in worker processes: trace a model's graphs; compile one graph.

Each function is top-level (picklable for spawn/Ray), opens the store itself and writes its
blobs and index rows before returning, so the parent only assembles releases.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from artifacts import leases
from artifacts.digest import Digest
from artifacts.diskspace import is_disk_full
from artifacts.records import CompilationRecord, RunStatus
from artifacts.store import Store
from pipeline.compile import get_compiler
from pipeline.compile_budget import PeakRss
from pipeline.errors import CompileError
from pipeline.jobs import CompiledGraph, GraphJob, find_compilation
from pipeline.keys import hlo_key
from pipeline.spec import ModelSpec
from pipeline.trace import hlo_digest_bytes, weight_tensors
from pipeline.triage import triage
from pipeline.weights import WeightBlobs, store_weights


@dataclass(frozen=True)
class TracedJob:
    job: GraphJob
    hlo_digest: str
    hlo_size: int
    hlo_key: str
    signature: dict[str, Any]
    trace_seconds: float


@dataclass(frozen=True)
class TraceOutcome:
    model: str
    traced: tuple[TracedJob, ...] = ()
    failed: tuple[tuple[GraphJob, str], ...] = ()
    weights: WeightBlobs | None = None
    load_seconds: float = 0.0


@dataclass(frozen=True)
class CompileOutcome:
    job: GraphJob
    traced: TracedJob
    compiled: CompiledGraph | None
    error: str | None = None
    log_digest: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    hit: bool = False  # another worker compiled it meanwhile (`compiled` is its result)


@lru_cache(maxsize=4)
def _store(store_url: str, index_url: str) -> Store:
    return Store.open(store_url, index_url)


def _graph_builder(task: str, kind: str):  # type: ignore[no-untyped-def]
    if task == "encoder":
        from pipeline.graphs.encoder import build_encoder_graph  # noqa: PLC0415

        return lambda model, batch, seq: build_encoder_graph(model, batch, seq)
    from pipeline.graphs.causal_lm import build_causal_lm_graphs  # noqa: PLC0415

    return lambda model, batch, seq: build_causal_lm_graphs(model, batch, seq)[kind]


def trace_model(
    store_url: str,
    index_url: str,
    model: ModelSpec,
    jobs: list[GraphJob],
    weights_key: str | None,
    write: bool = True,
) -> TraceOutcome:
    """Trace each distinct (graph kind, bucket) once and key it per target.

    With `weights_key`, also store the weights (every tensor a graph names) as safetensors.
    With write=False (for `kiln plan`), nothing is stored: only the keys are computed.
    """
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.sources import load_model  # noqa: PLC0415
    from pipeline.tracers import get_tracer  # noqa: PLC0415

    store = _store(store_url, index_url) if write or weights_key else None
    start = time.monotonic()
    try:
        loaded = load_model(model)
    except Exception as exc:  # noqa: BLE001 - any load failure fails this model's jobs
        message = f"cannot load model {model.name} from {model.source.describe()}: {exc}"
        return TraceOutcome(model.name, failed=tuple((j, message) for j in jobs))
    load_seconds = time.monotonic() - start
    build = {}
    traced: list[TracedJob] = []
    failed: list[tuple[GraphJob, str]] = []
    weight_names: set[str] = set()
    tensors: dict[str, Any] = {}
    kinds = {(j.graph_kind, j.bucket) for j in jobs}
    if weights_key and not kinds:
        kinds = {(model.graph_kinds[0], model.buckets[0])}
    for kind, bucket in sorted(kinds, key=lambda kb: (kb[0], kb[1].batch, kb[1].seq)):
        t0 = time.monotonic()
        try:
            module, inputs, outputs = _graph_builder(model.task, kind)(
                loaded, bucket.batch, bucket.seq
            )
            if not tensors:
                tensors = weight_tensors(module)
            graph = get_tracer(model.tracer)(module, inputs, outputs)
        except Exception as exc:  # noqa: BLE001 - a failed trace fails only its graphs
            for job in jobs:
                if (job.graph_kind, job.bucket) == (kind, bucket):
                    failed.append((job, f"trace failed: {type(exc).__name__}: {exc}"))
            continue
        weight_names.update(graph.signature.weight_names)
        hlo = hlo_digest_bytes(graph.hlo_proto)
        if store is not None and write:
            put = store.put_bytes(hlo, kind="hlo")
            digest, size = str(put.digest), put.size
        else:
            digest, size = str(Digest.of_bytes(hlo)), len(hlo)
        build[(kind, bucket)] = (digest, size, graph.signature.to_json(), time.monotonic() - t0)
    for job in jobs:
        if (job.graph_kind, job.bucket) not in build:
            continue
        digest, size, signature, seconds = build[(job.graph_kind, job.bucket)]
        key = hlo_key(
            hlo_digest=digest,
            compiler=job.compiler,
            compiler_version=job.compiler_version,
            flags=job.flags,
            target=job.target,
        )
        traced.append(TracedJob(job, digest, size, key, signature, seconds))
    weights = None
    if weights_key and store is not None and weight_names:
        try:
            weights = store_weights(
                store, weights_key, {n: tensors[n] for n in sorted(weight_names)}
            )
        except Exception as exc:  # noqa: BLE001 - no weights: the model is not released
            message = f"cannot store the weights of {model.name}: {type(exc).__name__}: {exc}"
            failed.extend((t.job, message) for t in traced)
            traced = []
    return TraceOutcome(model.name, tuple(traced), tuple(failed), weights, load_seconds)


def compile_graph(
    store_url: str, index_url: str, traced: TracedJob, timeout: float
) -> CompileOutcome:
    """Compile one traced graph, unless another worker sharing the index does.

    Holds the lease `compile:<hlo key>` while compiling (heartbeated; $KILN_LEASE_TTL). While
    another live worker holds it, waits for that worker's compile record: its success is an
    HLO hit (`hit=True`), its failure this graph's failure. A crashed holder's lease expires
    and is taken over.
    """
    store = _store(store_url, index_url)
    key, owner, ttl = f"compile:{traced.hlo_key}", leases.new_owner(), leases.lease_ttl()
    seen = store.last_compilation_id(traced.hlo_key)
    done = leases.acquire_or_wait(
        store, key, owner, ttl, lambda: _compiled_elsewhere(store, traced, seen)
    )
    if done is not None:
        return done
    with leases.keep(store, key, owner, ttl):
        done = _compiled_elsewhere(store, traced, seen)  # finished just before we acquired
        return done if done is not None else _compile(store, traced, timeout)


def _compiled_elsewhere(store: Store, traced: TracedJob, after_id: int) -> CompileOutcome | None:
    """A success of the key (an HLO hit), or a failure recorded since `after_id`, or None."""
    hit = find_compilation(store, traced.hlo_key, traced.signature)
    if hit is not None:
        return CompileOutcome(traced.job, traced, hit, log_digest=hit.log_digest, hit=True)
    row = store.failure_since(traced.hlo_key, after_id)
    if row is None:
        return None
    error = f"{row.error or 'failed'} (compiled by another worker at the same time)"
    return CompileOutcome(traced.job, traced, None, error, row.log_digest)


def _compile(store: Store, traced: TracedJob, timeout: float) -> CompileOutcome:
    """Compile one traced graph; store executable, log and a compile record (even on failure)."""
    job = traced.job
    hlo = store.read_bytes(Digest.parse(traced.hlo_digest))
    compiler = get_compiler(job.compiler)
    start = time.monotonic()
    result = error = None
    reason = None
    returncode: int | None = None
    with tempfile.TemporaryDirectory(prefix="kiln-compile-") as workdir, PeakRss() as peak:
        try:
            result = compiler.compile(hlo, job.target, job.flags, Path(workdir), timeout)
            log = result.log
        except CompileError as exc:
            error, reason, log = str(exc), exc.reason, exc.log
            returncode = exc.returncode
        except Exception as exc:  # noqa: BLE001 - record any compiler crash as a failure
            if is_disk_full(exc, (workdir,)):
                raise  # not the graph's fault: the run stops, nothing is recorded
            error, reason, log = f"{type(exc).__name__}: {exc}", "exit", ""
    seconds = time.monotonic() - start
    log_put = store.put_bytes(log.encode(), kind="log")
    exe_put = store.put_bytes(result.executable, kind="executable") if result else None
    triaged = None
    if result is None and job.compiler == "neuronx-cc":
        triaged = triage(log, returncode, reason).to_json()
    store.record_compilation(
        CompilationRecord(
            hlo_key=traced.hlo_key,
            status=RunStatus.OK if result else RunStatus.FAILED,
            compiler=job.compiler,
            compiler_version=result.compiler_version if result else job.compiler_version,
            flags=job.flags,
            target=job.target,
            hlo_digest=traced.hlo_digest,
            executable_digest=str(exe_put.digest) if exe_put else None,
            executable_format=result.format if result else None,
            log_digest=str(log_put.digest),
            seconds=seconds,
            error=error,
            reason=reason,
            created_at=time.time(),
            provenance={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                # what memory estimates of later compiles of this architecture go by
                "peak_rss_bytes": peak.peak,
                "architecture": job.architecture,
                "graph_kind": job.graph_kind,
                "bucket": job.bucket_json,
            },
            recipe={"direct_key": job.direct_key, "signature": traced.signature},
            triage=triaged,
        )
    )
    compiled = None
    if result is not None and exe_put is not None:
        compiled = CompiledGraph(
            hlo_key=traced.hlo_key,
            hlo_digest=traced.hlo_digest,
            hlo_size=traced.hlo_size,
            signature=traced.signature,
            executable_digest=str(exe_put.digest),
            executable_size=exe_put.size,
            executable_format=result.format,
            compiler=job.compiler,
            compiler_version=result.compiler_version,
            flags=job.flags,
            seconds=seconds,
            log_digest=str(log_put.digest),
            log_size=log_put.size,
        )
    return CompileOutcome(job, traced, compiled, error, str(log_put.digest), seconds)
