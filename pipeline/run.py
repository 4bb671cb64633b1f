"""`kiln compile`: plan, trace what the direct key misses, compile what the HLO key misses,
publish releases, record the run. Work runs in a process pool (spawn) or another executor."""

from __future__ import annotations

import getpass
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from artifacts.diskspace import disk_full_error, is_disk_full
from artifacts.leases import pid_alive
from artifacts.records import ItemStatus, RunRecord, RunStatus
from artifacts.store import Store
from pipeline.compile_budget import compile_estimate, human
from pipeline.executors import Executor
from pipeline.jobs import CompiledGraph, GraphJob, ModelPlan, find_compilation, known_failure
from pipeline.release import Published, build_release, publish, release_ref
from pipeline.spec import Spec
from pipeline.tasks import CompileOutcome, TracedJob, TraceOutcome, compile_graph, trace_model

HIT_DIRECT = ItemStatus.HIT_DIRECT
HIT_HLO = ItemStatus.HIT_HLO
COMPILED = ItemStatus.COMPILED
FAILED = ItemStatus.FAILED


@dataclass
class ItemResult:
    job: GraphJob
    status: ItemStatus
    compiled: CompiledGraph | None = None
    hlo_key: str | None = None
    trace_seconds: float = 0.0
    compile_seconds: float = 0.0
    log_digest: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.job.model,
            "graph_kind": self.job.graph_kind,
            "bucket": self.job.bucket.label,
            "target": self.job.target,
            "status": self.status,
            "hit_kind": self.status if self.status in (HIT_DIRECT, HIT_HLO) else None,
            "direct_key": self.job.direct_key,
            "hlo_key": self.hlo_key,
            "trace_seconds": round(self.trace_seconds, 4),
            "compile_seconds": round(self.compile_seconds, 4),
            "log_digest": self.log_digest,
            "error": self.error,
        }

    @classmethod
    def traced_failure(cls, traced: TracedJob, error: str) -> ItemResult:
        """A graph that was traced but did not compile (or was not let compile)."""
        return cls(
            traced.job,
            FAILED,
            hlo_key=traced.hlo_key,
            trace_seconds=traced.trace_seconds,
            error=error,
        )


@dataclass
class RunReport:
    run_id: str
    items: list[ItemResult] = field(default_factory=list)
    releases: list[Published] = field(default_factory=list)
    not_released: list[str] = field(default_factory=list)
    seconds: float = 0.0
    weights_stored: int = 0  # models whose weights this run read and streamed into the store

    def count(self, status: ItemStatus) -> int:
        return sum(1 for i in self.items if i.status == status)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "jobs": len(self.items),
            "compiled": self.count(COMPILED),
            "direct_hits": self.count(HIT_DIRECT),
            "hlo_hits": self.count(HIT_HLO),
            "failed": self.count(FAILED),
            "seconds": round(self.seconds, 3),
            "releases": [
                {"ref": p.ref, "digest": p.digest, "target": p.target, "unchanged": p.unchanged}
                for p in self.releases
            ],
            "not_released": self.not_released,
            "weights_stored": self.weights_stored,
            "items": [i.to_json() for i in self.items],
        }


Progress = Callable[[ItemResult, int, int], None]


@dataclass(frozen=True)
class RunOptions:
    tag: str | None = None
    timeout: float = 3600.0
    retry_failed: bool = True
    publish: bool = True
    max_memory: int | None = None  # bytes the compiles in flight may use together (estimated)


