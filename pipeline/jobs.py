"""Graph jobs and what the cache already knows about them (no tracing, no torch)."""

from __future__ import annotations

from typing import Any

from artifacts.digest import Digest
from artifacts.store import Store
from pipeline.planning import (
    CompiledGraph,
    GraphJob,
    ModelPlan,
    compiler_version,
    plan_jobs,
    unavailable_message,
)
from pipeline.spec import ModelSpec, Spec
from pipeline.weights import recorded_weights

__all__ = [
    "CompiledGraph",
    "GraphJob",
    "ModelPlan",
    "compiler_version",
    "find_compilation",
    "lookup_cache",
    "plan_jobs",
    "plan_model",
    "plan_spec",
    "unavailable_message",
]


def plan_model(
    model: ModelSpec, backend: str, store: Store, flags_override: tuple[str, ...] | None
) -> ModelPlan:
    plan = plan_jobs(model, backend, flags_override)
    lookup_cache(store, plan)
    return plan


def plan_spec(
    spec: Spec, store: Store, backend: str = "auto", flags_override: tuple[str, ...] | None = None
) -> list[ModelPlan]:
    return [plan_model(m, backend, store, flags_override) for m in spec.models]


def lookup_cache(store: Store, plan: ModelPlan) -> None:
    """Fill direct hits and the known weights blob from the index (blobs must exist)."""
    entry = store.weights_entry(plan.weights_key)
    if entry is not None:
        plan.weights = recorded_weights(store, entry.digest, entry.size)
    recipes = store.recipes(j.direct_key for j in plan.jobs)
    for job in plan.jobs:
        recipe = recipes.get(job.direct_key)
        if recipe is None or job in plan.unavailable:
            continue
        compiled = find_compilation(store, recipe.hlo_key, recipe.signature)
        if compiled is not None:
            plan.direct_hits[job] = compiled


def find_compilation(store: Store, hlo_key: str, signature: dict[str, Any]) -> CompiledGraph | None:
    """The newest successful compilation of `hlo_key` whose blobs are all still present."""
    for row in store.compilations(hlo_key=hlo_key, ok_only=True):
        digests = [d for d in (row.hlo_digest, row.executable_digest, row.log_digest) if d]
        sizes = store.blob_sizes(digests)
        if any(store.backend.stat(Digest.parse(d)) is None for d in digests):
            continue
        return CompiledGraph(
            hlo_key=hlo_key,
            hlo_digest=row.hlo_digest,
            hlo_size=sizes.get(row.hlo_digest, 0),
            signature=signature,
            executable_digest=row.executable_digest,
            executable_size=sizes.get(row.executable_digest, 0),
            executable_format=row.executable_format,
            compiler=row.compiler,
            compiler_version=row.compiler_version,
            flags=row.flags,
            seconds=row.seconds,
            log_digest=row.log_digest,
            log_size=sizes.get(row.log_digest) if row.log_digest else None,
        )
    return None


def known_failure(store: Store, hlo_key: str) -> str | None:
    """The error of the newest failed compile of `hlo_key`, if no success exists."""
    newest = next(iter(store.compilations(hlo_key=hlo_key)), None)
    return newest.error if newest is not None and not newest.ok else None
