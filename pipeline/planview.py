"""What `kiln plan` reports per graph, tracing direct misses (without storing) for HLO hits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from artifacts.store import Store
from pipeline.jobs import GraphJob, find_compilation, plan_spec
from pipeline.spec import Spec


@dataclass(frozen=True)
class PlanRow:
    job: GraphJob
    status: str  # "direct-hit", "hlo-hit", "compile", "unavailable: ...", "trace-failed: ..."

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
        status: dict[GraphJob, str] = {j: "direct-hit" for j in plan.direct_hits}
        status.update({j: f"unavailable: {m}" for j, m in plan.unavailable.items()})
        misses = plan.misses
        if misses and trace:
            outcome = trace_model(
                store.backend.url, store.index_url, plan.model, misses, None, write=False
            )
            for job, message in outcome.failed:
                status[job] = f"trace-failed: {message}"
            for traced in outcome.traced:
                hit = find_compilation(store, traced.hlo_key, traced.signature)
                status[traced.job] = "hlo-hit" if hit else "compile"
        for job in misses:
            status.setdefault(job, "compile (not traced)" if not trace else "compile")
        rows.extend(PlanRow(j, status[j]) for j in plan.jobs)
    return rows