class Runner:
    """Drives one run over an executor; every graph ends as exactly one ItemResult."""

    def __init__(
        self,
        store: Store,
        spec: Spec,
        plans: list[ModelPlan],
        executor: Executor,
        options: RunOptions,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.plans = plans
        self.executor = executor
        self.options = options
        self.progress = progress
        self.report = RunReport(run_id=uuid.uuid4().hex)
        self.total = sum(len(p.jobs) for p in plans)
        self.urls = (store.backend.url, store.index_url)
        # hlo_key -> traced jobs waiting on a compile of the same HLO already in flight
        # (e.g. two models of one architecture in a spec): compile once, share the result.
        self._waiting: dict[str, list[TracedJob]] = {}
        # --max-memory admission: compiles waiting for budget, estimates of those in flight
        self._queued: list[tuple[TracedJob, int]] = []
        self._in_flight: dict[str, int] = {}
        self._pending: dict[Future, tuple[str, Any]] = {}

    def _finish(self, item: ItemResult) -> None:
        self.report.items.append(item)
        if self.progress:
            self.progress(item, len(self.report.items), self.total)

    def run(self) -> RunReport:
        """Run every job. If the run stops early (Ctrl-C, SIGTERM, a full disk, a bug), its
        record is marked `interrupted` before the error propagates; a full disk is raised as
        one DiskFull line naming the filesystem."""
        start = time.monotonic()
        started_at = time.time()
        self._record_run_start(started_at)
        try:
            claim_reused(self.store, self.plans)
            self._run()
            self.report.seconds = time.monotonic() - start
            self._record_run_end(started_at)
        except BaseException as exc:
            self.report.seconds = time.monotonic() - start
            self._record_interrupted(started_at)
            if is_disk_full(exc, self._local_paths()):
                raise disk_full_error(exc, self._local_paths(), "compiling") from exc
            raise
        return self.report

    def _local_paths(self) -> list[str]:
        """Where this run writes on local disks: the store, its SQLite index, the temp dir."""
        paths = [tempfile.gettempdir()]
        root = getattr(self.store.backend, "root", None)
        if root is not None:
            paths.insert(0, str(root))
        index = self.store.index_path
        if index is not None:
            paths.insert(0, str(index))
        return paths

    def _worker_failed(self, exc: BaseException, what: str) -> str:
        """The error text of a job whose worker raised `exc` (a full disk stops the run)."""
        if is_disk_full(exc, self._local_paths()):
            raise exc
        if isinstance(exc, BrokenProcessPool):
            return (
                f"{what} worker process died (killed by the system, most likely out of memory;"
                " see the dmesg/OOM log), so the pool stopped"
            )
        return f"{what} worker failed: {type(exc).__name__}: {exc}"

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future | None:  # type: ignore[type-arg]
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool:
            return None

    def _run(self) -> None:
        pending = self._pending
        for plan in self.plans:
            for job, message in plan.unavailable.items():
                self._finish(ItemResult(job, FAILED, error=message))
            for job, compiled in plan.direct_hits.items():
                self._finish(ItemResult(job, HIT_DIRECT, compiled, compiled.hlo_key))
            misses = plan.misses
            if misses or (plan.weights is None and len(plan.unavailable) < len(plan.jobs)):
                future = self._submit(
                    trace_model,
                    *self.urls,
                    plan.model,
                    misses,
                    plan.weights_key if plan.weights is None else None,
                )
                if future is None:
                    error = self._worker_failed(BrokenProcessPool(), "trace")
                    for job in misses:
                        self._finish(ItemResult(job, FAILED, error=error))
                    continue
                pending[future] = ("trace", plan)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                kind, payload = pending.pop(future)
                if kind == "trace":
                    self._on_traced(future, payload, pending)
                else:
                    self._on_compiled(future, payload)
        if self.options.publish:
            self._publish()

    def _on_traced(self, future: Future, plan: ModelPlan, pending: dict) -> None:  # type: ignore[type-arg]
        try:
            outcome: TraceOutcome = future.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker fails this model's jobs only
            error = self._worker_failed(exc, "trace")
            for job in plan.misses:
                self._finish(ItemResult(job, FAILED, error=error))
            return
        if outcome.weights is not None:
            plan.weights = outcome.weights
            self.report.weights_stored += 1
        for job, message in outcome.failed:
            self._finish(ItemResult(job, FAILED, error=message))
        for traced in outcome.traced:
            if traced.hlo_key in self._waiting:
                self._waiting[traced.hlo_key].append(traced)
                continue
            hit = find_compilation(self.store, traced.hlo_key, traced.signature)
            if hit is not None:
                self._hlo_hit(traced, hit)
                continue
            if not self.options.retry_failed:
                failure = known_failure(self.store, traced.hlo_key)
                if failure is not None:
                    self._finish(
                        ItemResult.traced_failure(
                            traced, f"known failure (--no-retry-failed): {failure}"
                        )
                    )
                    continue
            self._waiting[traced.hlo_key] = []
            self._admit(traced)

    def _admit(self, traced: TracedJob) -> None:
        """Submit a compile now, or queue it until the memory budget has room for it; a graph
        whose estimate exceeds the whole budget fails with a one-line error."""
        budget = self.options.max_memory
        if budget is None:
            self._submit_compile(traced, 0)
            return
        estimate = compile_estimate(self.store, traced.job, traced.hlo_size, traced.signature)
        if estimate > budget:
            job = traced.job
            error = (
                f"model {job.model} graph {job.graph_kind} {job.bucket.label} ({job.target}):"
                f" estimated compile memory {human(estimate)} exceeds --max-memory"
                f" {human(budget)}"
            )
            self._finish(ItemResult.traced_failure(traced, error))
            self._release_waiting(traced, error)
            return
        self._queued.append((traced, estimate))
        self._drain_queue()

    def _drain_queue(self) -> None:
        budget = self.options.max_memory or 0
        while self._queued:
            traced, estimate = self._queued[0]
            if self._in_flight and sum(self._in_flight.values()) + estimate > budget:
                return
            self._queued.pop(0)
            self._submit_compile(traced, estimate)

    def _submit_compile(self, traced: TracedJob, estimate: int) -> None:
        future = self._submit(compile_graph, *self.urls, traced, self.options.timeout)
        if future is None:
            self._compile_failed(traced, self._worker_failed(BrokenProcessPool(), "compile"))
            return
        self._pending[future] = ("compile", traced)
        self._in_flight[traced.hlo_key] = estimate

    def _hlo_hit(self, traced: TracedJob, hit: CompiledGraph) -> None:
        self.store.touch_blobs(_compiled_blobs(hit))  # gc spares them until the release
        self.store.record_recipe(
            traced.job.direct_key, traced.hlo_key, traced.hlo_digest, traced.signature
        )
        self._finish(ItemResult(traced.job, HIT_HLO, hit, traced.hlo_key, traced.trace_seconds))

    def _release_waiting(self, traced: TracedJob, error: str | None) -> None:
        """Finish the jobs that waited on `traced`'s compile: HLO hits, or failed with it."""
        for waiter in self._waiting.pop(traced.hlo_key, []):
            hit = None if error else find_compilation(self.store, waiter.hlo_key, waiter.signature)
            if hit is not None:
                self._hlo_hit(waiter, hit)
                continue
            self._finish(
                ItemResult.traced_failure(
                    waiter, f"same HLO as {traced.job.label}, whose compile failed: {error}"
                )
            )

    def _on_compiled(self, future: Future, traced: TracedJob) -> None:  # type: ignore[type-arg]
        self._in_flight.pop(traced.hlo_key, None)
        try:
            self._record_compiled(future, traced)
        finally:
            self._drain_queue()

    def _record_compiled(self, future: Future, traced: TracedJob) -> None:  # type: ignore[type-arg]
        try:
            outcome: CompileOutcome = future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the worker was killed
            self._compile_failed(traced, self._worker_failed(exc, "compile"))
            return
        if outcome.hit and outcome.compiled is not None:  # another worker compiled it
            self._hlo_hit(traced, outcome.compiled)
            self._release_waiting(traced, None)
            return
        self._finish(
            ItemResult(
                traced.job,
                COMPILED if outcome.compiled else FAILED,
                outcome.compiled,
                traced.hlo_key,
                traced.trace_seconds,
                outcome.seconds,
                outcome.log_digest,
                outcome.error,
            )
        )
        self._release_waiting(traced, None if outcome.compiled else outcome.error or "failed")

    def _compile_failed(self, traced: TracedJob, error: str) -> None:
        self._finish(ItemResult.traced_failure(traced, error))
        self._release_waiting(traced, error)

    def _publish(self) -> None:
        by_job = {i.job: i for i in self.report.items}
        for plan in self.plans:
            for target in plan.model.targets:
                jobs = [j for j in plan.jobs if j.target == target]
                items = [by_job[j] for j in jobs if j in by_job]
                ref = release_ref(plan, target, self.options.tag or plan.model.tag)
                failed = [i for i in items if i.compiled is None]
                if failed or len(items) != len(jobs) or plan.weights is None:
                    self.report.not_released.append(
                        f"{ref}: {len(failed) or len(jobs) - len(items)} of {len(jobs)} graphs"
                        " failed"
                        if failed or len(items) != len(jobs)
                        else f"{ref}: no weights"
                    )
                    continue
                release = build_release(
                    self.store,
                    plan,
                    target,
                    {i.job: i.compiled for i in items},  # type: ignore[misc]
                    plan.weights,
                    str(self.spec.digest),
                )
                self.report.releases.append(
                    publish(self.store, release, ref, f"kiln compile {self.spec.path}")
                )

    def _record_run_start(self, started_at: float) -> None:
        run = self._record(started_at, None, RunStatus.RUNNING, {"pid": os.getpid()})
        self.store.record_run_started(run, pid_alive)  # the pid: for runs that die unrecorded

    def _record_interrupted(self, started_at: float) -> None:
        """Best effort: the run's record (else just its row) says `interrupted`."""
        try:
            self._record_run_end(started_at, RunStatus.INTERRUPTED)
            return
        except Exception:  # noqa: BLE001, S110 - e.g. the disk is full: try the row alone
            pass
        try:
            self.store.mark_run_interrupted(self.report.run_id, time.time(), self._summary())
        except Exception as exc:  # noqa: BLE001 - the next run on this host marks it
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            sys.stderr.write(
                f"kiln: cannot mark run {self.report.run_id} interrupted now ({reason});"
                " the next `kiln compile` on this host will\n"
            )

    def _summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.report.to_json().items() if k != "items"}

    def _record_run_end(self, started_at: float, status: RunStatus | None = None) -> None:
        ok = RunStatus.OK if self.report.ok else RunStatus.FAILED
        items = tuple(i.to_json() for i in self.report.items)
        self.store.record_run(
            self._record(started_at, time.time(), status or ok, self._summary(), items)
        )

    def _record(
        self,
        started_at: float,
        finished_at: float | None,
        status: RunStatus,
        summary: dict[str, Any],
        items: tuple[dict[str, Any], ...] = (),
    ) -> RunRecord:
        return RunRecord(
            id=self.report.run_id,
            started_at=started_at,
            finished_at=finished_at,
            status=status,
            spec_digest=str(self.spec.digest),
            host=socket.gethostname(),
            user=_user(),
            summary=summary,
            items=items,
        )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _compiled_blobs(compiled: CompiledGraph) -> list[str]:
    return [
        d for d in (compiled.hlo_digest, compiled.executable_digest, compiled.log_digest) if d
    ]


def _plan_blobs(plan: ModelPlan) -> list[str]:
    blobs = [digest for digest, _, _ in plan.weights or ()]
    for compiled in plan.direct_hits.values():
        blobs += _compiled_blobs(compiled)
    return blobs


def claim_reused(store: Store, plans: list[ModelPlan]) -> None:
    """Refresh the age of the stored blobs a run reuses (direct hits, known weights) so a
    concurrent `kiln gc` spares them; what gc took already is made again instead."""
    reused = [d for plan in plans for d in _plan_blobs(plan)]
    missing = set(store.touch_blobs(reused)) if reused else set()
    if not missing:
        return
    for plan in plans:
        if plan.weights is not None and any(d in missing for d, _, _ in plan.weights):
            plan.weights = None
        for job, compiled in list(plan.direct_hits.items()):
            if missing & set(_compiled_blobs(compiled)):
                del plan.direct_hits[job]
