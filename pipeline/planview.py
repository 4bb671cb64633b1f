"""What `kiln plan` reports per graph, tracing direct misses (without storing) for HLO hits."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from artifacts.store import Store
from pipeline.jobs import GraphJob, find_compilation, plan_spec
from pipeline.spec import Spec


class PlanStatus(StrEnum):
    """What `kiln plan` expects of a graph."""

    DIRECT_HIT = "direct-hit"
    HLO_HIT = "hlo-hit"
    COMPILE = "compile"
    UNAVAILABLE = "unavailable"  # its compiler is not installed here
    TRACE_FAILED = "trace-failed"


@dataclass(frozen=True)
class PlanRow:
    job: GraphJob
    kind: PlanStatus
    detail: str = ""  # why it is unavailable or its trace failed; "(not traced)"

    @property
    def status(self) -> str:
        """The kind with its detail, as `kiln plan` prints it ("unavailable: ...")."""
        if not self.detail:
            return self.kind.value
        if self.kind in (PlanStatus.UNAVAILABLE, PlanStatus.TRACE_FAILED):
            return f"{self.kind}: {self.detail}"
        return f"{self.kind} {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.job.model,
            "graph_kind": self.job.graph_kind,
            "bucket": self.job.bucket.to_json(),
            "target": self.job.target,
            "compiler": self.job.compiler,
            "flags": list(self.job.flags),
            "direct_key": self.job.direct_key,
            "status": self.status,
        }


def plan_view(
    store: Store, spec: Spec, backend: str, flags: tuple[str, ...] | None, trace: bool = True
) -> list[PlanRow]:
    from pipeline.tasks import trace_model  # noqa: PLC0415

    rows: list[PlanRow] = []
    for plan in plan_spec(spec, store, backend, flags):
        status = {j: PlanRow(j, PlanStatus.DIRECT_HIT) for j in plan.direct_hits}
        status.update(
            {j: PlanRow(j, PlanStatus.UNAVAILABLE, m) for j, m in plan.unavailable.items()}
        )
        misses = plan.misses
        if misses and trace:
            outcome = trace_model(
                store.backend.url, store.index_url, plan.model, misses, None, write=False
            )
            for job, message in outcome.failed:
                status[job] = PlanRow(job, PlanStatus.TRACE_FAILED, message)
            for traced in outcome.traced:
                hit = find_compilation(store, traced.hlo_key, traced.signature)
                kind = PlanStatus.HLO_HIT if hit else PlanStatus.COMPILE
                status[traced.job] = PlanRow(traced.job, kind)
        for job in misses:
            detail = "" if trace else "(not traced)"
            status.setdefault(job, PlanRow(job, PlanStatus.COMPILE, detail))
        rows.extend(status[j] for j in plan.jobs)
    return rows
